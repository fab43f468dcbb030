"""CLI: every command's --json output, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm

from tvm_compress.cli.main import main
from tvm_compress.frontend.importers import export_onnx


@pytest.fixture
def tiny_onnx(tiny_cnn, tiny_input, tmp_path):
    return export_onnx(tiny_cnn, tiny_input, tmp_path / "tiny.onnx")


def _run_json(capsys, argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json(capsys, tiny_onnx):
    out = _run_json(capsys, ["inspect", str(tiny_onnx)])
    assert [x["name"] for x in out["layers"]] == ["stem.0", "dw.0", "pw.0", "head"]
    assert out["total_macs"] == sum(x["macs"] for x in out["layers"])
    assert out["weight_bytes"] > 0


def test_inspect_list(capsys):
    out = _run_json(capsys, ["inspect", "--list"])
    assert "mobilenet_v2" in out["zoo"] and "fmnist_resnet" in out["zoo"]


def test_compile_writes_a_loadable_library(capsys, tiny_onnx, tiny_input, tiny_cnn, tmp_path):
    import torch
    from tvm import relax

    lib = tmp_path / "out" / "tiny.so"
    out = _run_json(capsys, ["compile", str(tiny_onnx), "--target", "x86", "-o", str(lib)])
    assert out["library_bytes"] == lib.stat().st_size
    assert json.loads(lib.with_suffix(".json").read_text())["input"]["shape"] == [1, 3, 16, 16]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(tiny_input)).numpy()
    expected = tiny_cnn(torch.from_numpy(tiny_input)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_eval_with_npz(capsys, tiny_onnx, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((5, 3, 16, 16)).astype("float32")
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(5))
    out = _run_json(capsys, ["eval", str(tiny_onnx), "--data", str(tmp_path / "d.npz"),
                             "--repeat", "3"])
    assert out["samples"] == 5 and out["reference"] == "onnxruntime"
    assert out["agreement"] == 1.0 and out["max_abs_diff"] < 1e-4
    assert 0.0 <= out["accuracy"] <= 1.0 and out["latency"]["median_ms"] > 0


def test_bench_json_reports_all_three_runtimes_from_onnx(capsys, tiny_onnx):
    out = _run_json(capsys, ["bench", str(tiny_onnx), "--repeat", "5"])
    assert out["ratio_to_onnxruntime"]["onnxruntime"] == 1.0
    assert out["tvm"]["median_ms"] > 0 and out["max_abs_diff"]["tvm_vs_onnxruntime"] < 1e-4
    assert "pytorch" not in out  # an ONNX file has no torch module to time


@pytest.mark.parametrize("argv, message", [
    (["inspect", "/no/such/model.onnx"], "model file not found"),
    (["inspect", "zoo:resnet9000"], "unknown zoo model 'resnet9000'; valid names: zoo:"),
    (["compile", "zoo:mobilenet_v2", "--target", "riscv", "-o", "x.so"],
     "unknown target 'riscv'; valid presets: aarch64"),
    (["inspect"], "inspect needs a MODEL"),
])
def test_bad_input_exit_code_2_and_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_eval_bad_data_file(capsys, tiny_onnx, tmp_path):
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((1, 3, 16, 16), "float32"))
    assert main(["eval", str(tiny_onnx), "--data", str(tmp_path / "bad.npz")]) == 2
    assert "has no 'images' array" in capsys.readouterr().err
    np.savez(tmp_path / "wrong.npz", images=np.zeros((1, 3, 8, 8), "float32"))
    assert main(["eval", str(tiny_onnx), "--data", str(tmp_path / "wrong.npz")]) == 2
    assert "model input 'input' expects (3, 16, 16) per sample" in capsys.readouterr().err
