"""Where a float graph gets quantized: layer blocks and activation quantization points.

Works on the fp32 Relax graph after BatchNorm folding. A *block* is a conv2d / matmul with a
constant weight followed by an optional bias add and an optional ReLU / ReLU6 (clip); a residual
add with an optional ReLU is a block too. A *point* is a tensor that holds int8 in the realized
graph, so it is calibrated and gets a quantize/dequantize pair in the simulated graph:

- the data input of every quantized layer;
- the output of a quantized block, a residual add or a concat whose inputs are all points, when a
  user can take int8 (a quantized layer, add, concat, or a scale-preserving op), or when all its
  users form a float island of that tensor alone (SiLU, GELU, hardswish: ``feeds_table``), which
  the integer build then evaluates as a 256-entry table;
- the output of a scale-preserving op (max-pool, reshape, ...) of a point: it shares the
  point's parameters, so it needs no calibration.

Outputs of the last layers (logits) are not points: they are dequantized from int32 directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax

from tvm_compress.frontend.layers import Layer, scan_layers
from tvm_compress.graph.dataflow import DataflowView, feeds_table, is_const, op_name, shape_of
from tvm_compress.quant.config import QuantConfig

CONV, MATMUL, ADD = "relax.nn.conv2d", "relax.matmul", "relax.add"
CONCAT = "relax.concat"
# Ops whose int8 output has exactly the input's quantization parameters.
SCALE_PRESERVING = ("relax.nn.max_pool2d", "relax.reshape", "relax.flatten",
                    "relax.permute_dims", "relax.squeeze", "relax.expand_dims",
                    "relax.split", "relax.strided_slice")


@dataclass
class LayerSite:
    layer: Layer
    var: relax.Var            # bound to the conv2d / matmul call
    data: relax.Expr          # its data input
    weight: tvm.ir.expr.Constant
    weight_axis: int          # output-channel axis of the weight
    block_out: relax.Var      # last var of conv [+ bias] [+ activation]
    bias_var: relax.Var | None = None  # bound to add(layer, constant bias), if there is one


@dataclass
class Point:
    name: str
    var: relax.Var
    bits: int
    shares: str | None = None  # name of the point whose parameters it reuses


@dataclass
class QuantGraph:
    layers: list[LayerSite]
    points: dict[str, Point]
    fp32_layers: list[str] = field(default_factory=list)

    def point_of(self, var: relax.Var) -> Point | None:
        for p in self.points.values():
            if p.var.same_as(var):
                return p
        return None

    @property
    def calibrated_points(self) -> list[Point]:
        return [p for p in self.points.values() if p.shares is None]


def _is_activation(value: relax.Expr) -> bool:
    op = op_name(value)
    if op == "relax.nn.relu":
        return True
    if op == "relax.clip":
        return float(value.args[1].value) == 0.0
    return False


def _channel_bias(value: relax.Expr, var: relax.Var, channels: int, ndim: int) -> bool:
    """add(var, const) with the const broadcasting along the channel axis only."""
    if op_name(value) != ADD:
        return False
    others = [a for a in value.args if not a.same_as(var)]
    if len(others) != 1 or not is_const(others[0]):
        return False
    shape = shape_of(others[0])
    allowed = [(1, channels, 1, 1), (channels, 1, 1)] if ndim == 4 else [(1, channels), (channels,)]
    return shape in allowed


def _block_out(view: DataflowView, var: relax.Var, channels: int, ndim: int
               ) -> tuple[relax.Var, relax.Var | None]:
    cur, bias = var, None
    nxt = view.single_user(cur)
    if nxt is not None and _channel_bias(view.values[nxt], cur, channels, ndim):
        cur = bias = nxt
        nxt = view.single_user(cur)
    if nxt is not None and _is_activation(view.values[nxt]):
        cur = nxt
    return cur, bias


def _site(view: DataflowView, var: relax.Var, layer: Layer) -> LayerSite | None:
    call = view.values[var]
    weight = view.resolve(call.args[1])
    if not is_const(weight) or (layer.kind != "linear" and len(shape_of(weight)) != 4):
        return None
    if layer.kind == "linear" and not weight.same_as(call.args[1]):
        return None  # a transpose that FoldConstant has not folded yet
    axis = 1 if layer.kind == "linear" else 0
    ndim = len(layer.output_shape)
    out, bias = _block_out(view, var, layer.out_channels, ndim)
    return LayerSite(layer, var, call.args[0], weight, axis, out, bias)


def analyze(mod: tvm.IRModule, config: QuantConfig) -> QuantGraph:
    """Find the layers to quantize and the activation points of ``mod["main"]``."""
    func = mod["main"]
    view = DataflowView.of(func)
    config.check_layers(layer.name for _, layer in scan_layers(func))
    sites, fp32 = [], []
    for var, layer in scan_layers(func):
        site = _site(view, var, layer)
        if site is None or config.is_fp32(layer.name):
            fp32.append(layer.name)
        else:
            sites.append(site)
    return QuantGraph(sites, _points(view, sites, config), fp32)


def _points(view: DataflowView, sites: list[LayerSite], config: QuantConfig) -> dict[str, Point]:
    data_bits: dict[relax.Var, tuple[int, str]] = {}
    for s in sites:
        bits = config.activation_spec(s.layer.name).bits
        prev = data_bits.get(s.data)
        if prev is None or bits > prev[0]:
            data_bits[s.data] = (bits, f"{s.layer.name}:in")
    block_of = {s.block_out: s for s in sites}
    consumers = {s.var: s for s in sites}
    points: dict[str, Point] = {}
    by_var: dict[relax.Var, Point] = {}

    def int_user(var: relax.Var) -> bool:
        for u in view.users.get(var, []):
            site = consumers.get(u)
            if (site is not None and site.data.same_as(var)) or \
                    view.op(u) in (ADD, CONCAT, *SCALE_PRESERVING):
                return True
        return feeds_table(view, var)

    def add(var: relax.Var, name: str, bits: int, shares: str | None = None) -> None:
        if name in points:  # two slices of one tensor (a channel split): "p>strided_slice#1"
            name = f"{name}#{sum(n.split('#')[0] == name for n in points)}"
        point = Point(name, var, bits, shares)
        points[name] = point
        by_var[var] = point

    for param in view.func.params:  # "input", then "input:NAME" for a model's further inputs
        if param in data_bits:
            add(param, "input" if "input" not in points else f"input:{param.name}",
                data_bits[param][0])
    counters = {"add": 0, "concat": 0}
    for b in view.bindings:
        var, value = b.var, b.value
        if var in by_var:
            continue
        op = op_name(value)
        inputs = [a for a in _data_args(value) if isinstance(a, relax.Var)]
        if var in block_of:
            site = block_of[var]
            if var in data_bits or int_user(var):
                add(var, f"{site.layer.name}:out",
                    data_bits.get(var, (config.activation_spec(site.layer.name).bits,))[0])
        elif op in SCALE_PRESERVING and inputs and inputs[0] in by_var:
            src = by_var[inputs[0]]
            if var in data_bits or int_user(var):
                add(var, f"{src.name}>{op.split('.')[-1]}", src.bits, src.shares or src.name)
        elif op in (ADD, CONCAT) and inputs and all(a in by_var for a in inputs) and \
                len(inputs) == len(_data_args(value)):
            out = _add_block_out(view, var) if op == ADD else var
            if out in data_bits or int_user(out):
                kind = "add" if op == ADD else "concat"
                bits = max(by_var[a].bits for a in inputs)
                add(out, f"{kind}:{counters[kind]}", bits)
                counters[kind] += 1
        elif var in data_bits:
            add(var, data_bits[var][1], data_bits[var][0])
    return points


def _data_args(value: relax.Expr) -> list[relax.Expr]:
    if isinstance(value, relax.Call):
        if op_name(value) == CONCAT:
            return list(value.args[0].fields)
        return list(value.args)
    return []


def _add_block_out(view: DataflowView, var: relax.Var) -> relax.Var:
    nxt = view.single_user(var)
    if nxt is not None and _is_activation(view.values[nxt]):
        return nxt
    return var
