"""Broken inputs through the CLI: one line on stderr, no traceback, exit 2 for input problems and
exit 1 (with the traceback in a log file) for failures inside TVM or our passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_compress.cli.main import main

RNG = np.random.default_rng(0)


def _conv_relu(dims: list, *, weight: np.ndarray | None = None, act: str = "Relu"
               ) -> onnx.ModelProto:
    w = weight if weight is not None else RNG.standard_normal((4, 3, 3, 3)).astype("float32")
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node(act, ["c"], ["y"], name="act0")]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(model: onnx.ModelProto, path: Path, **kwargs) -> str:
    onnx.save(model, str(path), **kwargs)
    return str(path)


def _quantized(path: Path) -> str:
    """An already-quantized model as onnxruntime's dynamic quantization writes it:
    DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul by the scales."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = RNG.integers(0, 255, (4, 3, 3, 3)).astype("uint8")
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.uint8(128), "w_zp"),
             numpy_helper.from_array(np.float32(0.02), "w_scale")]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["image"], ["x_q", "x_scale", "x_zp"],
                         name="quant_in"),
        helper.make_node("ConvInteger", ["x_q", "w_q", "x_zp", "w_zp"], ["acc"],
                         name="conv_int", pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["x_scale", "w_scale"], ["scale"], name="scale"),
        helper.make_node("Mul", ["acc_f", "scale"], ["y"], name="rescale"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def _fixed_reshape(path: Path) -> str:
    """Open height and width, but a Reshape to 1x192 that only an 8x8 input fits."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    shape = numpy_helper.from_array(np.array([1, 192], "int64"), "shape")
    node = helper.make_node("Reshape", ["image", "shape"], ["y"], name="flatten")
    graph = helper.make_graph([node], "g", [x], [y], [shape])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _run(capfd, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capfd.readouterr().err
    assert "Traceback" not in err and '  File "' not in err, err
    return code, err


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    good = _conv_relu([1, 3, 8, 8])
    data = good.SerializeToString()
    (tmp / "cut.onnx").write_bytes(data[: len(data) // 2])
    (tmp / "text.onnx").write_text("name,value\nthis is a csv file, not ONNX\n" * 20)
    onnx.save(_conv_relu([1, 3, 8, 8]), str(tmp / "ext.onnx"), save_as_external_data=True,
              location="ext.onnx.data", size_threshold=0)
    (tmp / "ext.onnx.data").unlink()
    nan_w = np.ones((4, 3, 3, 3), "float32")
    nan_w[1, 2, 0, 0] = np.inf
    dyn = _save(_conv_relu(["N", 3, "H", "W"]), tmp / "dyn.onnx")
    return [
        (["inspect", str(tmp / "cut.onnx")], "truncated or not ONNX"),
        (["inspect", str(tmp / "text.onnx")], "is not a valid ONNX model"),
        (["inspect", str(tmp / "ext.onnx")], "external file 'ext.onnx.data', which is missing"),
        (["inspect", _save(_conv_relu([1, 3, 8, 8], act="Celu"), tmp / "celu.onnx")],
         "operator Celu (node 'act0') is not supported by the TVM ONNX importer"),
        (["inspect", dyn], "dynamic dimension 2 ('H')"),
        (["compile", dyn, "-o", str(tmp / "x.so")], "pin it with --input-shape image:"),
        (["inspect", dyn, "--input-shape", "1x3x8"], "has rank 3 but input 'image' is Nx3xHxW"),
        (["inspect", dyn, "--input-shape", "pixels:1x3x8x8"],
         "has no input 'pixels'; its inputs are: image Nx3xHxW"),
        (["inspect", dyn, "--input-shape", "1x3xeightx8"], "expected dimensions like"),
        (["inspect", _fixed_reshape(tmp / "reshape.onnx"), "--input-shape", "1x3x4x4"],
         "ONNX Runtime cannot run the model with inputs image:1x3x4x4 (Reshape node 'flatten'"),
        (["inspect", _save(_conv_relu([1, 3, 8, 8], weight=nan_w), tmp / "nan.onnx")],
         "weight 'w' (used by Conv node 'conv0') has 1 NaN/Inf value(s)"),
        (["quantize", _save(good, tmp / "good.onnx")], "has no built-in calibration data; pass "
                                                       "--calib FILE.npz"),
        (["eval", str(tmp / "good.onnx")], "has no built-in evaluation data; pass --data"),
    ]


def test_input_problems_exit_2_with_one_line(capfd, tmp_path):
    for argv, message in _cases(tmp_path):
        code, err = _run(capfd, argv)
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert lines[-1].startswith("error: ") and message in lines[-1], (argv, err)


def test_input_problem_names_the_file(capfd, tmp_path):
    path = _save(_conv_relu(["N", 3, "H", "W"]), tmp_path / "named.onnx")
    code, err = _run(capfd, ["inspect", path])
    assert code == 2 and f"error: {path}: input 'image'" in err


def test_already_quantized_model_imports_or_says_what_is_unsupported(capfd, tmp_path):
    code, err = _run(capfd, ["inspect", _quantized(tmp_path / "q.onnx"), "--json"])
    if code == 2:  # no converter yet: the line names the operator and the node
        assert "operator ConvInteger (node 'conv_int')" in err or \
            "operator DynamicQuantizeLinear (node 'quant_in')" in err
    else:
        assert code == 0, err


def test_internal_failure_one_line_stage_model_and_log(capfd, tmp_path, monkeypatch):
    import tvm

    def broken_compile(*_args, **_kwargs):
        raise RuntimeError("simulated failure inside tvm.compile\nsecond line of the message")

    monkeypatch.setenv("TVM_COMPRESS_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(tvm, "compile", broken_compile)
    model = _save(_conv_relu([1, 3, 8, 8]), tmp_path / "ok.onnx")
    code, err = _run(capfd, ["compile", model, "-o", str(tmp_path / "ok.so")])
    line = err.strip().splitlines()[-1]
    assert code == 1
    assert line.startswith(f"error: internal failure in stage 'build' of model {model}: "
                           "RuntimeError: simulated failure inside tvm.compile (traceback in ")
    assert "second line" not in err
    logs = list((tmp_path / "logs").glob("*-compile-*.log"))
    assert len(logs) == 1 and str(logs[0]) in line
    text = logs[0].read_text()
    assert "Traceback" in text and "broken_compile" in text and "stage: build" in text


@pytest.mark.parametrize("argv_tail", [["--input-shape", "a:1x4", "--input-shape", "1x4"],
                                       ["--input-shape", "a:1x4", "--input-shape", "a:1x4"]])
def test_input_shape_flag_misuse(capfd, tmp_path, argv_tail):
    path = _save(_conv_relu([1, 3, 8, 8]), tmp_path / "m.onnx")
    code, err = _run(capfd, ["inspect", path, *argv_tail])
    assert code == 2 and "--input-shape" in err.strip().splitlines()[-1]


def test_importer_failure_names_the_operator_and_stays_quiet(capfd, tmp_path, monkeypatch):
    from tvm.relax.frontend.onnx import onnx_frontend

    def broken(*_args, **_kwargs):
        raise ValueError("simulated converter failure")

    monkeypatch.setenv("TVM_COMPRESS_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(onnx_frontend.Relu, "_impl_v13", classmethod(broken))
    model = _save(_conv_relu([1, 3, 8, 8]), tmp_path / "relu.onnx")
    code, err = _run(capfd, ["inspect", model])
    assert code == 1 and len(err.strip().splitlines()) == 1  # TVM's own prints go to the log
    assert err.strip().startswith(
        f"error: internal failure in stage 'import' of model {model}: RuntimeError: TVM's ONNX "
        "importer failed on a Relu node: simulated converter failure (traceback in ")
