"""ONNX QDQ import (realized as integer kernels) and export, both checked against ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm
from tvm import relax

from tvm_compress.backend.targets import resolve_target
from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import export_onnx, from_onnx, from_torch
from tvm_compress.graph.dataflow import bindings, op_name
from tvm_compress.passes.expose_tensors import ExposeTensors, binding_positions
from tvm_compress.quant.config import QuantConfig, QuantSpec
from tvm_compress.quant.onnx_qdq import export_qdq_onnx, from_onnx_qdq, qdq_onnx_model
from tvm_compress.quant.quantize import float_layers, quantize

SHAPE = (1, 3, 16, 16)


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE[1:])).astype("float32")


def _session(model: str | Path | onnx.ModelProto, *, fused: bool = True,
             optimized_path: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    # Exact u8 x s8 products: without it, AVX2 machines lacking VNNI saturate in int16.
    opts.add_session_config_entry("session.x64quantprecision", "1")
    if not fused:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _compile(mod: tvm.IRModule):  # noqa: ANN202
    """``run(x) -> [outputs]``. Unscheduled on purpose: these tests check import / export
    semantics, the int8 kernels have their own tests."""
    vm = relax.VirtualMachine(tvm.compile(mod, target=resolve_target("x86")), tvm.cpu())

    def run(x: np.ndarray) -> list[np.ndarray]:
        out = vm["main"](tvm.runtime.tensor(x))
        return [out.numpy()] if isinstance(out, tvm.runtime.Tensor) else [o.numpy() for o in out]

    return run


def _int_convs(mod) -> list[relax.Call]:  # noqa: ANN001
    return [b.value for b in bindings(mod["main"]) if op_name(b.value) == "relax.nn.conv2d"
            and str(b.value.args[0].ty.dtype) in ("int8", "uint8", "int16")
            and str(b.value.ty.dtype) == "int32"]


@pytest.fixture
def ort_qdq_path(tiny_cnn, tmp_path: Path) -> Path:  # noqa: ANN001
    """TinyCNN quantized by ORT's quantize_static (QDQ, u8 activations, s8 per-channel)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32 = export_onnx(tiny_cnn, torch.zeros(SHAPE), tmp_path / "tiny.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x[None]} for x in _inputs(8, 1)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    out = tmp_path / "tiny_qdq.onnx"
    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


# ------------------------------------------------------------------------------------ import


def test_import_realizes_every_conv_as_integer_kernel(ort_qdq_path: Path) -> None:
    model = from_onnx_qdq(ort_qdq_path)
    assert float_layers(model.mod) == []
    assert len(_int_convs(model.mod)) == 3
    assert model.layers.names == from_onnx(ort_qdq_path.with_name("tiny.onnx")).layers.names
    assert "realized 4 of 4 layers" in model.notes[-1]


def test_import_keeps_weight_dequantize(ort_qdq_path: Path) -> None:
    """Before realization every layer still reads dequantize(int8 constant) (not folded)."""
    mod = from_onnx_qdq(ort_qdq_path, realize=False).mod
    values = {b.var: b.value for b in bindings(mod["main"])}
    layers = [b.value for b in bindings(mod["main"])
              if op_name(b.value) in ("relax.nn.conv2d", "relax.matmul")]
    assert len(layers) == 4
    for call in layers:
        weight = values.get(call.args[1], call.args[1])
        assert op_name(weight) == "relax.dequantize"
        assert str(weight.args[0].ty.dtype) == "int8"


def test_imported_model_matches_onnxruntime(ort_qdq_path: Path) -> None:
    compiled = _compile(from_onnx_qdq(ort_qdq_path).mod)
    fused, reference = _session(ort_qdq_path), _session(ort_qdq_path, fused=False)
    out_scale = next(i for i in onnx.load(ort_qdq_path).graph.initializer
                     if i.name == "output_scale").float_data[0]
    for x in _inputs(4, 7):
        ours = compiled(x[None])[0]
        for sess in (fused, reference):
            assert np.abs(ours - sess.run(None, {"input": x[None]})[0]).max() <= \
                1.01 * out_scale


def test_import_rejects_a_float_model(ort_qdq_path: Path) -> None:
    with pytest.raises(UserError, match="not a QDQ model"):
        from_onnx_qdq(ort_qdq_path.with_name("tiny.onnx"))


# ------------------------------------------------------------------------------------ export


CONFIGS = {
    "default": QuantConfig(calib_samples=8),
    "per_tensor_weights": QuantConfig(weight=QuantSpec(8, "symmetric", "per_tensor"),
                                      calib_samples=8),
    # int8 narrow range [-127, 127]: Q is followed by a Clip and the ReLU stays, so ORT keeps
    # some layers in fp32; the numbers must still agree.
    "symmetric_activations": QuantConfig(activation=QuantSpec(8, "symmetric"), calib_samples=8),
}


