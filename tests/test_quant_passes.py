"""Quantization passes: Before/Expected structure, and numerics against their references."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import relax_main
from hypothesis import given
from hypothesis import strategies as st
from tvm import relax

from tvm_compress.backend.build import InputSpec, build
from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import from_torch
from tvm_compress.graph.dataflow import bindings, op_name
from tvm_compress.passes.expose_tensors import ExposeTensors, binding_positions
from tvm_compress.passes.fold_batch_norm import FoldBatchNorm
from tvm_compress.passes.insert_qdq import InsertQDQ
from tvm_compress.passes.realize_integer import (
    MIN_MANTISSA_BITS,
    RealizeInteger,
    fixed_point,
    mantissa_bits,
)
from tvm_compress.quant.config import LayerOverride, QuantConfig, QuantSpec
from tvm_compress.quant.qparams import range_qparams
from tvm_compress.quant.quantize import quantize

X_TYPE = relax.TensorType((1, 2, 4, 4), "float32")


def _module(body) -> tvm.IRModule:  # noqa: ANN001
    return relax_main(X_TYPE, body)


def _const(value, dtype: str) -> relax.Expr:  # noqa: ANN001
    return relax.const(np.asarray(value).astype(dtype), dtype)


W = np.arange(-3, 3, dtype=np.float32).reshape(3, 2, 1, 1) / 4


# --------------------------------------------------------------------------- FoldBatchNorm


def test_fold_batch_norm_structure():
    def before(bb, x):  # noqa: ANN001, ANN202
        conv = bb.emit(relax.op.nn.conv2d(x, relax.const(W)))
        bn = bb.emit(relax.op.nn.batch_norm(
            conv, _const(np.full(3, 2.0), "float32"), _const(np.full(3, 1.5), "float32"),
            _const(np.full(3, 0.5), "float32"), _const(np.full(3, 3.75), "float32"),
            axis=1, epsilon=0.25))  # sqrt(3.75 + 0.25) = 2 = gamma: scale 1, bias 1.5 - 0.5
        return relax.op.nn.relu(bb.emit(relax.TupleGetItem(bn, 0)))

    def expected(bb, x):  # noqa: ANN001, ANN202
        conv = bb.emit(relax.op.nn.conv2d(x, relax.const(W)))
        biased = bb.emit(relax.op.add(conv, _const(np.ones((1, 3, 1, 1)), "float32")))
        return relax.op.nn.relu(biased)

    tvm.ir.assert_structural_equal(FoldBatchNorm()(_module(before)), _module(expected),
                                   map_free_vars=True)


def test_fold_batch_norm_numerics_and_names(tiny_cnn, tiny_input):
    model = from_torch(tiny_cnn, tiny_input)
    folded = FoldBatchNorm()(model.mod)
    assert not any(op_name(b.value) == "relax.nn.batch_norm" for b in bindings(folded["main"]))
    assert model.with_mod(folded).layers.names == model.layers.names
    np.testing.assert_allclose(build(model.with_mod(folded)).run(tiny_input),
                               build(model).run(tiny_input), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ InsertQDQ

CONFIG = QuantConfig(weight=QuantSpec(8, "symmetric", "per_tensor"),
                     activation=QuantSpec(8, "asymmetric"))
INPUT_QP = range_qparams(-12.8, 12.7, QuantSpec(8, "asymmetric"))  # scale 0.1, zero point 128


def _conv_relu(bb, x):  # noqa: ANN001, ANN202
    return relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(x, relax.const(W))))


def test_insert_qdq_structure():
    wqp = range_qparams(W.min(), W.max(), CONFIG.weight)

    def expected(bb, x):  # noqa: ANN001, ANN202
        q = bb.emit(relax.op.quantize(x, _const(INPUT_QP.scale, "float32"),
                                      _const(128, "uint8"), -1, "uint8"))
        dq = bb.emit(relax.op.dequantize(q, _const(INPUT_QP.scale, "float32"),
                                         _const(128, "uint8"), -1, "float32"))
        w = relax.op.dequantize(relax.const(wqp.quantize(W)), _const(wqp.scale, "float32"),
                                _const(0, "int8"), -1, "float32")
        return relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(dq, w)))

    assert int(INPUT_QP.zero_point) == 128
    after = InsertQDQ(CONFIG, {"input": INPUT_QP})(_module(_conv_relu))
    tvm.ir.assert_structural_equal(after, _module(expected), map_free_vars=True)


def test_insert_qdq_saturates_a_huge_int32_bias_with_its_sign() -> None:
    """A channel with weights ~1e-20 (BN-folded dead channels in PicoDet) and a bias of 1e-3:
    the bias in accumulator units is far beyond int32 and saturates, positive stays positive."""
    weight = W.copy()
    weight[0] = 1e-20
    per_channel = QuantConfig(weight=QuantSpec(8, "symmetric", "per_channel"),
                              activation=QuantSpec(8, "asymmetric"))

    def body(bb, x):  # noqa: ANN001, ANN202
        conv = bb.emit(relax.op.nn.conv2d(x, relax.const(weight)))
        return relax.op.add(conv, _const(np.array([1e-3, -1e-3, 0.5]).reshape(1, 3, 1, 1),
                                         "float32"))

    after = InsertQDQ(per_channel, {"input": INPUT_QP})(_module(body))
    biases = [b.value.args[0].value.numpy() for b in bindings(after["main"])
              if op_name(b.value) == "relax.dequantize"
              and str(b.value.args[0].ty.dtype) == "int32"]
    assert len(biases) == 1
    q = biases[0].ravel()
    assert q[0] == 2**31 - 1, q
    assert 0 > q[1] > -(2**31 - 1) and q[2] > 0, q


def test_insert_qdq_requires_every_point():
    with pytest.raises(ValueError, match="no activation parameters for points"):
        InsertQDQ(CONFIG, {})(_module(_conv_relu))


# ------------------------------------------------------------------------- RealizeInteger

SX, SW, SO = 0.05, 0.01, 0.02
WQ = np.array([[[[1]], [[-2]]], [[[3]], [[4]]], [[[-5]], [[6]]]], dtype=np.int8)


def _qdq_block(bb, x):  # noqa: ANN001, ANN202
    q = bb.emit(relax.op.quantize(x, _const(SX, "float32"), _const(0, "int8"), -1, "int8"))
    dq = bb.emit(relax.op.dequantize(q, _const(SX, "float32"), _const(0, "int8"), -1, "float32"))
    w = bb.emit(relax.op.dequantize(relax.const(WQ), _const(SW, "float32"), _const(0, "int8"),
                                    -1, "float32"))
    act = bb.emit(relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(dq, w))))
    qo = bb.emit(relax.op.quantize(act, _const(SO, "float32"), _const(0, "int8"), -1, "int8"))
    return relax.op.dequantize(qo, _const(SO, "float32"), _const(0, "int8"), -1, "float32")


def test_realize_integer_structure():
    multiplier = np.float32(SX) * np.float64(np.float32(SW)) / np.float32(SO)
    # the accumulators' bound (|weights| summed per channel times 128) allows short mantissas
    bound = np.abs(WQ.astype(np.int64)).sum(axis=(1, 2, 3)) * 128
    bits = mantissa_bits(multiplier, bound)
    assert np.all(bits < 31)
    m, shift = fixed_point(multiplier, bits)
    m, shift = m.reshape(1, 3, 1, 1), shift.reshape(1, 3, 1, 1)

    def expected(bb, x):  # noqa: ANN001, ANN202
        q = bb.emit(relax.op.quantize(x, _const(SX, "float32"), _const(0, "int8"), -1, "int8"))
        acc = relax.DataflowVar("lv", relax.TensorType((1, 3, 4, 4), "int32"))
        bb.emit_normalized(relax.VarBinding(
            acc, bb.normalize(relax.op.nn.conv2d(q, relax.const(WQ), out_dtype="int32"))))
        y = bb.emit(relax.op.astype(acc, "int64"))
        y = bb.emit(relax.op.multiply(y, _const(m, "int64")))
        y = bb.emit(relax.op.add(y, _const(np.int64(1) << (shift - 1), "int64")))
        y = bb.emit(relax.op.right_shift(y, _const(shift, "int64")))
        y = bb.emit(relax.op.add(y, _const(0, "int64")))
        y = bb.emit(relax.op.clip(y, 0, 127))  # ReLU fused: the lower bound is the zero point
        qo = bb.emit(relax.op.astype(y, "int8"))
        return relax.op.dequantize(qo, _const(SO, "float32"), _const(0, "int8"), -1, "float32")

    tvm.ir.assert_structural_equal(RealizeInteger()(_module(_qdq_block)), _module(expected),
                                   map_free_vars=True)


@given(st.floats(1e-6, 1e3))
def test_fixed_point_multiplier(multiplier):
    m, shift = fixed_point(np.array(multiplier))
    assert 2**30 <= int(m) < 2**31
    assert float(m) * 2.0 ** -float(shift) == pytest.approx(multiplier, rel=2**-30)


@given(st.floats(1e-6, 10.0), st.lists(st.integers(0, 2**26), min_size=1, max_size=8))
def test_short_mantissas_keep_the_requantization_within_int32(multiplier, bounds):
    bound = np.array(bounds, np.int64)
    bits = mantissa_bits(multiplier, bound)
    m, shift = fixed_point(multiplier, bits)
    if np.ndim(bits) == 0:  # too large a bound for MIN_MANTISSA_BITS: int32 mantissas
        assert bits == 31 and 2**30 <= int(m) < 2**31
        return
    assert bits.min() >= MIN_MANTISSA_BITS
    # what LowerRequantize's 32-bit form needs: |acc + bias| * m + round < 2**31
    assert np.all(bound * m + (np.int64(1) << (shift - 1)) < 2**31)
    assert np.all(m < np.int64(1) << bits) and np.all(m >= np.int64(1) << (bits - 1))
    error = np.abs(m * 2.0 ** -shift.astype(np.float64) - multiplier) / multiplier
    assert np.all(error <= 2.0**-bits)


def test_mantissa_bits_of_a_depthwise_conv():
    # 3x3 taps of up to 127 on u8 input: bound 9 * 127 * 255 < 2**19, so 12 bits or more
    bound = np.full(16, 9 * 127 * 255)
    assert np.all(mantissa_bits(np.full(16, 1e-3), bound) >= 12)
    assert mantissa_bits(np.full(16, 1e-3), None) == 31
    assert mantissa_bits(1e-3, np.array([2**21])) == 31  # would be 9 bits: too coarse


def test_realize_integer_numerics_of_one_block():
    x = np.random.default_rng(0).uniform(-6, 6, (1, 2, 4, 4)).astype("float32")
    spec = InputSpec("x", (1, 2, 4, 4), "float32")
    sim = build(_module(_qdq_block), input_spec=spec).run(x)
    real = build(RealizeInteger()(_module(_qdq_block)), input_spec=spec).run(x)
    assert np.max(np.abs(np.round((sim - real) / SO))) <= 1


# ------------------------------------------------------------- whole models, sim vs realized


def _int_tensors(mod: tvm.IRModule, inputs: list[np.ndarray], names: list[str]
                 ) -> dict[str, np.ndarray]:
    by_name = {b.var.name: b.var for b in bindings(mod["main"])}
    exposed = ExposeTensors(binding_positions(mod["main"], [by_name[n] for n in names]))(mod)
    vm = relax.VirtualMachine(tvm.compile(exposed, target="llvm"), tvm.cpu())
    outs = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    return {n: outs[i + 1].numpy().astype(np.int64) for i, n in enumerate(names)}


@relax.expr_functor.mutator
class _FeedTensors(relax.PyExprMutator):
    """Drop the bindings of the named tensors; their uses read new function parameters."""

    def __init__(self, feeds: dict[str, relax.Var]) -> None:
        super().__init__()
        self.feeds = feeds

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var.name in self.feeds:
            self.set_var_remap(binding.var, self.feeds[binding.var.name])
        else:
            super().visit_var_binding_(binding)


def _teacher_forced(mod: tvm.IRModule, x: np.ndarray, reference: dict[str, np.ndarray],
                    name: str) -> np.ndarray:
    """Tensor ``name`` of ``mod`` computed from the reference values of every other tensor."""
    func = mod["main"]
    types = {b.var.name: b.var.ty for b in bindings(func)}
    feeds = {n: relax.Var(n + "_fed", types[n]) for n in reference if n != name}
    widened = relax.Function([*func.params, *feeds.values()], func.body, func.ret_ty,
                             func.is_pure, func.attrs)
    cut = tvm.IRModule({"main": _FeedTensors(feeds).visit_expr(widened)})
    arrays = [reference[n].astype(str(types[n].dtype)) for n in feeds]
    return _int_tensors(cut, [x, *arrays], [name])[name]


@pytest.mark.parametrize("config", [
    QuantConfig(),
    QuantConfig(weight=QuantSpec(8, "symmetric", "per_tensor"),
                activation=QuantSpec(8, "symmetric")),
    QuantConfig(weight=QuantSpec(8, "asymmetric", "per_channel"), calibration="kl"),
    QuantConfig(activation=QuantSpec(8, "symmetric_uint8"), calibration="percentile"),
    QuantConfig(weight=QuantSpec(4, "power_of_two", "per_channel"),
                activation=QuantSpec(8, "power_of_two"), calibration="mse"),
], ids=lambda c: c.short())
def test_realized_matches_simulated_within_one_lsb(tiny_cnn, tiny_input, config):
    calib = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype("float32")
    q = quantize(from_torch(tiny_cnn, tiny_input), config, calib, progress=False)
    assert q.fp32_layers == []
    names = sorted(n for n in (b.var.name for b in bindings(q.simulated["main"]))
                   if n.startswith("q_"))
    assert len(names) == len(q.graph.points) >= 4
    sim = _int_tensors(q.simulated, [tiny_input], names)
    # Layer by layer, each fed the simulated int8 inputs: at most one rounding step apart.
    for name in names:
        real = _teacher_forced(q.model.mod, tiny_input, sim, name)
        assert np.max(np.abs(sim[name] - real)) <= 1, name
    # every conv now runs on integers, under its layer name
    assert q.model.layers.names == ["stem.0", "dw.0", "pw.0", "head"]
    convs = [b.value for b in bindings(q.model.mod["main"])
             if op_name(b.value) == "relax.nn.conv2d"]
    assert convs and all(str(c.args[0].ty.dtype) in ("int8", "uint8", "int16") for c in convs)
    # the three conv blocks requantize in integers (int32 bias, fixed point), not via fp32
    ops = [op_name(b.value) for b in bindings(q.model.mod["main"])]
    assert ops.count("relax.right_shift") >= 3 and "relax.nn.relu" not in ops


def test_asymmetric_input_zero_point_is_exact_with_padding(tiny_cnn, tiny_input):
    # Inputs far from zero-centred: the zero point is large and padding must use it.
    calib = np.random.default_rng(2).uniform(0.5, 3.0, (4, 3, 16, 16)).astype("float32")
    q = quantize(from_torch(tiny_cnn, tiny_input), QuantConfig(), calib, progress=False)
    assert int(q.act_params["input"].zero_point) == 0  # [0.5, 3] widened to include 0
    calib = np.random.default_rng(2).uniform(-3.0, 1.0, (4, 3, 16, 16)).astype("float32")
    q = quantize(from_torch(tiny_cnn, tiny_input), QuantConfig(), calib, progress=False)
    assert int(q.act_params["input"].zero_point) > 100
    x = calib[:1]
    spec = InputSpec("input", x.shape, "float32")
    sim = build(q.simulated, input_spec=spec).run(x)
    real = build(q.model.mod, input_spec=spec).run(x)
    np.testing.assert_allclose(real, sim, atol=1e-5)


def test_fp32_override_and_unrealizable_layers_are_reported(tiny_cnn, tiny_input):
    calib = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype("float32")
    config = QuantConfig(overrides={"dw.0": LayerOverride(fp32=True)})
    q = quantize(from_torch(tiny_cnn, tiny_input), config, calib, progress=False)
    assert q.fp32_layers == ["dw.0"]
    ref = build(q.model.with_mod(q.folded)).run(tiny_input)
    assert np.argmax(build(q.model).run(tiny_input)) == np.argmax(ref)


def test_weight_bytes_quarter_at_8_bits_eighth_at_4(tiny_cnn, tiny_input):
    calib = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype("float32")
    model = from_torch(tiny_cnn, tiny_input)
    q8 = quantize(model, QuantConfig(), calib, progress=False)
    q4 = quantize(model, QuantConfig(weight=QuantSpec(4, "symmetric", "per_channel")), calib,
                  progress=False)
    # weights shrink 4x / 8x; the int32 biases (58 values) stay 4 bytes each
    weights = 16 * 27 + 16 * 9 + 16 * 16 + 160
    assert q8.fp32_weight_bytes == 4 * (weights + 58)
    assert q8.weight_bytes == weights + 4 * 58
    assert q4.weight_bytes == weights // 2 + 4 * 58


# ------------------------------------------------------------------------------ bad input


def test_bad_calibration_input(tiny_cnn, tiny_input):
    model = from_torch(tiny_cnn, tiny_input)
    with pytest.raises(UserError, match="calibration set is empty"):
        quantize(model, QuantConfig(), np.zeros((0, 3, 16, 16), "float32"), progress=False)
    with pytest.raises(UserError, match=r"shape \(3, 8, 8\) but the model input"):
        quantize(model, QuantConfig(), np.zeros((2, 3, 8, 8), "float32"), progress=False)
    with pytest.raises(UserError, match="dtype float64"):
        quantize(model, QuantConfig(), np.zeros((2, 3, 16, 16)), progress=False)
    bad = np.zeros((2, 3, 16, 16), "float32")
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(UserError, match="NaN or Inf"):
        quantize(model, QuantConfig(), bad, progress=False)
    with pytest.raises(UserError, match="unknown layer 'stem'"):
        quantize(model, QuantConfig(overrides={"stem": LayerOverride(fp32=True)}), bad[1:],
                 progress=False)


def test_nan_weights_are_refused(tiny_cnn, tiny_input):
    import torch

    with torch.no_grad():
        tiny_cnn.pw[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(UserError, match="NaN/Inf in 1 weight tensor"):
        quantize(from_torch(tiny_cnn, tiny_input), QuantConfig(),
                 np.zeros((2, 3, 16, 16), "float32"), progress=False)


def test_constant_activation_gets_finite_scale(tiny_cnn, tiny_input):
    import torch

    with torch.no_grad():  # the stem outputs exactly 0 everywhere: a zero-range activation
        tiny_cnn.stem[0].weight.zero_()
        tiny_cnn.stem[1].bias.zero_()
        tiny_cnn.stem[1].running_mean.zero_()
    q = quantize(from_torch(tiny_cnn, tiny_input), QuantConfig(calibration="kl"),
                 np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype("float32"),
                 progress=False)
    scale = float(q.act_params["stem.0:out"].scale)
    assert np.isfinite(scale) and scale > 0
    assert np.all(np.isfinite(build(q.model).run(tiny_input)))


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(
    weight=QuantSpec(8, "symmetric", "per_tensor"), activation=QuantSpec(8, "symmetric"))],
    ids=lambda c: c.short())
def test_integer_model_same_with_and_without_default_schedules(tiny_cnn, tiny_input, config):
    """Our CPU schedules (int8 kernels included) must not change what the integer model computes."""
    calib = np.random.default_rng(3).standard_normal((8, 3, 16, 16)).astype("float32")
    q = quantize(from_torch(tiny_cnn, tiny_input), config, calib, progress=False)
    images = np.concatenate([calib, calib * 3.0])  # also values the calibration did not see
    plain = build(q.model, schedule="none").predict(images)
    scheduled = build(q.model, schedule="default").predict(images)
    np.testing.assert_allclose(scheduled, plain, rtol=1e-5, atol=1e-5)


def test_linear_on_channels_last_4d_tensor_quantizes_exactly_enough(tmp_path) -> None:
    """ConvNeXt's pointwise Linear on an NHWC tensor: its int32 bias and requantization run
    along the last axis (they were reshaped for NCHW and failed)."""
    import torch
    from torch import nn

    from tvm_compress.backend.build import build
    from tvm_compress.frontend.importers import export_onnx, from_onnx
    from tvm_compress.quant.config import QuantConfig
    from tvm_compress.quant.quantize import quantize
    from tvm_compress.runtime.metrics import sqnr_db

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.fc = nn.Linear(16, 24)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype("float32")
    model = from_onnx(export_onnx(Block().eval(), x[:1], tmp_path / "block.onnx"))
    assert model.layers.names == ["conv", "fc"]
    qm = quantize(model, QuantConfig(calib_samples=8), x, progress=False)
    assert qm.fp32_layers == []
    ref = build(model, target="x86").predict(x)
    out = build(qm.model, target="x86").predict(x)
    assert sqnr_db(out, ref) > 25
