"""Integer matmul (dense layers, the classifier GEMV): ``vpdpbusd`` on VNNI, the AVX2 steps of
``int8_intrin`` elsewhere on x86; exact.

``RealizeInteger`` emits ``matmul(x u8/s8 (M, K), W s8 (K, N) constant, out int32)``. Here the
weights are packed (N/l, K/g, l, g) so that one step broadcasts g input values and meets ``l``
output columns x g inputs: the intrinsics of the integer convolutions. VNNI: g = 4, 16 or 8
columns wide. AVX2 (8 columns): ``direct`` (``vpmaddubsw``, g = 4) for pair-safe weights, else
``int16`` (``vpmaddwd`` on a widened int16 copy of the input, g = 2), as ``int8.pick_kind``
decides. Inputs offset by the intrinsic (s8 -> u8) are undone by sums that start at
``-offset * sum_k W[k, n]`` (as in ``int8.py``). The generic matmul schedule widened every
product to int32 first: MobileNetV2's 1280 x 1000 classifier took longer than the fp32 one, and
ddddocr's 512 x 8210 classifier on AVX2 took 40 ms against 5 ms in fp32.
"""

from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx

from tvm_compress.backend.schedules.blocks import (
    extent,
    fuse_epilogue,
    parallelize,
    producers_and_consumers,
    schedule_spatial,
)
from tvm_compress.backend.schedules.compute import KERNEL_ATTR, tvm_legalization
from tvm_compress.backend.schedules.hardware import has_avx2_int8, vnni_lanes
from tvm_compress.backend.schedules.int8 import INTRIN_ATTR, constant_value, pick_kind
from tvm_compress.backend.schedules.int8_intrin import intrin_name as avx2_intrin_name
from tvm_compress.backend.schedules.int8_intrin import offset as avx2_offset
from tvm_compress.backend.schedules.int8_intrin import register_intrinsics as register_avx2
from tvm_compress.backend.schedules.int8_intrin import start_from
from tvm_compress.backend.schedules.int8_vnni import intrin_name, offset, register_intrinsics
from tvm_compress.backend.schedules.rewrite import bound_call, rewrite_functions

MATMUL_VNNI = "matmul_vnni"
MATMUL_AVX2 = "matmul_avx2"


