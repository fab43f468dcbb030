"""Shared schedule steps: find blocks, fuse epilogues, parallelize and vectorize loop nests."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV

from tvm_compress.backend.schedules.compute import KERNEL_ATTR

STAGE_ATTR = "tvm_compress.stage"  # marks epilogue blocks fuse_epilogue must not inline


def extent(sch: s_tir.Schedule, loop: LoopRV) -> int:
    """Constant extent of ``loop`` (schedules here only handle static shapes)."""
    value = sch.get(loop).extent
    if not isinstance(value, tirx.IntImm):
        raise ValueError("dynamic loop extent")
    return int(value)


def child_blocks(sch: s_tir.Schedule) -> list[SBlockRV]:
    """The blocks directly under the root block, in execution order."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def find_kernel(sch: s_tir.Schedule, kind: str) -> SBlockRV | None:
    """The block annotated as kernel ``kind`` by ``compute.py``, if exactly one."""
    found = [b for b in child_blocks(sch)
             if str(sch.get(b).annotations.get(KERNEL_ATTR, "")) == kind]
    return found[0] if len(found) == 1 else None


def is_reduction(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether ``block`` has a reduction iterator."""
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def producers_and_consumers(sch: s_tir.Schedule,
                            block: SBlockRV) -> tuple[list[SBlockRV], list[SBlockRV]]:
    """Blocks before and after ``block`` under the root."""
    blocks = child_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    index = names.index(sch.get(block).name_hint)
    return blocks[:index], blocks[index + 1:]


def inline_side_inputs(sch: s_tir.Schedule, block: SBlockRV) -> None:
    """Inline the blocks before ``block`` that it does not depend on: element-wise work on the
    epilogue's other inputs (the dequantized skip tensor of a residual add that leaves the
    integer graph). Left in front of the kernel, they make it look like a chain of producers."""
    needed, todo = set(), [block]
    while todo:
        for producer in sch.get_producers(todo.pop()):
            name = sch.get(producer).name_hint
            if name not in needed:
                needed.add(name)
                todo.append(producer)
    before, _ = producers_and_consumers(sch, block)
    for other in before:
        if sch.get(other).name_hint not in needed:
            try:
                sch.compute_inline(other)
            except s_tir.schedule.ScheduleError:
                pass


def fuse_epilogue(sch: s_tir.Schedule, block: SBlockRV, loop: LoopRV) -> SBlockRV:
    """Move the element-wise tail of ``block`` (bias, activation, residual) under ``loop``.

    Intermediate consumers are inlined into the last one, which is then computed per tile of
    ``loop``; without a tail, a write cache plays that role so ``block`` accumulates into a
    tile-sized buffer. Consumers annotated with ``STAGE_ATTR`` stay stages of their own in the
    tile (to be tensorized). Returns the block that writes the function's output.
    """
    _, consumers = producers_and_consumers(sch, block)
    if not consumers:
        tail = sch.cache_write(block, 0, "global")
    else:
        for consumer in consumers[:-1]:
            if STAGE_ATTR in sch.get(consumer).annotations:
                sch.reverse_compute_at(consumer, loop, preserve_unit_loops=True)
                continue
            try:
                sch.compute_inline(consumer)
            except s_tir.schedule.ScheduleError:  # it writes an output of its own
                sch.reverse_compute_at(consumer, loop, preserve_unit_loops=True)
        tail = consumers[-1]
    sch.reverse_compute_at(tail, loop, preserve_unit_loops=True)
    return tail


def vectorize_inner(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> None:
    """Vectorize the innermost loop of ``block`` when its extent suits the SIMD width."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    size = extent(sch, inner)
    if size % lanes == 0 and size > lanes:
        inner = sch.split(inner, [None, lanes])[1]
    elif size > lanes or size < 2:
        return
    sch.vectorize(inner)


def vectorize_pixels(sch: s_tir.Schedule, block: SBlockRV) -> None:
    """Vectorize a per-tile epilogue across its pixels and channel block together.

    Narrowing int32 results to 8 bits packs whole registers at a time (two ``vpackssdw`` and one
    ``vpackuswb`` per 32 outputs instead of three shuffles per 8), so the innermost two loops
    (pixels x channel block) become one vector loop when the block reads only whole tensors.
    """
    loops = sch.get_loops(block)
    shape = [int(d) for d in sch.get(block).writes[0].source.shape]
    # per-channel constants would turn into gathers across the fused loop: keep them per pixel
    whole = all([int(d) for d in r.source.shape] == shape for r in sch.get(block).reads)
    lanes = extent(sch, loops[-1]) * (extent(sch, loops[-2]) if len(loops) >= 2 else 1)
    # whole registers of bytes, or at most two: 56 lanes (7-pixel rows) measured slower
    if whole and len(loops) >= 2 and (lanes % 32 == 0 or lanes <= 16):
        sch.vectorize(sch.fuse(*loops[-2:]))
    else:
        sch.vectorize(loops[-1])


def parallelize(sch: s_tir.Schedule, loops: list[LoopRV], cores: int) -> LoopRV | None:
    """Fuse the leading ``loops`` until there is enough work for ``cores``; mark it parallel.

    Returns the parallel loop, or None when there is nothing worth parallelizing.
    """
    if cores <= 1 or not loops:
        return None
    count, work = 0, 1
    for loop in loops:
        count, work = count + 1, work * extent(sch, loop)
        if work >= 4 * cores:
            break
    if work < 2:
        return None
    fused = sch.fuse(*loops[:count]) if count > 1 else loops[0]
    sch.parallel(fused)
    return fused


def schedule_spatial(sch: s_tir.Schedule, block: SBlockRV, lanes: int, cores: int) -> None:
    """Parallel outer loops, vectorized inner loop: for pads, layout transforms, element-wise."""
    vectorize_inner(sch, block, lanes)
    loops = sch.get_loops(block)
    if not loops:  # a scalar (0-d) computation: nothing to schedule
        return
    vector_loop = sch.get(loops[-1]).kind == tirx.ForKind.VECTORIZED
    parallelize(sch, loops[:-1] if vector_loop else loops, cores)
