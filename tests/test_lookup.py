"""Lookup tables for float islands of integer models (backend/schedules/lookup.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tvm
from conftest import relax_op_names
from tvm import relax

from tvm_compress.backend.schedules import lookup
from tvm_compress.backend.schedules.hardware import host_cpu

HOST = tvm.target.Target({"kind": "llvm", **host_cpu(),
                          "num-cores": 2})
SHAPE = (1, 2, 4, 4, 8)  # 256 elements: every 8-bit value once


def _const(value, dtype: str) -> relax.Expr:  # noqa: ANN001
    return relax.const(np.asarray(value, dtype), dtype)


def _island(q_dtype: str = "uint8", *, end: str = "quantize", scale=0.05,  # noqa: ANN001
            leaves: int = 1, ops: str = "hardswish") -> tvm.IRModule:
    """``dequantize(q) -> hardswish (or relu) -> quantize / mean`` on a packed tensor, the zero
    point as a packed array (as ``PackChannels`` leaves it)."""
    bb = relax.BlockBuilder()
    qs = [relax.Var(f"q{i}", relax.TensorType(SHAPE, q_dtype)) for i in range(leaves)]
    zp = -5 if q_dtype == "int8" else 3
    with bb.function("main", qs):
        with bb.dataflow():
            dqs = [bb.emit(relax.op.dequantize(q, _const(scale, "float32"),
                                               _const(np.full(8, zp), q_dtype), axis=-1))
                   for q in qs]
            x = dqs[0] if leaves == 1 else bb.emit(relax.op.add(dqs[0], dqs[1]))
            if ops == "hardswish":
                clipped = bb.emit(relax.op.minimum(
                    bb.emit(relax.op.maximum(bb.emit(relax.op.add(x, _const(3.0, "float32"))),
                                             _const(0.0, "float32"))), _const(6.0, "float32")))
            if ops == "hardswish_clip":  # ONNX HardSwish: clip with scalar (IntImm) bounds
                clipped = bb.emit(relax.op.clip(bb.emit(relax.op.add(x, _const(3.0, "float32"))),
                                                0, 6))
            if ops.startswith("hardswish"):
                y = bb.emit(relax.op.divide(bb.emit(relax.op.multiply(x, clipped)),
                                            _const(np.full(SHAPE[1:], 6.0), "float32")))
            else:
                y = bb.emit(relax.op.nn.relu(x))
            if end == "quantize":
                out = bb.emit(relax.op.quantize(y, _const(0.03, "float32"),
                                                _const(np.full(8, 10), "uint8"), axis=-1,
                                                out_dtype="uint8"))
            else:
                out = bb.emit(relax.op.mean(y, axis=[2, 3], keepdims=True))
            result = bb.emit_output(out)
        bb.emit_func_output(result)
    return bb.get()


AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})


def _tables(mod: tvm.IRModule, target: tvm.target.Target = HOST) -> tvm.IRModule:
    with target:
        return lookup.lookup_tables(mod)


def _run(mod: tvm.IRModule, *inputs: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(x) for x in inputs)).numpy()


def _every_value(dtype: str) -> np.ndarray:
    return lookup._domain(dtype).reshape(SHAPE)


@pytest.mark.parametrize("q_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("end", ["quantize", "mean"])
@pytest.mark.parametrize("ops", ["hardswish", "hardswish_clip"])
def test_island_becomes_table_with_the_same_values(q_dtype: str, end: str, ops: str) -> None:
    mod = _island(q_dtype, end=end, ops=ops)
    # float32 tables are made for targets narrower than AVX-512 (lookup.float_tables)
    rewritten = _tables(mod, HOST if end == "quantize" else AVX2)
    ops = relax_op_names(rewritten)
    assert not ops & {"relax.dequantize", "relax.divide", "relax.quantize"}, ops
    tables = [f for _, f in rewritten.functions_items()
              if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get(lookup.LOOKUP_ATTR)]
    assert len(tables) == 1
    table_dtype = str(tables[0].params[1].ty.dtype)
    assert table_dtype == ("uint8" if end == "quantize" else "float32")
    x = _every_value(q_dtype)
    expected = _run(mod, x)
    got = _run(rewritten, x)
    np.testing.assert_array_equal(got, expected)
    if end == "quantize":  # hardswish is not the identity: the table does something
        assert len(np.unique(got)) > 20


def test_float_islands_stay_float_on_avx512() -> None:
    mod = _island("uint8", end="mean", ops="hardswish")
    assert lookup.float_tables(AVX2) and not lookup.float_tables(AVX512)
    assert "relax.dequantize" in relax_op_names(_tables(mod, AVX512))
    assert "relax.dequantize" not in relax_op_names(_tables(mod, AVX2))
    quantized = _tables(_island("uint8", end="quantize", ops="hardswish"), AVX512)
    assert "relax.dequantize" not in relax_op_names(quantized)  # 8-bit tables everywhere


@pytest.mark.parametrize("kind", ["per-channel scale", "two inputs", "one op"])
def test_islands_a_table_cannot_hold_or_not_worth_one_are_left(kind: str) -> None:
    mod = {"per-channel scale": lambda: _island(scale=np.linspace(0.01, 0.05, 8)),
           "two inputs": lambda: _island(leaves=2),
           "one op": lambda: _island(ops="relu")}[kind]()
    tvm.ir.assert_structural_equal(_tables(mod), mod)


def test_mark_elementwise_sets_the_op_pattern() -> None:
    rewritten = relax.transform.AnnotateTIROpPattern()(_tables(_island()))
    marked = lookup.mark_elementwise(rewritten)
    patterns = {int(f.attrs["op_pattern"]) for _, f in marked.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get(lookup.LOOKUP_ATTR)}
    assert patterns == {0}
    before = {int(f.attrs["op_pattern"]) for _, f in rewritten.functions_items()
              if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get(lookup.LOOKUP_ATTR)}
    assert before != {0}  # what TVM's analysis says, and why the mark is needed


_ACTIVATIONS = {  # (torch, y) -> activation(y)
    "hardswish": lambda t, y: y * t.clamp(y + 3, 0, 6) / 6,  # as Paddle exports it
    "silu": lambda t, y: y * t.sigmoid(y),                    # EfficientNet's Mul(x, Sigmoid(x))
    "gelu": lambda t, y: t.nn.functional.gelu(y),             # the erf chain at opset 13
}


def _act_net_onnx(activation: str) -> bytes:
    """Conv -> activation -> conv."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(8, 16, 3, padding=1)
            self.b = torch.nn.Conv2d(16, 16, 1)

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.b(_ACTIVATIONS[activation](torch, self.a(x)))

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.onnx.export(Net().eval(), torch.randn(1, 8, 16, 16), buf, dynamo=False,
                      input_names=["x"], opset_version=13)
    return buf.getvalue()


