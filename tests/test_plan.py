"""CompressionPlan: JSON, old formats, resolving groups by name, composing, and the TVM pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm

import tvm_compress
from tvm_compress.data import fashion_mnist
from tvm_compress.errors import UserError
from tvm_compress.graph.channel_groups import analyze_channel_groups
from tvm_compress.passes.crop_channels import crop_channels
from tvm_compress.plan import CompressionPlan, Provenance, apply_plans, crop_plan_by_name
from tvm_compress.quant.config import QuantConfig


@pytest.fixture(scope="module")
def resnet():
    return tvm_compress.load("zoo:fmnist_resnet")


@pytest.fixture(scope="module")
def images():
    x, y = fashion_mnist("test")
    return x[:64], y[:64]


def _half_crop(mod: tvm.IRModule) -> dict[int, list[int]]:
    """Keep the first half of every prunable group's channels."""
    return {g.id: list(range(g.size // 2)) for g in analyze_channel_groups(mod) if g.prunable}


def test_json_round_trip_and_validation() -> None:
    plan = CompressionPlan(crop={"layer1.conv": (3, 1, 2)}, quant=QuantConfig(),
                           channel_bits={"layer1.conv": (8, 0, 4)},
                           provenance=Provenance("ajpq", budget="size=0.2", seed=3,
                                                 metrics={"acc": 0.9}))
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan
    assert again.crop["layer1.conv"] == (1, 2, 3)  # stored sorted
    with pytest.raises(UserError, match="no channels"):
        CompressionPlan(crop={"a": ()})
    with pytest.raises(UserError, match="2-8"):
        CompressionPlan(quant=QuantConfig(), channel_bits={"a": (9,)})
    with pytest.raises(UserError, match="need a quantization"):
        CompressionPlan(channel_bits={"a": (8,)})
    data = plan.to_dict()
    data["version"] = 99
    with pytest.raises(UserError, match="regenerate"):
        CompressionPlan.from_json(json.dumps(data))


def test_bad_files_fail_with_one_line(tmp_path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match="not found"):
        CompressionPlan.load(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="not JSON"):
        CompressionPlan.load(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="regenerate"):
        CompressionPlan.load(other)


def test_old_formats_load(tmp_path) -> None:
    config = QuantConfig(calibration="percentile")
    (tmp_path / "config.json").write_text(config.to_json())
    plan = CompressionPlan.load(tmp_path / "config.json")
    assert plan.quant == config and not plan.crops
    old_precrop = {"model": "m", "budget": "macs=0.5", "scorer": "synflow", "allocation": "score",
                   "crop": {"2": [0, 1]}, "groups": [{"id": 2, "producers": ["conv_a"]}],
                   "achieved": {}, "dense": {}}
    (tmp_path / "plan.json").write_text(json.dumps(old_precrop))
    plan = CompressionPlan.load(tmp_path / "plan.json")
    assert plan.crop == {"conv_a": (0, 1)} and plan.method == "precrop"


def test_crop_by_name_matches_crop_by_id(resnet, images) -> None:
    ids = _half_crop(resnet.mod)
    plan = CompressionPlan(crop=crop_plan_by_name(resnet.mod, ids))
    assert plan.crop_ids(resnet.mod) == ids
    cropped = apply_plans(resnet, [plan])
    direct = crop_channels(resnet.mod, ids)
    tvm.ir.assert_structural_equal(cropped.mod, direct)
    assert cropped.layers.total_macs < resnet.layers.total_macs
    wrong = CompressionPlan(crop={"no.such.layer": (0,)})
    with pytest.raises(UserError, match="does not have"):
        wrong.crop_ids(resnet.mod)


def test_plans_compose_crop_then_quantize(resnet, images) -> None:
    from tvm_compress.backend.build import build
    from tvm_compress.runtime.metrics import top1_agreement

    x, _ = images
    calib, _ = fashion_mnist("calib")
    crop = CompressionPlan(crop=crop_plan_by_name(resnet.mod, _half_crop(resnet.mod)),
                           provenance=Provenance("l1"))
    quant = CompressionPlan(quant=QuantConfig(calib_samples=32), provenance=Provenance("q"))
    cropped = apply_plans(resnet, [crop])
    qm = apply_plans(resnet, [crop, quant], calib=calib[:32])
    assert qm.weight_bytes < qm.fp32_weight_bytes / 3  # int8 weights of the cropped model
    ref = build(cropped, target="x86").predict(x)
    out = build(qm.model, target="x86").predict(x)
    assert top1_agreement(out, ref) >= 0.9  # int8 follows the cropped fp32 model
    with pytest.raises(UserError, match="after a quantizing plan"):
        apply_plans(resnet, [quant, crop], calib=calib[:32])
    with pytest.raises(UserError, match="calibration"):
        apply_plans(resnet, [quant])


def test_per_channel_bits_are_applied(resnet) -> None:
    calib, _ = fashion_mnist("calib")
    layer = resnet.layers.names[1]
    n = resnet.layers[layer].out_channels
    bits = tuple([4] * (n // 2) + [8] * (n - n // 2))
    plan = CompressionPlan(quant=QuantConfig(calib_samples=16), channel_bits={layer: bits})
    qm = apply_plans(resnet, [plan], calib=calib[:16])
    scale = qm.weight_params[layer].scale
    plain = apply_plans(resnet, [CompressionPlan(quant=QuantConfig(calib_samples=16))],
                        calib=calib[:16]).weight_params[layer].scale
    # 4-bit channels have a coarser step (~ 127/7 times), 8-bit ones the plain step
    ratio = np.asarray(scale) / np.asarray(plain)
    assert np.all(ratio[: n // 2] > 10) and np.allclose(ratio[n // 2:], 1.0, rtol=1e-5)


def test_tvm_compile_with_our_pipeline_equals_build(resnet, images) -> None:
    from tvm import relax

    from tvm_compress.backend.build import build

    x, _ = images
    calib, _ = fashion_mnist("calib")
    plans = [CompressionPlan(crop=crop_plan_by_name(resnet.mod, _half_crop(resnet.mod))),
             CompressionPlan(quant=QuantConfig(calib_samples=16))]
    target = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2", "num-cores": 2})
    ex = tvm.compile(resnet.mod, target,
                     relax_pipeline=tvm_compress.pipeline(plans, target, calib=calib[:16]))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    ours = build(apply_plans(resnet, plans, calib=calib[:16]).model, target=target)
    for i in range(4):
        got = vm["main"](tvm.runtime.tensor(x[i:i + 1]))
        got = (got if hasattr(got, "numpy") else got[0]).numpy()
        np.testing.assert_array_equal(got, ours.predict(x[i:i + 1]))
    # by name, as compiler users select pipelines
    tvm_compress.register_pipeline()
    named = relax.get_pipeline("tvm_compress", plans=plans[:1], target=target)
    ex2 = tvm.compile(resnet.mod, target, relax_pipeline=named)
    out = relax.VirtualMachine(ex2, tvm.cpu())["main"](tvm.runtime.tensor(x[:1]))
    assert out is not None


def test_precrop_plan_converts(resnet) -> None:
    import torch

    from tvm_compress.tuning.precrop.crop import fresh_model, precrop

    module, example, _ = fresh_model("zoo:fmnist_resnet", seed=0)
    result = precrop(module, example, "macs=0.5", allocation="uniform", seed=0)
    plan = result.plan.to_compression_plan(seed=0)
    cropped = apply_plans(result.dense, [plan])
    tvm.ir.assert_structural_equal(cropped.mod, result.mod)
    assert isinstance(example, torch.Tensor)
