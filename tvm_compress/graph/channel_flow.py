"""Channel flow: which channel of every tensor is which, through the ops of a Relax function.

Every channel that a conv / linear layer (or the model input, or an op we cannot follow) creates is
an *element*. Each 4-D (NCHW) or 2-D (N, C) tensor gets a *map*: the element of each position of its
channel axis. Channel-wise ops copy maps, a concat joins them, a slice cuts them, a flatten repeats
each channel ``H*W`` times, a channel shuffle permutes them. Ops that force channels to be cropped
together (a residual add, the blocks of a shuffle) *union* elements. Ops the walk cannot follow
*block* the elements they touch: those channels are never cropped.

:mod:`tvm_compress.graph.channel_groups` turns the result into :class:`ChannelGroup` objects; the
CropChannels pass and the torch cropper read the maps back to know what to cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tvm import relax

from tvm_compress.frontend.layers import Layer, scan_layers
from tvm_compress.graph.channel_shapes import (
    CH,
    Unsupported,
    prim,
    rank,
    reshape_kind,
    slice_bounds,
    split_points,
    static_shape,
)
from tvm_compress.graph.dataflow import DataflowView, bindings, is_const, op_name

# Channel-wise unary ops -> whether f(0) == 0 (zeroing a channel before the op zeroes it after).
UNARY = {"relax.nn.relu": True, "relax.nn.leakyrelu": True, "relax.nn.gelu": True,
         "relax.nn.silu": True, "relax.tanh": True, "relax.negative": True, "relax.abs": True,
         "relax.astype": True, "relax.sigmoid": False, "relax.exp": False,
         "relax.clip": True, "relax.nn.max_pool2d": True, "relax.nn.avg_pool2d": True,
         "relax.nn.adaptive_avg_pool2d": True}
BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
          "relax.minimum")
REDUCE = ("relax.mean", "relax.sum", "relax.max", "relax.min")


@dataclass
class Member:
    """A tensor axis whose positions are channels: ``elems[p]`` is the element at position p."""

    kind: str   # conv_out | conv_in | depthwise | linear_out | linear_in | bias | scale |
                # batch_norm | tensor
    name: str   # layer name for weights, else the name of the bound variable
    axis: int
    elems: np.ndarray
    layer: str | None = None  # the conv / linear layer a bias / BN directly follows


def _keeps_zero(op: str, const_pos: int, const: relax.Expr) -> bool:
    """Whether ``op(0, c)`` (or ``op(c, 0)``) is 0 for the constant operand ``c``."""
    c = const.value.numpy()
    if op == "relax.multiply" or (op == "relax.divide" and const_pos == 1):
        return True
    if op in ("relax.add", "relax.subtract"):
        return bool(np.all(c == 0))
    if op == "relax.maximum":
        return bool(np.all(c <= 0))
    return op == "relax.minimum" and bool(np.all(c >= 0))


class ChannelFlow:
    """Walk ``func`` once and record maps, members, unions and blocked elements."""

    def __init__(self, func: relax.Function) -> None:
        self.view = DataflowView.of(func)
        self.layers: dict[relax.Var, Layer] = dict(scan_layers(func))
        self.parent: list[int] = []
        self.roots: list[np.ndarray] = []
        self.blocked: dict[int, str] = {}
        self.nonzero: set[int] = set()     # elements after an op with f(0) != 0
        self.maps: dict[relax.Var, np.ndarray] = {}
        self.tuples: dict[relax.Var, list[np.ndarray | None]] = {}
        self.members: list[Member] = []
        self.shuffles: dict[relax.Var, int] = {}  # first reshape of a shuffle -> its groups
        self.channel_slices: list[relax.Var] = []  # strided_slice / split on channels, in order
        self._skip: set[relax.Var] = set()
        self._walk(func)

    # ----------------------------------------------------------------------- elements
    def find(self, e: int) -> int:
        parent = self.parent
        while parent[e] != e:
            parent[e] = parent[parent[e]]
            e = parent[e]
        return e

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def fresh(self, n: int, reason: str | None = None) -> np.ndarray:
        start = len(self.parent)
        elems = np.arange(start, start + n, dtype=np.int64)
        self.parent.extend(range(start, start + n))
        self.roots.append(elems)
        if reason is not None:
            self.block(elems, reason)
        return elems

    def block(self, elems: np.ndarray, reason: str) -> None:
        for e in elems.tolist():
            self.blocked.setdefault(e, reason)

    def _fresh_like(self, var: relax.Var, reason: str) -> None:
        shape = static_shape(var)
        if shape is not None and len(shape) in (2, 4):
            self.maps[var] = self.fresh(shape[CH], reason)
        elif isinstance(var.ty, relax.TupleType):
            fields = []
            for field in var.ty.fields:
                dims = getattr(field, "shape", None)
                ok = isinstance(field, relax.TensorType) and dims is not None and \
                    field.ndim in (2, 4)
                fields.append(self.fresh(int(dims[CH]), reason) if ok else None)
            self.tuples[var] = fields

    def member(self, kind: str, name: str, axis: int, elems: np.ndarray,
               layer: str | None = None) -> None:
        self.members.append(Member(kind, name, axis, elems, layer))

    # --------------------------------------------------------------------------- walk
    def _walk(self, func: relax.Function) -> None:
        for param in func.params:
            self._fresh_like(param, "model input")
        for b in bindings(func):
            if b.var in self._skip:
                continue
            try:
                self._visit(b.var, b.value)
            except Unsupported as exc:
                self._unknown(b.var, b.value, str(exc))
        for out in self.view.outputs:
            for elems in self._all_maps(out):
                self.block(elems, "model output")
        for var, elems in self.maps.items():
            self.member("tensor", var.name, CH, elems)

    def _all_maps(self, expr: relax.Expr) -> list[np.ndarray]:
        if isinstance(expr, relax.Tuple):
            return [m for f in expr.fields for m in self._all_maps(f)]
        if isinstance(expr, relax.Var):
            if expr in self.maps:
                return [self.maps[expr]]
            return [m for m in self.tuples.get(expr, []) if m is not None]
        return []

    def _unknown(self, var: relax.Var, value: relax.Expr, why: str) -> None:
        what = op_name(value) or type(value).__name__
        reason = f"{what} at '{var.name}': {why}"
        args = value.args if isinstance(value, relax.Call) else \
            value.fields if isinstance(value, relax.Tuple) else \
            [value.tuple_value] if isinstance(value, relax.TupleGetItem) else [value]
        for arg in args:
            for elems in self._all_maps(arg):
                self.block(elems, reason)
        self._fresh_like(var, reason)

    def map_of(self, expr: relax.Expr) -> np.ndarray:
        if isinstance(expr, relax.Var) and expr in self.maps:
            return self.maps[expr]
        raise Unsupported("an input has no channel layout the analysis can follow")

    def layer_of(self, expr: relax.Expr) -> str | None:
        layer = self.layers.get(expr) if isinstance(expr, relax.Var) else None
        return layer.name if layer is not None else None

    def _visit(self, var: relax.Var, value: relax.Expr) -> None:
        if isinstance(value, relax.Var):
            if value in self.maps:
                self.maps[var] = self.maps[value]
            elif value in self.tuples:
                self.tuples[var] = self.tuples[value]
            elif rank(var) in (2, 4):
                raise Unsupported("alias of an unknown tensor")
        elif isinstance(value, relax.Tuple):
            self.tuples[var] = [self.maps.get(f) if isinstance(f, relax.Var) else
                                self._const_field(f) for f in value.fields]
        elif isinstance(value, relax.TupleGetItem):
            fields = self.tuples.get(value.tuple_value)
            elems = fields[value.index] if fields is not None else None
            if elems is None:
                raise Unsupported("tuple field without channel layout")
            self.maps[var] = elems
        else:
            handler = HANDLERS.get(op_name(value) or "")
            if handler is None:
                raise Unsupported("op not supported by the channel analysis")
            handler(self, var, value)

    def _const_field(self, expr: relax.Expr) -> np.ndarray | None:
        shape = static_shape(expr)
        if shape is not None and len(shape) in (2, 4):
            return self.fresh(shape[CH], "constant tensor")
        return None

    # ------------------------------------------------------------------------- ops
    def _unary(self, var: relax.Var, call: relax.Call) -> None:
        elems = self.map_of(call.args[0])
        out = static_shape(var)
        if out is None or len(out) != rank(call.args[0]) or out[CH] != len(elems):
            raise Unsupported("changes the channel axis")
        layout = getattr(call.attrs, "layout", "NCHW")
        if str(layout) != "NCHW" or str(getattr(call.attrs, "out_layout", "NCHW")) != "NCHW":
            raise Unsupported(f"layout {layout}")
        op = op_name(call)
        zero_ok = UNARY[op]
        if op == "relax.clip":
            zero_ok = prim(call.args[1]) <= 0.0 <= prim(call.args[2])
        if not zero_ok:
            self.nonzero.update(elems.tolist())
        self.maps[var] = elems

    def _batch_norm(self, var: relax.Var, call: relax.Call) -> None:
        elems = self.map_of(call.args[0])
        params = call.args[1:5]
        if int(call.attrs.axis) != CH or not all(is_const(p) for p in params) or \
                any(static_shape(p) != (len(elems),) for p in params):
            raise Unsupported("batch_norm without constant per-channel parameters on axis 1")
        self.member("batch_norm", var.name, 0, elems, self.layer_of(call.args[0]))
        self.tuples[var] = [elems, None, None]

    def _binary(self, var: relax.Var, call: relax.Call) -> None:
        a, b = call.args
        if isinstance(a, relax.Var) and isinstance(b, relax.Var):
            self._binary_vars(var, call)
            return
        const_pos = 0 if is_const(a) else 1 if is_const(b) else -1
        if const_pos < 0:
            raise Unsupported("operand is neither a tensor variable nor a constant")
        x = call.args[1 - const_pos]
        elems, xs, cs = self.map_of(x), static_shape(x), static_shape(call.args[const_pos])
        if xs is None or cs is None or static_shape(var) != xs:
            raise Unsupported("the constant broadcasts the tensor to a new shape")
        axis = CH - (len(xs) - len(cs))
        spans = 0 <= axis < len(cs) and cs[axis] != 1
        if spans and cs[axis] != len(elems):
            raise Unsupported("constant does not broadcast along the channels")
        op = op_name(call)
        scale = op in ("relax.multiply", "relax.divide")
        if spans:
            self.member("scale" if scale else "bias", var.name, axis, elems, self.layer_of(x))
        if not (spans and not scale or _keeps_zero(op, const_pos, call.args[const_pos])):
            self.nonzero.update(elems.tolist())
        self.maps[var] = elems

    def _binary_vars(self, var: relax.Var, call: relax.Call) -> None:
        ma, mb = self.map_of(call.args[0]), self.map_of(call.args[1])
        out = static_shape(var)
        if out is None or rank(call.args[0]) != rank(call.args[1]):
            raise Unsupported("operands of different rank")
        if len(ma) == len(mb):
            self.union(ma, mb)
            elems = ma
        elif 1 in (len(ma), len(mb)):
            elems = mb if len(ma) == 1 else ma
            if op_name(call) != "relax.multiply":
                self.nonzero.update(elems.tolist())
        else:
            raise Unsupported("operands with different channel counts")
        if out[CH] != len(elems):
            raise Unsupported("output channel count differs from the operands'")
        self.maps[var] = elems

    def _conv(self, var: relax.Var, call: relax.Call) -> None:
        layer = self.layers.get(var)
        if layer is None or not is_const(call.args[1]):
            raise Unsupported("conv2d without a constant OIHW weight (run FoldConstant first)")
        x = self.map_of(call.args[0])
        outs = layer.out_channels
        if layer.kind == "conv":
            self.member("conv_in", layer.name, 1, x, layer.name)
            out = self.fresh(outs)
        elif layer.kind == "depthwise":
            out = np.repeat(x, outs // len(x))  # channel multiplier: copies follow their input
        else:
            reason = f"grouped conv '{layer.name}' (groups={layer.groups}) ties input and " \
                     "output channels group by group"
            self.block(x, reason)
            self.member("conv_in", layer.name, 1, x, layer.name)
            out = self.fresh(outs, reason)
        self.member("depthwise" if layer.kind == "depthwise" else "conv_out", layer.name, 0,
                    out, layer.name)
        self.maps[var] = out

    def _matmul(self, var: relax.Var, call: relax.Call) -> None:
        layer = self.layers.get(var)
        if layer is None or not is_const(call.args[1]) or rank(call.args[0]) != 2:
            raise Unsupported("matmul that is not (N, K) x constant (K, M)")
        self.member("linear_in", layer.name, 0, self.map_of(call.args[0]), layer.name)
        out = self.fresh(layer.out_channels)
        self.member("linear_out", layer.name, 1, out, layer.name)
        self.maps[var] = out

    def _concat(self, var: relax.Var, call: relax.Call) -> None:
        maps = [self.map_of(f) for f in call.args[0].fields]
        if int(call.attrs.axis) % rank(var) == CH:
            self.maps[var] = np.concatenate(maps)
            return
        for other in maps[1:]:
            if len(other) != len(maps[0]):
                raise Unsupported("concat of tensors with different channel counts")
            self.union(maps[0], other)
        self.maps[var] = maps[0]

    def _strided_slice(self, var: relax.Var, call: relax.Call) -> None:
        elems = self.map_of(call.args[0])
        bounds = slice_bounds(call, len(elems))
        if bounds is not None:
            self.channel_slices.append(var)
        self.maps[var] = elems if bounds is None else elems[bounds[0]:bounds[1]]

    def _split(self, var: relax.Var, call: relax.Call) -> None:
        elems = self.map_of(call.args[0])
        if int(call.attrs.axis) % rank(call.args[0]) != CH:
            self.tuples[var] = [elems] * len(var.ty.fields)
            return
        points = split_points(call, len(elems))
        self.channel_slices.append(var)
        self.tuples[var] = [elems[a:b] for a, b in zip(points[:-1], points[1:], strict=True)]

    def _reduce(self, var: relax.Var, call: relax.Call) -> None:
        elems = self.map_of(call.args[0])
        axes = call.attrs.axis
        if axes is None or rank(call.args[0]) == 0:
            raise Unsupported("reduces over all axes")
        axes = {int(a) % rank(call.args[0]) for a in axes}
        if axes & {0, CH} or (static_shape(var) or (0, 0))[CH] != len(elems):
            raise Unsupported("reduces over the batch or channel axis")
        self.maps[var] = elems

    def _squeeze(self, var: relax.Var, call: relax.Call) -> None:
        elems = self.map_of(call.args[0])
        x, out = static_shape(call.args[0]), static_shape(var)
        if x is None or out is None or len(out) not in (2, 4) or x[0] != out[0] or \
                out[CH] != len(elems):
            raise Unsupported("moves the channel axis")
        self.maps[var] = elems

    def _reshape(self, var: relax.Var, call: relax.Call) -> None:
        elems = self.map_of(call.args[0])
        x, out = static_shape(call.args[0]), static_shape(var)
        if x is None or out is None:
            raise Unsupported("reshape with unknown shapes")
        if self._shuffle(var, call, elems, x, out):
            return
        kind = reshape_kind(x, out)
        if kind is None:
            raise Unsupported(f"reshape {x} -> {out} mixes channels with other axes")
        self.maps[var] = elems if kind == "keep" else np.repeat(elems, int(np.prod(x[2:])))

    def _shuffle(self, var: relax.Var, call: relax.Call, elems: np.ndarray,
                 x: tuple[int, ...], out: tuple[int, ...]) -> bool:
        """reshape (N,C,H,W)->(N,g,C/g,H,W), permute [0,2,1,3,4], reshape back: a shuffle."""
        if len(x) != 4 or len(out) != 5 or out[0] != x[0] or out[1] * out[2] != x[1] or \
                out[3:] != x[2:]:
            return False
        perm = self.view.single_user(var)
        if perm is None or self.view.op(perm) != "relax.permute_dims" or \
                [int(a) for a in self.view.values[perm].attrs.axes] != [0, 2, 1, 3, 4]:
            return False
        back = self.view.single_user(perm)
        if back is None or self.view.op(back) != "relax.reshape" or static_shape(back) != x:
            return False
        groups, per = out[1], out[2]
        blocks = elems.reshape(groups, per)
        for a in range(1, groups):  # block a's b-th channel goes with block 0's b-th
            self.union(blocks[0], blocks[a])
        self.maps[back] = blocks.T.reshape(-1)
        self.shuffles[var] = groups
        self._skip.update((perm, back))
        return True


HANDLERS: dict[str, Callable[[ChannelFlow, relax.Var, relax.Call], None]] = {
    **{op: ChannelFlow._unary for op in UNARY},
    **{op: ChannelFlow._binary for op in BINARY},
    **{op: ChannelFlow._reduce for op in REDUCE},
    "relax.nn.batch_norm": ChannelFlow._batch_norm,
    "relax.nn.conv2d": ChannelFlow._conv,
    "relax.matmul": ChannelFlow._matmul,
    "relax.concat": ChannelFlow._concat,
    "relax.strided_slice": ChannelFlow._strided_slice,
    "relax.split": ChannelFlow._split,
    "relax.reshape": ChannelFlow._reshape,
    "relax.squeeze": ChannelFlow._squeeze,
    "relax.expand_dims": ChannelFlow._squeeze,
}