@pytest.mark.parametrize("activation", sorted(_ACTIVATIONS))
def test_tables_fuse_into_int8_convs_and_keep_outputs(tmp_path, monkeypatch,  # noqa: ANN001
                                                      activation: str) -> None:
    import tvm_compress as tc
    from tvm_compress.backend.build import build
    from tvm_compress.quant.config import QuantConfig
    from tvm_compress.quant.quantize import quantize

    path = tmp_path / f"{activation}.onnx"
    path.write_bytes(_act_net_onnx(activation))
    model = tc.load(str(path))
    rng = np.random.default_rng(0)
    q = quantize(model, QuantConfig(calib_samples=8),
                 rng.standard_normal((8, 8, 16, 16)).astype("float32"), progress=False)
    x = rng.standard_normal((1, 8, 16, 16)).astype("float32")
    with_tables = build(q.model, target="x86")
    fused = [k for k in with_tables.kernels if k.arithmetic == "table"]
    assert fused and all("conv2d" in k.name and "lookup" in k.name for k in fused), \
        [k.name for k in with_tables.kernels]
    island_ops = ("sigmoid", "erf", "minimum", "divide")  # no kernel computes the activation
    assert not [k.name for k in with_tables.kernels if any(o in k.name for o in island_ops)]
    monkeypatch.setattr(lookup, "MIN_OPS", 10**6)  # no island qualifies: the float epilogue
    without = build(q.model, target="x86")
    assert not [k for k in without.kernels if k.arithmetic == "table"]
    assert [k for k in without.kernels if k.arithmetic == "float island"]
    got, epilogue = with_tables.run(x), without.run(x)
    # the table holds what the float epilogue computes, up to its rounding to 8 bits: at most
    # one step of the second conv's input scale, through that conv
    reference = build(model, target="x86").run(x)
    step = np.abs(got - epilogue).max()
    assert step <= 0.02 * np.abs(reference).max(), step
    from tvm_compress.runtime.metrics import sqnr_db
    assert sqnr_db(got, reference) > 25.0, sqnr_db(got, reference)


