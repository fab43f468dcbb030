"""Schedule for depthwise conv2d in NCHW[x]c (see ``compute.depthwise_nchwc``).

Each output pixel is one SIMD register of ``x`` channels; a row tile of pixels accumulates the
kernel window with one weight vector per tap shared across the tile. Depthwise layers are
memory-bound, so the padding is produced per output row band (while it is in cache) instead of
as a separate pass over the whole input.
"""

from __future__ import annotations

from tvm import s_tir

from tvm_compress.schedules.blocks import (
    extent,
    fuse_epilogue,
    parallelize,
    producers_and_consumers,
    schedule_spatial,
)
from tvm_compress.schedules.conv2d import pick_tile


def schedule_depthwise_nchwc(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *,
                             lanes: int, registers: int, cores: int) -> None:
    """Tile, vectorize and parallelize one ``depthwise_nchwc`` block with its epilogue."""
    producers, _ = producers_and_consumers(sch, block)
    n, c, y, x, ci, ry, rx = sch.get_loops(block)
    tile = pick_tile(1, extent(sch, y), extent(sch, x), registers)
    y_o, y_i = sch.split(y, [None, tile.y])
    x_o, x_i = sch.split(x, [None, tile.x])
    sch.reorder(n, c, y_o, x_o, ry, rx, y_i, x_i, ci)
    tail = fuse_epilogue(sch, block, x_o)
    parallelize(sch, [n, c, y_o], cores)
    for loop in (y_i, x_i):
        sch.unroll(loop)
    sch.vectorize(ci)
    init = sch.decompose_reduction(block, ry)
    for stage in (init, tail):
        inner = sch.get_loops(stage)[-1]
        if extent(sch, inner) <= 4 * lanes:
            sch.vectorize(inner)
    for producer in producers:
        schedule_spatial(sch, producer, lanes, cores)
