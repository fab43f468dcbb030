"""The default (untuned) CPU pipeline: blocked layouts, legalization, fusion, hand schedules."""

from __future__ import annotations

import functools

import tvm
from tvm import relax

from tvm_compress.backend.schedules import fast_math
from tvm_compress.backend.schedules.compute import legalize_conv2d
from tvm_compress.backend.schedules.constants import fold_constants_numpy
from tvm_compress.backend.schedules.conv_transpose import ConvTransposeToConv
from tvm_compress.backend.schedules.dense_packed import legalize_matmul_f32
from tvm_compress.backend.schedules.dense_vnni import legalize_matmul_int8, narrow_integer_matmul
from tvm_compress.backend.schedules.elementwise import raise_elementwise
from tvm_compress.backend.schedules.hardware import has_int8_kernel, vector_lanes
from tvm_compress.backend.schedules.int8 import fold_zero_point_pads, legalize_conv2d_int8
from tvm_compress.backend.schedules.layout import PackChannels
from tvm_compress.backend.schedules.lookup import lookup_tables, mark_elementwise
from tvm_compress.backend.schedules.requantize import lower_requantize
from tvm_compress.backend.schedules.rules import apply_default_schedules
from tvm_compress.errors import UserError


def _legalize_matmul(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """float32 with a constant weight: packed GEMM; integer: VNNI; else TVM's legalization."""
    packed = legalize_matmul_f32(bb, call)
    return packed if packed is not None else legalize_matmul_int8(bb, call)


def lower_passes(target: tvm.target.Target, *, pack: bool = True) -> list[tvm.ir.transform.Pass]:
    """Relax passes up to fused, legalized, not yet scheduled PrimFuncs.

    Parameters
    ----------
    target : tvm.target.Target
        CPU target; its SIMD width sets the channel block.
    pack : bool
        Convert convolutions to NCHW[lanes]c (turn off to compare with plain NCHW).

    Returns
    -------
    list of tvm.ir.transform.Pass
        Also the starting point for meta-schedule tuning of the blocked kernels.
    """
    layout = [PackChannels(lanes=vector_lanes(target), int8=has_int8_kernel(target)),
              relax.transform.DeadCodeElimination()]
    return [
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        fold_constants_numpy,
        ConvTransposeToConv(block=vector_lanes(target) if pack else None),
        raise_elementwise,
        fold_constants_numpy,
        relax.transform.CanonicalizeBindings(),
        *(layout if pack else []),
        fold_constants_numpy,
        relax.transform.FoldConstant(),
        narrow_integer_matmul,
        lower_requantize,
        lookup_tables,
        fold_zero_point_pads,
        relax.transform.LegalizeOps({"relax.nn.conv2d": functools.partial(
            legalize_conv2d, int8_legalizer=legalize_conv2d_int8),
            "relax.matmul": _legalize_matmul, **fast_math.legalizers()}),
        relax.transform.AnnotateTIROpPattern(),
        mark_elementwise,
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def default_schedule_pipeline(target: tvm.target.Target,
                              databases: list | None = None) -> tvm.ir.transform.Pass:
    """Relax module (weights bound as constants, fp32 NCHW) -> module with scheduled PrimFuncs.

    Parameters
    ----------
    target : tvm.target.Target
        An ``llvm`` target (or its dict); its features pick the SIMD width (AVX2, AVX-512,
        NEON) and its ``num-cores`` the parallelism. Without ``mcpu``/``mattr`` LLVM assumes a
        baseline CPU (SSE2 on x86), so the schedules use 4 lanes.
    databases : list of meta-schedule Database, optional
        Tuning databases (``tvm_compress.backend.tuning_ms``): a fused function found in one gets
        its
        tuned schedule (marked ``tvm_compress.tuned``) instead of the default one.

    Returns
    -------
    tvm.ir.transform.Pass
        ``tvm.compile(pass(mod), target)`` then builds the module with the same outputs.

    Raises
    ------
    UserError
        If ``target`` is not an ``llvm`` (CPU) target.

    Notes
    -----
    Steps: fold BatchNorm into conv weights, fold constants (NumPy), raise the ONNX importer's
    point-wise ``call_tir`` to Relax ops, convert float32 convs and the ops between them to
    NCHW[lanes]c (:func:`PackChannels`; on AVX2 and VNNI targets integer convs too), lower
    ``RealizeInteger``'s int64 requantization to its exact 32-bit form (``requantize.py``),
    legalize (blocked convs by ``compute.py``, integer ones by ``int8.py`` and
    ``depthwise_int8.py``; float32 exp, sigmoid, tanh, erf, GELU, SiLU and softmax as
    vectorizable arithmetic by ``fast_math.py``; float32 matmuls with constant weights as
    packed-panel GEMMs by ``dense_packed.py``), fuse, and schedule every PrimFunc with the first
    rule of ``rules.RULES`` that applies (the last, ``fallback``, schedules any function block by
    block;
    each function records its rule, see ``backend.report``). ``conv2d_transpose`` is rewritten
    to a conv2d first (``conv_transpose.py``); channel counts that are not a multiple of the
    block are zero-padded. Integer kernels are exact: they equal the unscheduled build bit for
    bit.
    """
    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    if target.kind.name != "llvm":
        raise UserError(f"default_schedule_pipeline: target {target.kind.name!r} is not a CPU "
                        "target; pass an llvm target such as {'kind': 'llvm', 'mcpu': 'znver3'}")

    @tvm.ir.transform.module_pass(opt_level=0, name="DefaultSchedulePipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            mod = tvm.transform.Sequential(lower_passes(target))(mod)
            if databases:
                from tvm_compress.backend.databases import apply_databases

                mod, _ = apply_databases(mod, target, databases)
            return apply_default_schedules(mod, target)

    return _pipeline
