"""Relax pass: rewrite NCHW convolutions and the ops around them to channel-blocked NCHW[x]c.

In NCHW[x]c the innermost axis holds ``x`` consecutive channels, one SIMD register of them, so a
convolution can keep ``x`` output channels in one register and stride/padding never touch the
vectorized axis. Every rewritten binding keeps its NCHW meaning: it becomes
``layout_transform(packed)`` and consumers that understand the packed layout read ``packed``
directly; unpacks nobody reads are removed by ``DeadCodeElimination`` afterwards. Ops that are
not understood therefore always see NCHW tensors, which keeps the pass safe on any graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.backend.schedules.conv_transpose import match_interleave
from tvm_compress.backend.schedules.rewrite import rewrite_functions

# Element-wise ops: the packed layout passes straight through them.
_UNARY = {"relax.clip", "relax.nn.relu", "relax.nn.leakyrelu", "relax.nn.gelu",
          "relax.nn.gelu_tanh", "relax.nn.silu", "relax.sigmoid", "relax.tanh", "relax.exp",
          "relax.negative", "relax.abs", "relax.sqrt", "relax.rsqrt", "relax.square",
          "relax.astype", "relax.round", "relax.floor", "relax.ceil", "relax.nn.softplus",
          "relax.erf"}
_BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
           "relax.minimum", "relax.power", "relax.right_shift", "relax.left_shift",
           "relax.bitwise_and", "relax.bitwise_or", "relax.bitwise_xor"}
_POOL = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d"}
_SPATIAL_REDUCE = {"relax.mean", "relax.sum", "relax.max", "relax.min"}


# Ops that map finite values to finite values: the padding channels of a zero-padded packed
# tensor stay finite through them, and every consumer multiplies them by zero weights or crops
# them. (Division by a padded tensor, exp, sqrt or power could turn them into inf / nan.)
_PAD_SAFE = (_UNARY | _BINARY) - {"relax.exp", "relax.sqrt", "relax.rsqrt", "relax.power",
                                  "relax.divide"}


def _pad_safe(call: relax.Call) -> bool:
    if call.op.name in _PAD_SAFE:
        return True
    divisor = _static_shape(call.args[1]) if call.op.name == "relax.divide" else None
    return divisor is not None and math.prod(divisor) == 1


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _pack_map(block: int) -> Callable:
    return lambda n, c, h, w: (n, c // block, h, w, c % block)


def _unpack_map(block: int) -> Callable:
    return lambda n, c, h, w, cb: (n, c * block + cb, h, w)


def _int8_blocks(groups: int, cin: int, cout: int, lanes: int,
                 in_block: int | None = None) -> tuple[int, int] | None:
    """Blocks of an int8 conv for the int8 micro-kernels: whole 4-channel groups of input
    (the stem's 3 channels are padded to 4; an input already packed in such groups keeps its
    block), ``lanes`` int32 outputs, or 8 on 16-lane (VNNI) targets where ``lanes`` does not
    divide the channels; depthwise as fp32."""
    block = lanes if cout % lanes == 0 else 8 if lanes == 16 and cout % 8 == 0 else None
    if block is None and (groups == 1 or groups == cin == cout):
        # Zero-padded output channels, as in fp32 (ShuffleNetV2's 58 / 116 channels): exact,
        # the padded weights being zero whatever the padded activations hold.
        if not padded_block(cout, lanes):
            return None
        block = lanes
    if groups == 1:
        if in_block is not None and in_block % 4 == 0 and (cin % in_block == 0
                                                           or padded_block(cin, in_block)):
            return in_block, block
        return (lanes if cin % lanes == 0 else block if cin % block == 0 else 4), block
    if groups == cin == cout:
        return block, block
    # grouped: whole blocks of 4-channel groups in, of the kernel's lanes out, in every group
    cin_g, cout_g = cin // groups, cout // groups
    out = lanes if cout_g % lanes == 0 else 8 if lanes == 16 and cout_g % 8 == 0 else None
    if out is None:
        return None
    if in_block is not None and in_block % 4 == 0 and cin_g % in_block == 0:
        return in_block, out
    return (math.gcd(cin_g, lanes), out) if math.gcd(cin_g, lanes) % 4 == 0 else None


def _is_int8_conv(call: relax.Call) -> bool:
    return (str(call.args[0].ty.dtype) in ("uint8", "int8")
            and str(call.args[1].ty.dtype) == "int8" and str(call.attrs.out_dtype) == "int32")


def padded_block(channels: int, lanes: int) -> bool:
    """Whether ``channels`` not a multiple of ``lanes`` are worth zero-padding to one: at most
    half the padded channels are padding (fewer go to the generic NCHW schedule instead)."""
    return channels % lanes == 0 or 2 * channels >= -(-channels // lanes) * lanes


def _conv_blocks(call: relax.Call, lanes: int, int8: bool,
                 in_block: int | None = None) -> tuple[int, int] | None:
    """(input block, output block) for a conv2d that can be packed, else None.

    ``in_block``: the block of the already packed input, if any. Channel counts that are not a
    multiple of the block are zero-padded (weights too), except in grouped convs, which use the
    largest blocks that divide every group instead.
    """
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    dshape, wshape = _static_shape(call.args[0]), _static_shape(call.args[1])
    if dshape is None or wshape is None or len(dshape) != 4:
        return None
    groups, cin, cout = int(attrs.groups), dshape[1], wshape[0]
    if int8 and _is_int8_conv(call):
        return _int8_blocks(groups, cin, cout, lanes, in_block)
    if call.args[0].ty.dtype != "float32":
        return None
    if groups == 1:
        if not padded_block(cout, lanes):
            return None
        # The input block is a reduction axis: any block works, padded channels being zero.
        return in_block or math.gcd(cin, lanes), lanes
    if groups == cin == cout:
        return (lanes, lanes) if padded_block(cout, lanes) else None  # depthwise
    # grouped: every group a whole number of blocks on both sides
    return math.gcd(cin // groups, lanes), math.gcd(cout // groups, lanes)


@mutator
class _Packer(PyExprMutator):
    """Rewrites calls bottom-up; ``packed`` maps each packed var to its channel block."""

    def __init__(self, mod: tvm.IRModule, lanes: int, int8: bool) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.int8 = int8
        self.packed: dict[relax.Var, int] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _packed_source(self, expr: relax.Expr) -> tuple[relax.Var, int] | None:
        """If ``expr`` is the unpack of a packed var, that var and its block."""
        if not isinstance(expr, relax.Var):
            return None
        value = self.lookup_binding(expr)
        if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.strided_slice") \
                and isinstance(value.args[0], relax.Var):
            value = self.lookup_binding(value.args[0])  # the channel crop of a padded tensor
        if (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.layout_transform")
                and value.args[0] in self.packed):
            return value.args[0], self.packed[value.args[0]]
        return None

    def _pack(self, expr: relax.Expr, block: int) -> relax.Expr:
        source = self._packed_source(expr)
        if source is not None and source[1] == block:
            return source[0]
        shape = _static_shape(expr)
        pad = 0 if shape is not None and shape[1] % block else None  # zero channels to fill
        return self.builder_.emit(relax.op.layout_transform(expr, _pack_map(block), pad))

    def _emit_packed(self, call: relax.Expr, block: int,
                     channels: int | None = None) -> relax.Expr:
        """Bind packed ``call``; return its NCHW view (cropped to ``channels`` if padded)."""
        packed = self.builder_.emit(call)
        self.packed[packed] = block
        unpacked = relax.op.layout_transform(packed, _unpack_map(block))
        if channels is None or channels % block == 0:
            return unpacked
        return relax.op.strided_slice(self.builder_.emit(unpacked), axes=[1], begin=[0],
                                      end=[channels])

    def _broadcast_operand(self, expr: relax.Expr, shape: tuple[int, ...],
                           block: int) -> relax.Expr | None:
        """``expr`` as an operand of a packed op of NCHW ``shape``, or None if impossible."""
        other = _static_shape(expr)
        if other is None:
            return None
        if other == shape or (len(other) == 4 and other[0] == 1 and other[2:] == (1, 1)
                              and other[1] == shape[1]):
            return self._pack(expr, block)
        if len(other) == 3 and other[0] == shape[1] and other[1:] == (1, 1):
            return self._pack(relax.op.reshape(expr, (1, shape[1], 1, 1)), block)
        if math.prod(other) == 1 and len(other) <= 4:
            return relax.op.reshape(expr, (1,) * 5) if other else expr
        return None

    # -- rewrites ----------------------------------------------------------------------------
    def _conv2d(self, call: relax.Call) -> relax.Expr | None:
        source = self._packed_source(call.args[0])
        blocks = _conv_blocks(call, self.lanes, self.int8, source[1] if source else None)
        if blocks is None:
            return None
        ib, ob = blocks
        attrs = call.attrs
        cin, (cout, wcin, _, _) = _static_shape(call.args[0])[1], _static_shape(call.args[1])
        groups = int(attrs.groups)
        depthwise = groups > 1 and groups == cin == cout
        if depthwise:  # padded channels are groups of their own
            groups = -(-cout // ob) * ob
        wib = 1 if depthwise else ib
        weight = relax.op.layout_transform(
            call.args[1], lambda o, i, h, w: (o // ob, i // wib, h, w, i % wib, o % ob),
            0 if wcin % wib or cout % ob else None)
        conv = relax.op.nn.conv2d(
            self._pack(call.args[0], ib), self.builder_.emit(weight), strides=attrs.strides,
            padding=attrs.padding, dilation=attrs.dilation, groups=groups,
            data_layout=f"NCHW{ib}c", kernel_layout=f"OIHW{wib}i{ob}o",
            out_layout=f"NCHW{ob}c", out_dtype=attrs.out_dtype or "float32")
        return self._emit_packed(conv, ob, cout)

    def _elementwise(self, call: relax.Call) -> relax.Expr | None:
        shape = _static_shape(call)
        if shape is None or len(shape) != 4:
            return None
        packed = [s for s in map(self._packed_source, call.args) if s is not None]
        if not packed:
            return None
        block = packed[0][1]
        if shape[1] % block and not _pad_safe(call):
            return None
        args = []
        for arg in call.args:
            if not isinstance(arg.ty, relax.TensorType):
                args.append(arg)
                continue
            new = self._broadcast_operand(arg, shape, block)
            if new is None:
                return None
            args.append(new)
        return self._emit_packed(relax.Call(call.op, args, call.attrs, call.ty_args), block,
                                 shape[1])

    def _qdq(self, call: relax.Call) -> relax.Expr | None:
        """Per-tensor quantize / dequantize (the float islands of an integer graph: hardswish,
        SiLU, squeeze-excitation) on the packed tensor, so int8 layers stay packed around them.
        Padded channels stay finite; they meet zero weights or a crop downstream."""
        source = self._packed_source(call.args[0])
        shape = _static_shape(call)
        qparams = [_static_shape(a) for a in call.args[1:]]
        if source is None or shape is None or len(shape) != 4 \
                or any(q is None or math.prod(q) != 1 for q in qparams):
            return None
        data, block = source
        scalars = [a if not _static_shape(a) else relax.op.reshape(a, ()) for a in call.args[1:]]
        return self._emit_packed(relax.Call(call.op, [data, *scalars], call.attrs, call.ty_args),
                                 block, shape[1])

    def _pool(self, call: relax.Call) -> relax.Expr | None:
        source = self._packed_source(call.args[0])
        attrs = call.attrs
        if source is None or attrs.layout != "NCHW" or attrs.out_layout != "NCHW":
            return None
        data, block = source
        layout = f"NCHW{block}c"
        if call.op.name == "relax.nn.adaptive_avg_pool2d":
            new = relax.op.nn.adaptive_avg_pool2d(data, attrs.output_size, layout, layout)
        else:
            make = (relax.op.nn.max_pool2d if call.op.name == "relax.nn.max_pool2d"
                    else relax.op.nn.avg_pool2d)
            new = make(data, attrs.pool_size, attrs.strides, attrs.padding, attrs.dilation,
                       attrs.ceil_mode, attrs.count_include_pad, layout, layout)
        return self._emit_packed(new, block, _static_shape(call)[1])

    def _pad(self, call: relax.Call) -> relax.Expr | None:
        """Constant padding of H and W only (the zero-point padding of integer convs)."""
        source = self._packed_source(call.args[0])
        widths = [int(v) for v in call.attrs.pad_width]
        if source is None or str(call.attrs.pad_mode) != "constant" or len(widths) != 8 \
                or any(widths[:4]):
            return None
        data, block = source
        padded = relax.op.nn.pad(data, [*widths, 0, 0], pad_value=float(call.attrs.pad_value))
        return self._emit_packed(padded, block, _static_shape(call)[1])

    def _spatial_reduce(self, call: relax.Call) -> relax.Expr | None:
        source = self._packed_source(call.args[0])
        attrs = call.attrs
        if source is None or not attrs.keepdims or attrs.axis is None:
            return None
        if sorted(int(a) % 4 for a in attrs.axis) != [2, 3]:
            return None
        data, block = source
        return self._emit_packed(self._reduce_call(call.op.name, data), block,
                                 _static_shape(call)[1])

    def _interleave(self, call: relax.Call) -> relax.Expr | None:
        """The phase interleaving of a rewritten conv2d_transpose (``conv_transpose.py``) on its
        packed conv output: whole channel blocks move, the result stays packed."""
        found = match_interleave(call, self.lookup_binding)
        source = None if found is None else self._packed_source(found["conv"])
        if source is None or found["groups"] != 1 or found["cout"] % source[1]:
            return None
        data, block = source
        (sh, sw), chunks = found["strides"], found["cout"] // block
        n, _, qh, qw, _ = _static_shape(data)
        y = relax.op.reshape(data, (n, sh, sw, chunks, qh, qw, block))
        y = relax.op.permute_dims(y, [0, 3, 4, 1, 5, 2, 6])
        y = relax.op.reshape(y, (n, chunks, qh * sh, qw * sw, block))
        y = relax.op.strided_slice(y, axes=[2, 3], begin=found["begin"], end=found["end"])
        return self._emit_packed(y, block, found["channels"])

    def _resize(self, call: relax.Call) -> relax.Expr | None:
        """Resize (FPN / YOLO upsampling) per channel on the packed tensor."""
        source = self._packed_source(call.args[0])
        attrs = call.attrs
        if source is None or attrs.layout != "NCHW" or _static_shape(call) is None:
            return None
        data, block = source
        new = relax.op.image.resize2d(
            data, call.args[1], [float(v) for v in attrs.roi], f"NCHW{block}c", attrs.method,
            attrs.coordinate_transformation_mode, attrs.rounding_method,
            float(attrs.cubic_alpha), int(attrs.cubic_exclude),
            float(attrs.extrapolation_value), attrs.out_dtype or None)
        return self._emit_packed(new, block, _static_shape(call)[1])

    def _concat(self, call: relax.Call) -> relax.Expr | None:
        """Channel concat of packed tensors that each hold whole blocks (U-Net skips,
        Inception / YOLO necks): a concat of the packed tensors along the block axis."""
        fields = call.args[0]
        if not isinstance(fields, relax.Tuple) or int(call.attrs.axis) % 4 != 1:
            return None
        sources = [self._packed_source(f) for f in fields.fields]
        shapes = [_static_shape(f) for f in fields.fields]
        if any(s is None for s in sources) or any(s is None or len(s) != 4 for s in shapes):
            return None
        block = sources[0][1]
        if any(b != block for _, b in sources) or any(s[1] % block for s in shapes):
            return None
        packed = relax.op.concat([data for data, _ in sources], axis=1)
        return self._emit_packed(packed, block, sum(s[1] for s in shapes))

    @staticmethod
    def _reduce_call(name: str, data: relax.Expr) -> relax.Expr:
        make = {"relax.mean": relax.op.mean, "relax.sum": relax.op.sum,
                "relax.max": relax.op.max, "relax.min": relax.op.min}[name]
        return make(data, axis=[2, 3], keepdims=True)

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        name = call.op.name
        if name == "relax.nn.conv2d":
            new = self._conv2d(call)
        elif name in _UNARY or name in _BINARY:
            new = self._elementwise(call)
        elif name in ("relax.quantize", "relax.dequantize"):
            new = self._qdq(call)
        elif name in _POOL:
            new = self._pool(call)
        elif name in _SPATIAL_REDUCE:
            new = self._spatial_reduce(call)
        elif name == "relax.strided_slice":
            new = self._interleave(call)
        elif name == "relax.concat":
            new = self._concat(call)
        elif name == "relax.image.resize2d":
            new = self._resize(call)
        elif name == "relax.nn.pad":
            new = self._pad(call)
        else:
            new = None
        return call if new is None else new


def PackChannels(*, lanes: int, int8: bool = False) -> tvm.ir.transform.Pass:  # noqa: N802
    """Pass: convert float32 NCHW conv2d (regular, grouped, depthwise) to NCHW[lanes]c.

    Parameters
    ----------
    lanes : int
        Channel block, normally the target's fp32 SIMD lanes (8 for AVX2, 16 for AVX-512,
        4 for NEON). Convolutions whose output channels are not a multiple of it stay NCHW.
    int8 : bool
        Also pack integer convolutions (u8/s8 data, s8 weights, int32 output; regular or
        depthwise) for the int8 micro-kernel: input blocks of ``lanes`` channels, or of 4 with
        the channels zero-padded to a multiple of 4. Constant ``nn.pad`` of H/W (zero points)
        and integer element-wise ops (shifts, bit ops) pass the packed layout through.

    Notes
    -----
    Requires static shapes to rewrite a call; anything else is left untouched. Follow with
    ``DeadCodeElimination`` and ``FoldConstant`` (weights are transformed by relax
    ``layout_transform`` calls on constants).
    """

    @tvm.ir.transform.module_pass(opt_level=0, name="PackChannels")
    def _transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(mod, _Packer(mod, lanes, int8))

    return _transform