def test_report_says_how_8_bit_kernels_compute() -> None:
    from tvm import te

    from tvm_compress.backend.report import arithmetic

    def func(dtype: str) -> tvm.tirx.PrimFunc:
        x = te.placeholder((4,), dtype)
        return te.create_prim_func([x, te.compute((4,), lambda i: x[i] + x[i])])

    u8, f32 = func("uint8"), func("float32")
    assert arithmetic("fused_conv2d_nchwc_int8_requantize", u8) == "integer"
    assert arithmetic("fused_conv2d_nchwc_int83_requantize7_lookup12", u8) == "table"
    assert arithmetic("fused_depthwise_conv2d_int86_requantize33_dequantize14_add97", u8) \
        == "float island"
    assert arithmetic("fused_conv2d_nchwc_int829_cast32_multiply57_quantize16", u8) \
        == "float island"
    assert arithmetic("fused_conv2d_nchwc3_add_cast", f32) == ""  # no 8-bit input


def _feeds(body) -> bool:  # noqa: ANN001
    """``feeds_table`` of the first binding of a ``relax_main`` built by ``body``."""
    from conftest import relax_main

    from tvm_compress.graph.dataflow import DataflowView, feeds_table

    view = DataflowView.of(relax_main((1, 4, 6, 6), body)["main"])
    return feeds_table(view, view.bindings[0].var)


def _x(bb, x):  # noqa: ANN001, ANN202  (the tensor the islands start from)
    return bb.emit(relax.op.add(x, _const(np.ones((1, 4, 1, 1)), "float32")))


@pytest.mark.parametrize(("case", "expected"), [
    ("silu", True), ("gelu", True), ("lone sigmoid", False), ("gate from a mean", False),
    ("per-channel scale", False), ("also read by a conv", False), ("a tuple", False)])
def test_feeds_table_only_where_the_island_is_a_function_of_one_tensor(case: str,
                                                                       expected: bool) -> None:
    def body(bb, x):  # noqa: ANN001, ANN202
        if case == "a tuple":  # a split's outputs: no tensor to quantize
            halves = bb.emit(relax.op.split(x, 2, axis=1))
            y = bb.emit(relax.TupleGetItem(halves, 0))
            return relax.op.multiply(y, bb.emit(relax.op.sigmoid(y)))
        y = _x(bb, x)
        if case == "silu":
            return relax.op.multiply(y, bb.emit(relax.op.sigmoid(y)))
        if case == "gelu":
            e = bb.emit(relax.op.erf(bb.emit(relax.op.divide(y, _const(1.414, "float32")))))
            h = bb.emit(relax.op.multiply(y, bb.emit(relax.op.add(e, _const(1.0, "float32")))))
            return relax.op.multiply(h, _const(0.5, "float32"))
        if case == "lone sigmoid":
            return relax.op.sigmoid(y)
        if case == "gate from a mean":
            gate = bb.emit(relax.op.sigmoid(bb.emit(relax.op.mean(y, [2, 3], keepdims=True))))
            return relax.op.multiply(bb.emit(relax.op.sigmoid(y)), gate)
        if case == "per-channel scale":
            scaled = bb.emit(relax.op.multiply(y, _const(np.arange(4.0).reshape(1, 4, 1, 1),
                                                         "float32")))
            return relax.op.multiply(scaled, bb.emit(relax.op.sigmoid(y)))
        s = bb.emit(relax.op.multiply(y, bb.emit(relax.op.sigmoid(y))))
        w = _const(np.ones((4, 4, 1, 1)), "float32")
        return relax.op.add(s, bb.emit(relax.op.nn.conv2d(y, w)))

    assert _feeds(body) is expected
