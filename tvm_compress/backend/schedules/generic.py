"""Schedules for what is left after the convolution and matmul rules.

* pooling and other window/axis reductions (max/avg pool, global mean): the reduction loops go
  outside the innermost spatial loop, which is vectorized (the channel block in NCHW[x]c);
* purely element-wise / injective functions (layout transforms, residual adds): inline into the
  last block, iterate in the order of the output's memory (a transpose then writes whole cache
  lines, each from one thread), parallel outer loops, vectorized inner loop;
* the fallback: any other mix of blocks, each reduction and spatial block scheduled as above.
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx

from tvm_compress.backend.schedules.blocks import (
    child_blocks,
    extent,
    is_reduction,
    parallelize,
    schedule_spatial,
)


def _vector_tile(size: int, lanes: int) -> int | None:
    """Inner spatial tile for a reduction: the largest divisor of ``size`` from ``lanes`` to
    ``4 * lanes`` (that many accumulators stay in registers), or ``size`` itself when small."""
    if 2 <= size <= 4 * lanes:
        return size
    fits = [d for d in range(lanes, 4 * lanes + 1, lanes) if size % d == 0]
    return max(fits) if fits else None


def schedule_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *, lanes: int,
                       cores: int) -> s_tir.schedule.LoopRV | None:
    """Spatial loops outside (parallel), reductions, then a vectorized tile of the innermost
    spatial axis (split off when the axis is long, e.g. the width of an NCHW conv).

    Returns the innermost loop outside the reductions (where an epilogue can be computed), or
    None when every spatial loop is inside them.
    """
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in iters]
    spatial = [lp for lp, kind in zip(loops, kinds, strict=True) if kind == tirx.IterVar.DataPar]
    reduce = [lp for lp, kind in zip(loops, kinds, strict=True) if kind == tirx.IterVar.CommReduce]
    if len(spatial) + len(reduce) != len(loops) or not reduce:
        raise ValueError("reduction block with unexpected loop structure")
    if all(extent(sch, lp) == 1 for lp in spatial) and _reduce_to_scalar(sch, block, reduce,
                                                                         lanes, cores):
        return None
    if _sum_in_two_levels(sch, block, spatial, reduce, lanes, cores):
        loops = sch.get_loops(block)  # the final block now reduces the partial sums only
        spatial, reduce = loops[:len(spatial)], loops[len(spatial):]
    tile = _vector_tile(extent(sch, spatial[-1]), lanes) if spatial else None
    inner = None
    outer = list(spatial)
    if tile is not None:
        outer_part, inner = sch.split(spatial[-1], [None, tile])
        outer = [*spatial[:-1], outer_part]
    sch.reorder(*outer, *reduce, *([inner] if inner is not None else []))
    parallelize(sch, outer[:-1] if len(outer) > 1 else outer, cores)
    if inner is not None:
        sch.vectorize(inner)
    init = sch.decompose_reduction(block, reduce[0])
    init_loops = sch.get_loops(init)
    if inner is not None and init_loops:
        sch.vectorize(init_loops[-1])
    return outer[-1] if outer else None


def _sum_in_two_levels(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, spatial: list,
                       reduce: list, lanes: int, cores: int) -> bool:
    """Long reductions to few outputs (global average pools, ReduceMean over a whole map): one
    partial result per step of the outer reduction loop (rfactor), reduced again after.

    One float32 accumulator per output over 25,600 values of mixed sign lost three decimal
    digits (PaddleOCR's detector: a ReduceMean 2.8e-4 off, 10x ONNX Runtime's error; 1.3e-6
    in two levels). False (nothing changed) for a single reduce loop, short reductions, or
    when the partials would be large (a conv's reduction)."""
    if len(reduce) < 2:
        return False
    total = math.prod(extent(sch, lp) for lp in reduce)
    outputs = math.prod(extent(sch, lp) for lp in spatial)
    partials = outputs * extent(sch, reduce[0])
    if total < 4096 or outputs > total or partials > 1 << 20:
        return False
    ndim = len(sch.get(block).writes[0].source.shape)
    try:
        partial = sch.rfactor(reduce[0], factor_axis=max(ndim - 1, 0))
    except s_tir.schedule.ScheduleError:
        return False
    loops = sch.get_loops(partial)  # [*spatial, outer (now spatial), *rest of the reduction]
    if spatial:
        sch.reorder(loops[len(spatial)], loops[len(spatial) - 1])  # lanes stay innermost
    schedule_reduction(sch, partial, lanes=lanes, cores=cores)
    return True


def _reduce_to_scalar(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, reduce: list,
                      lanes: int, cores: int) -> bool:
    """A whole tensor to one value (the min / max of ONNX ``DynamicQuantizeLinear``, a global
    sum): ``cores x lanes`` partial results (rfactor), each thread reducing its contiguous
    share a vector at a time, then the partials. False (nothing changed) when the extent does
    not split evenly or is too short to be worth it."""
    total = math.prod(extent(sch, lp) for lp in reduce)
    parts = cores * lanes
    if total % parts or total < 16 * parts:
        return False
    for other in child_blocks(sch):  # rfactor fails next to a loop-less block (mean's divide)
        if not sch.get_loops(other):
            sch.add_unit_loop(other)
    fused = sch.fuse(*reduce) if len(reduce) > 1 else reduce[0]
    thread, middle, lane = sch.split(fused, [cores, None, lanes])
    sch.reorder(thread, lane, middle)
    partial = sch.rfactor(sch.fuse(thread, lane), factor_axis=0)
    outer, inner = sch.get_loops(partial)[-2:]
    thread, lane = sch.split(outer, [cores, lanes])
    sch.reorder(thread, inner, lane)
    sch.parallel(thread)
    sch.vectorize(lane)
    init = sch.decompose_reduction(partial, inner)
    sch.vectorize(sch.get_loops(init)[-1])
    return True


def schedule_reduction_func(sch: s_tir.Schedule, *, lanes: int, cores: int) -> bool:
    """One reduction block per function, every other block spatial; False if not that shape.

    Producers (padding) are scheduled as loops of their own; the element-wise consumers
    (bias, activation) are computed per tile of the reduction when possible.
    """
    blocks = child_blocks(sch)
    reductions = [b for b in blocks if is_reduction(sch, b)]
    if len(reductions) != 1:
        return False
    names = [sch.get(b).name_hint for b in blocks]
    index = names.index(sch.get(reductions[0]).name_hint)
    producers, consumers = blocks[:index], blocks[index + 1:]
    loop = schedule_reduction(sch, reductions[0], lanes=lanes, cores=cores)
    for block in producers:
        schedule_spatial(sch, block, lanes, cores)
    if consumers and loop is not None and _fuse_consumers(sch, consumers, loop, lanes):
        return True
    for block in consumers:
        schedule_spatial(sch, block, lanes, cores)
    return True


def _fuse_consumers(sch: s_tir.Schedule, consumers: list, loop: s_tir.schedule.LoopRV,
                    lanes: int) -> bool:
    """Inline the consumers into the last one and compute it under ``loop``; False (nothing
    changed) when the index maps do not allow it."""
    for consumer in consumers[:-1]:
        try:
            sch.compute_inline(consumer)
        except s_tir.schedule.ScheduleError:
            return False
    try:
        sch.reverse_compute_at(consumers[-1], loop, preserve_unit_loops=True)
    except s_tir.schedule.ScheduleError:
        return False
    inner = sch.get_loops(consumers[-1])[-1]
    if 2 <= extent(sch, inner) <= 4 * lanes:
        sch.vectorize(inner)
    return True


def output_order(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """Iterate a spatial block in the order of its output buffer's memory when it writes
    through an index map (layout transform, transpose): whole cache lines per iteration, no
    two threads writing one line. Left as it is when the map is not a bijection."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return
    region = stmt.writes[0].region
    variables = [iv.var for iv in stmt.iter_vars]
    indices = [r.min for r in region]
    if len(indices) == len(variables) and all(
            isinstance(i, tirx.Var) and i.same_as(v) for i, v in zip(indices, variables,
                                                                        strict=True)):
        return  # already in output order
    try:
        index_map = tirx.IndexMap(variables, indices, None)
        sch.transform_block_layout(block, index_map)
    except (s_tir.schedule.ScheduleError, RuntimeError, ValueError):
        return
    _tile_transpose(sch, block, lanes)


def _contiguous_source(last: tirx.PrimExpr, iter_vars: list) -> tuple[int, int] | None:
    """(iterator index, block) when the input's innermost index is ``v`` (block 0) or
    ``v % block`` for a block iterator ``v``."""
    var, block = last, 0
    if isinstance(last, tirx.FloorMod) and isinstance(last.b, tirx.IntImm):
        var, block = last.a, int(last.b.value)
    for i, iv in enumerate(iter_vars):
        if isinstance(var, tirx.Var) and var.same_as(iv.var):
            return i, block
    return None


def _tile_transpose(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int) -> None:
    """When an outer loop walks the input's contiguous axis (unpacking NCHW[x]c: the channel
    block ``c % x``), move that block inside a tile of the innermost loop, so that each tile
    reads contiguous runs of the input instead of one element of every cache line."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) < 2 or not stmt.reads or len(stmt.iter_vars) != len(loops):
        return
    source = max(stmt.reads, key=lambda r: len(r.region))
    # right after transform_block_layout, block iterator i is bound to loop i
    found = _contiguous_source(source.region[-1].min, list(stmt.iter_vars))
    if found is None or found[0] == len(loops) - 1:
        return
    j, cblock = found
    size = extent(sch, loops[j])
    if cblock and size > cblock and size % cblock == 0:
        j_outer, j_inner = sch.split(loops[j], [None, cblock])
    elif size <= 4 * lanes:
        j_outer, j_inner = None, loops[j]
    else:
        return
    inner_size = extent(sch, loops[-1])
    tile = next((t for t in (4 * lanes, 2 * lanes, lanes) if inner_size % t == 0), None)
    if tile is None or tile == inner_size:
        return
    outer, inner = sch.split(loops[-1], [None, tile])
    rest = [j_outer if i == j else lp for i, lp in enumerate(loops[:-1])]
    sch.reorder(*[lp for lp in rest if lp is not None], outer, j_inner, inner)


def schedule_injective_func(sch: s_tir.Schedule, *, lanes: int, cores: int) -> bool:
    """Element-wise / injective functions; False if any block reduces."""
    blocks = child_blocks(sch)
    if not blocks or any(is_reduction(sch, b) for b in blocks):
        return False
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except s_tir.schedule.ScheduleError:
            schedule_spatial(sch, block, lanes, cores)
    output_order(sch, blocks[-1], lanes)
    schedule_spatial(sch, blocks[-1], lanes, cores)
    return True


def schedule_fallback_func(sch: s_tir.Schedule, *, lanes: int, cores: int) -> bool:
    """Any function of root-level blocks: each reduction tiled, parallel and vectorized
    (:func:`schedule_reduction`), each spatial block parallel and vectorized, element-wise
    blocks inlined where they can be. Never leaves naive loops; False only for blocks nested
    in loops (already scheduled by someone else)."""
    blocks = child_blocks(sch)
    if not blocks:
        return False
    for block in blocks:
        if len(sch.get_loops(block)) != len(sch.get(block).iter_vars):
            return False
    for block in blocks[:-1]:
        if not is_reduction(sch, block):
            try:
                sch.compute_inline(block)
            except s_tir.schedule.ScheduleError:
                pass
    for block in child_blocks(sch):
        if is_reduction(sch, block):
            schedule_reduction(sch, block, lanes=lanes, cores=cores)
        else:
            schedule_spatial(sch, block, lanes, cores)
    return True
