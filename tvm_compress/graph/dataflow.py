"""Small read-only views of a Relax function's dataflow: bindings, producers, users."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

# Ops a weight passes through between its parameter and the layer (transposes of linear weights).
WEIGHT_VIEWS = ("relax.permute_dims", "relax.reshape", "relax.astype")


def bindings(func: relax.Function) -> list[relax.VarBinding]:
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return []
    return [b for block in body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)]


def op_name(expr: relax.Expr) -> str | None:
    """``relax.nn.conv2d`` etc. for a call to a Relax op, else None."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def is_const(expr: relax.Expr) -> bool:
    return isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, tvm.runtime.Tensor)


def uniform_value(expr: relax.Expr) -> np.ndarray | None:
    """The single value of a constant whose elements are all equal, as a 0-d array."""
    if not isinstance(expr, tvm.ir.expr.Constant) or not hasattr(expr.value, "numpy"):
        return None
    value = expr.value.numpy()
    if value.size == 0 or not np.all(value == value.flat[0]):
        return None
    return np.array(value.flat[0], value.dtype)


def same_for_every_element(expr: relax.Expr) -> bool:
    """A uniform constant, or a scalar operand such as ``clip``'s bounds (``IntImm`` /
    ``FloatImm``)."""
    return isinstance(expr, (tvm.tirx.IntImm, tvm.tirx.FloatImm)) \
        or uniform_value(expr) is not None


def shape_of(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def call_args(expr: relax.Expr) -> list[relax.Expr]:
    """Arguments of a call, with a tuple argument (concat) flattened."""
    if not isinstance(expr, relax.Call):
        return []
    out: list[relax.Expr] = []
    for arg in expr.args:
        out.extend(arg.fields if isinstance(arg, relax.Tuple) else [arg])
    return out


@dataclass
class DataflowView:
    """Bindings of ``main`` with producer (var -> value) and user (var -> binding vars) maps."""

    func: relax.Function
    bindings: list[relax.VarBinding]
    values: dict[relax.Var, relax.Expr]
    users: dict[relax.Var, list[relax.Var]]
    outputs: set[relax.Var]
    items: dict[relax.Var, list[relax.Var]]  # tuple var -> its TupleGetItem vars (not in users)

    @classmethod
    def of(cls, func: relax.Function) -> DataflowView:
        bs = bindings(func)
        values = {b.var: b.value for b in bs}
        users: dict[relax.Var, list[relax.Var]] = {}
        items: dict[relax.Var, list[relax.Var]] = {}
        for b in bs:
            for arg in call_args(b.value):
                if isinstance(arg, relax.Var):
                    users.setdefault(arg, []).append(b.var)
            if isinstance(b.value, relax.Var):
                users.setdefault(b.value, []).append(b.var)
            if isinstance(b.value, relax.TupleGetItem) and isinstance(b.value.tuple_value,
                                                                      relax.Var):
                items.setdefault(b.value.tuple_value, []).append(b.var)
        result = func.body.body if isinstance(func.body, relax.SeqExpr) else None
        outputs = set()
        if isinstance(result, relax.Var):
            outputs.add(result)
        elif isinstance(result, relax.Tuple):
            outputs.update(f for f in result.fields if isinstance(f, relax.Var))
        return cls(func, bs, values, users, outputs, items)

    def resolve(self, expr: relax.Expr) -> relax.Expr:
        """Follow a value through bound views (transposes, reshapes) to its origin."""
        while True:
            if isinstance(expr, relax.Var) and expr in self.values:
                expr = self.values[expr]
            elif op_name(expr) in WEIGHT_VIEWS:
                expr = expr.args[0]
            else:
                return expr

    def op(self, var: relax.Var) -> str | None:
        return op_name(self.values.get(var))

    def single_user(self, var: relax.Var) -> relax.Var | None:
        users = self.users.get(var, [])
        return users[0] if len(users) == 1 and var not in self.outputs else None


def emit_named(bb: relax.BlockBuilder, value: relax.Expr, name: str, *,
               dataflow: bool = True) -> relax.Var:
    """Bind ``value`` to a new variable called exactly ``name``.

    ``BlockBuilder.emit`` would rewrite the dots out of layer names such as ``features.3.conv``;
    passes use this to keep a rewritten layer's name (LayerTable reads names from variables).
    """
    value = bb.normalize(value)
    var = (relax.DataflowVar if dataflow else relax.Var)(name, value.ty)
    bb.emit_normalized(relax.VarBinding(var, value))
    return var


# Ops an integer graph computes exactly on the quantized values (a quantized tensor passes
# through them and stays integer): batch norm folds into the conv, bias adds and scales fold
# into the requantization, ReLU / clip are integer clamps.
_FOLDED = {"relax.nn.batch_norm", "relax.nn.relu", "relax.clip", "relax.maximum",
           "relax.minimum", "relax.add", "relax.subtract", "relax.multiply", "relax.divide"}
_NONLINEAR = {"relax.sigmoid", "relax.nn.silu", "relax.tanh", "relax.exp", "relax.nn.gelu",
              "relax.nn.gelu_tanh", "relax.erf", "relax.nn.softmax", "relax.mean", "relax.sum",
              "relax.nn.adaptive_avg_pool2d", "relax.power", "relax.sqrt", "relax.rsqrt"}


def feeds_float_island(view: DataflowView, var: relax.Var, *, limit: int = 16) -> bool:
    """Whether ``var``'s value, before it reaches another layer, goes through a float island:
    a product of two activations (hardswish ``x * clip(x + 3, 0, 6) / 6``, SiLU, a
    squeeze-and-excitation gate) or a non-linear / reducing op (sigmoid, mean, softmax, ...).
    Batch norm, bias adds and scales by constants, ReLU and clips pass through; a residual add
    of two activations, a conv, a matmul or anything else ends the search."""
    frontier, seen = [var], {var}
    while frontier and len(seen) <= limit:
        current = frontier.pop()
        for user in view.users.get(current, []) + view.items.get(current, []):
            value = view.values[user]
            op = op_name(value)
            if op in _NONLINEAR:
                return True
            constants = [is_const(a) for a in call_args(value)]
            if op in ("relax.multiply", "relax.divide") and not any(constants):
                return True
            passes = isinstance(value, relax.TupleGetItem) or (
                op in _FOLDED and (op not in ("relax.add", "relax.subtract") or any(constants)))
            if passes and user not in seen:
                seen.add(user)
                frontier.append(user)
    return False


# Element-wise float ops a function of one 8-bit tensor can be tabulated through
# (``backend.schedules.lookup``): unary ones, and binary ones whose other operand is the same
# tensor or a constant with all elements equal.
TABLE_UNARY = {"relax.clip", "relax.nn.relu", "relax.nn.leakyrelu", "relax.nn.gelu",
               "relax.nn.gelu_tanh", "relax.nn.silu", "relax.sigmoid", "relax.tanh", "relax.exp",
               "relax.negative", "relax.abs", "relax.sqrt", "relax.rsqrt", "relax.square",
               "relax.round", "relax.floor", "relax.ceil", "relax.nn.softplus", "relax.erf"}
TABLE_BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
                "relax.minimum", "relax.power"}
