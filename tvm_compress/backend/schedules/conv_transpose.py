"""Relax pass: rewrite ``conv2d_transpose`` as one ordinary conv2d plus a depth-to-space.

A transposed conv with stride ``s`` writes output pixel ``u = i*s + t`` from input pixel ``i`` and
kernel tap ``t``. Split ``u = q*s + r``: phase ``r`` of the output is an ordinary convolution of the
input with the taps ``t = r, r+s, r+2s, ...`` (flipped), ``M = ceil(k/s)`` of them. All ``s*s``
phases are one conv2d with ``Cout*s*s`` output channels and an ``M x M`` kernel over the *input*
grid (taps beyond ``k`` are zero), followed by interleaving the phases into the output grid
(reshape, transpose, reshape) and cropping the transposed conv's padding. That conv goes through
the blocked conv2d kernels; no multiply touches an inserted zero (TVM's own legalization convolves
a zero-inserted input, ``s*s`` times the work, with no schedule).

Handled: NCHW data, IOHW weights bound as constants, any groups, stride, padding and
output_padding, dilation 1, padding smaller than the kernel. Anything else is left as it is.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.backend.schedules.rewrite import rewrite_functions


def _static(expr: relax.Expr) -> tuple[int, ...] | None:
    shape = getattr(expr.ty, "shape", None)
    dims = getattr(shape, "values", None)
    if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _axis_plan(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
               out_pad: int) -> tuple[int, int, int, int, int] | None:
    """(taps M, conv pad before, conv pad after, crop start, output size) along one axis."""
    out = (size - 1) * stride - pad_begin - pad_end + kernel + out_pad
    taps = -(-kernel // stride)
    q_lo = pad_begin // stride
    q_hi = -(-(pad_begin + out) // stride)
    before, after = taps - 1 - q_lo, q_hi - size
    if before < 0 or after < 0 or out <= 0:
        return None
    return taps, before, after, pad_begin - q_lo * stride, out


def phase_weight(weight: np.ndarray, groups: int, strides: tuple[int, int]) -> np.ndarray:
    """IOHW transposed-conv weight -> OIHW conv2d weight of the ``s*s`` phases.

    Output channels are ordered (group, ry, rx, co): within a group, phase ``(ry, rx)`` of all
    its output channels is contiguous, so in a channel-blocked layout one block holds one phase
    of consecutive channels and the interleaving moves whole blocks. Tap ``(jy, jx)`` of phase
    ``(ry, rx)`` is the transposed kernel's ``(ry + (My-1-jy)*sh, rx + (Mx-1-jx)*sw)``.
    """
    cin, cout_g, kh, kw = weight.shape
    sh, sw = strides
    my, mx = -(-kh // sh), -(-kw // sw)
    padded = np.zeros((cin, cout_g, my * sh, mx * sw), weight.dtype)
    padded[:, :, :kh, :kw] = weight
    taps = padded.reshape(cin, cout_g, my, sh, mx, sw)[:, :, ::-1, :, ::-1, :]
    taps = taps.reshape(groups, cin // groups, cout_g, my, sh, mx, sw)
    # -> [group, ry, rx, co_g, ci_g, jy, jx]
    return np.ascontiguousarray(taps.transpose(0, 4, 6, 2, 1, 3, 5)).reshape(
        groups * sh * sw * cout_g, cin // groups, my, mx)


def _plan(call: relax.Call) -> dict | None:
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout) != ("NCHW", "IOHW") or \
            (attrs.out_layout or "NCHW") != "NCHW":
        return None
    if any(int(d) != 1 for d in attrs.dilation):
        return None
    dshape, weight = _static(call.args[0]), call.args[1]
    if dshape is None or len(dshape) != 4 or not isinstance(weight, tvm.ir.expr.Constant):
        return None
    w = weight.value.numpy()
    pad = [int(p) for p in attrs.padding]
    if len(pad) == 2:
        pad = pad + pad
    strides = tuple(int(s) for s in attrs.strides)
    out_pad = [int(p) for p in attrs.output_padding]
    axes = [_axis_plan(dshape[2 + a], w.shape[2 + a], strides[a], pad[a], pad[2 + a],
                       out_pad[a]) for a in range(2)]
    if None in axes:
        return None
    return {"weight": w, "strides": strides, "groups": int(attrs.groups), "axes": axes,
            "batch": dshape[0], "cout": w.shape[1] * int(attrs.groups)}


def _padded_channels(cout: int, groups: int, block: int | None) -> int:
    """Output channels of the phase conv per phase: ``cout``, or rounded up to a whole
    ``block`` (zero weights) when that costs at most 2x, so the interleaving of a
    channel-blocked result moves whole blocks."""
    if not block or groups != 1 or cout % block == 0:
        return cout
    padded = -(-cout // block) * block
    return padded if 2 * cout >= padded else cout


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, block: int | None) -> None:
        super().__init__(mod)
        self.block = block

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d_transpose":
            return call
        plan = _plan(call)
        if plan is None:
            return call
        (sh, sw), (ay, ax) = plan["strides"], plan["axes"]
        n, cout, groups = plan["batch"], plan["cout"], plan["groups"]
        padded = _padded_channels(cout, groups, self.block)
        w = plan["weight"]
        if padded != cout:
            w = np.concatenate([w, np.zeros((w.shape[0], padded - cout, *w.shape[2:]),
                                            w.dtype)], axis=1)
        weight = phase_weight(w, groups, (sh, sw))
        out_dtype = call.attrs.out_dtype or call.args[0].ty.dtype
        conv = self.builder_.emit(relax.op.nn.conv2d(
            call.args[0], relax.const(weight), padding=(ay[1], ax[1], ay[2], ax[2]),
            groups=groups, out_dtype=str(out_dtype)))
        qh, qw = (int(d) for d in _static(conv)[2:])
        y = relax.op.reshape(conv, (n, groups, sh, sw, padded // groups, qh, qw))
        y = relax.op.permute_dims(y, list(_INTERLEAVE))
        y = relax.op.reshape(y, (n, padded, qh * sh, qw * sw))
        begin, end = [ay[3], ax[3]], [ay[3] + ay[4], ax[3] + ax[4]]
        if padded != cout:  # crop the padding channels too
            return relax.op.strided_slice(y, axes=[1, 2, 3], begin=[0, *begin],
                                          end=[cout, *end])
        return relax.op.strided_slice(y, axes=[2, 3], begin=begin, end=end)


# [n, group, ry, rx, co, qy, qx] -> [n, group, co, qy, ry, qx, rx]
_INTERLEAVE = (0, 1, 4, 5, 2, 6, 3)


def _ints(expr: relax.Expr) -> list[int] | None:
    values = getattr(expr, "fields", None) or getattr(expr, "values", None)
    if values is None:
        return None
    out = []
    for v in values:
        v = getattr(v, "value", v)
        if not isinstance(v, (int, tvm.tirx.IntImm)):
            return None
        out.append(int(v))
    return out


def match_interleave(call: relax.Call, lookup) -> dict | None:  # noqa: ANN001
    """Recognize this pass's phase interleaving ending in ``call`` (the strided_slice).

    ``lookup(var)`` returns a var's bound value. Returns ``{"conv": the conv2d output var,
    "strides": (sh, sw), "cout" (per phase, padded), "channels" (the real ones), "groups",
    "begin": [y, x], "end": [y, x]}`` or None.
    """
    def bound(expr: relax.Expr, op: str) -> relax.Call | None:
        value = lookup(expr) if isinstance(expr, relax.Var) else None
        ok = isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
        return value if ok and value.op.name == op else None

    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.strided_slice" \
            or _ints(call.args[1]) not in ([2, 3], [1, 2, 3]) \
            or (len(call.args) > 4 and call.args[4] is not None):
        return None
    merged = bound(call.args[0], "relax.reshape")
    permuted = None if merged is None else bound(merged.args[0], "relax.permute_dims")
    if permuted is None or [int(a) for a in permuted.attrs.axes] != list(_INTERLEAVE):
        return None
    split = bound(permuted.args[0], "relax.reshape")
    shape = None if split is None else _ints(split.args[1])
    if shape is None or len(shape) != 7:
        return None
    _, groups, sh, sw, cout_g, _, _ = shape
    begin, end = _ints(call.args[2]), _ints(call.args[3])
    if begin is None or end is None:
        return None
    channels = groups * cout_g
    if len(begin) == 3:  # padding channels cropped
        if begin[0] != 0:
            return None
        channels, begin, end = end[0], begin[1:], end[1:]
    return {"conv": split.args[0], "strides": (sh, sw), "cout": groups * cout_g,
            "channels": channels, "groups": groups, "begin": begin, "end": end}


def ConvTransposeToConv(*, block: int | None = None) -> tvm.ir.transform.Pass:  # noqa: N802
    """Pass: rewrite constant-weight NCHW ``conv2d_transpose`` as conv2d + phase interleaving
    (see the module docstring); equal to the transposed conv up to float summation order.

    Parameters
    ----------
    block : int, optional
        The channel block the convs will be packed in (``PackChannels``): output channel
        counts that are not a multiple of it are zero-padded per phase when that at most
        doubles them, so the interleaving can stay blocked; the padding is cropped.
    """

    @tvm.ir.transform.module_pass(opt_level=0, name="ConvTransposeToConv")
    def _transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(mod, _Rewriter(mod, block))

    return _transform


conv_transpose_to_conv = ConvTransposeToConv()
