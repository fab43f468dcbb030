"""Integer convolution on AVX2 and VNNI: u8/s8 activations x s8 weights -> s32, tensorized.

Layouts: activations NCHW[ib]c (``ib`` a multiple of 4, as ``PackChannels`` packs integer
convolutions); weights OIHW[ib/g]i[ob]o[g]i so that one 32-bit broadcast of ``g`` input channels
meets one row of ``ob`` output channels x ``g`` input channels. The legalization reads the
(constant) weights and picks the intrinsic. On VNNI targets (``int8_vnni``) every conv takes
``vnni``: s8 weights, g = 4, ``ob`` = 16 (zmm) or 8 (ymm), exact for every weight. On AVX2
(``int8_intrin``, ``ob`` = 8): ``direct`` (s8 weights, g = 4) for pair-safe weights, else
``int16`` (s16 weights, g = 2, activations widened once into a padded int16 copy). Sums start
at ``-offset * sum(w)`` per output channel, which undoes the activation offset of the
intrinsic, so the kernel equals ``conv2d`` on the original integers exactly, for every input.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx

from tvm_compress.backend.schedules.blocks import (
    extent,
    fuse_epilogue,
    parallelize,
    producers_and_consumers,
    schedule_spatial,
    vectorize_pixels,
)
from tvm_compress.backend.schedules.compute import (
    KERNEL_ATTR,
    blocked_conv_options,
    out_size,
    pad_nchwc,
)
from tvm_compress.backend.schedules.conv2d import ConvTile, pick_tile
from tvm_compress.backend.schedules.depthwise_int8 import legalize_depthwise_int8
from tvm_compress.backend.schedules.depthwise_vnni import legalize_depthwise_vnni
from tvm_compress.backend.schedules.hardware import has_avx2_int8, has_sdot, vnni_lanes
from tvm_compress.backend.schedules.int8_intrin import intrin_name, register_intrinsics, start_from
from tvm_compress.backend.schedules.int8_intrin import offset as avx2_offset
from tvm_compress.backend.schedules.int8_sdot import intrin_name as sdot_intrin_name
from tvm_compress.backend.schedules.int8_sdot import offset as sdot_offset
from tvm_compress.backend.schedules.int8_sdot import register_intrinsics as register_sdot
from tvm_compress.backend.schedules.int8_vnni import intrin_name as vnni_intrin_name
from tvm_compress.backend.schedules.int8_vnni import offset as vnni_offset
from tvm_compress.backend.schedules.int8_vnni import register_intrinsics as register_vnni
from tvm_compress.backend.schedules.requantize_intrin import tensorize_high_mul
from tvm_compress.backend.schedules.rewrite import bound_call, rewrite_functions

CONV_NCHWC_U8S8 = "conv2d_nchwc_u8s8"
INTRIN_ATTR = "tvm_compress.intrin"
# Registers an intrinsic holds besides accumulators and weight rows: the broadcast (both), the
# ones and pair sums of direct. vnni: 4, not its 1 broadcast: 2 x 14 tiles (31 of 32 zmm) spilled,
# measured 1.7x slower than 2 x 7 on MobileNetV2's 384 -> 64 and 192 -> 32 layers.
_INTRIN_REGISTERS = {"direct": 2, "int16": 1, "vnni": 4, "sdot": 4}


def offset(kind: str, data_dtype: str) -> int:
    """What intrinsic ``kind`` adds to each activation before multiplying."""
    if kind == "vnni":
        return vnni_offset(data_dtype)
    return sdot_offset(data_dtype) if kind == "sdot" else avx2_offset(kind, data_dtype)


def pack_weight(weight: np.ndarray, group: int = 4) -> np.ndarray:
    """OIHW[ib]i[ob]o weights (as ``PackChannels`` lays them out) -> OIHW[ib/g]i[ob]o[g]i."""
    o, i, h, w, ib, ob = weight.shape
    return np.ascontiguousarray(
        weight.reshape(o, i, h, w, ib // group, group, ob).transpose(0, 1, 2, 3, 4, 6, 5))


def pick_kind(weight: np.ndarray) -> str:
    """``direct`` when these packed (4-group) weights are pair-safe, else ``int16``."""
    w = weight.astype(np.int64)
    pos, neg = np.maximum(w, 0), np.minimum(w, 0)
    # vpmaddubsw adds the products of byte pairs (0, 1) and (2, 3) of each 4-channel group
    if (pos[..., 0::2] + pos[..., 1::2]).max() <= 128 and \
            (neg[..., 0::2] + neg[..., 1::2]).min() >= -128:
        return "direct"
    return "int16"


def conv2d_nchwc_u8s8(data: te.Tensor, kernel: te.Tensor, *, strides: tuple[int, int],
                      padding: tuple[int, int, int, int], dilation: tuple[int, int] = (1, 1),
                      kind: str = "direct", groups: int = 1, pad_value: int = 0) -> te.Tensor:
    """conv2d, data (N, C/ib, H, W, ib) u8 or s8, kernel (O/ob, C/groups/ib, kh, kw, ib/g, ob, g).

    Grouped convolutions hold whole channel blocks per group on both sides.

    ``g`` = 4 with s8 weights for the 8-bit kinds, which compute ``sum((x + offset) * w)``
    with the activation offset of intrinsic ``kind`` (:func:`conv2d_int8_func` starts the sums
    at ``-offset * sum(w)`` to make that exact); ``g`` = 2 with s16 weights for ``int16``,
    which reads a padded int16 copy of the data.
    """
    n, _, height, width, ib = (int(d) for d in data.shape)
    oc_chunks, ic_chunks, kh, kw, _, ob, group = (int(d) for d in kernel.shape)
    (sh, sw), (dh, dw) = strides, dilation
    oh = out_size(height, padding[0] + padding[2], kh, sh, dh)
    ow = out_size(width, padding[1] + padding[3], kw, sw, dw)
    padded = pad_nchwc(data, padding, pad_value)
    if kind == "int16":
        padded = te.compute(padded.shape, lambda *i: padded[i].astype("int16"), name="data_i16")
    add = offset(kind, str(data.dtype))
    ico = te.reduce_axis((0, ic_chunks), name="ico")
    ry, rx = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")
    icg, kg = te.reduce_axis((0, ib // group), name="icg"), te.reduce_axis((0, group), name="kg")

    oc_group_chunks = oc_chunks // groups

    def body(b, oc, y, x, oi):
        chunk = oc // oc_group_chunks * ic_chunks + ico if groups > 1 else ico
        value = padded[b, chunk, y * sh + ry * dh, x * sw + rx * dw, icg * group + kg]
        value = value.astype("int32")
        if add:
            value = value + add
        weight = kernel[oc, ico, ry, rx, icg, oi, kg].astype("int32")
        return te.sum(value * weight, axis=[ico, ry, rx, icg, kg])

    intrin = (vnni_intrin_name(ob, str(data.dtype)) if kind == "vnni"
              else sdot_intrin_name(str(data.dtype)) if kind == "sdot"
              else intrin_name(kind, str(data.dtype)))
    return te.compute((n, oc_chunks, oh, ow, ob), body, name="conv2d_NCHWc_u8s8",
                      attrs={KERNEL_ATTR: CONV_NCHWC_U8S8, INTRIN_ATTR: intrin})


def conv2d_int8_func(data: relax.TensorType, weight: np.ndarray, *, kind: str,
                     **options) -> tirx.PrimFunc:
    """PrimFunc ``(data, packed weight, start) -> int32 conv`` equal to the plain conv2d."""
    data_ph = te.placeholder([int(d) for d in data.shape], str(data.dtype), name="data")
    weight_ph = te.placeholder(weight.shape, str(weight.dtype), name="weight")
    start_ph = te.placeholder(weight.shape[:1] + weight.shape[5:6], "int32", name="start")
    conv = conv2d_nchwc_u8s8(data_ph, weight_ph, kind=kind, **options)
    func = te.create_prim_func([data_ph, weight_ph, start_ph, conv],
                               index_dtype_override="int64").without_attr("global_symbol")
    return func.with_body(start_from(func.body, func.params[2]))


def constant_value(bb: relax.BlockBuilder, expr: relax.Expr) -> np.ndarray | None:
    """The value of ``expr`` when it is (bound to) a Relax constant, else None."""
    if isinstance(expr, relax.Var):
        bound = bb.lookup_binding(expr)
        expr = bound if bound is not None else expr  # no `or`: Relax exprs have no truth value
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    return None


def legalize_conv2d_int8(bb: relax.BlockBuilder, call: relax.Call, options: dict
                         ) -> relax.Expr | None:
    """The int8 kernel for a packed integer conv2d, or None where none applies.

    Needs u8/s8 data, constant s8 weights, int32 output. Regular convolutions (``ib % 4 == 0``,
    8-channel output blocks, an AVX2 ``Target.current()``) get the tensorized kernel, depthwise
    ones the fp32-arithmetic kernel of ``depthwise_int8`` where that is exact.
    """
    data_dtype = str(call.args[0].ty.dtype)
    weight = constant_value(bb, call.args[1])
    if (data_dtype not in ("uint8", "int8") or options["out_dtype"] != "int32"
            or weight is None or weight.dtype != np.int8 or weight.ndim != 6):
        return None
    groups = int(call.attrs.groups)
    target = tvm.target.Target.current(allow_none=True)
    if groups > 1 and weight.shape[4] == 1 and groups == weight.shape[0] * weight.shape[5]:
        if target is not None and weight.shape[5] <= vnni_lanes(target) \
                and weight.shape[5] in (8, 16):
            vnni = legalize_depthwise_vnni(bb, call, weight, options)
            if vnni is not None:
                return vnni
        return legalize_depthwise_int8(bb, call, weight, options)
    kind = None if target is None else pick_int8_kind(target, weight)
    if kind is None:
        return None
    packed = pack_weight(weight, 2).astype(np.int16) if kind == "int16" else pack_weight(weight)
    sums = weight.astype(np.int64).sum(axis=(1, 2, 3, 4))  # (O/8, 8)
    start = (-offset(kind, data_dtype) * sums).astype(np.int32)
    options = {k: options[k] for k in ("strides", "padding", "dilation", "pad_value")
               if k in options} | {"groups": groups}
    func = conv2d_int8_func(call.args[0].ty, packed, kind=kind, **options)
    gv = bb.add_func(func, "conv2d_nchwc_int8")
    return relax.call_tir(gv, [call.args[0], relax.const(packed, str(packed.dtype)),
                               relax.const(start, "int32")],
                          relax.TensorType(func.params[3].shape, "int32"))


def pick_int8_kind(target: tvm.target.Target, weight: np.ndarray) -> str | None:
    """The intrinsic kind for packed OIHW[ib]i[ob]o s8 ``weight`` on ``target``, or None.

    VNNI (exact for all weights) where the target has it for ``ob`` lanes; else on AVX2
    ``direct`` for pair-safe weights (e.g. 7-bit) and ``int16`` for the others.
    """
    if weight.shape[4] % 4:
        return None
    if weight.shape[5] <= vnni_lanes(target) and weight.shape[5] in (8, 16):
        return "vnni"
    if has_sdot(target) and weight.shape[5] == 4:
        return "sdot"
    if has_avx2_int8(target) and weight.shape[5] == 8:
        return pick_kind(pack_weight(weight))
    return None


def pick_int8_tile(oc_chunks: int, out_h: int, out_w: int, registers: int,
                   kind: str = "direct") -> ConvTile:
    """Register tile of the int8 kernels.

    Measured on MobileNetV2's 1x1 layers (Zen 3, one thread): 3 output-channel blocks x 2
    pixels beats the fp32 choice of 8-12 accumulators by up to 20% (the epilogue and the
    broadcasts weigh more than in fp32), 1 x 8 pixels is best where the channel blocks do not
    divide by 3; other shapes keep the fp32 tile with the intrinsic's registers set aside.
    """
    if kind in ("vnni", "sdot"):  # one instruction per step, 32 registers: the fp32 rule fits
        return pick_tile(oc_chunks, out_h, out_w, registers - _INTRIN_REGISTERS[kind])
    if out_w % 2 == 0 and oc_chunks % 3 == 0:
        return ConvTile(3, 1, 2)
    if out_w % 8 == 0:
        return ConvTile(1, 1, 8)
    return pick_tile(oc_chunks, out_h, out_w, registers - _INTRIN_REGISTERS[kind])


def _kind(intrin: str) -> str:
    if "vnni" in intrin:
        return "vnni"
    if "sdot" in intrin:
        return "sdot"
    return next(k for k in _INTRIN_REGISTERS if f"_{k}" in intrin)


def schedule_conv2d_nchwc_u8s8(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *,
                               registers: int, cores: int, lanes: int = 8,
                               tile: ConvTile | None = None) -> None:
    """The fp32 conv tiling with the (8 output channels x 4 or 2 input channels) step
    tensorized; the padding / int16 copy of the data is computed in a pass of its own."""
    register_intrinsics()
    register_vnni()
    register_sdot()
    intrin = str(sch.get(block).annotations[INTRIN_ATTR])
    producers, _ = producers_and_consumers(sch, block)
    n, oc, y, x, oi, ico, ry, rx, icg, kg = sch.get_loops(block)
    tile = tile or pick_int8_tile(extent(sch, oc), extent(sch, y), extent(sch, x), registers,
                                  _kind(intrin))
    oc_o, oc_i = sch.split(oc, [None, tile.oc])
    y_o, y_i = sch.split(y, [None, tile.y])
    x_o, x_i = sch.split(x, [None, tile.x])
    outer = [n, y_o, oc_o, x_o]
    sch.reorder(*outer, ico, ry, rx, icg, oc_i, y_i, x_i, oi, kg)
    tail = fuse_epilogue(sch, block, x_o)
    parallelize(sch, outer[:-1], cores)
    for loop in (oc_i, y_i, x_i):
        sch.unroll(loop)
    init = sch.decompose_reduction(block, ico)
    sch.vectorize(sch.get_loops(init)[-1])
    vectorize_pixels(sch, tail)
    sch.tensorize(oi, intrin)
    tensorize_high_mul(sch)
    for producer in producers[:-1]:
        sch.compute_inline(producer)
    if producers:
        schedule_spatial(sch, producers[-1], lanes, cores)


@relax.expr_functor.mutator
class _ZeroPointPads(relax.expr_functor.PyExprMutator):
    """``conv2d(nn.pad(x, zp))`` on packed 8-bit data -> the int8 kernel padding ``x`` with
    ``zp`` itself (see :func:`fold_zero_point_pads`)."""

    def _unpadded(self, data: relax.Expr) -> tuple[relax.Expr, tuple[int, ...], int] | None:
        """(the conv's data without its zero-point pad, (top, left, bottom, right), value):
        a pad of the packed tensor, or a pad of an NCHW tensor packed afterwards (the first
        conv, whose input is packed after the pad)."""
        packing = bound_call(self, data, "relax.layout_transform")
        pad = bound_call(self, packing.args[0] if packing is not None else data, "relax.nn.pad")
        if pad is None or str(pad.attrs.pad_mode) != "constant" \
                or str(pad.args[0].ty.dtype) not in ("uint8", "int8"):
            return None
        widths = [int(v) for v in pad.attrs.pad_width]
        value = float(pad.attrs.pad_value)
        if len(widths) != (8 if packing is not None else 10) or any(widths[:4]) \
                or any(widths[8:]) or value != int(value):
            return None
        top, bottom, left, right = widths[4:8]
        unpadded = pad.args[0]
        if packing is not None:
            unpadded = self.builder_.emit(relax.op.layout_transform(
                unpadded, packing.attrs.index_map, packing.attrs.pad_value))
        return unpadded, (top, left, bottom, right), int(value)

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
            return call
        options = blocked_conv_options(call)
        if options is None or any(options["padding"]) \
                or str(call.args[0].ty.dtype) not in ("uint8", "int8"):
            return call
        found = self._unpadded(call.args[0])
        if found is None:
            return call
        data, padding, value = found
        attrs = call.attrs
        folded = self.builder_.normalize(relax.op.nn.conv2d(
            data, call.args[1], strides=attrs.strides, padding=padding,
            dilation=attrs.dilation, groups=attrs.groups, data_layout=attrs.data_layout,
            kernel_layout=attrs.kernel_layout, out_layout=attrs.out_layout,
            out_dtype=attrs.out_dtype))
        kernel = legalize_conv2d_int8(self.builder_, folded,
                                      options | {"padding": padding, "pad_value": value})
        return call if kernel is None else kernel


@tvm.ir.transform.module_pass(opt_level=0, name="FoldZeroPointPads")
def fold_zero_point_pads(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Give the zero-point padding of integer convs to their int8 kernels.

    ``RealizeInteger`` pads an integer conv's input with the activation zero point in an
    ``nn.pad`` of its own (conv2d pads with 0): one more kernel and one more copy of the
    activations per layer whose zero point is not 0 (after hardswish, SiLU, or any layer
    without ReLU). The int8 kernels stage a padded copy of their input anyway; here they are
    legalized early with the zero point as the padding value, and the ``nn.pad`` is left dead.
    Convs that no int8 kernel takes keep the ``nn.pad``. Run under the target, before
    ``LegalizeOps``.
    """
    return rewrite_functions(mod, _ZeroPointPads(mod))
