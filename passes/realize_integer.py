"""RealizeInteger: turn quantize/dequantize (QDQ) graphs into integer kernels.

Requires: a QDQ module - from ``InsertQDQ`` or an imported ONNX QDQ model - whose quantized layers
read ``dequantize(int tensor)`` data and ``dequantize(int constant)`` weights.
Guarantees: equal to the simulated module up to 1 LSB of each int8 tensor (rounding of the bias
and of the fixed-point multipliers), with these rewrites:

- ``quantize(act(add(conv2d|matmul(dq(x), dq(W)), bias)))`` -> int8 x int8 -> int32 conv / matmul,
  int32 bias, fixed-point requantization to the output's int8, ReLU / ReLU6 fused as a clamp;
- ``conv2d|matmul(dq(x), dq(W))`` whose output is not quantized -> integer kernel, then the int32
  accumulator is dequantized (the fp32 epilogue stays);
- ``quantize([relu](add(dq(a), dq(b))))`` -> integer add with rescaling;
  ``quantize(concat(dq(a_i)))`` -> concat of rescaled int8 tensors;
- ``quantize(op(dq(a)))`` with ``op`` scale-preserving (max-pool, reshape, ...) and the same
  parameters -> ``op`` on int8; ``quantize(dq(a))`` -> requantization or nothing.
Zero points: activation zero points are exact with padding (the input is padded with its zero
point and the correction ``zx * sum(W)`` is folded into the bias); asymmetric weights run as
int16 operands. Anything else is left as it is (correct, in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from tvm_compress.graph.dataflow import DataflowView, emit_named, is_const, op_name
from tvm_compress.graph.qgraph import ADD, CONCAT, CONV, MATMUL, SCALE_PRESERVING

REQUANT_SHIFT = 24  # fixed-point fraction bits of the add / concat rescaling multipliers


@dataclass
class QTensor:
    """An integer tensor and the affine parameters of its ``dequantize``."""

    expr: relax.Expr
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    dtype: str

    def dequantized_constant(self) -> np.ndarray:
        """float64 values of a dequantized constant (scale / zero point along ``axis``)."""
        values = self.expr.value.numpy().astype(np.float64)
        shape = [1] * values.ndim
        if self.scale.ndim:
            shape[self.axis % values.ndim] = -1
        return (values - self.zero_point.reshape(shape)) * self.scale.reshape(shape)

    def same_params(self, scale: np.ndarray, zero_point: np.ndarray) -> bool:
        return self.scale.shape == scale.shape and bool(
            np.all(self.scale == scale) and np.all(self.zero_point == zero_point))


def _const_array(expr: relax.Expr) -> np.ndarray | None:
    return expr.value.numpy() if is_const(expr) else None


def as_dequantize(view: DataflowView, expr: relax.Expr) -> QTensor | None:
    """``expr`` as the dequantization of an integer tensor, if it is one."""
    value = view.values.get(expr, expr) if isinstance(expr, relax.Var) else expr
    if op_name(value) != "relax.dequantize":
        return None
    scale, zp = _const_array(value.args[1]), _const_array(value.args[2])
    if scale is None or zp is None:
        return None
    return QTensor(value.args[0], scale.astype(np.float64), zp.astype(np.int64),
                   int(value.attrs.axis), str(value.args[0].ty.dtype))


def fixed_point(multiplier: np.ndarray, bits: int | np.ndarray = 31
                ) -> tuple[np.ndarray, np.ndarray]:
    """``multiplier ~= m * 2**-shift`` with mantissas ``m`` in [2**(bits-1), 2**bits)
    (``bits`` per channel or one for all; 31: int32 mantissas)."""
    multiplier = np.asarray(multiplier, np.float64)
    bits = np.asarray(bits, np.int64)
    mantissa, exponent = np.frexp(multiplier)  # multiplier = mantissa * 2**exponent
    m = np.round(mantissa * 2.0**bits).astype(np.int64)
    shift = bits - exponent.astype(np.int64)
    carry = m == np.int64(1) << bits
    m = np.where(carry, m // 2, m)
    shift = np.where(carry, shift - 1, shift)
    tiny = shift > 62  # below the representable range: the result rounds to 0
    return np.where(tiny, 0, m), np.clip(shift, 1, 62)


MIN_MANTISSA_BITS = 12  # relative multiplier error <= 2**-12: under 0.07 LSB of any int8 output


def mantissa_bits(multiplier: np.ndarray, acc_bound: np.ndarray | None) -> np.ndarray | int:
    """Mantissa bits of the requantization multipliers: 31, or, where the accumulators are
    small enough (``acc_bound``: per channel, the largest ``|acc + bias|``), per channel the
    most that keep ``|acc + bias| * m + round`` within int32, so that the requantization runs
    as one 32-bit multiply (``LowerRequantize``'s 32-bit form) instead of 64-bit products.
    3x3 and 5x5 depthwise convs get 12-16 bits this way; layers where a channel would get
    fewer than ``MIN_MANTISSA_BITS`` keep 31 bits."""
    if acc_bound is None:
        return 31
    bound = np.asarray(acc_bound, np.int64)
    lengths = np.array([int(b).bit_length() for b in np.ravel(bound)]).reshape(bound.shape)
    bits = 31 - lengths  # bound * m < 2**31
    for _ in range(2):  # one bit less where the rounding term does not fit beside it
        if bits.min() < MIN_MANTISSA_BITS:
            return 31
        m, shift = fixed_point(multiplier, bits)
        over = bound * m + (np.int64(1) << (shift - 1)) >= 2**31  # shift <= 62
        if not over.any():
            return bits
        bits = bits - over
    return 31


def _channel_shape(ndim: int, channels: int, axis: int | None = None) -> tuple[int, ...]:
    """Broadcast shape of a per-channel vector: channels on ``axis`` (default: 1 for 4-D NCHW
    convs, the last axis otherwise; a matmul's channels are always last, e.g. a Linear applied
    to a channels-last 4-D tensor)."""
    axis = (1 if ndim == 4 else ndim - 1) if axis is None else axis
    shape = [1] * ndim
    shape[axis] = channels
    return tuple(shape)


def _const(arr: np.ndarray, dtype: str) -> relax.Expr:
    return relax.const(np.asarray(arr, order="C").astype(dtype), dtype)  # keeps 0-d shapes


def requantize_int32(bb: relax.BlockBuilder, acc: relax.Expr, multiplier: np.ndarray,
                     zero_point: int, lo: int, hi: int, out_dtype: str, ndim: int,
                     axis: int | None = None, acc_bound: np.ndarray | None = None
                     ) -> relax.Expr:
    """``clip(round(acc * multiplier) + zero_point, lo, hi)`` in integer arithmetic
    (a per-channel ``multiplier`` runs along ``axis``; see ``_channel_shape``); ``acc_bound``:
    see :func:`mantissa_bits`."""
    m, shift = fixed_point(multiplier, mantissa_bits(multiplier, acc_bound))
    shape = _channel_shape(ndim, m.size, axis) if m.ndim else ()
    x = bb.emit(relax.op.astype(acc, "int64"))
    x = bb.emit(relax.op.multiply(x, _const(m.reshape(shape), "int64")))
    x = bb.emit(relax.op.add(x, _const((np.int64(1) << (shift - 1)).reshape(shape), "int64")))
    x = bb.emit(relax.op.right_shift(x, _const(shift.reshape(shape), "int64")))
    x = bb.emit(relax.op.add(x, _const(np.array(zero_point), "int64")))
    x = bb.emit(relax.op.clip(x, lo, hi))
    return relax.op.astype(x, out_dtype)  # unbound: the caller binds it under the tensor's name


def _out_range(q_call: relax.Call, act: relax.Expr | None, scale: float, zp: int
               ) -> tuple[int, int]:
    dtype = str(q_call.attrs.out_dtype)
    lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
    if act is not None:
        lo = max(lo, zp)
        if op_name(act) == "relax.clip":
            hi = min(hi, zp + int(np.round(float(act.args[2].value) / scale)))
    return lo, hi


@dataclass
class _Layer:
    """A conv2d / matmul whose data and weight are both dequantized integers."""

    call: relax.Call
    x: QTensor
    w: QTensor
    weight: np.ndarray  # integer weight values

    @property
    def is_conv(self) -> bool:
        return op_name(self.call) == CONV

    @property
    def out_axis(self) -> int:
        return 0 if self.is_conv else 1

    def weight_scale(self) -> np.ndarray:
        """Per-output-channel vector, or a 0-d array for per-tensor weights."""
        return self.w.scale

    def weight_zero(self) -> np.ndarray:
        zp = self.w.zero_point
        return zp if zp.ndim else np.full(self.weight.shape[self.out_axis], int(zp))


def as_int_layer(view: DataflowView, expr: relax.Expr) -> _Layer | None:
    value = view.values.get(expr) if isinstance(expr, relax.Var) else expr
    if op_name(value) not in (CONV, MATMUL):
        return None
    x, w = as_dequantize(view, value.args[0]), as_dequantize(view, value.args[1])
    if x is None or w is None or x.scale.ndim != 0 or not is_const(w.expr):
        return None
    if op_name(value) == CONV and (str(value.attrs.data_layout) != "NCHW"
                                   or str(value.attrs.kernel_layout) != "OIHW"):
        return None
    weight = w.expr.value.numpy()
    out_axis = 0 if op_name(value) == CONV else 1
    if w.scale.ndim and w.axis % weight.ndim != out_axis:
        return None
    return _Layer(value, x, w, weight)


def _layer_call(layer: _Layer, x: relax.Expr, w: relax.Expr, padding: list[int] | None = None
                ) -> relax.Expr:
    if not layer.is_conv:
        return relax.op.matmul(x, w, out_dtype="int32")
    a = layer.call.attrs
    return relax.op.nn.conv2d(x, w, strides=[int(v) for v in a.strides],
                              padding=padding if padding is not None else
                              [int(v) for v in a.padding],
                              dilation=[int(v) for v in a.dilation], groups=int(a.groups),
                              data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32")


def emit_accumulator(bb: relax.BlockBuilder, layer: _Layer, x: relax.Expr, name: str
                     ) -> tuple[relax.Expr, np.ndarray]:
    """Emit the integer conv / matmul of ``layer`` on the new int input ``x``, bound to the
    layer's name (so the LayerTable of the integer module keeps its layers).

    Returns the int32 accumulator and an int64 per-output-channel correction that must be added
    to it (the activation zero point times the weight sums)."""
    zx = int(layer.x.zero_point)
    zw = layer.weight_zero()
    weight = layer.weight.astype(np.int64)
    channels = weight.shape[layer.out_axis]
    if np.any(zw != 0):  # asymmetric weights: exact int16 operands (x - zx) * (w - zw)
        zw_b = zw.reshape((-1, 1, 1, 1) if layer.is_conv else (1, -1))
        xs = bb.emit(relax.op.subtract(relax.op.astype(x, "int16"), _const(np.array(zx), "int16")))
        acc = emit_named(bb, _layer_call(layer, xs, _const(weight - zw_b, "int16")), name)
        return acc, np.zeros(channels, np.int64)
    reduce_axes = (1, 2, 3) if layer.is_conv else (0,)
    correction = -zx * weight.sum(axis=reduce_axes)
    padding = None
    if zx != 0 and layer.is_conv and any(int(v) for v in layer.call.attrs.padding):
        top, left, bottom, right = (int(v) for v in layer.call.attrs.padding)
        x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right],
                                    pad_value=float(zx)))
        padding = [0, 0, 0, 0]
    acc = emit_named(bb, _layer_call(layer, x, layer.w.expr, padding), name)
    return acc, correction.astype(np.int64)


def _acc_bound(layer: _Layer, bias: np.ndarray) -> np.ndarray | None:
    """Per output channel, the largest ``|acc + bias|`` of a conv with symmetric weights over
    its input dtype's whole range (as ``LowerRequantize`` bounds it), or None."""
    if not layer.is_conv or np.any(layer.weight_zero() != 0):
        return None
    info = np.iinfo(layer.x.dtype)
    sums = np.abs(layer.weight.astype(np.int64)).sum(axis=(1, 2, 3))
    return sums * max(abs(int(info.min)), int(info.max)) + np.abs(bias)


def _bias_values(view: DataflowView, expr: relax.Expr, channels: int) -> np.ndarray | None:
    arr = _const_array(expr)
    if arr is None:
        dq = as_dequantize(view, expr)
        if dq is None or not is_const(dq.expr):
            return None
        arr = dq.dequantized_constant()
    if arr.size != channels or arr.shape not in ((channels,), (1, channels), (channels, 1, 1),
                                                (1, channels, 1, 1)):
        return None
    return arr.reshape(channels).astype(np.float64)


@dataclass
class _Block:
    layer_var: relax.Var
    layer: _Layer
    bias: np.ndarray
    act: relax.Expr | None


def match_block(view: DataflowView, q_value: relax.Call) -> _Block | None:
    """``quantize([act]([add](layer, bias)))`` with single-use intermediates."""
    t, act = q_value.args[0], None
    value = view.values.get(t)
    if op_name(value) in ("relax.nn.relu", "relax.clip") and view.single_user(t) is not None:
        if op_name(value) == "relax.nn.relu" or float(value.args[1].value) == 0.0:
            act, t = value, value.args[0]
            value = view.values.get(t)
    bias = None
    if op_name(value) == ADD and view.single_user(t) is not None:
        for mine, other in ((0, 1), (1, 0)):
            layer = as_int_layer(view, value.args[mine])
            if layer is not None:
                channels = layer.weight.shape[layer.out_axis]
                bias = _bias_values(view, value.args[other], channels)
                if bias is not None:
                    t = value.args[mine]
                    break
    layer = as_int_layer(view, t)
    if layer is None or not isinstance(t, relax.Var) or view.single_user(t) is None:
        return None
    channels = layer.weight.shape[layer.out_axis]
    return _Block(t, layer, bias if bias is not None else np.zeros(channels), act)


def _rescale(bb: relax.BlockBuilder, qt: QTensor, x: relax.Expr, out_scale: float
             ) -> relax.Expr:
    """int64 ``(x - z) * round(scale / out_scale * 2**REQUANT_SHIFT)``."""
    m = np.round(float(qt.scale) / out_scale * 2.0**REQUANT_SHIFT)
    centered = bb.emit(relax.op.subtract(relax.op.astype(x, "int64"),
                                         _const(np.array(int(qt.zero_point)), "int64")))
    return bb.emit(relax.op.multiply(centered, _const(np.array(m), "int64")))


def _finish_rescaled(bb: relax.BlockBuilder, total: relax.Expr, zp: int, lo: int, hi: int,
                     dtype: str) -> relax.Expr:
    x = bb.emit(relax.op.add(total, _const(np.array(1 << (REQUANT_SHIFT - 1)), "int64")))
    x = bb.emit(relax.op.right_shift(x, _const(np.array(REQUANT_SHIFT), "int64")))
    x = bb.emit(relax.op.add(x, _const(np.array(zp), "int64")))
    return relax.op.astype(bb.emit(relax.op.clip(x, lo, hi)), dtype)


@relax.expr_functor.mutator
class _Realizer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, view: DataflowView, short_mantissas: bool) -> None:
        super().__init__(mod)
        self.view = view
        self.short_mantissas = short_mantissas
        self.blocks = {}
        for b in view.bindings:
            if op_name(b.value) == "relax.quantize":
                block = match_block(view, b.value)
                if block is not None:
                    self.blocks[b.var] = block
        self.fused = {blk.layer_var for blk in self.blocks.values()}

    def new(self, expr: relax.Expr) -> relax.Expr:
        return self.visit_expr(expr)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value, var = binding.value, binding.var
        name, result = var.name, None
        if var in self.blocks:
            result = self.int_block(self.blocks[var], value)
        elif op_name(value) == "relax.quantize":
            result = self.int_quantize(value)
        elif op_name(value) in (CONV, MATMUL) and var not in self.fused:
            layer = as_int_layer(self.view, value)
            if layer is not None:
                result = self.dequantized_layer(layer, var.name)
                name = var.name + ".dequantized"  # the layer's name is on its int32 kernel
        if result is None:
            super().visit_var_binding_(binding)
            return
        self.set_var_remap(var, emit_named(self.builder_, result, name,
                                           dataflow=isinstance(var, relax.DataflowVar)))

    # -------------------------------------------------------------------------- rewrites
    def int_block(self, block: _Block, q: relax.Call) -> relax.Expr:
        bb, layer = self.builder_, block.layer
        acc, correction = emit_accumulator(bb, layer, self.new(layer.x.expr),
                                           block.layer_var.name)
        in_scale = float(layer.x.scale) * layer.weight_scale()
        bias = np.round(block.bias / in_scale).astype(np.int64) + correction
        ndim = len(layer.call.ty.shape)
        axis = 1 if layer.is_conv else ndim - 1
        if np.any(bias):
            acc = bb.emit(relax.op.add(acc, _const(
                bias.reshape(_channel_shape(ndim, bias.size, axis)), "int32")))
        out_scale, out_zp = float(_const_array(q.args[1])), int(_const_array(q.args[2]))
        lo, hi = _out_range(q, block.act, out_scale, out_zp)
        return requantize_int32(bb, acc, in_scale / out_scale, out_zp, lo, hi,
                                str(q.attrs.out_dtype), ndim, axis,
                                _acc_bound(layer, bias) if self.short_mantissas else None)

    def dequantized_layer(self, layer: _Layer, name: str) -> relax.Expr:
        bb = self.builder_
        acc, correction = emit_accumulator(bb, layer, self.new(layer.x.expr), name)
        ndim = len(layer.call.ty.shape)
        shape = _channel_shape(ndim, correction.size, 1 if layer.is_conv else ndim - 1)
        if np.any(correction):
            acc = bb.emit(relax.op.add(acc, _const(correction.reshape(shape), "int32")))
        scale = np.asarray(float(layer.x.scale) * layer.weight_scale())
        out = bb.emit(relax.op.astype(acc, "float32"))
        return relax.op.multiply(out, _const(scale.reshape(shape) if scale.ndim else scale,
                                             "float32"))

    def int_quantize(self, q: relax.Call) -> relax.Expr | None:
        """Integer forms of quantize(add / concat / scale-preserving op / dequantize)."""
        out_scale, out_zp = _const_array(q.args[1]), _const_array(q.args[2])
        if out_scale is None or out_zp is None or out_scale.ndim:
            return None
        t, act = q.args[0], None
        value = self.view.values.get(t, t)
        if op_name(value) == "relax.nn.relu" and op_name(self.view.values.get(value.args[0])) \
                == ADD:
            act, value = value, self.view.values[value.args[0]]
        lo, hi = _out_range(q, act, float(out_scale), int(out_zp))
        dtype = str(q.attrs.out_dtype)
        op = op_name(value)
        if op == "relax.dequantize":
            return self.requantize([value], float(out_scale), int(out_zp), lo, hi, dtype)
        if op == ADD:
            return self.requantize(list(value.args), float(out_scale), int(out_zp), lo, hi, dtype)
        if op == CONCAT:
            parts = [self.requantize([f], float(out_scale), int(out_zp), lo, hi, dtype)
                     for f in value.args[0].fields]
            if any(p is None for p in parts):
                return None
            return relax.op.concat([p if isinstance(p, relax.Var) else self.builder_.emit(p)
                                    for p in parts],
                                   axis=int(value.attrs.axis))
        if op in SCALE_PRESERVING:
            src = as_dequantize(self.view, value.args[0])
            if src is None or not src.same_params(out_scale.astype(np.float64),
                                                  out_zp.astype(np.int64)):
                return None
            return relax.Call(value.op, [self.new(src.expr), *value.args[1:]], value.attrs)
        return None

    def requantize(self, inputs: list[relax.Expr], out_scale: float, out_zp: int, lo: int,
                   hi: int, dtype: str) -> relax.Expr | None:
        """Sum of rescaled integer inputs (one input: plain requantization)."""
        qts = [as_dequantize(self.view, e) for e in inputs]
        if any(qt is None or qt.scale.ndim for qt in qts):
            return None
        if len(qts) == 1 and qts[0].same_params(np.array(out_scale), np.array(out_zp)) and \
                qts[0].dtype == dtype:
            return self.new(qts[0].expr)
        bb = self.builder_
        total = None
        for qt in qts:
            term = _rescale(bb, qt, self.new(qt.expr), out_scale)
            total = term if total is None else bb.emit(relax.op.add(total, term))
        return _finish_rescaled(bb, total, out_zp, lo, hi, dtype)


@tvm.ir.transform.module_pass(opt_level=0, name="tvmc.RealizeInteger")
class RealizeInteger:
    """Rewrite QDQ patterns of ``main`` into integer kernels (see the module docstring).

    ``short_mantissas``: requantize convs whose accumulators allow it with the per-channel
    mantissas of :func:`mantissa_bits` (one 32-bit multiply per output); False: 31 bits
    everywhere (benchmarks/bench_mantissa.py compares the two).
    """

    def __init__(self, short_mantissas: bool = True) -> None:
        self.short_mantissas = short_mantissas

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        realizer = _Realizer(out, DataflowView.of(mod["main"]), self.short_mantissas)
        out["main"] = realizer.visit_expr(mod["main"])
        return relax.transform.DeadCodeElimination(["main"])(out)