def pack_matmul_weight(weight: np.ndarray, lanes: int, group: int = 4) -> np.ndarray:
    """(K, N) -> (N/lanes, K/group, lanes, group)."""
    k, n = weight.shape
    return np.ascontiguousarray(
        weight.reshape(k // group, group, n // lanes, lanes).transpose(2, 0, 3, 1))


def matmul_int8(data: te.Tensor, weight: te.Tensor, kind: str = "vnni") -> te.Tensor:
    """(M, K) u8/s8 x packed (N/l, K/g, l, g) -> (M, N) int32 with the step of ``kind``
    (``vnni``, ``direct`` or ``int16``): the inputs offset as that step offsets them (undone
    by the start :func:`matmul_int8_func` adds); ``int16`` reads a widened copy of the input."""
    m = int(data.shape[0])
    blocks, groups, lanes, group = (int(d) for d in weight.shape)
    dtype = str(data.dtype)
    if kind == "vnni":
        add, intrin, attr = offset(dtype), intrin_name(lanes, dtype), MATMUL_VNNI
    else:
        add, intrin, attr = avx2_offset(kind, dtype), avx2_intrin_name(kind, dtype), MATMUL_AVX2
    if kind == "int16":
        data = te.compute(data.shape, lambda i, k: data[i, k].astype("int16"), name="data_i16")
    ko = te.reduce_axis((0, groups), name="ko")
    ki = te.reduce_axis((0, group), name="ki")

    def body(i, j):
        value = data[i, ko * group + ki].astype("int32")
        if add:
            value = value + add
        return te.sum(value * weight[j // lanes, ko, j % lanes, ki].astype("int32"),
                      axis=[ko, ki])

    return te.compute((m, blocks * lanes), body, name=attr,
                      attrs={KERNEL_ATTR: attr, INTRIN_ATTR: intrin})


def matmul_int8_func(data: relax.TensorType, weight: np.ndarray,
                     kind: str = "vnni") -> tirx.PrimFunc:
    """PrimFunc ``(data, packed weight, start) -> int32 (M, N)``."""
    data_ph = te.placeholder([int(d) for d in data.shape], str(data.dtype), name="data")
    weight_ph = te.placeholder(weight.shape, str(weight.dtype), name="weight")
    start_ph = te.placeholder((weight.shape[0] * weight.shape[2],), "int32", name="start")
    out = matmul_int8(data_ph, weight_ph, kind)
    func = te.create_prim_func([data_ph, weight_ph, start_ph, out],
                               index_dtype_override="int64").without_attr("global_symbol")
    return func.with_body(start_from(func.body, func.params[2], axes=(1,)))


def _pick(target: tvm.target.Target | None, weight: np.ndarray) -> tuple[str, int, int] | None:
    """(kind, columns per step, inputs per step) for a (K, N) s8 weight on ``target``."""
    if target is None:
        return None
    lanes = vnni_lanes(target)
    if lanes:
        n = weight.shape[1]
        # 8-wide columns fit exactly where 16-wide would need padding
        return ("vnni", 8 if n % 16 and n % 8 == 0 else lanes, 4)
    if not has_avx2_int8(target):
        return None
    # pick_kind reads (..., 4 inputs) groups: adjacent input pairs are what vpmaddubsw adds
    kind = pick_kind(weight.T) if weight.shape[0] % 4 == 0 else "int16"
    return (kind, 8, 4 if kind == "direct" else 2)


def legalize_matmul_int8(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """The VNNI or AVX2 kernel for ``matmul(u8/s8 (..., M, K), constant s8 (K, N)) -> int32``;
    every other matmul as TVM legalizes it."""
    data_ty = call.args[0].ty
    weight = constant_value(bb, call.args[1])
    shape = getattr(data_ty, "shape", None)
    if (str(data_ty.dtype) not in ("uint8", "int8") or weight is None
            or weight.dtype != np.int8 or weight.ndim != 2 or shape is None or len(shape) < 2
            or not all(isinstance(d, tirx.IntImm) for d in shape)
            or str(call.ty.dtype) != "int32"):
        return tvm_legalization(bb, call)
    picked = _pick(tvm.target.Target.current(allow_none=True), weight)
    if picked is None or weight.shape[0] % picked[2]:
        return tvm_legalization(bb, call)
    kind, lanes, group = picked
    n = int(weight.shape[1])
    if n % lanes:  # classifier heads (e.g. 18,710 classes): zero columns, sliced off after
        weight = np.pad(weight, ((0, 0), (0, -n % lanes)))
    packed = pack_matmul_weight(weight, lanes, group)
    if kind == "int16":
        packed = packed.astype(np.int16)
    add = offset(str(data_ty.dtype)) if kind == "vnni" else avx2_offset(kind, str(data_ty.dtype))
    start = (-add * weight.astype(np.int64).sum(axis=0)).astype(np.int32)
    # Token-major layers ((..., M, K): ConvNeXt, attention): the kernel on the rows flattened.
    dims = [int(d) for d in shape]
    rows = int(np.prod(dims[:-1]))
    data = call.args[0] if len(dims) == 2 else bb.emit(relax.op.reshape(call.args[0],
                                                                       (rows, dims[-1])))
    func = matmul_int8_func(relax.TensorType((rows, dims[-1]), str(data_ty.dtype)), packed,
                            kind)
    gv = bb.add_func(func, "matmul_int8")
    out = relax.call_tir(gv, [data, relax.const(packed, str(packed.dtype)),
                              relax.const(start, "int32")],
                         relax.TensorType(func.params[3].shape, "int32"))
    if weight.shape[1] != n:
        out = relax.op.strided_slice(bb.emit(out), axes=[1], begin=[0], end=[n])
    if len(dims) == 2:
        return out
    return relax.op.reshape(bb.emit(out), (*dims[:-1], n))


def _register_tile(rows: int, blocks: int, budget: int) -> tuple[int, int]:
    """(rows, column blocks) of the register tile: the most accumulators (``rows x blocks``)
    that fit ``budget`` registers with a weight vector per block and a broadcast per row."""
    return max(((r, t) for r in range(1, 9) for t in (1, 2, 3, 4, 5, 6, 8)
                if rows % r == 0 and blocks % t == 0 and r * t + t + r <= budget),
               key=lambda rt: (rt[0] * rt[1], rt[1]))


def schedule_matmul_int8(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *,
                         lanes: int, registers: int, cores: int) -> None:
    """Columns in blocks of the intrinsic's width; a register tile of ``rows x tile`` blocks
    (one accumulator each) around the whole K reduction; column tiles outermost, so that each
    column panel of the weight is read from memory once and from cache by every row tile
    (row by row, a 32 x 1024 x 8210 classifier streamed its 8 MB weight 32 times: 4 ms). The
    epilogue per tile; the int16 copy of the input (AVX2 ``int16``) in a pass of its own."""
    register_intrinsics()
    register_avx2()
    intrin = str(sch.get(block).annotations[INTRIN_ATTR])
    width = int(re.search(r"_(\d+)x[24]_", intrin).group(1))
    budget = registers - (2 if "direct" in intrin else 0)  # direct: the ones, the pair sums
    producers, _ = producers_and_consumers(sch, block)
    i, j, ko, ki = sch.get_loops(block)
    rows, tile = _register_tile(extent(sch, i), extent(sch, j) // width, budget)
    i_o, i_t = sch.split(i, [None, rows])
    j_o, j_t, j_i = sch.split(j, [None, tile, width])
    sch.reorder(j_o, i_o, ko, i_t, j_t, j_i, ki)
    tail = fuse_epilogue(sch, block, i_o)
    parallelize(sch, [j_o, i_o], cores)
    sch.unroll(i_t)
    sch.unroll(j_t)
    init = sch.decompose_reduction(block, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(j_i, intrin)
    sch.vectorize(sch.get_loops(tail)[-1])
    for producer in producers[:-1]:
        sch.compute_inline(producer)
    if producers:
        schedule_spatial(sch, producers[-1], lanes, cores)


def _scalar_int(expr: relax.Expr) -> bool:
    ty = expr.ty
    return (isinstance(ty, relax.TensorType) and ty.shape is not None and str(ty.dtype) == "int32"
            and all(isinstance(d, tirx.IntImm) and int(d) == 1 for d in ty.shape.values))


@relax.expr_functor.mutator
class _WidenedMatmul(relax.expr_functor.PyExprMutator):
    """``matmul(astype(x, int32) [- zx], W int32 constant)`` with 8-bit ``x`` as an 8-bit matmul.

    ONNX ``MatMulInteger`` imports as an int32 x int32 matmul of the widened 8-bit operands minus
    their zero points (ddddocr's dynamically quantized classifier: 37 ms in the generic int32
    schedule). With ``c`` a shift that brings ``W`` into int8 (0 when it fits; u8 weights with
    their zero point folded in span 256 values),
    ``(x - zx) W = x (W - c) - zx * colsum(W - c) + c * rowsum(x - zx)``: exact, and the first
    term is the VNNI kernel's.
    """

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul" \
                or str(call.ty.dtype) != "int32":
            return call
        weight = constant_value(self.builder_, call.args[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.int32 \
                or int(weight.max()) - int(weight.min()) > 255:
            return call
        data, zero_point = call.args[0], None
        sub = bound_call(self, data, "relax.subtract")
        if sub is not None and _scalar_int(sub.args[1]):
            data, zero_point = sub.args[0], sub.args[1]
        widened = bound_call(self, data, "relax.astype")
        if widened is None or str(widened.args[0].ty.dtype) not in ("uint8", "int8"):
            return call
        shift = 0 if weight.min() >= -128 and weight.max() <= 127 else int(weight.max()) - 127
        narrow = (weight.astype(np.int64) - shift).astype(np.int8)
        out = self.builder_.emit(relax.op.matmul(widened.args[0], relax.const(narrow),
                                                 out_dtype="int32"))
        if zero_point is not None:
            sums = relax.const(narrow.astype(np.int64).sum(axis=0).astype(np.int32))
            out = self.builder_.emit(relax.op.subtract(out, relax.op.multiply(zero_point, sums)))
        if shift:
            rows = relax.op.sum(call.args[0], axis=[-1], keepdims=True)  # sum_k (x - zx)
            out = relax.op.add(out, relax.op.multiply(rows, relax.const(shift, "int32")))
        return out


@tvm.ir.transform.module_pass(opt_level=0, name="NarrowIntegerMatmul")
def narrow_integer_matmul(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Rewrite widened 8-bit int32 matmuls (ONNX ``MatMulInteger``) as 8-bit ones (after
    constant folding, before legalization; see :class:`_WidenedMatmul`)."""
    return rewrite_functions(mod, _WidenedMatmul(mod))
