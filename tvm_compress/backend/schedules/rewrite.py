"""Plumbing shared by the Relax rewrites of the default pipeline (``PyExprMutator`` passes)."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax


def rewrite_functions(mod: tvm.IRModule, mutator: Any) -> tvm.IRModule:
    """``mutator`` (a ``PyExprMutator`` built on ``mod``) applied to every Relax function of
    ``mod``; the rewritten module."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def bound_call(mutator: Any, expr: relax.Expr, op: str) -> relax.Call | None:
    """The call of Relax op ``op`` that ``expr`` is (or, a var, is bound to), else None."""
    value = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == op:
        return value
    return None
