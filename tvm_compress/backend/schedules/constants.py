"""Relax pass: fold calls on constants with NumPy.

TVM's ``FoldConstant`` compiles every folded call with LLVM; on MobileNetV2 the BatchNorm and
weight-layout folding that the default pipeline needs takes ~30 s that way. The ops that pass
produces on weights (arithmetic, reshape-like, layout_transform) are evaluated here in NumPy in
well under a second; anything else is left for ``FoldConstant``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_compress.backend.schedules.rewrite import rewrite_functions

_BINARY: dict[str, Callable] = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.power": np.power, "relax.maximum": np.maximum,
    "relax.minimum": np.minimum}
_UNARY: dict[str, Callable] = {
    "relax.sqrt": np.sqrt, "relax.rsqrt": lambda a: 1.0 / np.sqrt(a), "relax.negative": np.negative,
    "relax.exp": np.exp, "relax.abs": np.abs, "relax.isnan": np.isnan}
_INDEX_OPS = {tirx.Add: np.add, tirx.Sub: np.subtract, tirx.Mul: np.multiply,
              tirx.FloorDiv: np.floor_divide, tirx.FloorMod: np.mod}


def _eval_index(expr: tirx.PrimExpr, env: dict) -> np.ndarray | int:
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    if isinstance(expr, tirx.Cast):
        return _eval_index(expr.value, env)
    for cls, fn in _INDEX_OPS.items():
        if isinstance(expr, cls):
            return fn(_eval_index(expr.a, env), _eval_index(expr.b, env))
    for var, value in env.items():
        if expr.same_as(var):
            return value
    raise NotImplementedError(f"index expression {type(expr).__name__}")


def layout_transform_array(array: np.ndarray, index_map: tirx.IndexMap,
                           pad_value: float = 0.0) -> np.ndarray:
    """Apply a relax ``layout_transform`` index map to a NumPy array, padding with ``pad_value``."""
    grids = np.indices(array.shape, sparse=True)
    env = dict(zip(index_map.initial_indices, grids, strict=True))
    dst = [np.broadcast_to(_eval_index(e, env), array.shape) for e in index_map.final_indices]
    out_shape = tuple(int(d) for d in index_map.map_shape(list(array.shape)))
    out = np.full(out_shape, pad_value, dtype=array.dtype)
    out[tuple(dst)] = array
    return out


def _value(expr: relax.Expr) -> np.ndarray | float | None:
    if isinstance(expr, (tirx.FloatImm, tirx.IntImm)):
        return expr.value
    if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    return None


def _evaluate(call: relax.Call) -> np.ndarray | None:
    name = call.op.name
    if name in _BINARY or name in _UNARY:
        args = [_value(a) for a in call.args]
        if any(a is None for a in args):
            return None
        fn = _BINARY.get(name) or _UNARY[name]
        return np.asarray(fn(*args))
    if name == "relax.where":
        args = [_value(a) for a in call.args]
        return None if any(a is None for a in args) else np.where(*args)
    data = _value(call.args[0])
    if not isinstance(data, np.ndarray):
        return None
    if name == "relax.astype":  # the result is cast to the call's dtype below
        return data
    if name == "relax.reshape" and isinstance(call.args[1], relax.ShapeExpr):
        return data.reshape([int(v) for v in call.args[1].values])
    if name == "relax.expand_dims":
        return np.expand_dims(data, tuple(int(a) for a in call.attrs.axis))
    if name == "relax.squeeze" and call.attrs.axis is not None:
        return np.squeeze(data, tuple(int(a) for a in call.attrs.axis))
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        return np.transpose(data, None if axes is None else [int(a) for a in axes])
    if name == "relax.layout_transform":
        pad = call.attrs.pad_value
        return layout_transform_array(data, call.attrs.index_map,
                                      0.0 if pad is None else float(pad.value))
    return None


@mutator
class _NumpyFolder(PyExprMutator):
    def _resolve(self, expr: relax.Expr) -> relax.Expr:
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if _value(bound) is not None:
                return bound
        return expr

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or not isinstance(call.ty, relax.TensorType):
            return call
        dtype = str(call.ty.dtype)
        call = relax.Call(call.op, [self._resolve(a) for a in call.args], call.attrs,
                          call.ty_args)
        try:
            result = _evaluate(call)
        except (NotImplementedError, ValueError, TypeError):
            return call
        if result is None:
            return call
        return relax.const(result.astype(dtype), dtype)


@tvm.ir.transform.module_pass(opt_level=0, name="FoldConstantsNumpy")
def fold_constants_numpy(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Fold arithmetic, casts, reshape-like, transpose and layout_transform calls on constants in
    NumPy."""
    return rewrite_functions(mod, _NumpyFolder(mod))
