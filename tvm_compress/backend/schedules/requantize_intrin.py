"""``((acc * m + offset) >> 32) >> shift`` for 8 or 16 lanes, as a tensor intrinsic (x86).

``requantize.py`` turns the fixed-point requantization into that high half of 64-bit products
of 32-bit values, shifted per channel, followed by 32-bit steps with per-tensor constants only
(which then vectorize across pixels). Vectorized by LLVM, the 64-bit
part splits the 8 lanes into halves, sign-extends, multiplies and gathers the high words back
with five cross-lane shuffles per 8 outputs; Zen 3 runs shuffles on two ports only, which made
the requantization cost as much as a depthwise convolution. This intrinsic keeps the lanes in
place instead: ``vpmuldq`` multiplies the even lanes as they are, the odd ones after a 64-bit
shift, and one ``vpblendd`` puts the high words together. The 16-lane form (AVX-512, the
channel block of VNNI kernels) is the same on zmm registers.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tvm_compress.backend.schedules.blocks import STAGE_ATTR, child_blocks

HIGH_MUL = "high_mul"  # the STAGE_ATTR value of the blocks this intrinsic computes
PRE_SHIFT_ATTR = "tvm_compress.pre_shift"  # their left shift of the accumulator (requantize.py)


LANES = (8, 16)


def intrin_name(source_dtype: str, lanes: int = 8, pre_shift: int = 0) -> str:
    return f"tvm_compress.high_mul_{lanes}_{source_dtype}" + (f"_shl{pre_shift}"
                                                             if pre_shift else "")


def _desc(source_dtype: str, lanes: int, pre_shift: int = 0):
    def accumulator(value):  # noqa: ANN001, ANN202 - as requantize.py's stage computes it
        if source_dtype != "int32":
            value = T.cast(value, "int32")
        return value << T.int32(pre_shift) if pre_shift else value

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((lanes,), source_dtype, offset_factor=1),
             M: T.Buffer((lanes,), "int32", offset_factor=1),
             D: T.Buffer((lanes,), "int64", offset_factor=1),
             S: T.Buffer((lanes,), "int32", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(A[0:lanes], M[0:lanes], D[0:lanes], S[0:lanes])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                with T.sblock("high"):
                    vi = T.axis.remap("S", [i])
                    C[vi] = T.cast((T.cast(accumulator(A[vi]), "int64") * T.cast(M[vi], "int64")
                                    + D[vi]) >> T.int64(32), "int32") >> S[vi]

    return desc


def _impl(source_dtype: str, lanes: int, pre_shift: int = 0):
    half = lanes // 2
    src_type, i32, i64 = f"{source_dtype}x{lanes}", f"int32x{lanes}", f"int64x{lanes}"
    i32h, i64h, u64h = f"int32x{half}", f"int64x{half}", f"uint64x{half}"
    odd_lanes = [i | 1 for i in range(lanes)]
    evens, odds = list(range(0, lanes, 2)), list(range(1, lanes, 2))
    blend = [i if i % 2 == 0 else lanes + i for i in range(lanes)]

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((lanes,), source_dtype, offset_factor=1),
             M: T.Buffer((lanes,), "int32", offset_factor=1),
             D: T.Buffer((lanes,), "int64", offset_factor=1),
             S: T.Buffer((lanes,), "int32", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(A[0:lanes], M[0:lanes], D[0:lanes], S[0:lanes])
            T.writes(C[0:lanes])
            # T.bind: SSA values (plain assignments would become memory buffers)
            # shifted by 0 (no pre-shift): LLVM drops the shift
            acc = T.bind(T.cast(A.vload([0], src_type), i32)
                         << T.broadcast(T.int32(pre_shift), lanes))
            mul = T.bind(M.vload([0], i32))
            offsets = T.bind(D.vload([0], i64))  # per channel: hoisted by LLVM
            # sign-extended low words of 64-bit lanes: what vpmuldq multiplies; the odd lanes
            # are moved there by an in-lane vpshufd
            even = T.bind(
                T.cast(T.cast(T.reinterpret(acc, dtype=i64h), i32h), i64h)
                * T.cast(T.cast(T.reinterpret(mul, dtype=i64h), i32h), i64h)
                + T.Shuffle([offsets], evens))
            acc_odd = T.bind(T.reinterpret(T.Shuffle([acc], odd_lanes),
                                           dtype=i64h))
            mul_odd = T.bind(T.reinterpret(T.Shuffle([mul], odd_lanes),
                                           dtype=i64h))
            odd = T.bind(T.cast(T.cast(acc_odd, i32h), i64h)
                         * T.cast(T.cast(mul_odd, i32h), i64h)
                         + T.Shuffle([offsets], odds))
            low = T.bind(T.reinterpret(T.reinterpret(even, dtype=u64h)
                                       >> T.broadcast(T.uint64(32), half), dtype=i32))
            C[T.ramp(T.int32(0), 1, lanes)] = T.Shuffle(
                [low, T.reinterpret(odd, dtype=i32)], blend
            ) >> S.vload([0], i32)

    return impl


def register_intrinsics(pre_shift: int = 0) -> None:
    """Register the int32- and float32-source variants of every width (idempotent)."""
    for lanes in LANES:
        for dtype in ("int32", "float32"):
            name = intrin_name(dtype, lanes, pre_shift)
            if TensorIntrin.get(name, allow_missing=True) is None:
                TensorIntrin.register(name, _desc(dtype, lanes, pre_shift),
                                      _impl(dtype, lanes, pre_shift))


def tensorize_high_mul(sch: s_tir.Schedule) -> None:
    """Tensorize the innermost (8- or 16-lane) loop of every block marked by ``requantize.py``."""
    for block in child_blocks(sch):
        annotations = sch.get(block).annotations
        if str(annotations.get(STAGE_ATTR, "")) != HIGH_MUL:
            continue
        pre_shift = int(annotations.get(PRE_SHIFT_ATTR, 0))
        register_intrinsics(pre_shift)
        dtypes = {str(r.source.dtype) for r in sch.get(block).reads}
        source = "float32" if "float32" in dtypes else "int32"
        inner = sch.get_loops(block)[-1]
        sch.tensorize(inner, intrin_name(source, int(sch.get(inner).extent), pre_shift))
