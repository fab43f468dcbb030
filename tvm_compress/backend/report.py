"""Build report: every kernel (PrimFunc) of a build, the rule that scheduled it, its FLOPs.

``apply_default_schedules`` marks each function it schedules with the rule's name
(``rules.RULE_ATTR``); ``apply_databases`` marks database schedules as tuned. A function with
neither mark was not scheduled by us. Rules fall in three kinds:

* ``kernel``: the hand-written schedules of one operator (blocked conv, depthwise, int8, matmul);
* ``tuned``: a meta-schedule database record;
* ``generic``: schedules by loop structure (reductions, element-wise, dlight's rules, the
  fallback) - never naive loops, but not an operator's fast path either.

The runtime side (per-kernel times, share of the run, GFLOP/s vs the machine's measured peak)
is :mod:`tvm_compress.runtime.profile`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import tvm
from tvm import s_tir, tirx

UNSCHEDULED = "unscheduled"
TUNED = "tuned"
GENERIC_RULES = frozenset({"reduction", "injective", "fallback", "dlight.cpu.GEMV",
                           "dlight.cpu.Reduction"})


@dataclass(frozen=True)
class KernelInfo:
    """One PrimFunc of a build."""

    name: str
    rule: str  # rule name, "tuned", or "unscheduled"
    flops: float  # estimated floating-point (or integer multiply-add) operations per call
    bytes: int  # bytes of its arguments (inputs and outputs) per call
    arithmetic: str = ""  # 8-bit kernels: "integer", "table", "float island" (see arithmetic)

    @property
    def kind(self) -> str:
        """``kernel``, ``tuned``, ``generic`` or ``unscheduled``."""
        if self.rule in (UNSCHEDULED, TUNED):
            return self.rule
        return "generic" if self.rule in GENERIC_RULES else "kernel"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind}


def rule_of(func: tirx.PrimFunc) -> str:
    """The rule that scheduled ``func`` (see the module docstring)."""
    from tvm_compress.backend.databases import TUNED_ATTR
    from tvm_compress.backend.schedules.rules import RULE_ATTR

    attrs = func.attrs or {}
    if bool(attrs.get(TUNED_ATTR, False)):
        return TUNED
    rule = attrs.get(RULE_ATTR, None)
    if rule is not None:
        return str(rule)
    return UNSCHEDULED


def _reduction_flops(stmt: Any, runs: int = 1) -> int:
    """2 x the executions of every reduction block (one multiply-add each) under ``stmt``."""
    if isinstance(stmt, tirx.For):
        extent = stmt.extent
        if not isinstance(extent, tirx.IntImm):
            raise ValueError("dynamic loop extent")
        return _reduction_flops(stmt.body, runs * int(extent))
    if isinstance(stmt, tirx.SeqStmt):
        return sum(_reduction_flops(s, runs) for s in stmt.seq)
    if isinstance(stmt, tirx.IfThenElse):
        return _reduction_flops(stmt.then_case, runs) + (
            _reduction_flops(stmt.else_case, runs) if stmt.else_case is not None else 0)
    if isinstance(stmt, s_tir.SBlockRealize):
        block = stmt.block
        if any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars):
            if not isinstance(block.body, tirx.BufferStore):  # tensorized: MACs per call unknown
                raise ValueError("tensorized reduction")
            return 2 * runs
        return _reduction_flops(block.body, runs)
    body = getattr(stmt, "body", None)
    return _reduction_flops(body, runs) if body is not None else 0


def _flops(func: tirx.PrimFunc) -> float:
    """Multiply-adds of the reduction blocks (conv, matmul, pooling) when there are any, so a
    conv's GFLOP/s does not count its epilogue (a vectorized sigmoid is ~25 operations per
    element); otherwise TVM's estimate of every operation (element-wise kernels)."""
    try:
        reductions = _reduction_flops(func.body)
    except ValueError:
        reductions = 0
    try:
        if reductions:
            return float(reductions)
        return float(s_tir.analysis.estimate_tir_flops(tvm.IRModule({"main": func})))
    except (RuntimeError, ValueError):  # e.g. a data-dependent loop (tvm InternalError)
        return 0.0


def _bytes(func: tirx.PrimFunc) -> int:
    total = 0
    for param in func.params:
        ty = param.ty
        shape = getattr(ty, "shape", None)
        if shape is None:  # a scalar parameter
            continue
        dims = [int(d) if isinstance(d, tirx.IntImm) else 0 for d in shape]
        total += int(np.prod(dims)) * np.dtype(str(ty.dtype)).itemsize
    return total


_FLOAT_STEPS = ("dequantize", "cast")  # fused op names that compute in float32


def arithmetic(name: str, func: tirx.PrimFunc) -> str:
    """How a kernel reading 8-bit integers computes: ``integer`` end to end, with a 256-entry
    ``table`` (``lookup.py``: an activation of one 8-bit tensor), or with a ``float island``
    (a dequantize / cast to float32 in its epilogue: an activation the integer kernels do not
    compute); "" for kernels that read no 8-bit tensor. From the fused op names."""
    dtypes = {str(getattr(p.ty, "dtype", "")) for p in func.params}
    if not dtypes & {"int8", "uint8"}:
        return ""
    steps = name.split("_")
    if any(step.rstrip("0123456789") in _FLOAT_STEPS for step in steps):
        return "float island"
    if any(step.rstrip("0123456789") == "lookup" for step in steps):
        return "table"
    return "integer"


def kernel_infos(mod: tvm.IRModule) -> list[KernelInfo]:
    """Every PrimFunc of a scheduled module, sorted by name."""
    rows = [KernelInfo(gv.name_hint, rule_of(func), _flops(func), _bytes(func),
                       arithmetic(gv.name_hint, func))
            for gv, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)]
    return sorted(rows, key=lambda r: r.name)


def unscheduled(infos: list[KernelInfo]) -> list[str]:
    """Names of the kernels no rule and no database scheduled."""
    return [k.name for k in infos if k.rule == UNSCHEDULED]


def arithmetic_counts(infos: list[KernelInfo]) -> dict[str, int]:
    """How many 8-bit kernels compute in integers only, with a table, with a float island."""
    counts: dict[str, int] = {}
    for k in infos:
        if k.arithmetic:
            counts[k.arithmetic] = counts.get(k.arithmetic, 0) + 1
    return dict(sorted(counts.items()))


def rule_counts(infos: list[KernelInfo]) -> dict[str, int]:
    """How many kernels each rule scheduled."""
    counts: dict[str, int] = {}
    for k in infos:
        counts[k.rule] = counts.get(k.rule, 0) + 1
    return dict(sorted(counts.items()))
