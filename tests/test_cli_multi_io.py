"""A model with two inputs and two outputs through inspect, compile, eval, bench and quantize;
pinned shapes from --input-shape; quantize with only --calib (held-out agreement / SQNR)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tvm

from tvm_compress.cli.main import main


class TwoInTwoOut(torch.nn.Module):
    """An image and a mask in; a dense map and class scores out."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, 4, 1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, img: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.a(img) + self.b(mask))
        return self.head(f), self.fc(f.mean((2, 3)))


@pytest.fixture(scope="module")
def two_io(tmp_path_factory):
    """The ONNX file (batch, height and width dynamic) and a 12-sample .npz for it."""
    tmp = tmp_path_factory.mktemp("two_io")
    torch.manual_seed(0)
    dyn = {0: "N", 2: "H", 3: "W"}
    torch.onnx.export(TwoInTwoOut().eval(), (torch.randn(1, 3, 16, 16), torch.randn(1, 1, 16, 16)),
                      str(tmp / "m.onnx"), dynamo=False, input_names=["img", "mask"],
                      output_names=["seg", "cls"], dynamic_axes={"img": dyn, "mask": dyn})
    rng = np.random.default_rng(0)
    np.savez(tmp / "c.npz", img=rng.standard_normal((12, 3, 16, 16)).astype("float32"),
             mask=rng.standard_normal((12, 1, 16, 16)).astype("float32"))
    return tmp


SHAPES = ["--input-shape", "img:1x3x16x16", "--input-shape", "mask:1x1x16x16"]


def _json(capsys, argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_lists_inputs_outputs_and_notes(capsys, two_io):
    out = _json(capsys, ["inspect", str(two_io / "m.onnx"), *SHAPES])
    assert [(i["name"], i["shape"]) for i in out["inputs"]] == [("img", [1, 3, 16, 16]),
                                                               ("mask", [1, 1, 16, 16])]
    assert out["outputs"] == ["seg", "cls"]
    assert [x["name"] for x in out["layers"]] == ["a", "b", "head", "fc"]
    assert "input 'img' Nx3xHxW pinned to 1x3x16x16 (--input-shape)" in out["notes"]
    assert out["notes"][-1].endswith("over 2 output(s)")


def test_missing_shape_for_one_input_is_named(capsys, two_io):
    assert main(["inspect", str(two_io / "m.onnx"), "--input-shape", "img:1x3x16x16"]) == 2
    assert "input 'mask' has a dynamic dimension 2 ('H')" in capsys.readouterr().err


def test_compile_library_runs_both_inputs_and_outputs(capsys, two_io, tmp_path):
    from tvm import relax

    lib = tmp_path / "m.so"
    out = _json(capsys, ["compile", str(two_io / "m.onnx"), *SHAPES, "-o", str(lib)])
    assert len(out["inputs"]) == 2 and out["outputs"] == ["seg", "cls"]
    with np.load(two_io / "c.npz") as npz:
        feed = {k: npz[k][:1] for k in ("img", "mask")}
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(feed["img"]), tvm.runtime.tensor(feed["mask"]))
    session = ort.InferenceSession(str(two_io / "m.onnx"), providers=["CPUExecutionProvider"])
    for g, w in zip(got, session.run(None, feed), strict=True):
        np.testing.assert_allclose(g.numpy(), w, atol=1e-5)


def test_eval_and_bench_compare_every_output(capsys, two_io):
    out = _json(capsys, ["eval", str(two_io / "m.onnx"), *SHAPES, "--data",
                         str(two_io / "c.npz"), "--repeat", "2"])
    assert out["samples"] == 12 and [o["name"] for o in out["outputs"]] == ["seg", "cls"]
    assert all(o["max_abs_diff"] < 1e-4 for o in out["outputs"])
    bench = _json(capsys, ["bench", str(two_io / "m.onnx"), *SHAPES, "--repeat", "2"])
    assert set(bench["max_abs_diff_per_output"]) == {"seg", "cls"}
    assert bench["max_abs_diff"]["tvm_vs_onnxruntime"] < 1e-4


def test_data_file_missing_an_input_is_named(capsys, two_io, tmp_path):
    np.savez(tmp_path / "img_only.npz", img=np.zeros((2, 3, 16, 16), "float32"))
    assert main(["eval", str(two_io / "m.onnx"), *SHAPES, "--data",
                 str(tmp_path / "img_only.npz")]) == 2
    assert "lacks array(s) mask" in capsys.readouterr().err


def test_quantize_with_only_calibration_data_evaluates_on_held_out_samples(capsys, two_io):
    out = _json(capsys, ["quantize", str(two_io / "m.onnx"), *SHAPES, "--calib",
                         str(two_io / "c.npz"), "--calib-samples", "8", "--repeat", "0"])
    assert out["evaluation"] == ("calibrated on samples 0-7 of --calib, evaluated on the 4 "
                                 "held-out samples")
    q = out["quantized"]
    assert q["samples"] == 4 and len(q["outputs"]) == 2
    assert 15.0 < q["sqnr_db"] < 80.0  # int8: close to fp32, not identical
    assert out["fp32_layers"] == [] and out["weight_bytes"]["quantized"] < \
        out["weight_bytes"]["fp32"]


def test_bundle_of_a_two_input_model_is_refused_with_the_fix(capsys, two_io, tmp_path):
    assert main(["compile", str(two_io / "m.onnx"), *SHAPES, "-o", str(tmp_path / "bundle")]) == 2
    assert "compile it with -o FILE.so" in capsys.readouterr().err
