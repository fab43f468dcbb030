"""8-bit 256-entry table lookups in registers (AVX512-VBMI): two ``vpermi2b`` per 64 outputs.

A lookup kernel (``lookup.py``: ``table[q]`` for 8-bit ``q``) vectorized by LLVM becomes a
gather: per output, one lane extracted, one scalar load, one insert (22 instructions per 8
outputs on Zen 4, where LLVM does not use the slow ``vpgatherdd``). PP-LCNet (``rapidocr_cls``)
looks up 410 thousand 8-bit outputs per call.

With the table in 4 zmm registers a lookup is a permutation: ``vpermi2b`` picks from 128 bytes
by the low 7 bits of each index, one for each half of the table, and the top bit selects between
them (3 instructions and a mask move per 64 outputs). The table's loads do not depend on the
loop: LLVM keeps them in registers across the tile. Indices are the ``u8`` offsets
``q - min(dtype)`` of ``lookup.py``'s index stage, so each output is exactly the table's entry,
as the gather's.

float32 tables keep the gather: the same in registers (16 zmm, 8 ``vpermi2ps`` and 7 selects
per 16 outputs) made PP-LCNet's depthwise kernels 1.25x slower on Zen 4, which runs 512-bit
permutations at half rate.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.ir import Range, TensorLoad
from tvm.s_tir import SBlock, TensorIntrin
from tvm.script import tirx as T
from tvm.tirx.stmt import BufferRegion

from tvm_compress.backend.schedules.blocks import (
    STAGE_ATTR,
    child_blocks,
    extent,
    vectorize_pixels,
)

INDEX_STAGE = "lookup_index"  # the STAGE_ATTR value of lookup.py's index stage
LOOKUP_BLOCK_ATTR = "tvm_compress.table_lookup"  # marks lookup.py's lookup block
TABLE_DTYPES = {"uint8": (64, 32, 16, 8), "int8": (64, 32, 16, 8)}


def intrin_name(dtype: str, lanes: int) -> str:
    return f"tvm_compress.lookup256_{dtype}_{lanes}"


def _desc(dtype: str, lanes: int):  # noqa: ANN202 (a TVMScript PrimFunc)
    # the lookup as a sum over the table of the one entry whose position equals the index
    # (``_as_sum``): a form tensorize can match, where ``table[index[i]]``, a load inside a
    # load's index, is not
    @T.prim_func(s_tir=True)
    def desc(X: T.Buffer((lanes,), "uint8", offset_factor=1),
             V: T.Buffer((256,), dtype, offset_factor=1),
             Y: T.Buffer((lanes,), dtype, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(Y[0:lanes], X[0:lanes], V[0:256])
            T.writes(Y[0:lanes])
            for i, k in T.grid(T.int64(lanes), T.int64(256)):
                with T.sblock("lookup"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    T.reads(Y[vi], X[vi], V[vk])
                    T.writes(Y[vi])
                    Y[vi] = Y[vi] + T.Select(X[vi] == T.Cast("uint8", vk), V[vk],
                                             T.cast(T.int32(0), dtype))

    return desc


def _widen(index, lanes: int, total: int):  # noqa: ANN001, ANN202
    """``index`` repeated up to ``total`` lanes (what the extra lanes look up is dropped)."""
    return index if lanes == total else T.Shuffle([index] * (total // lanes), list(range(total)))


def _impl(dtype: str, lanes: int):  # noqa: ANN202
    vec = "int8x64"

    @T.prim_func(s_tir=True)
    def impl(X: T.Buffer((lanes,), "uint8", offset_factor=1),
             V: T.Buffer((256,), dtype, offset_factor=1),
             Y: T.Buffer((lanes,), dtype, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(Y[0:lanes], X[0:lanes], V[0:256])
            T.writes(Y[0:lanes])
            index = T.bind(T.reinterpret(_widen(X.vload([0], f"uint8x{lanes}"), lanes, 64),
                                         dtype=vec))
            low = T.bind(T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpermi2var.qi.512"),
                T.reinterpret(V.vload([0], f"{dtype}x64"), dtype=vec), index,
                T.reinterpret(V.vload([64], f"{dtype}x64"), dtype=vec), dtype=vec))
            high = T.bind(T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpermi2var.qi.512"),
                T.reinterpret(V.vload([128], f"{dtype}x64"), dtype=vec), index,
                T.reinterpret(V.vload([192], f"{dtype}x64"), dtype=vec), dtype=vec))
            # indices 128-255 are negative as int8. Y is written, not added to: the sum's
            # decomposed init has set it to 0 (tensorize_lookups)
            both = T.bind(T.Select(index < T.broadcast(T.int8(0), 64), high, low))
            Y.vstore([0], T.reinterpret(both if lanes == 64 else T.Shuffle([both],
                                                                          list(range(lanes))),
                                        dtype=f"{dtype}x{lanes}"))

    return impl


def register_intrinsics() -> None:
    """Register every (table dtype, lanes) variant (idempotent)."""
    for dtype, widths in TABLE_DTYPES.items():
        for lanes in widths:
            name = intrin_name(dtype, lanes)
            if TensorIntrin.get(name, allow_missing=True) is None:
                TensorIntrin.register(name, _desc(dtype, lanes), _impl(dtype, lanes))


def lookup_blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV]:
    """The table lookup blocks (``LOOKUP_BLOCK_ATTR``) of the function ``sch`` holds."""
    return [b for b in child_blocks(sch) if LOOKUP_BLOCK_ATTR in sch.get(b).annotations]


def _as_sum(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV,
            block: s_tir.schedule.SBlockRV) -> None:
    """Replace ``loop`` (directly around the lookup block ``out[...] = table[index[...]]``) by
    ``for k in 0..256: out[...] += index[...] == k ? table[k] : 0`` (one term is not 0: the
    same value, as an exact sum), the form of the intrinsics' description."""
    old = sch.get(block)
    store = old.body
    table_load = store.value
    index_load = table_load.indices[0]
    index_load = getattr(index_load, "value", index_load)  # under its cast to int64
    if not isinstance(table_load, TensorLoad) or not isinstance(index_load, TensorLoad) \
            or len(table_load.indices) != 1 or int(table_load.source.shape[0]) != 256:
        raise ValueError(f"lookup block {old.name_hint} is not table[index[...]]")
    table, out, index = table_load.source, store.buffer, index_load.source
    size = table.shape[0]
    k = tirx.Var("k", size.ty)
    vk = tirx.Var("vk", size.ty)
    zero = tirx.const(0, str(out.dtype))
    current = tirx.BufferLoad(out, store.indices)
    body = tirx.stmt.BufferStore(out, current + tirx.Select(
        index_load == tirx.Cast(str(index.dtype), vk), tirx.BufferLoad(table, [vk]),
        zero), store.indices)
    index_read = [r for r in old.reads if r.source.same_as(index)]
    reads = [BufferRegion(out, [Range.from_min_extent(i, i * 0 + 1) for i in store.indices]),
             *index_read, BufferRegion(table, [Range.from_min_extent(vk, vk * 0 + 1)])]
    new = SBlock([*old.iter_vars, tirx.IterVar(Range.from_min_extent(size * 0, size), vk,
                                               tirx.IterVar.CommReduce)],
                 reads, old.writes, old.name_hint, body,
                 tirx.stmt.BufferStore(out, zero, store.indices), old.alloc_buffers,
                 old.match_buffers, old.annotations)
    outer = sch.get(loop)
    realize = outer.body
    inner = tirx.stmt.For(k, size * 0, size, tirx.stmt.ForKind.SERIAL,
                          s_tir.SBlockRealize([*realize.iter_values, k], realize.predicate, new))
    sch.state.replace(sch.get_sref(loop),
                      tirx.stmt.For(outer.loop_var, outer.min, outer.extent,
                                    tirx.stmt.ForKind.SERIAL, inner), {old: new})


def tensorize_lookups(sch: s_tir.Schedule) -> int:
    """Tensorize every table lookup that reads its own index stage (``lookup.py``); returns
    how many. The index stage is vectorized over the same tile; a lookup whose index stage
    was inlined (a rule that inlines every element-wise block) keeps LLVM's gather."""
    done = 0
    for block in lookup_blocks(sch):
        stages = [p for p in sch.get_producers(block)
                  if str(sch.get(p).annotations.get(STAGE_ATTR, "")) == INDEX_STAGE]
        dtype = str(sch.get(block).writes[0].source.dtype)
        if len(stages) != 1 or dtype not in TABLE_DTYPES:
            continue
        inner = sch.get_loops(block)[-1]
        size = extent(sch, inner)
        lanes = next((w for w in TABLE_DTYPES[dtype] if size % w == 0), None)
        if lanes is None:
            continue
        inner = sch.split(inner, [None, lanes])[1]
        _as_sum(sch, inner, block)
        init = sch.decompose_reduction(block, inner)
        sch.vectorize(sch.get_loops(init)[-1])
        register_intrinsics()
        sch.tensorize(inner, intrin_name(dtype, lanes))
        vectorize_pixels(sch, stages[0])
        done += 1
    return done
