"""Dispatch: try each hand-written schedule on each PrimFunc, keep the first that applies."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from tvm_compress.backend.schedules.blocks import (
    child_blocks,
    extent,
    find_kernel,
    inline_side_inputs,
)
from tvm_compress.backend.schedules.compute import CONV_NCHWC, DEPTHWISE_NCHWC
from tvm_compress.backend.schedules.conv2d import schedule_conv2d_nchwc
from tvm_compress.backend.schedules.dense import find_matmul, schedule_matmul
from tvm_compress.backend.schedules.dense_packed import MATMUL_PACKED, schedule_matmul_packed
from tvm_compress.backend.schedules.dense_vnni import (
    MATMUL_AVX2,
    MATMUL_VNNI,
    schedule_matmul_int8,
)
from tvm_compress.backend.schedules.depthwise import schedule_depthwise_nchwc
from tvm_compress.backend.schedules.depthwise_int8 import (
    DEPTHWISE_NCHWC_INT8,
    schedule_depthwise_nchwc_int8,
)
from tvm_compress.backend.schedules.depthwise_vnni import (
    DEPTHWISE_NCHWC_VNNI,
    schedule_depthwise_nchwc_vnni,
)
from tvm_compress.backend.schedules.generic import (
    schedule_fallback_func,
    schedule_injective_func,
    schedule_reduction_func,
)
from tvm_compress.backend.schedules.hardware import (
    has_vbmi,
    num_cores,
    vector_lanes,
    vector_registers,
)
from tvm_compress.backend.schedules.int8 import CONV_NCHWC_U8S8, schedule_conv2d_nchwc_u8s8
from tvm_compress.backend.schedules.lookup_intrin import lookup_blocks, tensorize_lookups

logger = logging.getLogger(__name__)

RULE_ATTR = "tvm_compress.rule"  # which rule scheduled a PrimFunc ("tuned": a database record)

Rule = Callable[[s_tir.Schedule, tvm.target.Target], bool]


def _machine(target: tvm.target.Target) -> dict[str, int]:
    return {"lanes": vector_lanes(target), "registers": vector_registers(target),
            "cores": num_cores(target)}


def _kernel_rule(kind: str, schedule: Callable) -> Rule:
    def rule(sch: s_tir.Schedule, target: tvm.target.Target) -> bool:
        block = find_kernel(sch, kind)
        if block is None:
            return False
        inline_side_inputs(sch, block)
        schedule(sch, block, **_machine(target))
        return True

    return rule


def _matmul_rule(sch: s_tir.Schedule, target: tvm.target.Target) -> bool:
    block = find_matmul(sch)
    if block is None:
        return False
    inline_side_inputs(sch, block)  # e.g. an integer matmul's zero-point x column-sum term
    schedule_matmul(sch, block, **_machine(target))
    return True


def _reduction_rule(sch: s_tir.Schedule, target: tvm.target.Target) -> bool:
    return schedule_reduction_func(sch, lanes=vector_lanes(target), cores=num_cores(target))


def _injective_rule(sch: s_tir.Schedule, target: tvm.target.Target) -> bool:
    return schedule_injective_func(sch, lanes=vector_lanes(target), cores=num_cores(target))


def _fallback_rule(sch: s_tir.Schedule, target: tvm.target.Target) -> bool:
    return schedule_fallback_func(sch, lanes=vector_lanes(target), cores=num_cores(target))


def _dlight_rule(rule: dl.ScheduleRule) -> Rule:
    """A dlight rule as a Rule: its schedule replaces the function held by ``sch``."""

    def apply(sch: s_tir.Schedule, target: tvm.target.Target) -> bool:
        result = rule.apply(sch.mod["main"], target, False)
        if isinstance(result, list):
            result = result[0] if len(result) == 1 else None
        if result is None:
            return False
        sch.mod["main"] = result.mod["main"]
        return True

    return apply


# Most specific first: a function is scheduled by the first rule that applies cleanly.
# TVM's dlight CPU rules cover what ours do not (GEMV with the reduction innermost, softmax
# and norms with several reduction blocks); the fallback schedules whatever is left block by
# block, so no function runs as naive loops.
RULES: list[tuple[str, Rule]] = [
    ("conv2d_nchwc", _kernel_rule(CONV_NCHWC, schedule_conv2d_nchwc)),
    ("conv2d_nchwc_u8s8", _kernel_rule(CONV_NCHWC_U8S8, schedule_conv2d_nchwc_u8s8)),
    ("depthwise_nchwc", _kernel_rule(DEPTHWISE_NCHWC, schedule_depthwise_nchwc)),
    ("depthwise_nchwc_int8", _kernel_rule(DEPTHWISE_NCHWC_INT8, schedule_depthwise_nchwc_int8)),
    ("depthwise_nchwc_vnni", _kernel_rule(DEPTHWISE_NCHWC_VNNI, schedule_depthwise_nchwc_vnni)),
    ("matmul_vnni", _kernel_rule(MATMUL_VNNI, schedule_matmul_int8)),
    ("matmul_avx2", _kernel_rule(MATMUL_AVX2, schedule_matmul_int8)),
    ("matmul_packed", _kernel_rule(MATMUL_PACKED, schedule_matmul_packed)),
    ("matmul", _matmul_rule),
    ("dlight.cpu.GEMV", _dlight_rule(dl.cpu.GEMV())),
    ("reduction", _reduction_rule),
    ("injective", _injective_rule),
    ("dlight.cpu.Reduction", _dlight_rule(dl.cpu.Reduction())),
    ("fallback", _fallback_rule),
]


# Functions with at most this many loop iterations (summed over their blocks, reductions
# included) are scheduled for one core: waking the second core of the pool and waiting for it
# costs about 1 us per call (2-core AVX2 host, workers spinning), more than such a function
# takes alone. Measured there: a 4096-element add takes 0.2 us alone, 1.5 us in parallel;
# a 65536-element one 6.3 us alone, 4.2 us in parallel. The unrolled LSTM of an OCR model
# runs hundreds of such 512- to 2048-element functions per call (``docs/status.md``).
SERIAL_ITERATIONS = 4096


def iterations(func: tirx.PrimFunc) -> int:
    """Loop iterations of ``func``'s blocks (product of each block's loop extents), summed;
    a dynamic extent counts as unbounded."""
    sch = s_tir.Schedule(func)
    total = 0
    for block in child_blocks(sch):
        count = 1
        for loop in sch.get_loops(block):
            try:
                count *= extent(sch, loop)
            except ValueError:
                return sys.maxsize
        total += count
    return total


def _one_core(target: tvm.target.Target) -> tvm.target.Target:
    return tvm.target.Target({**target.export(), "num-cores": 1})


def schedule_func(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """The first rule's schedule of ``func``, or None when no rule applies cleanly; small
    functions (``SERIAL_ITERATIONS``) get a one-core schedule."""
    if num_cores(target) > 1 and iterations(func) <= SERIAL_ITERATIONS:
        target = _one_core(target)
    for name, rule in RULES:
        sch = s_tir.Schedule(func)
        try:
            applied = rule(sch, target)
        except (RuntimeError, ValueError, IndexError, AssertionError) as err:
            logger.debug("schedule rule %s failed: %s", name, err)
            continue
        if applied:
            if has_vbmi(target):
                sch = _with_lookups(sch)
            return (sch.mod["main"].with_attr("tirx.is_scheduled", True)
                    .with_attr(RULE_ATTR, name))
    return None


def _with_lookups(sch: s_tir.Schedule) -> s_tir.Schedule:
    """``sch`` with its table lookups in registers (``lookup_intrin``), where they tensorize."""
    trial = s_tir.Schedule(sch.mod["main"])  # a dlight rule replaces the function it held
    if not lookup_blocks(trial):
        return sch
    try:
        tensorize_lookups(trial)
    except (RuntimeError, ValueError, s_tir.schedule.ScheduleError) as err:
        logger.debug("lookup tensorization failed: %s", err)
        return sch
    return trial


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every unscheduled PrimFunc of ``mod`` that a rule recognizes."""
    mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(mod.functions, mod.attrs)
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        scheduled = schedule_func(func, target)
        if scheduled is not None:
            mod[gv] = scheduled
    return mod
