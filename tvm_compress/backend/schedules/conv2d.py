"""Schedule for regular and grouped conv2d in NCHW[x]c (see ``compute.conv2d_nchwc``).

Register tile: ``t_oc`` output-channel blocks x ``t_y * t_x`` output pixels, one SIMD register
each; the reduction over input channels and kernel window runs around it, so every input scalar
is broadcast once per tile and every weight vector loaded once per tile. The element-wise
epilogue is computed per tile while it is still in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir

from tvm_compress.backend.schedules.blocks import (
    extent,
    fuse_epilogue,
    parallelize,
    producers_and_consumers,
    schedule_spatial,
)


@dataclass(frozen=True)
class ConvTile:
    """Register tile of a blocked convolution: output-channel blocks x rows x columns."""

    oc: int
    y: int
    x: int

    @property
    def accumulators(self) -> int:
        return self.oc * self.y * self.x

    @property
    def fma_per_load(self) -> float:
        return self.accumulators / (self.oc + self.y * self.x)


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def pick_tile(oc_chunks: int, out_h: int, out_w: int, registers: int, *,
              window_overlap: bool = False) -> ConvTile:
    """Register tile: accumulators + one register per weight vector + one broadcast register.

    Preference: at least 8 accumulators (two FMA pipes x four cycles latency), at most 12 (wider
    tiles spilled on AVX2 in measurements), then the most FMAs per load. Candidates are exact
    divisors (no tail loops); rows are tiled only when a whole output row is too short.

    ``window_overlap``: the input has no channel block (3-channel stems) and the kernel window is
    wider than the stride, so the window loop is innermost and LLVM, unrolling it, reuses the
    broadcast of one pixel's last window column as the next pixel's first: one more live
    register per pixel of the tile, and at most 14 accumulators. Without counting them a 2 x 14
    tile of a 3x3 stride-2 stem spilled (MobileNetV2's stem: 97 -> 70 us). The cap is measured:
    on five stems (3x3 stride 1 and 2, 7x7 stride 2; 1, 2 and 4 output-channel blocks) the
    fastest tile had 14 accumulators or fewer (U-Net's 3x3 stride-1 stem: 2 x 8 267 us, 2 x 7
    228 us).
    """
    best, best_key = ConvTile(1, 1, 1), None
    for t_oc in _divisors(oc_chunks, 4):
        for t_x in _divisors(out_w, registers):
            for t_y in _divisors(out_h, registers) if t_x == out_w else [1]:
                tile = ConvTile(t_oc, t_y, t_x)
                reused = tile.y * (tile.x - 1) if window_overlap else 0
                if tile.accumulators + t_oc + 1 + reused > registers or (
                        window_overlap and tile.accumulators > 14):
                    continue
                acc = tile.accumulators
                key = (acc >= 8, acc <= 12 or registers > 16, tile.fma_per_load, acc)
                if best_key is None or key > best_key:
                    best, best_key = tile, key
    return best


def schedule_conv2d_nchwc(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *,
                          lanes: int, registers: int, cores: int,
                          tile: ConvTile | None = None) -> None:
    """Tile, reorder, vectorize and parallelize one ``conv2d_nchwc`` block with its epilogue.

    ``tile`` overrides the register tile chosen by :func:`pick_tile`.
    """
    producers, _ = producers_and_consumers(sch, block)  # the padding, if any
    n, oc, y, x, oi, ico, ry, rx, ici = sch.get_loops(block)
    tile = tile or pick_tile(extent(sch, oc), extent(sch, y), extent(sch, x), registers,
                             window_overlap=_window_overlap(sch, block, x, rx, ici))
    oc_o, oc_i = sch.split(oc, [None, tile.oc])
    y_o, y_i = sch.split(y, [None, tile.y])
    x_o, x_i = sch.split(x, [None, tile.x])
    # Weights larger than the input: stream each weight tile once (output channels outside);
    # otherwise keep an input row hot while all output channels pass over it.
    sizes = {len(r.source.shape): _buffer_bytes(r.source) for r in sch.get(block).reads}
    data_bytes, weight_bytes = sizes.get(5, 0), sizes.get(6, 0)
    outer = [n, oc_o, y_o, x_o] if weight_bytes > data_bytes else [n, y_o, oc_o, x_o]
    # Pixels outside output-channel blocks: LLVM then keeps the tile's weight vectors in
    # registers and broadcasts one input scalar at a time (accumulators + t_oc + 1 registers, as
    # pick_tile budgets). The other order hoisted all t_x broadcasts and spilled them to the
    # stack for a 3x4 tile (14% slower on 56x56 layers).
    sch.reorder(*outer, ico, ry, rx, ici, y_i, x_i, oc_i, oi)
    tail = fuse_epilogue(sch, block, x_o)
    parallelize(sch, outer[:-1], cores)
    for loop in (y_i, x_i, oc_i):
        sch.unroll(loop)
    sch.vectorize(oi)
    init = sch.decompose_reduction(block, ico)
    _vectorize_tile(sch, init, lanes)
    _vectorize_tile(sch, tail, lanes)
    # Compute-bound: a separate padding pass is cheaper than bounds checks in the inner loop.
    for producer in producers:
        schedule_spatial(sch, producer, lanes, cores)


def _window_overlap(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, x: s_tir.LoopRV,
                    rx: s_tir.LoopRV, ici: s_tir.LoopRV) -> bool:
    """Unblocked input channels and a kernel window wider than the stride (see pick_tile)."""
    if extent(sch, ici) != 1 or extent(sch, x) < 2:
        return False
    output = sch.get(block).writes[0].source
    data = [r.source for r in sch.get(block).reads
            if len(r.source.shape) == 5 and not r.source.same_as(output)]
    if not data:
        return False
    width, kernel = int(data[0].shape[3]), extent(sch, rx)
    stride = (width - kernel) // (extent(sch, x) - 1)
    return kernel > stride


def _buffer_bytes(buffer) -> int:
    size = 1
    for dim in buffer.shape:
        size *= int(dim)
    return size * buffer.dtype.bits // 8


def _vectorize_tile(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """Unroll a per-tile block (init or epilogue) and vectorize its channel-block loop."""
    loops = sch.get_loops(block)
    inner = loops[-1]
    if extent(sch, inner) <= 4 * lanes:
        sch.vectorize(inner)
