"""Schedules for what is left after the convolution and matmul rules.

* pooling and other window/axis reductions (max/avg pool, global mean): the reduction loops go
  outside the innermost spatial loop, which is vectorized (the channel block in NCHW[x]c);
* purely element-wise / injective functions (layout transforms, residual adds): inline into the
  last block, parallel outer loops, vectorized inner loop.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from tvm_compress.backend.schedules.blocks import (
    child_blocks,
    extent,
    is_reduction,
    parallelize,
    schedule_spatial,
)


def schedule_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *, lanes: int,
                       cores: int) -> None:
    """Spatial loops outside (parallel), reductions, then the vectorized innermost spatial."""
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in iters]
    spatial = [lp for lp, kind in zip(loops, kinds, strict=True) if kind == tirx.IterVar.DataPar]
    reduce = [lp for lp, kind in zip(loops, kinds, strict=True) if kind == tirx.IterVar.CommReduce]
    if len(spatial) + len(reduce) != len(loops) or not reduce:
        raise ValueError("reduction block with unexpected loop structure")
    inner = spatial[-1] if spatial else None
    vector = inner is not None and 2 <= extent(sch, inner) <= 4 * lanes
    outer = spatial[:-1] if vector else spatial
    sch.reorder(*outer, *reduce, *([inner] if vector else []))
    parallelize(sch, outer, cores)
    if vector:
        sch.vectorize(inner)
    init = sch.decompose_reduction(block, reduce[0])
    init_loops = sch.get_loops(init)
    if vector and init_loops:
        sch.vectorize(init_loops[-1])


def schedule_reduction_func(sch: s_tir.Schedule, *, lanes: int, cores: int) -> bool:
    """One reduction block per function, every other block spatial; False if not that shape."""
    blocks = child_blocks(sch)
    reductions = [b for b in blocks if is_reduction(sch, b)]
    if len(reductions) != 1:
        return False
    spatial = [b for b in blocks if not is_reduction(sch, b)]
    schedule_reduction(sch, reductions[0], lanes=lanes, cores=cores)
    for block in spatial:
        schedule_spatial(sch, block, lanes, cores)
    return True


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
    schedule_spatial(sch, blocks[-1], lanes, cores)
    return True
