"""Schedule for depthwise conv2d in NCHW[x]c (see ``compute.depthwise_nchwc``).

Each output pixel is one SIMD register of ``x`` channels; a row tile of pixels accumulates the
kernel window with one weight vector per tap shared across the tile. Depthwise layers are
memory-bound, so the padding is inlined (a bounds check per tap) rather than written out as a
padded copy of the input: 1.2-2.4x faster on MobileNetV2's depthwise layers.
"""

from __future__ import annotations

from tvm import s_tir

from tvm_compress.backend.schedules.blocks import (
    extent,
    fuse_epilogue,
    parallelize,
    producers_and_consumers,
    vectorize_pixels,
)
from tvm_compress.backend.schedules.requantize_intrin import tensorize_high_mul

STAGE_TAPS = 25  # int8 kernels with this many taps or more convert their input once
STAGE_PIXELS = 100  # ... when their output planes have this many pixels


def row_tile(width: int, registers: int) -> int:
    """Output pixels per register tile: a divisor of the row, 7 when possible.

    Measured on MobileNetV2's depthwise layers (AVX2): 7 beats 8 by 10-25% and wider tiles
    spill; tiles of 2-4 leave the FMA pipes idle.
    """
    limit = min(8, registers // 2)
    if width % 7 == 0 and limit >= 7:
        return 7
    return max(d for d in range(1, limit + 1) if width % d == 0)


def pixel_tile(height: int, width: int, registers: int, *,
               integer: bool = False) -> tuple[int, int]:
    """(rows, columns) of the register tile: :func:`row_tile` columns and, where that leaves
    few accumulators (a width like 38 = 2 x 19 or 19 itself), as many rows as keep them under
    a limit: each pixel's FMA chain waits four cycles per tap, so 1-4 accumulators leave the
    two FMA pipes mostly idle.

    Measured on the 5x5 and 3x3 depthwise layers of a PP-PicoDet layout model (widths 152, 76,
    38, 19; AVX2, kernels alone): fp32 gains up to 2x with 2 or 3 columns and up to 10
    accumulators, and loses up to 15% with 4 columns (2-3 rows); the int8 kernel (more work per
    tap, and an epilogue per pixel) gains 1.3-2x with up to 4 columns and 12 accumulators.
    """
    columns = row_tile(width, registers)
    max_columns, limit = (4, 12) if integer else (3, 10)
    if columns > max_columns:
        return 1, columns
    limit = min(limit, registers - 4)
    rows = max([1] + [d for d in range(2, height + 1)
                      if height % d == 0 and d * columns <= limit])
    return rows, columns


def schedule_depthwise_nchwc(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *,
                             lanes: int, registers: int, cores: int,
                             requantize: bool = False) -> None:
    """Tile, vectorize and parallelize one ``depthwise_nchwc`` block with its epilogue; its
    producers (padding, and for ``depthwise_int8`` the u8 -> fp32 conversion) are inlined into
    the taps. ``requantize``: the epilogue is an integer requantization, whose 64-bit high
    multiplies are tensorized (``requantize_intrin``) before its pixels are vectorized."""
    producers, _ = producers_and_consumers(sch, block)
    n, c, y, x, ci, ry, rx = sch.get_loops(block)
    height, width = extent(sch, y), extent(sch, x)
    rows, columns = pixel_tile(height, width, registers, integer=requantize)
    y_o, y_i = sch.split(y, [None, rows])
    x_o, x_i = sch.split(x, [None, columns])
    sch.reorder(n, c, y_o, x_o, ry, rx, y_i, x_i, ci)
    tail = fuse_epilogue(sch, block, x_o)
    # int8 with 25+ taps: convert each input once, into an fp32 copy of the block's padded
    # plane, instead of at every tap (5x5: up to 25 conversions per input). Measured (AVX2,
    # kernels alone): 5x5 layers 5-10% faster with 14x14 outputs and larger, 5-10% slower
    # with 7x7 ones; 3x3 layers no faster (see depthwise_int8)
    stage = requantize and bool(producers) \
        and sch.get(producers[-1]).name_hint == "data_f32" \
        and extent(sch, ry) * extent(sch, rx) >= STAGE_TAPS \
        and height * width >= STAGE_PIXELS
    for producer in producers[:-1] if stage else producers:
        sch.compute_inline(producer)
    fused = parallelize(sch, [n, c, y_o], cores)
    if stage:
        sch.compute_at(producers[-1], fused if fused is not None else c)
        sch.vectorize(sch.get_loops(producers[-1])[-1])
    for loop in (y_i, x_i):
        sch.unroll(loop)
    sch.vectorize(ci)
    init = sch.decompose_reduction(block, ry)
    if requantize:
        tensorize_high_mul(sch)
    for stage in (init,) if requantize else (init, tail):
        inner = sch.get_loops(stage)[-1]
        if extent(sch, inner) <= 4 * lanes:
            sch.vectorize(inner)
    if requantize:
        vectorize_pixels(sch, tail)
