"""VNNI integer dot-product tensor intrinsics: ``vpdpbusd``, 8 or 16 output channels per step.

``vpdpbusd`` multiplies 4 u8 x s8 pairs per 32-bit lane, adds the four products and the lane's
int32 accumulator, all in 32-bit arithmetic: no intermediate saturates (unlike the s16 step of
``vpmaddubsw``), so one instruction does 16 (ymm: 8) x 4 multiply-adds exactly, for every
8-bit weight. One step broadcasts one 32-bit word of 4 input channels and reads a row of
``lanes`` output channels x 4 input channels (``lanes * 4`` bytes), the layout the AVX2 kernel
uses (``int8.pack_weight``).

s8 activations become u8 by flipping the top bit (``x ^ 0x80 = x + 128``); ``int8.py`` starts the
sums at ``-128 * sum(w)``, which makes the kernel exact for s8 activations too.

TVM's own ``dot_16x4_vnni`` has the u8 / 16-lane form only, and registering it means importing
``tvm.s_tir.tensor_intrin``, every target's intrinsics (~30 s); these are registered here, and
cover s8 activations and 8-lane (ymm, AVX512-VL) output blocks.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tvm_compress.backend.schedules.int8_intrin import dot_desc

LANES = (8, 16)
_FLIP = -2139062144  # 0x80808080 as int32: flips the top bit of four bytes
_LLVM = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}


def offset(data_dtype: str) -> int:
    """What the intrinsic adds to each activation before multiplying."""
    return 128 if data_dtype == "int8" else 0


def intrin_name(lanes: int, data_dtype: str) -> str:
    """Registered name of the ``lanes`` x 4 VNNI step for activations of ``data_dtype``."""
    return f"tvm_compress.vnni_dot_{lanes}x4_{data_dtype}"


def _desc(lanes: int, data_dtype: str):  # noqa: ANN202 (a TVMScript PrimFunc)
    return dot_desc(lanes, data_dtype, offset(data_dtype))


def _impl(lanes: int, data_dtype: str):
    flip = offset(data_dtype) != 0
    llvm = _LLVM[lanes]
    acc_type, weight_type, quad_type = f"int32x{lanes}", f"int8x{lanes * 4}", data_dtype + "x4"

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), data_dtype, offset_factor=1),
             B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            # T.bind: SSA values (plain assignments would become memory buffers)
            word = T.bind(T.reinterpret(A.vload([0], quad_type), dtype="int32"))
            if flip:
                quad = T.bind(T.broadcast(T.bitwise_xor(word, T.int32(_FLIP)), lanes))
            else:
                quad = T.bind(T.broadcast(word, lanes))
            # LLVM 20 declares the byte operands as <N x i8> (older versions: <N/4 x i32>)
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm), C.vload([0], acc_type),
                T.reinterpret(quad, dtype=weight_type), B.vload([0, 0], dtype=weight_type),
                dtype=acc_type)

    return impl


def lanewise_name(lanes: int) -> str:
    """The per-lane step of depthwise kernels: ``C[i] += sum_k A[i, k] * B[i, k]``."""
    return f"tvm_compress.vnni_lanewise_{lanes}x4"


def quads_name(lanes: int) -> str:
    """The transposition that feeds it: 4 pixels x ``lanes`` channels -> channels x 4 taps
    (LLVM's own shuffle lowering, 8 unpacks; with AVX512-VBMI kernels permute in registers
    instead, ``permuted_lanewise_name``)."""
    return f"tvm_compress.quads_{lanes}x4"


def _lanewise(lanes: int) -> tuple:
    acc_type, byte_type = f"int32x{lanes}", f"int8x{lanes * 4}"
    llvm = _LLVM[lanes]

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((lanes, 4), "uint8", offset_factor=1),
             B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((lanes, 4), "uint8", offset_factor=1),
             B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm), C.vload([0], acc_type),
                T.reinterpret(A.vload([0, 0], dtype="uint8x" + str(lanes * 4)),
                              dtype=byte_type),
                B.vload([0, 0], dtype=byte_type), dtype=acc_type)

    return desc, impl


def permuted_lanewise_name(lanes: int) -> str:
    """The per-lane step reading 4 pixels x ``lanes`` channels as they lie in memory: one
    ``vpermb`` (AVX512-VBMI) into channels x 4 taps, then ``vpdpbusd``."""
    return f"tvm_compress.vnni_permuted_lanewise_{lanes}x4"


def _permuted_lanewise(lanes: int) -> tuple:
    acc_type, byte_type, u8_type = f"int32x{lanes}", f"int8x{lanes * 4}", f"uint8x{lanes * 4}"
    llvm, permute = _LLVM[lanes], f"llvm.x86.avx512.permvar.qi.{lanes * 32}"

    # Q: the permutation (``quads_order``), read ``& 0`` as in ``_quads``
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4, lanes), "uint8", offset_factor=1),
             Q: T.Buffer((lanes * 4,), "uint8", offset_factor=1),
             B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4, 0:lanes], Q[0:lanes * 4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(T.bitwise_or(
                        A[vk, vi], T.bitwise_and(Q[vi * 4 + vk], T.uint8(0))), "int32") \
                        * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4, lanes), "uint8", offset_factor=1),
             Q: T.Buffer((lanes * 4,), "uint8", offset_factor=1),
             B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4, 0:lanes], Q[0:lanes * 4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            quad = T.bind(T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(permute),
                T.reinterpret(A.vload([0, 0], dtype=u8_type), dtype=byte_type),
                T.reinterpret(Q.vload([0], dtype=u8_type), dtype=byte_type), dtype=byte_type))
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm), C.vload([0], acc_type), quad,
                B.vload([0, 0], dtype=byte_type), dtype=acc_type)

    return desc, impl


def quads_order(lanes: int) -> list[int]:
    """Byte ``v`` of a quad vector is byte ``order[v]`` of its 4 pixels x ``lanes`` channels."""
    return [k * lanes + i for i in range(lanes) for k in range(4)]


def _quads(lanes: int) -> tuple:
    byte_type = f"uint8x{lanes * 4}"
    order = quads_order(lanes)

    # Q: the permutation as data (``order``), read ``| (Q & 0)``, which changes nothing: with
    # AVX512-VBMI it is what vpermb takes its indices from (``_permuted_lanewise``); from a
    # constant, LLVM would turn that permutation back into a generic shuffle.
    @T.prim_func(s_tir=True)
    def desc(P: T.Buffer((4, lanes), "uint8", offset_factor=1),
             Q: T.Buffer((lanes * 4,), "uint8", offset_factor=1),
             S: T.Buffer((lanes, 4), "uint8", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(P[0:4, 0:lanes], Q[0:lanes * 4])
            T.writes(S[0:lanes, 0:4])
            for i, k in T.grid(lanes, 4):
                with T.sblock("quad"):
                    vi, vk = T.axis.remap("SS", [i, k])
                    S[vi, vk] = T.bitwise_or(P[vk, vi], T.bitwise_and(Q[vi * 4 + vk], T.uint8(0)))

    @T.prim_func(s_tir=True)
    def impl(P: T.Buffer((4, lanes), "uint8", offset_factor=1),
             Q: T.Buffer((lanes * 4,), "uint8", offset_factor=1),
             S: T.Buffer((lanes, 4), "uint8", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(P[0:4, 0:lanes], Q[0:lanes * 4])
            T.writes(S[0:lanes, 0:4])
            S.vstore([0, 0], T.Shuffle([P.vload([0, 0], dtype=byte_type)], order))

    return desc, impl


def register_intrinsics() -> None:
    """Register every (lanes, activation dtype) variant (idempotent)."""
    for lanes in LANES:
        for dtype in ("uint8", "int8"):
            name = intrin_name(lanes, dtype)
            if TensorIntrin.get(name, allow_missing=True) is None:
                TensorIntrin.register(name, _desc(lanes, dtype), _impl(lanes, dtype))
        if TensorIntrin.get(lanewise_name(lanes), allow_missing=True) is None:
            TensorIntrin.register(lanewise_name(lanes), *_lanewise(lanes))
        if TensorIntrin.get(permuted_lanewise_name(lanes), allow_missing=True) is None:
            TensorIntrin.register(permuted_lanewise_name(lanes), *_permuted_lanewise(lanes))
        if TensorIntrin.get(quads_name(lanes), allow_missing=True) is None:
            TensorIntrin.register(quads_name(lanes), *_quads(lanes))
