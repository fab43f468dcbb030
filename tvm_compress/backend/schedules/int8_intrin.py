"""AVX2 integer dot-product tensor intrinsics: 8 output channels per step, exact.

TVM registers int8 dot products for VNNI and AVX-512 only. Two AVX2 steps here, both adding
into 8 x s32 accumulators:

* ``direct`` (8 x 4 channels): ``vpmaddubsw`` multiplies 32 u8 x s8 pairs and adds neighbours
  into 16 x s16, ``vpmaddwd`` against ones adds neighbours again into 8 x s32: 32 multiply-adds
  per two instructions. The s16 step saturates when a pair sum leaves [-32768, 32767], so it is
  used only for *pair-safe* (constant) weights: in each adjacent input-channel pair the
  positive weights sum to at most 128 and the negative ones to at least -128 (255 x 128 <
  32768), e.g. 7-bit weights. s8 activations become u8 by flipping the top bit
  (``x ^ 0x80 = x + 128``); the kernel subtracts ``128 * sum(w)`` through the accumulators'
  initial value.
* ``int16`` (8 x 2 channels): ``vpmaddwd`` on activations and weights widened to s16, 16
  multiply-adds per instruction and never saturating: exact for every u8/s8 input and weight.
  Zen 3 issues two ``vpmaddwd`` per cycle, so with the activations widened once (not per use)
  this runs at the speed of ``direct`` there, twice the fp32 FMA rate.

One step broadcasts one 32-bit word of activations (4 u8/s8 or 2 s16 channels) and reads a
32-byte weight row of 8 output channels x 4 (or 2) input channels.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tvm_compress.backend.schedules.compute import KERNEL_ATTR

KINDS = ("direct", "int16")
_FLIP = -2139062144  # 0x80808080 as int32: flips the top bit of four bytes


def offset(kind: str, data_dtype: str) -> int:
    """What the intrinsic adds to each activation before multiplying."""
    return 128 if kind == "direct" and data_dtype == "int8" else 0


def intrin_name(kind: str, data_dtype: str) -> str:
    """Registered name of the AVX2 intrinsic for a kernel kind and activation dtype."""
    if kind == "int16":
        return "tvm_compress.avx2_dot_8x2_int16"
    return f"tvm_compress.avx2_dot_8x4_{kind}_{data_dtype}"


def dot_desc(lanes: int, data_dtype: str, add: int):  # noqa: ANN201 (a TVMScript PrimFunc)
    """Description of ``C[i] += (A[k] + add) * B[i, k]`` over 4 ``k``, ``lanes`` outputs.

    Two functions, not one with ``+ add``: tensorize matches the compute structurally, and the
    compute of an unshifted kernel has no ``+ 0``.
    """
    if add == 0:
        @T.prim_func(s_tir=True)
        def plain(A: T.Buffer((4,), data_dtype, offset_factor=1),
                  B: T.Buffer((lanes, 4), "int8", offset_factor=1),
                  C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
                T.writes(C[0:lanes])
                for i, k in T.grid(lanes, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

        return plain

    @T.prim_func(s_tir=True)
    def shifted(A: T.Buffer((4,), data_dtype, offset_factor=1),
                B: T.Buffer((lanes, 4), "int8", offset_factor=1),
                C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + (T.cast(A[vk], "int32") + add) * T.cast(B[vi, vk], "int32")

    return shifted


def _direct_impl(data_dtype: str):
    flip = offset("direct", data_dtype) != 0

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), data_dtype, offset_factor=1),
             B: T.Buffer((8, 4), "int8", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            # T.bind: SSA values (plain assignments would become memory buffers)
            if flip:
                quad = T.bind(T.bitwise_xor(T.broadcast(T.reinterpret(
                    A.vload([0], data_dtype + "x4"), dtype="int32"), 8),
                    T.broadcast(T.int32(_FLIP), 8)))
            else:
                quad = T.bind(T.broadcast(T.reinterpret(A.vload([0], data_dtype + "x4"),
                                                        dtype="int32"), 8))
            pairs = T.bind(T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(quad, dtype="uint8x32"), B.vload([0, 0], dtype="int8x32"),
                dtype="int16x16"))
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1),
                dtype="int32x8")

    return impl


@T.prim_func(s_tir=True)
def _int16_desc(A: T.Buffer((2,), "int16", offset_factor=1),
                B: T.Buffer((8, 2), "int16", offset_factor=1),
                C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        for i, k in T.grid(8, 2):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _int16_impl(A: T.Buffer((2,), "int16", offset_factor=1),
                B: T.Buffer((8, 2), "int16", offset_factor=1),
                C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        pair = T.bind(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 8))
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.reinterpret(pair, dtype="int16x16"), B.vload([0, 0], dtype="int16x16"),
            dtype="int32x8")


def register_intrinsics() -> None:
    """Register every (kind, activation dtype) variant (idempotent)."""
    for dtype in ("uint8", "int8"):
        name = intrin_name("direct", dtype)
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, dot_desc(8, dtype, offset("direct", dtype)),
                                  _direct_impl(dtype))
    name = intrin_name("int16", "int16")
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, _int16_desc, _int16_impl)


def start_from(stmt: tirx.Stmt, start: tirx.Buffer,
               axes: tuple[int, ...] = (1, 4)) -> tirx.Stmt:
    """``stmt`` with the kernel block's reduction starting at ``start[iter vars at axes]``
    (``start[oc, oi]`` for NCHW[x]c convolutions, ``start[n]`` for matmul) instead of 0.

    Not a separate ``+ start`` stage: inlined into the requantization, an int32 add under the
    int64 cast is distributed into two 64-bit values, which defeats ``vpmuldq`` there. (A te
    ``init`` would say the same, but ``create_prim_func`` drops it; TVM 0.27 exposes no Python
    statement mutator, so the loop nest that TE produces is rebuilt here.)
    """
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([start_from(s, start, axes) for s in stmt.seq])
    if isinstance(stmt, tirx.For):
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind,
                        start_from(stmt.body, start, axes), stmt.thread_binding, stmt.annotations)
    if not isinstance(stmt, s_tir.SBlockRealize):
        return stmt
    block = stmt.block
    init = block.init
    if KERNEL_ATTR in block.annotations:
        # The block's read regions stay those of its update, which is what tensorize matches;
        # decompose_reduction derives the init block's own regions from its statement.
        index = [block.iter_vars[axis].var for axis in axes]
        init = tirx.BufferStore(init.buffer, tirx.BufferLoad(start, index), init.indices)
    block = s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint,
                         start_from(block.body, start, axes), init, block.alloc_buffers,
                         block.match_buffers, block.annotations)
    return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, block)
