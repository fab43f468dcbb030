"""``--wbits auto``: 7-bit weights on x86 targets with AVX2 and no VNNI (the exact fast u8 x s8
path), 8 elsewhere, and 8 again when the 7-bit build loses accuracy."""

from __future__ import annotations

import json

import pytest

from tvm_compress.backend.schedules.hardware import preferred_weight_bits
from tvm_compress.backend.targets import resolve_target
from tvm_compress.cli import main as cli
from tvm_compress.cli.main import main

QUANTIZE = ["quantize", "zoo:fmnist_vgg", "--target", "x86-avx2", "--limit", "200",
            "--repeat", "0", "--calib-samples", "32"]


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("preset", "bits"), [("x86-avx2", 7), ("x86-avx512", 8),
                                               ("x86-vnni", 8), ("aarch64", 8),
                                               ("aarch64-dotprod", 8)])
def test_preferred_weight_bits_per_target(preset: str, bits: int) -> None:
    assert preferred_weight_bits(resolve_target(preset)) == bits


def test_auto_keeps_seven_bits_when_they_keep_the_accuracy(capsys) -> None:  # noqa: ANN001
    r = _json(capsys, QUANTIZE)
    assert r["config"]["weight"]["bits"] == 7
    choice = r["weight_bits_choice"]
    assert choice["chosen"] == 7 and list(choice["tried"]) == ["7"]
    assert r["quantized"]["accuracy"] >= r["fp32"]["accuracy"] - 0.01
    assert choice["tried"]["7"]["accuracy"] == r["quantized"]["accuracy"]
    assert choice["eight_bit_layers"] == []  # VGG has no depthwise layer
    # 7-bit weights are counted at 7 bits: 7/8 of the 8-bit size plus the int32 biases
    e = _json(capsys, [*QUANTIZE, "--wbits", "8"])
    assert e["config"]["weight"]["bits"] == 8 and "weight_bits_choice" not in e
    assert r["weight_bytes"]["quantized"] < e["weight_bytes"]["quantized"]


