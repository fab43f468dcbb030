"""Schedule for matmul / dense blocks whose weight is laid out [K, N] (as the frontends fold it).

The output columns are vectorized: each k step broadcasts one input scalar per row and loads one
contiguous weight vector per column register, so the weight matrix streams through once.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from tvm_compress.backend.schedules.blocks import (
    child_blocks,
    extent,
    fuse_epilogue,
    parallelize,
    producers_and_consumers,
    schedule_spatial,
)


def _is_var(expr: tirx.PrimExpr, var: tirx.Var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def find_matmul(sch: s_tir.Schedule) -> s_tir.schedule.SBlockRV | None:
    """The single ``C[..., i, j] += A[..., i, k] * B[..., k, j]`` block, if there is one."""
    candidates = []
    for block_rv in child_blocks(sch):
        block = sch.get(block_rv)
        reduce = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        spatial = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
        if not reduce:
            continue
        if len(reduce) != 1 or len(spatial) < 2 or len(block.reads) != 2:
            return None
        k, j = reduce[0].var, spatial[-1].var
        lhs, rhs = (r.region for r in block.reads)
        out = block.writes[0].region
        if (len(rhs) >= 2 and _is_var(rhs[-1].min, j) and _is_var(rhs[-2].min, k)
                and _is_var(lhs[-1].min, k) and _is_var(out[-1].min, j)):
            candidates.append(block_rv)
        else:
            return None
    return candidates[0] if len(candidates) == 1 else None


def _column_tile(n: int, lanes: int, max_vectors: int) -> tuple[int, int]:
    """(columns per tile, vector width). Narrower vectors (half, quarter register) when ``n`` is
    not a multiple of the register: 1000 classes on AVX-512 run as 8-lane vectors, not scalars."""
    for width in (lanes, lanes // 2, lanes // 4):
        if width >= 4 and n % width == 0:
            chunks = n // width
            return width * max(u for u in range(1, max_vectors + 1) if chunks % u == 0), width
    return (n if n <= 4 * lanes else 1), lanes


def schedule_matmul(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *, lanes: int,
                    registers: int, cores: int) -> None:
    """Tile rows x vector columns, reduce over k outside the tile, fuse the epilogue.

    A single row (a classifier head at batch 1) is a matrix-vector product: see
    :func:`schedule_gemv`.
    """
    *batch, i, j, k = sch.get_loops(block)
    if all(extent(sch, loop) == 1 for loop in (*batch, i)) and schedule_gemv(
            sch, block, lanes=lanes, cores=cores):
        return
    # Up to (registers - 1) // 2 column vectors: each is an independent accumulator chain, and
    # a GEMV (one row) is latency bound with one (1280x1000 classifier: 207 -> 92 us).
    cols, width = _column_tile(extent(sch, j), lanes, max(1, (registers - 1) // 2))
    vectors = max(cols // width, 1)
    rows = max(r for r in range(1, 5) if extent(sch, i) % r == 0
               and r * vectors + vectors + 1 <= registers)
    i_o, i_i = sch.split(i, [None, rows])
    j_o, j_i = sch.split(j, [None, cols])
    if cols % width == 0 and cols > width:
        j_u, j_v = sch.split(j_i, [None, width])
    else:
        j_u, j_v = None, j_i
    inner = [loop for loop in (i_i, j_u, j_v) if loop is not None]
    sch.reorder(*batch, i_o, j_o, k, *inner)
    tail = fuse_epilogue(sch, block, j_o)
    parallelize(sch, [*batch, i_o, j_o], cores)
    for loop in inner[:-1]:
        sch.unroll(loop)
    if extent(sch, j_v) > 1:
        sch.vectorize(j_v)
    init = sch.decompose_reduction(block, k)
    for stage in (init, tail):
        last = sch.get_loops(stage)[-1]
        if 1 < extent(sch, last) <= 4 * lanes:
            sch.vectorize(last)


def schedule_gemv(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *, lanes: int,
                  cores: int) -> bool:
    """One row times a [K, N] weight: split K into contiguous slabs of rows, one partial sum
    per slab (``rfactor``), then add the partials and apply the epilogue.

    Tiling the columns instead (every thread reading a narrow strip of each row) read one
    cache line pair per 4 KB weight row, a new page each time, which no prefetcher follows:
    latency bound (1280x1000 classifier: 131 us; as slabs of whole rows: 57 us, 2 threads).
    Returns False, leaving ``block`` untouched, when the shape does not suit.
    """
    *batch, i, j, k = sch.get_loops(block)
    n, depth = extent(sch, j), extent(sch, k)
    width = next((w for w in (lanes, lanes // 2, lanes // 4) if w >= 4 and n % w == 0), 0)
    slabs = next((c for c in (2 * cores, cores, 4 * cores) if c > 1 and depth % c == 0
                  and depth // c >= 64), 0)
    if not width or not slabs or n < 2 * width:
        return False
    k_o, _ = sch.split(k, [slabs, None])
    partial = sch.rfactor(k_o, 0)
    *outer, col, slab, inner = sch.get_loops(partial)  # rfactor keeps: spatial, k_o, k_i
    sch.reorder(slab, *outer, inner, col)
    sch.parallel(slab)
    sch.vectorize(sch.split(col, [None, width])[1])
    sch.decompose_reduction(partial, inner)
    # The sum over slabs: slab loop outside, columns vectorized inside.
    *_, cols, slab_sum = sch.get_loops(block)
    sch.reorder(slab_sum, cols)
    sch.vectorize(sch.split(cols, [None, width])[1])
    sch.decompose_reduction(block, slab_sum)
    _, consumers = producers_and_consumers(sch, block)
    tails = []
    for consumer in consumers[:-1]:
        try:
            sch.compute_inline(consumer)
        except s_tir.schedule.ScheduleError:  # it writes an output of its own
            tails.append(consumer)
    for tail in [*tails, *consumers[-1:]]:  # element-wise over N: one thread, vectors of width
        last = sch.get_loops(tail)[-1] if sch.get_loops(tail) else None
        if last is not None and extent(sch, last) == n:
            sch.vectorize(sch.split(last, [None, width])[1])
        else:
            schedule_spatial(sch, tail, lanes, 1)
    return True
