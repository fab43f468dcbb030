"""Relax pass: ONNX ``Cast`` from float to an integer type as one conversion.

TVM's ONNX importer spells ``Cast(x, to=int32)`` (and the other signed or unsigned integer
types narrower than 64 bits) as a chain that defines what the ONNX specification leaves
undefined: non-finite values become 0 and out-of-range ones wrap modulo 2**bits::

    where(not isfinite(x), 0, x) -> astype int64 -> floor_mod 2**32 -> where(>= 2**31, - 2**32)
    -> astype int32

On the int64 remainder LLVM has no vector instruction, so every element goes through scalar
64-bit divisions: in ``ddddocr_common_old`` (ONNX Runtime's dynamic quantization: each
ConvInteger's output and bias cast to int32) these kernels took about 4 of its 16 ms.

The chain is replaced by ``astype(x, int32)`` (then ``astype(.., type)`` for narrower types,
which wraps as the chain does). For every finite value in int32's range the result is the same;
NaN, infinities and values beyond int32 become what the CPU's conversion gives (x86:
``-2**31``), which is also what ONNX Runtime gives for them (a C++ ``static_cast``).
"""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_compress.backend.schedules.rewrite import bound_call, rewrite_functions

_INT, _UINT = tvm.runtime.DataTypeCode.INT, tvm.runtime.DataTypeCode.UINT


def _const(expr: relax.Expr, mutator: relax.PyExprMutator | None = None) -> int | float | None:
    """The value of a one-element constant or (``mutator`` given) of a sum of two."""
    if isinstance(expr, tvm.ir.expr.Constant) and expr.value.numpy().size == 1:
        return expr.value.numpy().reshape(()).item()
    total = None if mutator is None else bound_call(mutator, expr, "relax.add")
    if total is not None:
        parts = [_const(arg) for arg in total.args]
        return None if None in parts else sum(parts)
    return None


@relax.expr_functor.mutator
class _Casts(relax.expr_functor.PyExprMutator):
    """``astype(wrap(sanitize(x)), intN)`` -> ``astype(x, int32)`` (``-> intN``)."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.replaced = 0

    def _source(self, cast: relax.Call) -> relax.Expr | None:
        """The float ``x`` that ``cast`` converts through the importer's chain, or None."""
        dtype = tvm.DataType(str(cast.attrs.dtype))
        signed, bits = dtype.type_code == _INT, dtype.bits
        if dtype.type_code not in (_INT, _UINT) or bits not in (8, 16, 32):
            return None
        wrapped = cast.args[0]
        if signed:
            select = bound_call(self, wrapped, "relax.where")
            if select is None:
                return None
            test = bound_call(self, select.args[0], "relax.greater_equal")
            minus = bound_call(self, select.args[1], "relax.subtract")
            if test is None or minus is None or _const(test.args[1]) != 1 << (bits - 1) \
                    or _const(minus.args[1], self) != 1 << bits \
                    or not test.args[0].same_as(select.args[2]) \
                    or not minus.args[0].same_as(select.args[2]):
                return None
            wrapped = select.args[2]
        mod_op = "relax.floor_mod" if bits == 32 else "relax.bitwise_and"
        reduce = bound_call(self, wrapped, mod_op)
        if reduce is None or _const(reduce.args[1]) != ((1 << bits) if bits == 32
                                                        else (1 << bits) - 1):
            return None
        widen = bound_call(self, reduce.args[0], "relax.astype")
        sanitized = None if widen is None else bound_call(self, widen.args[0], "relax.where")
        if sanitized is None or _const(sanitized.args[1]) != 0:
            return None
        negated = bound_call(self, sanitized.args[0], "relax.logical_not")
        finite = None if negated is None else bound_call(self, negated.args[0], "relax.isfinite")
        if finite is None or not finite.args[0].same_as(sanitized.args[2]):
            return None
        return finite.args[0]

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.astype"):
            return call
        source = self._source(call)
        if source is None:
            return call
        self.replaced += 1
        dtype = str(call.attrs.dtype)
        out = relax.op.astype(source, "int32")
        return out if dtype == "int32" else relax.op.astype(self.builder_.emit(out), dtype)


@tvm.ir.transform.module_pass(opt_level=0, name="SimplifyIntegerCasts")
def simplify_integer_casts(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """The importer's float -> integer cast chains as single conversions (module docstring)."""
    mutator = _Casts(mod)
    mod = rewrite_functions(mod, mutator)
    if not mutator.replaced:
        return mod
    return relax.transform.DeadCodeElimination()(mod)
