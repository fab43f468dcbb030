"""Prototype: AVX2 u8 x s8 -> s32 convolution micro-kernel (vpmaddubsw + vpmaddwd), tensorized.

TVM registers int8 dot products for VNNI and AVX-512 only. On AVX2 the same idea is two
instructions: ``vpmaddubsw`` multiplies 32 u8 x s8 pairs and adds neighbours into 16 x s16,
``vpmaddwd`` against ones adds neighbours again into 8 x s32: 32 multiply-adds per pair of
instructions, against 8 for one fp32 FMA. Caveat: the s16 step saturates when
``a0*b0 + a1*b1 > 32767``; activations must stay within 7 bits (or weights within 7 bits, as
ONNX Runtime's ``reduce_range`` does on AVX2).

Layouts: activations uint8 NCHW[ib]c (ib a multiple of 4), weights int8 OIHW[ib/4]i[ob]o4i so
that one 32-bit broadcast of 4 input channels meets one 32-byte row of 8 output channels x 4
input channels. Not yet wired into ``default_schedule_pipeline`` (that needs the zero-point and
requantization handling of the integer passes); it is here to measure the micro-kernel.
"""

from __future__ import annotations

from tvm import s_tir, te
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tvm_compress.schedules.blocks import extent, fuse_epilogue, parallelize
from tvm_compress.schedules.compute import KERNEL_ATTR, out_size, pad_nchwc
from tvm_compress.schedules.conv2d import pick_tile

AVX2_DOT_8X4 = "tvm_compress.avx2_dot_8x4_u8s8s32"
CONV_NCHWC_U8S8 = "conv2d_nchwc_u8s8"


@T.prim_func(s_tir=True)
def _dot_8x4_desc(A: T.Buffer((4,), "uint8", offset_factor=1),
                  B: T.Buffer((8, 4), "int8", offset_factor=1),
                  C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        for i in T.serial(0, 8):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_8x4_avx2(A: T.Buffer((4,), "uint8", offset_factor=1),
                  B: T.Buffer((8, 4), "int8", offset_factor=1),
                  C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a_u8x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32")
        pairs = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a_u8x32,
            B.vload([0, 0], dtype="int8x32"), dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1),
            dtype="int32x8")


def register_intrinsics() -> None:
    """Register the AVX2 dot product (idempotent)."""
    if TensorIntrin.get(AVX2_DOT_8X4, allow_missing=True) is None:
        TensorIntrin.register(AVX2_DOT_8X4, _dot_8x4_desc, _dot_8x4_avx2)


def conv2d_nchwc_u8s8(data: te.Tensor, kernel: te.Tensor, *, strides: tuple[int, int],
                      padding: tuple[int, int, int, int]) -> te.Tensor:
    """conv2d, data uint8 (N, C/ib, H, W, ib), kernel int8 (O/8, C/ib, kh, kw, ib/4, 8, 4)."""
    n, _, height, width, ib = (int(d) for d in data.shape)
    oc_chunks, ic_chunks, kh, kw, _, ob, _ = (int(d) for d in kernel.shape)
    (sh, sw) = strides
    oh = out_size(height, padding[0] + padding[2], kh, sh, 1)
    ow = out_size(width, padding[1] + padding[3], kw, sw, 1)
    padded = pad_nchwc(data, padding)
    ico = te.reduce_axis((0, ic_chunks), name="ico")
    ry, rx = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")
    ic4, k4 = te.reduce_axis((0, ib // 4), name="ic4"), te.reduce_axis((0, 4), name="k4")

    def body(b, oc, y, x, oi):
        value = padded[b, ico, y * sh + ry, x * sw + rx, ic4 * 4 + k4].astype("int32")
        weight = kernel[oc, ico, ry, rx, ic4, oi, k4].astype("int32")
        return te.sum(value * weight, axis=[ico, ry, rx, ic4, k4])

    return te.compute((n, oc_chunks, oh, ow, ob), body, name="conv2d_NCHWc_u8s8",
                      attrs={KERNEL_ATTR: CONV_NCHWC_U8S8})


def schedule_conv2d_nchwc_u8s8(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *,
                               registers: int, cores: int) -> None:
    """The fp32 conv tiling with the (8 output channels x 4 input channels) step tensorized."""
    register_intrinsics()
    n, oc, y, x, oi, ico, ry, rx, ic4, k4 = sch.get_loops(block)
    tile = pick_tile(extent(sch, oc), extent(sch, y), extent(sch, x), registers)
    oc_o, oc_i = sch.split(oc, [None, tile.oc])
    y_o, y_i = sch.split(y, [None, tile.y])
    x_o, x_i = sch.split(x, [None, tile.x])
    outer = [n, y_o, oc_o, x_o]
    sch.reorder(*outer, ico, ry, rx, ic4, oc_i, y_i, x_i, oi, k4)
    tail = fuse_epilogue(sch, block, x_o)
    parallelize(sch, outer[:-1], cores)
    for loop in (oc_i, y_i, x_i):
        sch.unroll(loop)
    init = sch.decompose_reduction(block, ico)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(tail)[-1])
    sch.tensorize(oi, AVX2_DOT_8X4)
