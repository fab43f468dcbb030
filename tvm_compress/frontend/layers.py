"""LayerTable: one row per conv / linear layer of a Relax module, under stable names.

A layer's name is the name of the Relax variable its conv2d / matmul is bound to. The frontends set
it from the layer's weight (``features.3.conv.1.0``) with :func:`name_layers`; Relax mutators keep
variable names, so a rewritten module still reports the same names. Unnamed layers (modules built
by hand) get ``conv_<i>`` / ``linear_<i>`` in graph order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import tvm
from tvm import relax

from tvm_compress.graph.dataflow import (
    WEIGHT_VIEWS,
    bindings,
    emit_named,
    is_const,
    op_name,
    shape_of,
)

_CONV = "relax.nn.conv2d"
_MATMUL = "relax.matmul"


def _resolve(expr: relax.Expr, values: dict[relax.Var, relax.Expr]) -> relax.Expr:
    """Follow a weight through bound views (transposes) to its origin (constant or parameter)."""
    while True:
        if isinstance(expr, relax.Var) and expr in values:
            expr = values[expr]
        elif op_name(expr) in WEIGHT_VIEWS:
            expr = expr.args[0]
        else:
            return expr


@dataclass(frozen=True)
class Layer:
    """One conv2d / linear layer; shapes are NCHW / OIHW for convs, (K, M) weights for linear."""

    name: str
    kind: str  # "conv" | "depthwise" | "grouped" | "linear"
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    groups: int
    stride: tuple[int, ...]
    macs: int
    params: int

    @property
    def in_channels(self) -> int:
        return self.input_shape[1] if self.kind != "linear" else self.input_shape[-1]

    @property
    def out_channels(self) -> int:
        return self.output_shape[1] if self.kind != "linear" else self.output_shape[-1]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:]) if self.kind != "linear" else (1, 1)


class LayerTable:
    """Ordered, name-indexed collection of :class:`Layer` rows."""

    def __init__(self, layers: list[Layer]) -> None:
        self._layers = list(layers)
        self._by_name = {layer.name: layer for layer in self._layers}

    @classmethod
    def from_module(cls, mod: tvm.IRModule, func_name: str = "main") -> LayerTable:
        return cls([layer for _, layer in _scan(mod[func_name])])

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, name: str) -> Layer:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self._layers)

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self._layers)

    def count(self, kind: str) -> int:
        return sum(layer.kind == kind for layer in self._layers)

    def to_json(self) -> str:
        return json.dumps([asdict(layer) for layer in self._layers])

    def to_markdown(self) -> str:
        rows = ["| layer | kind | in | out | kernel | groups | MACs | params |",
                "|---|---|---|---|---|---|---:|---:|"]
        for x in self._layers:
            kernel = "x".join(map(str, x.kernel))
            rows.append(f"| {x.name} | {x.kind} | {x.in_channels} | {x.out_channels} | "
                        f"{kernel} | {x.groups} | {x.macs:,} | {x.params:,} |")
        return "\n".join(rows)


def _bias_params(var: relax.Var, users: dict[relax.Var, list[relax.Expr]], channels: int) -> int:
    """Size of a constant bias added right after the layer (0 if none)."""
    for use in users.get(var, []):
        if op_name(use) == "relax.add":
            for arg in use.args:
                if is_const(arg) and int(np.prod(shape_of(arg))) == channels:
                    return channels
    return 0


def scan_layers(func: relax.Function) -> list[tuple[relax.Var, Layer]]:
    """Every conv / linear layer with a constant weight, in graph order, with its bound var."""
    return list(_scan(func))


def _scan(func: relax.Function) -> Iterator[tuple[relax.Var, Layer]]:
    bs = bindings(func)
    values = {b.var: b.value for b in bs}
    users: dict[relax.Var, list[relax.Expr]] = {}
    for b in bs:
        if isinstance(b.value, relax.Call):
            for arg in b.value.args:
                if isinstance(arg, relax.Var):
                    users.setdefault(arg, []).append(b.value)
    counters = {"conv": 0, "linear": 0}
    for b in bs:
        op = op_name(b.value)
        if op not in (_CONV, _MATMUL):
            continue
        weight = _resolve(b.value.args[1], values)
        if not is_const(weight):
            continue
        layer = _conv_row(b) if op == _CONV else _linear_row(b)
        if layer is None:
            continue
        family = "linear" if layer.kind == "linear" else "conv"
        name = b.var.name if b.var.name and not b.var.name.startswith(("lv", "gv")) else \
            f"{family}_{counters[family]}"
        counters[family] += 1
        params = layer.params + _bias_params(b.var, users, layer.out_channels)
        yield b.var, Layer(**{**asdict(layer), "name": name, "params": params})


def _conv_row(binding: relax.VarBinding) -> Layer | None:
    call = binding.value
    attrs = call.attrs
    if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW":
        return None
    x, w, y = shape_of(call.args[0]), shape_of(call.args[1]), shape_of(binding.var)
    groups = int(attrs.groups)
    cin = x[1]
    if groups == 1:
        kind = "conv"
    elif groups == cin and w[1] == 1:
        kind = "depthwise"
    else:
        kind = "grouped"
    macs = int(np.prod(y)) * w[1] * w[2] * w[3]
    return Layer(name="", kind=kind, input_shape=x, output_shape=y, weight_shape=w, groups=groups,
                 stride=tuple(int(s) for s in attrs.strides), macs=macs, params=int(np.prod(w)))


def _linear_row(binding: relax.VarBinding) -> Layer | None:
    call = binding.value
    x, w, y = shape_of(call.args[0]), shape_of(call.args[1]), shape_of(binding.var)
    if len(w) != 2:
        return None
    macs = int(np.prod(y)) * w[0]
    return Layer(name="", kind="linear", input_shape=x, output_shape=y, weight_shape=w, groups=1,
                 stride=(1,), macs=macs, params=int(np.prod(w)))


# ------------------------------------------------------------------------------- naming at import


@relax.expr_functor.mutator
class _LayerRenamer(relax.PyExprMutator):
    def __init__(self, names: dict[relax.Var, str], mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.names = names

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        name = self.names.get(binding.var)
        if name is None:
            super().visit_var_binding_(binding)
            return
        value = self.visit_expr(binding.value)
        self.set_var_remap(binding.var, emit_named(
            self.builder_, value, name, dataflow=isinstance(binding.var, relax.DataflowVar)))


def name_layers(mod: tvm.IRModule, param_to_layer: dict[str, str]) -> tvm.IRModule:
    """Rename the vars bound to conv2d / matmul calls after their weight parameter.

    ``param_to_layer`` maps a parameter name of ``main`` (weights still as parameters) to the
    layer's stable name. Calls whose weight is not such a parameter keep their names.
    """
    func = mod["main"]
    params = {p: param_to_layer[p.name] for p in func.params if p.name in param_to_layer}
    bs = bindings(func)
    values = {b.var: b.value for b in bs}
    names: dict[relax.Var, str] = {}
    for b in bs:
        if op_name(b.value) in (_CONV, _MATMUL):
            origin = _resolve(b.value.args[1], values)
            if isinstance(origin, relax.Var) and origin in params:
                names[b.var] = params[origin]
    if not names:
        return mod
    new_mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    renamer = _LayerRenamer(names, new_mod)
    new_mod["main"] = renamer.visit_expr(func)
    return new_mod


def _layer_vars(func: relax.Function) -> list[tuple[relax.Var, tuple[str, tuple[int, ...]]]]:
    """(var, (op, weight shape)) of every conv / linear call with a constant weight, in order."""
    bs = bindings(func)
    values = {b.var: b.value for b in bs}
    found = []
    for b in bs:
        op = op_name(b.value)
        if op in (_CONV, _MATMUL):
            weight = _resolve(b.value.args[1], values)
            if is_const(weight) or isinstance(weight, relax.Var):
                found.append((b.var, (op, shape_of(weight))))
    return found


def restore_layer_names(before: tvm.IRModule, after: tvm.IRModule) -> tvm.IRModule:
    """Give ``after``'s layers the names they had in ``before``.

    For third-party passes that re-create bindings (TVM's pattern-rewrite passes do, dropping
    variable names) but keep the layers: the i-th conv / linear of ``after`` gets the i-th name of
    ``before``. Raises ValueError if the layer sequence (op and weight shape) changed.
    """
    old, new = _layer_vars(before["main"]), _layer_vars(after["main"])
    if [sig for _, sig in old] != [sig for _, sig in new]:
        raise ValueError("restore_layer_names: the pass changed the layers; names cannot be "
                         "carried over by position")
    names = {var: old_var.name for (var, _), (old_var, _) in zip(new, old, strict=True)
             if var.name != old_var.name}
    if not names:
        return after
    out = tvm.IRModule(dict(after.functions), attrs=after.attrs)
    out["main"] = _LayerRenamer(names, out).visit_expr(after["main"])
    return out