def _quantize(tiny_cnn, config: QuantConfig):  # noqa: ANN001, ANN202
    return quantize(from_torch(tiny_cnn, torch.zeros(SHAPE)), config, _inputs(8, 1),
                    progress=False)


@pytest.fixture(params=list(CONFIGS))
def quantized_any(request, tiny_cnn):  # noqa: ANN001, ANN201
    return _quantize(tiny_cnn, CONFIGS[request.param])


@pytest.fixture
def quantized_tiny(tiny_cnn):  # noqa: ANN001, ANN201
    return _quantize(tiny_cnn, CONFIGS["default"])


def test_export_runs_in_onnxruntime_like_our_simulation(quantized_any, tmp_path: Path
                                                         ) -> None:  # noqa: ANN001
    quantized_tiny = quantized_any
    path = export_qdq_onnx(quantized_tiny, tmp_path / "q.onnx")
    optimized = tmp_path / "q_ort.onnx"
    sess = _session(path, optimized_path=optimized)
    # ORT fused DQ -> Conv -> Q into integer kernels: the export has its QDQ pattern.
    fused_ops = [n.op_type for n in onnx.load(optimized).graph.node]
    if quantized_tiny.config.activation.scheme == "asymmetric":
        assert fused_ops.count("QLinearConv") == 3 and "Conv" not in fused_ops
    sim = _compile(quantized_tiny.simulated)
    for x in _inputs(3, 11):
        ours, theirs = sim(x[None])[0], sess.run(None, {"input": x[None]})[0]
        np.testing.assert_allclose(theirs, ours, atol=1e-3 * np.abs(ours).max())


def test_exported_int8_tensors_match_our_realized_module(quantized_tiny, tmp_path: Path
                                                         ) -> None:  # noqa: ANN001
    path = export_qdq_onnx(quantized_tiny, tmp_path / "q.onnx", expose_points=True)
    names = [o.name for o in onnx.load(path).graph.output][1:]
    assert names and all(n.startswith("q_") for n in names)
    mod = quantized_tiny.model.mod
    by_name = {b.var.name: b.var for b in bindings(mod["main"])}
    exposed = ExposeTensors(binding_positions(mod["main"], [by_name[n] for n in names]))(mod)
    real = _compile(exposed)
    sess = _session(path)
    for x in _inputs(2, 13):
        ours, theirs = real(x[None])[1:], sess.run(None, {"input": x[None]})[1:]
        for name, a, b in zip(names, ours, theirs, strict=True):
            diff = np.abs(a.astype(int) - b.astype(int)).max()
            assert diff <= 1, f"{name}: {diff} LSB"


def test_export_then_import_round_trips(quantized_tiny, tmp_path: Path) -> None:  # noqa: ANN001
    path = export_qdq_onnx(quantized_tiny, tmp_path / "q.onnx")
    back = from_onnx_qdq(path)
    assert float_layers(back.mod) == []
    assert len(_int_convs(back.mod)) == len(_int_convs(quantized_tiny.model.mod)) == 3
    ours, theirs = _compile(quantized_tiny.model.mod), _compile(back.mod)
    for x in _inputs(2, 17):
        np.testing.assert_allclose(theirs(x[None])[0], ours(x[None])[0], rtol=0, atol=1e-5)


def test_export_names_an_unsupported_op() -> None:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    with bb.function("main", [x]):
        out = bb.emit(relax.op.nn.gelu(x))
        bb.emit_func_output(out)
    with pytest.raises(UserError, match=r"relax\.nn\.gelu"):
        qdq_onnx_model(bb.get())


def test_export_rejects_unknown_exposed_tensor(quantized_tiny) -> None:  # noqa: ANN001
    with pytest.raises(UserError, match="q_nowhere"):
        qdq_onnx_model(quantized_tiny.simulated, expose=["q_nowhere"])


def test_export_rejects_the_realized_module(quantized_tiny) -> None:  # noqa: ANN001
    with pytest.raises(UserError, match="simulated"):
        qdq_onnx_model(quantized_tiny.model.mod)


def test_ort_quantize_static_calibrates_a_static_batch(tiny_cnn, tmp_path: Path) -> None:
    """A batch-4 model is calibrated in batches of 4 (5 samples: one batch, the rest dropped)
    and the QDQ model it returns runs at batch 4 and stays close to fp32."""
    from tvm_compress.quant.ort_quant import ort_quantize_static

    x = _inputs(4, 1)
    fp32 = onnx.load(str(export_onnx(tiny_cnn, x, tmp_path / "b4.onnx")))
    qdq = ort_quantize_static(fp32, _inputs(5, 2))
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) > 0
    ref = _session(fp32).run(None, {fp32.graph.input[0].name: x})[0]
    out = _session(qdq).run(None, {qdq.graph.input[0].name: x})[0]
    assert out.shape == ref.shape == (4, 10)
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()
