"""Relax pass: turn pre-legalized point-wise ``call_tir`` back into Relax arithmetic ops.

The ONNX importer emits some ops as TE calls (``Clip`` becomes ``call_tir(maximum, (x, lo))``
and ``call_tir(minimum, ...)``). Those are opaque to ``PackChannels``, which would then unpack
and repack around every ReLU6. A PrimFunc whose only block computes its output element from the
same element of its inputs (or from scalars) with + - * / max min is rewritten as Relax ops, so
the layout pass and FuseOps see through it. Anything else is left as it is.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.backend.schedules.rewrite import rewrite_functions

_OPS = {tirx.Add: relax.op.add, tirx.Sub: relax.op.subtract, tirx.Mul: relax.op.multiply,
        tirx.Div: relax.op.divide, tirx.Max: relax.op.maximum, tirx.Min: relax.op.minimum}


def _blocks(stmt: tirx.Stmt) -> list[s_tir.SBlock]:
    """Blocks in a loop nest of For / SeqStmt / SBlockRealize (what TE-created funcs hold)."""
    if isinstance(stmt, s_tir.SBlockRealize):
        return [stmt.block, *_blocks(stmt.block.body)]
    if isinstance(stmt, tirx.For):
        return _blocks(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        return [b for child in stmt.seq for b in _blocks(child)]
    return []


def _single_block(func: tirx.PrimFunc) -> s_tir.SBlock | None:
    inner = [b for b in _blocks(func.body) if b.name_hint != "root"]
    return inner[0] if len(inner) == 1 else None


def _same_vars(indices, iter_vars) -> bool:
    return len(indices) == len(iter_vars) and all(
        i.same_as(iv.var) for i, iv in zip(indices, iter_vars, strict=True))


def _shape(buffer: tirx.Buffer) -> tuple[int, ...] | None:
    dims = list(buffer.shape)
    if not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


class _Unsupported(Exception):
    pass


class _Raiser:
    """Converts one point-wise PrimFunc body to Relax calls emitted into ``builder``."""

    def __init__(self, builder: relax.BlockBuilder, block, inputs: dict,
                 output: tirx.Buffer) -> None:
        self.builder, self.block, self.inputs, self.output = builder, block, inputs, output

    def convert(self, expr: tirx.PrimExpr) -> relax.Expr:
        if isinstance(expr, tvm.ir.expr.TensorLoad):  # a BufferLoad in TVM 0.27
            arg = self.inputs.get(expr.source)
            scalar = len(expr.indices) == 0
            same_shape = (_same_vars(expr.indices, self.block.iter_vars)
                          and _shape(expr.source) == _shape(self.output) is not None)
            if arg is None or not (scalar or same_shape):
                raise _Unsupported
            return arg
        if isinstance(expr, (tirx.FloatImm, tirx.IntImm)):
            if str(expr.dtype) != str(self.output.dtype):
                raise _Unsupported  # relax would not type-check the mixed-dtype arithmetic
            return relax.const(expr.value, str(expr.dtype))
        if isinstance(expr, tirx.Cast):
            return self.builder.emit(relax.op.astype(self.convert(expr.value), str(expr.dtype)))
        for cls, make in _OPS.items():
            if isinstance(expr, cls):
                return self.builder.emit(make(self.convert(expr.a), self.convert(expr.b)))
        raise _Unsupported


@mutator
class _RaiseMutator(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.call_tir") or len(call.args) != 2:
            return call
        func = self.mod.functions.get(call.args[0]) if isinstance(
            call.args[0], tvm.ir.GlobalVar) else None
        if not isinstance(func, tirx.PrimFunc) or not isinstance(call.args[1], relax.Tuple):
            return call
        block = _single_block(func)
        args = list(call.args[1].fields)
        params = list(func.params)
        if block is None or len(params) != len(args) + 1 or block.init is not None:
            return call
        store = block.body
        if (not isinstance(store, tirx.BufferStore) or not store.buffer.same_as(params[-1])
                or not _same_vars(store.indices, block.iter_vars)
                or any(iv.iter_type != tirx.IterVar.DataPar for iv in block.iter_vars)):
            return call
        try:
            inputs = dict(zip(params[:-1], args, strict=True))
            if any(str(b.dtype) != str(store.buffer.dtype) for b in inputs):
                return call
            return _Raiser(self.builder_, block, inputs, store.buffer).convert(store.value)
        except _Unsupported:
            return call


@tvm.ir.transform.module_pass(opt_level=0, name="RaiseElementwise")
def raise_elementwise(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Rewrite point-wise arithmetic ``call_tir`` (e.g. the ONNX importer's Clip) as Relax ops."""
    return rewrite_functions(mod, _RaiseMutator(mod))