def test_auto_falls_back_to_eight_bits_when_seven_lose_accuracy(
        capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The fallback path: the 7-bit build is judged too inaccurate (forced here), the 8-bit build
    is made, and it wins (tolerance forced below zero so that it must)."""
    monkeypatch.setattr(cli, "_seven_bits_keep_accuracy", lambda ref, got: False)
    monkeypatch.setattr(cli, "_BITS_TOLERANCE", -1.0)
    r = _json(capsys, QUANTIZE)
    assert r["config"]["weight"]["bits"] == 8
    assert r["weight_bits_choice"]["chosen"] == 8
    assert sorted(r["weight_bits_choice"]["tried"]) == ["7", "8"]
    assert r["quantized"]["accuracy"] == r["weight_bits_choice"]["tried"]["8"]["accuracy"]


def test_seven_bit_judgement() -> None:
    assert cli._seven_bits_keep_accuracy({"accuracy": 0.90}, {"accuracy": 0.895})
    assert not cli._seven_bits_keep_accuracy({"accuracy": 0.90}, {"accuracy": 0.88})
    assert cli._seven_bits_keep_accuracy({}, {"agreement": 0.995})
    assert not cli._seven_bits_keep_accuracy({}, {"agreement": 0.97})


def test_compile_int8_library_is_quantized_at_the_targets_bits(capsys, tmp_path) -> None:  # noqa: ANN001
    """``compile --int8 -o FILE.so`` quantizes (it used to build fp32 silently)."""
    r = _json(capsys, ["compile", "zoo:fmnist_vgg", "--target", "x86-avx2", "--int8",
                       "-o", str(tmp_path / "m.so")])
    assert r["quantization"]["weight"]["bits"] == 7
    assert r["weight_bytes"] < r["fp32_weight_bytes"] / 3
    assert (tmp_path / "m.so").is_file()


def test_compile_int8_of_a_model_without_data_names_the_fix(capsys, tiny_cnn, tiny_input,
                                                             tmp_path) -> None:  # noqa: ANN001
    from tvm_compress.frontend.importers import export_onnx

    onnx_path = export_onnx(tiny_cnn, tiny_input, tmp_path / "tiny.onnx")
    assert main(["compile", str(onnx_path), "--int8", "-o", str(tmp_path / "m.so")]) == 2
    err = capsys.readouterr().err
    assert "has none: run `tvm-compress quantize MODEL --calib FILE.npz" in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_depthwise_layers_keep_eight_bits_on_avx2() -> None:
    """Structural: on AVX2 without VNNI the auto config is 7 bits with the depthwise layers at 8;
    elsewhere 8 bits and no exceptions; a user's own override of a layer stays."""
    from dataclasses import replace

    import tvm_compress as tc
    from tvm_compress.quant.config import LayerOverride, QuantConfig, at_target_bits

    model = tc.load("zoo:fmnist_mobilenet_v2")
    avx2 = resolve_target("x86-avx2")
    config = at_target_bits(QuantConfig(), avx2, model.layers)
    depthwise = sorted(layer.name for layer in model.layers if layer.kind == "depthwise")
    assert config.weight.bits == 7 and len(depthwise) == 8
    assert dict(config.overrides) == {name: LayerOverride(weight_bits=8) for name in depthwise}
    assert "w8x8" in config.short()
    eight = replace(QuantConfig(), weight=replace(QuantConfig().weight, bits=8))
    assert at_target_bits(QuantConfig(), resolve_target("x86-vnni"), model.layers) == eight
    assert at_target_bits(QuantConfig(), avx2, model.layers, bits=8) == eight
    kept = QuantConfig().with_overrides({depthwise[0]: LayerOverride(fp32=True)})
    assert at_target_bits(kept, avx2, model.layers).override(depthwise[0]) == \
        LayerOverride(fp32=True)


def test_eight_bit_depthwise_is_more_accurate_at_the_same_kernels(
        mobilenet_v2_model, mobilenet_v2_torch, imagenet_photos) -> None:  # noqa: ANN001
    """Numeric, ImageNet MobileNetV2 on the labelled photos: the auto config (depthwise at 8
    bits) is closer to fp32 than every layer at 7 bits, and its depthwise kernels are scheduled
    by the same rules (the fp32-arithmetic kernel takes either weight width at the same cost)."""
    from dataclasses import replace

    import numpy as np
    import torch

    from tvm_compress.backend.build import build
    from tvm_compress.data import real_photos
    from tvm_compress.quant.config import QuantConfig, at_target_bits
    from tvm_compress.quant.quantize import quantize

    images = imagenet_photos[0]
    with torch.inference_mode():
        reference = mobilenet_v2_torch(torch.from_numpy(images)).numpy()
    auto = at_target_bits(QuantConfig(), resolve_target("x86-avx2"), mobilenet_v2_model.layers)
    calib = real_photos("calib", n=16)
    sqnr, rules = {}, {}
    for name, cfg in (("auto", auto), ("all7", replace(auto, overrides=()))):
        compiled = build(quantize(mobilenet_v2_model, cfg, calib, progress=False).model,
                         target="x86-avx2")
        noise = compiled.predict(images) - reference
        sqnr[name] = 10 * np.log10((reference ** 2).sum() / (noise ** 2).sum())
        rules[name] = sorted(k.rule for k in compiled.kernels if "depthwise" in k.name)
    assert rules["auto"] == rules["all7"] and len(rules["auto"]) >= 10
    assert sqnr["auto"] > sqnr["all7"] + 0.5, sqnr


def test_auto_quantize_keeps_the_depthwise_layers_at_eight_bits(
        capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The CLI path: the config written and reported has the depthwise layers at 8 bits (the
    7-bit build is kept here whatever its accuracy, so that the check is deterministic)."""
    import tvm_compress as tc

    monkeypatch.setattr(cli, "_seven_bits_keep_accuracy", lambda ref, got: True)
    r = _json(capsys, ["quantize", "zoo:fmnist_mobilenet_v2", "--target", "x86-avx2",
                       "--limit", "100", "--repeat", "0", "--calib-samples", "32"])
    depthwise = sorted(layer.name for layer in tc.load("zoo:fmnist_mobilenet_v2").layers
                       if layer.kind == "depthwise")
    assert r["config"]["weight"]["bits"] == 7
    assert r["config"]["overrides"] == {name: {"weight_bits": 8} for name in depthwise}
    assert r["weight_bits_choice"]["eight_bit_layers"] == depthwise


class _IslandBlocks:
    """Five depthwise layers, each followed by something else: ReLU6 then a 1x1 conv (integer
    end to end), hardswish, SiLU, a squeeze-and-excitation gate, and a residual add."""

    @staticmethod
    def module():  # noqa: ANN205
        import torch
        from torch import nn
        from torch.nn import functional as F  # noqa: N812

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                c = 16
                self.stem = nn.Conv2d(3, c, 3, padding=1)
                for name in ("dw_relu6", "dw_hswish", "dw_silu", "dw_se", "dw_res"):
                    setattr(self, name, nn.Conv2d(c, c, 3, padding=1, groups=c))
                    setattr(self, "bn_" + name, nn.BatchNorm2d(c))
                    setattr(self, "pw_" + name, nn.Conv2d(c, c, 1))
                self.se_down, self.se_up = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = self.stem(x)
                x = self.pw_dw_relu6(F.relu6(self.bn_dw_relu6(self.dw_relu6(x))))
                x = self.pw_dw_hswish(F.hardswish(self.bn_dw_hswish(self.dw_hswish(x))))
                x = self.pw_dw_silu(F.silu(self.bn_dw_silu(self.dw_silu(x))))
                y = self.bn_dw_se(self.dw_se(x))
                gate = torch.sigmoid(self.se_up(F.relu(self.se_down(y.mean((2, 3), True)))))
                x = self.pw_dw_se(y * gate)
                return self.pw_dw_res(self.bn_dw_res(self.dw_res(x)) + x)

        torch.manual_seed(0)
        return Net().eval()


@pytest.fixture(scope="module")
def island_model():  # noqa: ANN201
    import torch

    from tvm_compress.frontend.importers import from_torch

    return from_torch(_IslandBlocks.module(), torch.randn(1, 3, 24, 24), name="islands")


def test_small_depthwise_layers_feeding_a_float_island_stay_fp32_on_avx2(island_model,
                                                                         monkeypatch) -> None:  # noqa: ANN001
    """Structural: with the module, the auto config keeps fp32 exactly the depthwise layers
    whose output goes through hardswish, SiLU or a gate; ReLU6 and residual ones stay int8 at 8
    bits; large activations, other targets and no module leave the old rule."""
    from tvm_compress.backend.schedules import hardware
    from tvm_compress.quant.config import LayerOverride, QuantConfig, at_target_bits

    avx2 = resolve_target("x86-avx2")
    layers = island_model.layers
    depthwise = sorted(layer.name for layer in layers if layer.kind == "depthwise")
    assert depthwise == ["dw_hswish", "dw_relu6", "dw_res", "dw_se", "dw_silu"]
    expected = {"dw_relu6": 8, "dw_res": 8, "dw_hswish": hardware.FP32,
                "dw_silu": hardware.FP32, "dw_se": hardware.FP32}
    assert hardware.preferred_weight_overrides(avx2, layers, island_model.mod) == expected
    assert hardware.preferred_weight_overrides(avx2, layers) == dict.fromkeys(depthwise, 8)
    assert hardware.preferred_weight_overrides(resolve_target("x86-vnni"), layers,
                                               island_model.mod) == {}
    config = at_target_bits(QuantConfig(), avx2, layers, mod=island_model.mod)
    assert config.override("dw_silu") == LayerOverride(fp32=True)
    assert config.override("dw_relu6") == LayerOverride(weight_bits=8)
    monkeypatch.setattr(hardware, "FLOAT_DEPTHWISE_BYTES", 4 * 16 * 24 * 24 - 1)
    assert hardware.preferred_weight_overrides(avx2, layers, island_model.mod) == \
        dict.fromkeys(depthwise, 8)


def test_float_depthwise_layers_build_fp32_kernels_and_keep_the_accuracy(island_model) -> None:
    """Numeric: the auto build runs fp32 depthwise kernels for the island layers and int8 ones
    for the others, and its outputs are as close to fp32 as the build with every depthwise
    layer int8 (within 1 dB of output SQNR)."""
    import numpy as np

    from tvm_compress.backend.build import build
    from tvm_compress.quant.config import QuantConfig, at_target_bits
    from tvm_compress.quant.quantize import quantize

    avx2 = resolve_target("x86-avx2")
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, 3, 24, 24)).astype("float32")
    xs = rng.standard_normal((8, 3, 24, 24)).astype("float32")
    reference = build(island_model, target="x86-avx2").predict(xs)
    sqnr, rules = {}, {}
    for name, mod in (("auto", island_model.mod), ("int8", None)):
        config = at_target_bits(QuantConfig(calib_samples=16), avx2, island_model.layers,
                                mod=mod)
        compiled = build(quantize(island_model, config, calib, progress=False).model,
                         target="x86-avx2")
        noise = compiled.predict(xs) - reference
        sqnr[name] = 10 * np.log10((reference ** 2).sum() / (noise ** 2).sum())
        rules[name] = sorted(k.rule for k in compiled.kernels if "depthwise" in k.name)
    assert rules["int8"] == ["depthwise_nchwc_int8"] * 5, rules
    assert sorted(rules["auto"]) == ["depthwise_nchwc"] * 3 + ["depthwise_nchwc_int8"] * 2, rules
    assert sqnr["auto"] > sqnr["int8"] - 1.0 and sqnr["auto"] > 20, sqnr