TABLE_OPS = TABLE_UNARY | TABLE_BINARY
TABLE_MIN_OPS = 2  # smaller islands (a lone ReLU, already an integer clip) stay as they are


def feeds_table(view: DataflowView, var: relax.Var) -> bool:
    """Whether every user of ``var`` belongs to a float island of ``var`` alone: element-wise
    ops (``TABLE_OPS``) whose operands are ``var``, other island ops or
    operands the same for every element (``same_for_every_element``), at least
    ``TABLE_MIN_OPS`` of them (SiLU ``x * sigmoid(x)``, hardswish, GELU). Quantized to 8 bits,
    ``var`` then has 256 values and the island becomes a table."""
    if not isinstance(var.ty, relax.TensorType):
        return False
    shape, dtype = var.ty.shape, str(var.ty.dtype)
    island: set[relax.Var] = set()
    frontier = [var]
    while frontier:  # every element-wise op reachable from var through element-wise ops
        for user in view.users.get(frontier.pop(), []):
            value = view.values[user]
            if user not in island and op_name(value) in TABLE_OPS \
                    and isinstance(value.ty, relax.TensorType) and str(value.ty.dtype) == dtype \
                    and list(value.ty.shape) == list(shape):
                island.add(user)
                frontier.append(user)
    changed = True
    while changed:  # drop ops with an operand from outside, and what depends on them
        changed = False
        for user in list(island):
            if not all(a.same_as(var) or a in island or same_for_every_element(a)
                       for a in call_args(view.values[user])):
                island.discard(user)
                changed = True
    return var not in view.outputs and len(island) >= TABLE_MIN_OPS \
        and all(u in island for u in view.users.get(var, []))
