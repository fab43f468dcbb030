"""float32 matmul with a constant weight and several rows, as a packed-panel GEMM.

The weight ``(K, N)`` is repacked at compile time into panels ``(ceil(N / w), K, w)``, ``w`` =
two SIMD registers of columns (zero-padded at the end). A register tile of ``rows x w`` outputs
then reads, per ``k``, ``w`` contiguous weights and ``rows`` input scalars: the panel streams
through the cache line by line, where the plain ``(K, N)`` layout read a narrow strip of every
weight row (a new 4 KB page per ``k``, which no prefetcher follows) and re-read the whole weight
for every few rows. Measured on ConvNeXt's 49 x 768 x 3072 matmul and OCR classifier heads
(18,710 classes): 5% of peak before (``dense.schedule_matmul``).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir, te

from tvm_compress.backend.schedules.blocks import extent, fuse_epilogue, parallelize
from tvm_compress.backend.schedules.compute import KERNEL_ATTR
from tvm_compress.backend.schedules.hardware import vector_lanes
from tvm_compress.backend.schedules.int8 import constant_value

MATMUL_PACKED = "matmul_packed"


def pack_weight(weight: np.ndarray, width: int) -> np.ndarray:
    """(K, N) -> (ceil(N / width), K, width), zero columns past N."""
    k, n = weight.shape
    padded = np.pad(weight, ((0, 0), (0, -n % width)))
    return np.ascontiguousarray(padded.reshape(k, -1, width).transpose(1, 0, 2))


def matmul_packed(data: te.Tensor, weight: te.Tensor, n: int) -> te.Tensor:
    """``(..., M, K) x panels (P, K, w) -> (..., M, n)``: the product over all ``P * w``
    columns, then the first ``n`` (a copy the schedule fuses into the epilogue)."""
    *batch, m, depth = (int(d) for d in data.shape)
    panels, _, width = (int(d) for d in weight.shape)
    k = te.reduce_axis((0, depth), name="k")

    def body(*index):
        *b, i, j = index
        return te.sum(data[(*b, i, k)] * weight[j // width, k, j % width], axis=k)

    full = te.compute((*batch, m, panels * width), body, name="matmul_packed",
                      attrs={KERNEL_ATTR: MATMUL_PACKED})
    if panels * width == n:
        return full
    return te.compute((*batch, m, n), lambda *index: full(*index), name="matmul_columns")


def legalize_matmul_f32(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr | None:
    """The packed GEMM for ``matmul(float32 (..., M, K), constant float32 (K, N))`` with at
    least 2 rows in all (``(T, 1, K)`` is ``T`` rows) on a CPU target; None when the call does
    not fit (single rows stay GEMVs)."""
    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return None
    data_ty = call.args[0].ty
    shape = getattr(data_ty, "shape", None)
    if (str(getattr(data_ty, "dtype", "")) != "float32" or shape is None or len(shape) < 2
            or not all(isinstance(d, tvm.tirx.IntImm) for d in shape)):
        return None
    weight = constant_value(bb, call.args[1])
    if weight is None or weight.dtype != np.float32 or weight.ndim != 2:
        return None
    dims = [int(d) for d in shape]
    rows, depth = int(np.prod(dims[:-1])), dims[-1]
    width = 2 * vector_lanes(target)
    if rows < 2 or depth != weight.shape[0] or weight.shape[1] < width:
        return None
    packed = pack_weight(weight, width)
    n = int(weight.shape[1])
    return bb.call_te(lambda x, w: matmul_packed(x, w, n), call.args[0],
                      relax.const(packed, "float32"), primfunc_name_hint="matmul")


def _row_tile(rows: int, vectors: int, registers: int) -> int:
    """Rows per register tile: a divisor of ``rows`` (no tail), at most 8, with the
    accumulators (rows x vectors), the panel's vectors and a broadcast in registers."""
    limit = min(8, (registers - vectors - 1) // vectors)
    return max(r for r in range(1, limit + 1) if rows % r == 0)


def schedule_matmul_packed(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *,
                           lanes: int, registers: int, cores: int) -> None:
    """Panels outermost (each streamed once), then row tiles; per tile the whole K reduction
    around ``rows x width`` accumulators; the epilogue per tile."""
    *batch, i, j, k = sch.get_loops(block)
    if batch and extent(sch, i) == 1:
        # one row loop: (T, 1, K), an LSTM's input projection over T steps, is T rows. Only
        # then: fusing (1, 56, 56) token rows of ConvNeXt's MLP changed its results by 1e-3
        # (not traced; the batch loops stay parallel there, as before).
        i, batch = sch.fuse(*batch, i), []
    width = int(sch.get(block).reads[1].source.shape[-1])
    vectors = max(width // lanes, 1)
    rows = _row_tile(extent(sch, i), vectors, registers)
    i_o, i_i = sch.split(i, [None, rows])
    j_o, j_v, j_l = sch.split(j, [None, vectors, width // vectors])
    sch.reorder(*batch, j_o, i_o, k, i_i, j_v, j_l)
    tail = fuse_epilogue(sch, block, i_o)
    parallelize(sch, [*batch, j_o, i_o], cores)
    sch.unroll(i_i)
    sch.unroll(j_v)
    sch.vectorize(j_l)
    init = sch.decompose_reduction(block, k)
    sch.vectorize(sch.get_loops(init)[-1])
    last = sch.get_loops(tail)[-1]
    try:
        if extent(sch, last) % lanes == 0:
            sch.vectorize(sch.split(last, [None, lanes])[1])
    except (ValueError, s_tir.schedule.ScheduleError):  # the ragged last panel: scalar tail
        pass

