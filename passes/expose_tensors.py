"""ExposeTensors: make ``main`` also return chosen intermediate tensors (for calibration).

Requires: ``main`` returning one tensor; the tensors named by their binding positions.
Guarantees: ``main`` returns ``(original_output, t_1, ..., t_k)`` with the same computation;
dataflow blocks are turned into ordinary binding blocks so the tensors may leave them.
"""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_compress.graph.dataflow import bindings


def binding_positions(func: relax.Function, tensors: list[relax.Var]) -> list[int]:
    """Position of each tensor in the binding order (-1 - k for the k-th function parameter)."""
    index = {b.var: i for i, b in enumerate(bindings(func))}
    params = list(func.params)
    out = []
    for var in tensors:
        if var in index:
            out.append(index[var])
        elif var in params:
            out.append(-1 - params.index(var))
        else:
            raise ValueError(f"ExposeTensors: {var.name} is not bound in main")
    return out


@tvm.ir.transform.module_pass(opt_level=0, name="tvmc.ExposeTensors")
class ExposeTensors:
    """Return the tensors at the given binding positions (see :func:`binding_positions`)."""

    def __init__(self, positions: list[int]) -> None:
        self.positions = list(positions)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        flat = relax.transform.ToNonDataflow()(mod)
        func = flat["main"]
        bound = bindings(func)
        exprs = [func.params[-1 - p] if p < 0 else bound[p].var for p in self.positions]
        body = func.body
        result = relax.Tuple([body.body, *exprs])
        ret_ty = relax.TupleType([e.ty for e in result.fields])
        new_body = relax.SeqExpr(body.blocks, result)
        new_func = relax.Function(func.params, new_body, ret_ty, func.is_pure, func.attrs)
        out = tvm.IRModule(dict(flat.functions), attrs=flat.attrs)
        out["main"] = new_func
        return relax.transform.Normalize()(out)
