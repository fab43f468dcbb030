"""int8 depthwise conv2d on VNNI: 4 taps of a row per ``vpdpbusd``, exact.

A depthwise output lane (one channel) sums taps of its own channel, so ``vpdpbusd`` needs the
4 bytes of each 32-bit lane to be 4 taps of one channel: 4 horizontally consecutive pixels x
16 channels (64 consecutive bytes of the NCHW16c input) permuted into channels x taps. A 3x3
window is then 3 ``vpdpbusd`` per 16 outputs (the fourth tap of each row weighs 0) and a 5x5
window 10, where fp32 needs 9 and 25 FMAs. Products and sums are exact int32 arithmetic. s8
activations are staged as u8 (``x + 128``, padding too) and the sums start at
``-128 * sum(w)``, as in ``int8.py``.

Stages per channel block: the padded, offset u8 plane (1 byte per input element), then the
convolution with its epilogue per row tile. With AVX512-VBMI the permutation is one
``vpermb`` in registers before each ``vpdpbusd`` (``int8_vnni.permuted_lanewise_name``).
Without it, the permutation is LLVM's generic shuffle (8 unpacks and 3 inserts per 64 bytes),
so the kernel stages the permuted quads once per band of output rows (``band_rows``) and
reuses them across the rows of the window (``staged``). On MobileNetV2 (Zen 4, VBMI) the
staged quads cost more than permuting in registers: its depthwise layers ran 0.70-1.21x fp32
staged, 0.57-0.96x permuting each time (fresh-process profiles, docs/int8.md).
Dilated windows keep ``depthwise_int8``'s fp32-arithmetic kernel.
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
    vectorize_pixels,
)
from tvm_compress.backend.schedules.compute import KERNEL_ATTR, out_size
from tvm_compress.backend.schedules.depthwise import row_tile
from tvm_compress.backend.schedules.hardware import has_vbmi
from tvm_compress.backend.schedules.int8_intrin import start_from
from tvm_compress.backend.schedules.int8_vnni import (
    lanewise_name,
    offset,
    permuted_lanewise_name,
    quads_name,
    quads_order,
    register_intrinsics,
)
from tvm_compress.backend.schedules.requantize_intrin import tensorize_high_mul

DEPTHWISE_NCHWC_VNNI = "depthwise_nchwc_vnni"
BAND_ATTR = "tvm_compress.band_rows"
OUT_ELEMWISE_FUSABLE = 4  # TVM's OpPatternKind kOutEWiseFusable (convolutions)
_QUADS_BYTES = 24 * 1024  # the quads of a band of rows stay in L1 (32-48 KiB) while read


def band_rows(out_h: int, out_w: int, kh: int, stride: int, bytes_per_pixel: int) -> int:
    """Output rows per band of staged quads: the whole height, or the most rows (at most 8,
    dividing it) whose input rows' quads fit ``_QUADS_BYTES``. Bands restage the window
    overlap (``kh - stride`` rows) but keep the quads in L1; whole planes of quads (53 KiB per
    channel block on 28x28 layers) ran 1.5x slower than fp32 there. Where no band fits, the
    narrowest: on 112x112 the whole plane of quads (817 KiB) made the kernel 1.12x fp32, bands
    of 2 rows 0.78x. Never 1 row of several:
    TVM then classifies the kernel as a plain reduction and does not fuse its epilogue."""
    divisors = [t for t in [*range(2, min(out_h, 8) + 1), out_h] if out_h % t == 0]
    fits = [t for t in divisors
            if ((t - 1) * stride + kh) * out_w * bytes_per_pixel <= _QUADS_BYTES]
    return max(fits, default=min(divisors))


def pack_depthwise_weight(weight: np.ndarray) -> np.ndarray:
    """OIHW1i[b]o depthwise weights -> (O/b, kh, ceil(kw/4), b, 4), zeros after the last tap."""
    chunks, _, kh, kw, _, block = weight.shape
    groups = -(-kw // 4)
    taps = np.zeros((chunks, kh, groups * 4, block), weight.dtype)
    taps[:, :, :kw] = weight[:, 0, :, :, 0, :]
    return np.ascontiguousarray(
        taps.reshape(chunks, kh, groups, 4, block).transpose(0, 1, 2, 4, 3))


def depthwise_nchwc_vnni(data: te.Tensor, weight: te.Tensor, perm: te.Tensor, *, kw: int,
                         strides: tuple[int, int], padding: tuple[int, int, int, int],
                         pad_value: int = 0, staged: bool = False) -> te.Tensor:
    """Depthwise conv2d, data u8/s8 NCHW[b]c, weight (O/b, kh, G, b, 4) s8 -> int32 (without
    the ``-offset * sum(w)`` start, which :func:`depthwise_vnni_func` adds); ``perm``: the
    byte order of a quad (``int8_vnni.quads_order``), which the kernel only reads ``& 0``;
    ``staged``: permuted quads staged per band of rows (see the module docstring).

    Weights (O/b, OH, H, G, b, 4), one row of taps per output row and input row
    (:func:`rows_weight`), make it the short-map form: the sum runs over the input's rows
    instead of the window's, and the plane has no padding rows."""
    n, chunks, height, width, block = (int(d) for d in data.shape)
    short = len(weight.shape) == 6
    sh, sw = strides
    top, left, bottom, right = padding
    kh = None if short else int(weight.shape[1])
    groups = int(weight.shape[-3])
    oh = int(weight.shape[1]) if short else out_size(height, top + bottom, kh, sh, 1)
    ow = out_size(width, left + right, kw, sw, 1)
    add = offset(str(data.dtype))
    padded_w = max(width + left + right, (ow - 1) * sw + 4 * groups)
    if short:
        top = bottom = 0

    def pad(b, c, y, x, ci):
        inside = tirx.all(y >= top, y < top + height, x >= left, x < left + width)
        yy = tirx.min(tirx.max(y - top, 0), height - 1)
        xx = tirx.min(tirx.max(x - left, 0), width - 1)
        value = (data[b, c, yy, xx, ci].astype("int32") + add).astype("uint8")
        return tirx.if_then_else(inside, value, tirx.const(pad_value + add, "uint8"))

    plane = te.compute((n, chunks, height + top + bottom, padded_w, block), pad, name="data_u8")
    ry = te.reduce_axis((0, height if short else int(weight.shape[1])), name="ry")
    rg = te.reduce_axis((0, groups), name="rg")
    rk = te.reduce_axis((0, 4), name="rk")

    def tap(c, y, ci):  # noqa: ANN001, ANN202
        if short:
            return weight[c, y, ry, rg, ci, rk]
        return weight[c, ry, rg, ci, rk]

    def quad(b, c, row, x, g, ci, k):  # noqa: ANN001, ANN202 - read ``| (perm & 0)``
        return tirx.bitwise_or(plane[b, c, row, x * sw + 4 * g + k, ci],
                               tirx.bitwise_and(perm[ci * 4 + k], tirx.const(0, "uint8")))

    attrs = {KERNEL_ATTR: DEPTHWISE_NCHWC_VNNI}
    if staged:
        if short:
            rows, span = oh, height
        else:
            rows = band_rows(oh, ow, kh, sh, groups * block * 4)
            span = (rows - 1) * sh + kh  # input rows of a band
        quads = te.compute((n, chunks, oh // rows, span, ow, groups, block, 4),
                           lambda b, c, band, r, x, g, ci, k: quad(
                               b, c, band * rows * sh + r, x, g, ci, k), name="data_quads")
        attrs[BAND_ATTR] = rows

        def source(b, c, y, x, ci):  # noqa: ANN001, ANN202
            return quads[b, c, y // rows, ry if short else y % rows * sh + ry, x, rg, ci, rk]
    else:
        def source(b, c, y, x, ci):  # noqa: ANN001, ANN202
            return quad(b, c, ry if short else y * sh + ry, x, rg, ci, rk)

    return te.compute(
        (n, chunks, oh, ow, block),
        lambda b, c, y, x, ci: te.sum(
            source(b, c, y, x, ci).astype("int32") * tap(c, y, ci).astype("int32"),
            axis=[ry, rg, rk]),
        name="depthwise_conv2d_NCHWc_vnni", attrs=attrs)


def rows_weight(packed: np.ndarray, start: np.ndarray, *, height: int, stride: int, top: int,
                bottom: int, pad_u8: int, taps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The short-map form of packed weights (O/b, kh, G, b, 4) and start (O/b, b): per output
    row ``y`` and input row ``j`` the window row ``j + top - y * stride`` (zeros outside it),
    and the start plus what the window's padding rows add (``pad_u8`` times their taps;
    ``taps``: the per-row tap sums, (O/b, kh, b)). For maps of fewer rows than the window
    (PP-LCNet's 5x5 layers on 2- and 3-row maps), where most window rows are padding."""
    chunks, kh, groups, block, _ = packed.shape
    oh = (height + top + bottom - kh) // stride + 1
    weight = np.zeros((chunks, oh, height, groups, block, 4), packed.dtype)
    rows_start = np.repeat(start[:, None, :], oh, axis=1).astype(np.int64)
    for y in range(oh):
        inside = set()
        for j in range(height):
            r = j + top - y * stride
            if 0 <= r < kh:
                weight[:, y, j] = packed[:, r]
                inside.add(r)
        for r in set(range(kh)) - inside:
            rows_start[:, y, :] += pad_u8 * taps[:, r, :].astype(np.int64)
    return weight, rows_start.astype(np.int32)


def depthwise_vnni_func(data: relax.TensorType, weight: np.ndarray, *, kw: int,
                        strides: tuple[int, int], padding: tuple[int, int, int, int],
                        pad_value: int = 0, staged: bool = False) -> tirx.PrimFunc:
    """PrimFunc ``(data, packed weight, start, quad order) -> int32 depthwise conv``."""
    short = weight.ndim == 6
    block = weight.shape[-2]
    data_ph = te.placeholder([int(d) for d in data.shape], str(data.dtype), name="data")
    weight_ph = te.placeholder(weight.shape, "int8", name="weight")
    start_shape = (weight.shape[0], weight.shape[1], block) if short else (weight.shape[0], block)
    start_ph = te.placeholder(start_shape, "int32", name="start")
    perm_ph = te.placeholder((block * 4,), "uint8", name="perm")
    conv = depthwise_nchwc_vnni(data_ph, weight_ph, perm_ph, kw=kw, strides=strides,
                                padding=padding, pad_value=pad_value, staged=staged)
    func = te.create_prim_func([data_ph, weight_ph, start_ph, perm_ph, conv],
                               index_dtype_override="int64").without_attr("global_symbol")
    func = func.with_body(start_from(func.body, func.params[2], (1, 2, 4) if short else (1, 4)))
    # what TVM infers for the window form; for the short-map form (weights indexed by the output
    # row) it infers a plain reduction, and FuseOps would not fuse the requantization into it
    return func.with_attr("op_pattern", OUT_ELEMWISE_FUSABLE) if short else func


def legalize_depthwise_vnni(bb: relax.BlockBuilder, call: relax.Call, weight: np.ndarray,
                            options: dict) -> relax.Expr | None:
    """The VNNI kernel for a packed u8/s8 depthwise conv2d, or None (dilated windows)."""
    if tuple(options["dilation"]) != (1, 1) or options["out_dtype"] != "int32":
        return None
    data_dtype = str(call.args[0].ty.dtype)
    packed = pack_depthwise_weight(weight)
    sums = weight.astype(np.int64).sum(axis=(1, 2, 3, 4))  # (O/b, b)
    start = (-offset(data_dtype) * sums).astype(np.int32)
    height, kh = int(call.args[0].ty.shape[2]), int(weight.shape[2])
    if height < kh:  # short map: sum over its rows (rows_weight)
        top, _, bottom, _ = options["padding"]
        packed, start = rows_weight(
            packed, start, height=height, stride=int(options["strides"][0]), top=int(top),
            bottom=int(bottom), pad_u8=int(options.get("pad_value", 0)) + offset(data_dtype),
            taps=weight.astype(np.int64).sum(axis=(1, 3, 4)))
    target = tvm.target.Target.current(allow_none=True)
    func = depthwise_vnni_func(call.args[0].ty, packed, kw=int(weight.shape[3]),
                               strides=options["strides"], padding=options["padding"],
                               pad_value=options.get("pad_value", 0),
                               staged=target is None or not has_vbmi(target))
    gv = bb.add_func(func, "depthwise_conv2d_int8")
    order = np.array(quads_order(int(weight.shape[5])), np.uint8)
    return relax.call_tir(gv, [call.args[0], relax.const(packed, "int8"),
                               relax.const(start, "int32"), relax.const(order, "uint8")],
                          relax.TensorType(func.params[4].shape, "int32"))


def schedule_depthwise_nchwc_vnni(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *,
                                  lanes: int, registers: int, cores: int) -> None:
    """Row tiles of output pixels, one ``vpdpbusd`` per 4 taps; staging per channel block."""
    register_intrinsics()
    producers, _ = producers_and_consumers(sch, block)
    n, c, y, x, ci, ry, rg, rk = sch.get_loops(block)
    block_lanes = extent(sch, ci)
    band = sch.get(block).annotations.get(BAND_ATTR)  # staged quads (module docstring)
    y_o, y_i = sch.split(y, [None, int(band)]) if band is not None else (y, None)
    x_o, x_i = sch.split(x, [None, row_tile(extent(sch, x), registers)])
    sch.reorder(*(loop for loop in (n, c, y_o, y_i, x_o, ry, rg, x_i, ci, rk) if loop))
    tail = fuse_epilogue(sch, block, x_o)
    if band is not None:
        plane, quads = producers[-2], producers[-1]
        sch.compute_at(quads, y_o, preserve_unit_loops=True)
    else:
        plane = producers[-1]
    sch.compute_at(plane, c, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(plane)[-1])
    if band is not None:
        sch.tensorize(sch.get_loops(quads)[-2], quads_name(block_lanes))
    parallelize(sch, [n, c], cores)
    sch.unroll(x_i)
    init = sch.decompose_reduction(block, ry)
    sch.tensorize(ci, lanewise_name(block_lanes) if band is not None
                  else permuted_lanewise_name(block_lanes))
    tensorize_high_mul(sch)
    inner = sch.get_loops(init)[-1]
    if extent(sch, inner) <= 4 * lanes:
        sch.vectorize(inner)
    vectorize_pixels(sch, tail)
