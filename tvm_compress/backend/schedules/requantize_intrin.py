"""``((acc * m + offset) >> 32) >> shift`` for 8 lanes, as a tensor intrinsic (x86).

``requantize.py`` turns the fixed-point requantization into that high half of 64-bit products
of 32-bit values, shifted per channel, followed by 32-bit steps with per-tensor constants only
(which then vectorize across pixels). Vectorized by LLVM, the 64-bit
part splits the 8 lanes into halves, sign-extends, multiplies and gathers the high words back
with five cross-lane shuffles per 8 outputs; Zen 3 runs shuffles on two ports only, which made
the requantization cost as much as a depthwise convolution. This intrinsic keeps the lanes in
place instead: ``vpmuldq`` multiplies the even lanes as they are, the odd ones after a 64-bit
shift, and one ``vpblendd`` puts the high words together.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tvm_compress.backend.schedules.blocks import STAGE_ATTR, child_blocks

HIGH_MUL = "high_mul"  # the STAGE_ATTR value of the blocks this intrinsic computes


def intrin_name(source_dtype: str) -> str:
    return f"tvm_compress.high_mul_8_{source_dtype}"


def _desc(source_dtype: str):
    if source_dtype == "int32":
        @T.prim_func(s_tir=True)
        def from_int32(A: T.Buffer((8,), "int32", offset_factor=1),
                       M: T.Buffer((8,), "int32", offset_factor=1),
                       D: T.Buffer((8,), "int64", offset_factor=1),
                       S: T.Buffer((8,), "int32", offset_factor=1),
                       C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(A[0:8], M[0:8], D[0:8], S[0:8])
                T.writes(C[0:8])
                for i in T.serial(0, 8):
                    with T.sblock("high"):
                        vi = T.axis.remap("S", [i])
                        C[vi] = T.cast((T.cast(A[vi], "int64") * T.cast(M[vi], "int64")
                                        + D[vi]) >> T.int64(32), "int32") >> S[vi]

        return from_int32

    @T.prim_func(s_tir=True)
    def from_float(A: T.Buffer((8,), "float32", offset_factor=1),
                   M: T.Buffer((8,), "int32", offset_factor=1),
                   D: T.Buffer((8,), "int64", offset_factor=1),
                   S: T.Buffer((8,), "int32", offset_factor=1),
                   C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(A[0:8], M[0:8], D[0:8], S[0:8])
            T.writes(C[0:8])
            for i in T.serial(0, 8):
                with T.sblock("high"):
                    vi = T.axis.remap("S", [i])
                    C[vi] = T.cast((T.cast(T.cast(A[vi], "int32"), "int64")
                                    * T.cast(M[vi], "int64") + D[vi])
                                   >> T.int64(32), "int32") >> S[vi]

    return from_float


def _impl(source_dtype: str):
    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((8,), source_dtype, offset_factor=1),
             M: T.Buffer((8,), "int32", offset_factor=1),
             D: T.Buffer((8,), "int64", offset_factor=1),
             S: T.Buffer((8,), "int32", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(A[0:8], M[0:8], D[0:8], S[0:8])
            T.writes(C[0:8])
            # T.bind: SSA values (plain assignments would become memory buffers)
            acc = T.bind(T.cast(A.vload([0], source_dtype + "x8"), "int32x8"))
            mul = T.bind(M.vload([0], "int32x8"))
            offsets = T.bind(D.vload([0], "int64x8"))  # per channel: hoisted by LLVM
            # sign-extended low words of 64-bit lanes: what vpmuldq multiplies; the odd lanes
            # are moved there by an in-lane vpshufd
            even = T.bind(
                T.cast(T.cast(T.reinterpret(acc, dtype="int64x4"), "int32x4"), "int64x4")
                * T.cast(T.cast(T.reinterpret(mul, dtype="int64x4"), "int32x4"), "int64x4")
                + T.Shuffle([offsets], [0, 2, 4, 6]))
            acc_odd = T.bind(T.reinterpret(T.Shuffle([acc], [1, 1, 3, 3, 5, 5, 7, 7]),
                                           dtype="int64x4"))
            mul_odd = T.bind(T.reinterpret(T.Shuffle([mul], [1, 1, 3, 3, 5, 5, 7, 7]),
                                           dtype="int64x4"))
            odd = T.bind(T.cast(T.cast(acc_odd, "int32x4"), "int64x4")
                         * T.cast(T.cast(mul_odd, "int32x4"), "int64x4")
                         + T.Shuffle([offsets], [1, 3, 5, 7]))
            low = T.bind(T.reinterpret(T.reinterpret(even, dtype="uint64x4")
                                       >> T.broadcast(T.uint64(32), 4), dtype="int32x8"))
            C[T.ramp(T.int32(0), 1, 8)] = T.Shuffle(
                [low, T.reinterpret(odd, dtype="int32x8")], [0, 9, 2, 11, 4, 13, 6, 15]
            ) >> S.vload([0], "int32x8")

    return impl


def register_intrinsics() -> None:
    """Register the int32- and float32-source variants (idempotent)."""
    for dtype in ("int32", "float32"):
        if TensorIntrin.get(intrin_name(dtype), allow_missing=True) is None:
            TensorIntrin.register(intrin_name(dtype), _desc(dtype), _impl(dtype))


def tensorize_high_mul(sch: s_tir.Schedule) -> None:
    """Tensorize the innermost (8-lane) loop of every block marked by ``requantize.py``."""
    register_intrinsics()
    for block in child_blocks(sch):
        if str(sch.get(block).annotations.get(STAGE_ATTR, "")) != HIGH_MUL:
            continue
        dtypes = {str(r.source.dtype) for r in sch.get(block).reads}
        source = "float32" if "float32" in dtypes else "int32"
        sch.tensorize(sch.get_loops(block)[-1], intrin_name(source))
