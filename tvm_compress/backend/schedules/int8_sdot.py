"""NEON dot-product tensor intrinsic for int8 convolutions on ``aarch64-dotprod``: ``sdot``.

``sdot vC.4s, vA.16b, vB.16b`` adds, to each of 4 int32 lanes, the 4 products of signed bytes
in the same 32-bit lane of A and B: exact (no intermediate saturates), 16 multiply-adds per
instruction. One step broadcasts one 32-bit word of 4 input channels (A) and reads 4 output
channels x 4 input channels of weights (B, 16 bytes): the VNNI kernel's layout with 4 lanes
(``int8_vnni``), so the same conv compute and schedule serve both.

``sdot`` is signed x signed. u8 activations become s8 by flipping the top bit
(``x ^ 0x80 = x - 128``); ``int8.py`` starts the sums at ``+128 * sum(w)``, which makes the
kernel exact for u8 activations too.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tvm_compress.backend.schedules.int8_intrin import dot_desc

LANES = 4
_FLIP = -2139062144  # 0x80808080 as int32: flips the top bit of four bytes


def offset(data_dtype: str) -> int:
    """What the intrinsic adds to each activation before multiplying."""
    return -128 if data_dtype == "uint8" else 0


def intrin_name(data_dtype: str) -> str:
    """Registered name of the 4 x 4 ``sdot`` step for activations of ``data_dtype``."""
    return f"tvm_compress.sdot_4x4_{data_dtype}"


def _impl(data_dtype: str):  # noqa: ANN202 (a TVMScript PrimFunc)
    flip = offset(data_dtype) != 0

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), data_dtype, offset_factor=1),
             B: T.Buffer((LANES, 4), "int8", offset_factor=1),
             C: T.Buffer((LANES,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:4], B[0:LANES, 0:4])
            T.writes(C[0:LANES])
            word = T.bind(T.reinterpret(A.vload([0], data_dtype + "x4"), dtype="int32"))
            if flip:
                quad = T.bind(T.broadcast(T.bitwise_xor(word, T.int32(_FLIP)), LANES))
            else:
                quad = T.bind(T.broadcast(word, LANES))
            C[T.ramp(T.int32(0), 1, LANES)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([0], "int32x4"), T.reinterpret(quad, dtype="int8x16"),
                B.vload([0, 0], dtype="int8x16"), dtype="int32x4")

    return impl


def register_intrinsics() -> None:
    """Register the u8 and s8 activation variants (idempotent)."""
    for dtype in ("uint8", "int8"):
        name = intrin_name(dtype)
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, dot_desc(LANES, dtype, offset(dtype)), _impl(dtype))
