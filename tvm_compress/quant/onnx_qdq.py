"""ONNX QDQ models in and out: import (realized as integer kernels) and export for ONNX Runtime.

Import: a QDQ model (``onnxruntime.quantization.quantize_static(..., quant_format=QDQ)``) goes
through TVM's ONNX importer, which keeps QuantizeLinear / DequantizeLinear as ``quantize`` /
``dequantize``. The plain :func:`tvm_compress.frontend.importers.from_onnx` ends with
``FoldConstant``,
which would fold ``dequantize(int8 weight)`` into an fp32 constant and lose the integer weights
that ``RealizeInteger`` needs, so the quantized weights are bound only after folding.

Export: the simulated (QDQ) Relax module of a :class:`~tvm_compress.quant.quantize.QuantizedModel`
is
translated binding by binding into an ONNX QDQ graph, in the form ONNX Runtime fuses into integer
kernels: the int32 bias becomes the Conv's third input, and a ReLU / clip that the following
QuantizeLinear already saturates is dropped (exactly equal results).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tvm
from tvm import relax

from tvm_compress.errors import UserError
from tvm_compress.frontend import importers as frontend
from tvm_compress.frontend.importers import Model
from tvm_compress.frontend.layers import LayerTable, _LayerRenamer
from tvm_compress.graph.dataflow import DataflowView, bindings, is_const, op_name
from tvm_compress.passes.insert_qdq import int_tensor_name
from tvm_compress.passes.realize_integer import RealizeInteger
from tvm_compress.quant.quantize import QuantizedModel, float_layers

if TYPE_CHECKING:
    import onnx

_WEIGHT_TOKEN = "tvmcqw_"
_LAYER_OPS = ("Conv", "Gemm", "MatMul")
_LAYER_CALLS = ("relax.nn.conv2d", "relax.matmul")
_WEIGHT_PATH = ("relax.dequantize", "relax.permute_dims", "relax.reshape")
_INT8 = (2, 3)  # onnx.TensorProto.UINT8, INT8: the weight types kept as integer constants


def _quantized_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Copy of ``model`` whose int8 layer weights (inputs of a DequantizeLinear feeding a
    Conv / Gemm / MatMul weight) are renamed to tokens; token -> layer name."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    renames: dict[str, str] = {}
    token_to_layer: dict[str, str] = {}
    taken: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if node.op_type not in _LAYER_OPS or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        weight = dq.input[0]
        init = inits.get(weight)
        if init is None or init.data_type not in _INT8 or weight in renames:
            continue
        # quantize_static names the int8 copy '<fp32 name>_quantized': name layers as from_onnx.
        layer = frontend._onnx_layer_name(node, weight.removesuffix("_quantized"), index)
        if layer in taken:
            layer = f"{layer}#{index}"
        taken.add(layer)
        renames[weight] = token = f"{_WEIGHT_TOKEN}{len(renames)}"
        token_to_layer[token] = layer
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    return model, token_to_layer


@relax.expr_functor.mutator
class _WeightTransposes(relax.PyExprMutator):
    """``permute_dims(dequantize(W))`` -> ``dequantize(W^T)`` (Gemm's transB): the integer layer
    patterns read the weight dequantize directly."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if op_name(call) != "relax.permute_dims":
            return call
        src = self.lookup_binding(call.args[0]) if isinstance(call.args[0], relax.Var) else \
            call.args[0]
        if op_name(src) != "relax.dequantize" or not is_const(src.args[0]):
            return call
        data = src.args[0].value.numpy()
        axes = [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else \
            list(range(data.ndim))[::-1]
        axis = int(src.attrs.axis) % data.ndim
        scale_dims = len(src.args[1].ty.shape)
        new_axis = axes.index(axis) if scale_dims else int(src.attrs.axis)
        return relax.op.dequantize(relax.const(data.transpose(axes)), src.args[1], src.args[2],
                                   new_axis, str(src.attrs.out_dtype))


def _bind_after_folding(mod: tvm.IRModule, token_to_layer: dict[str, str]) -> tvm.IRModule:
    """Bind every weight, folding all but the quantized layer weights (bound last, unfolded)."""
    from tvm.relax.frontend import detach_params

    mod, params = detach_params(mod)
    weights = params.get("main", []) if params else []
    func = mod["main"]
    n_inputs = len(func.params) - len(weights)
    values = {p.name: w for p, w in zip(func.params[n_inputs:], weights, strict=True)}
    late = {k: v for k, v in values.items() if k in token_to_layer}
    mod = relax.transform.BindParams(
        "main", {k: v for k, v in values.items() if k not in late})(mod)
    mod = _name_qdq_layers(relax.transform.FoldConstant()(mod), token_to_layer)
    mod = relax.transform.BindParams("main", late)(mod)
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = _WeightTransposes(out).visit_expr(mod["main"])
    return relax.transform.DeadCodeElimination(["main"])(out)


def _name_qdq_layers(mod: tvm.IRModule, token_to_layer: dict[str, str]) -> tvm.IRModule:
    """Name each conv / matmul after the layer whose int8 weight (still a parameter) it reads."""
    values = {b.var: b.value for b in bindings(mod["main"])}
    names: dict[relax.Var, str] = {}
    for b in bindings(mod["main"]):
        if op_name(b.value) not in _LAYER_CALLS:
            continue
        w = b.value.args[1]
        while isinstance(w, relax.Var) and w in values or op_name(w) in _WEIGHT_PATH:
            w = values[w] if isinstance(w, relax.Var) and w in values else w.args[0]
        if isinstance(w, relax.Var) and w.name in token_to_layer:
            names[b.var] = token_to_layer[w.name]
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = _LayerRenamer(names, out).visit_expr(mod["main"])
    return out


def from_onnx_qdq(source: str | Path | onnx.ModelProto, *, name: str | None = None,
                  batch: int = 1, realize: bool = True) -> Model:
    """Import an ONNX QDQ model with its int8 weights intact, realized as integer kernels.

    Parameters
    ----------
    source : path or onnx.ModelProto
        A single-input QDQ model (QuantizeLinear / DequantizeLinear around Conv, Gemm, MatMul,
        Add, ...), e.g. from ``onnxruntime.quantization.quantize_static`` with
        ``quant_format=QuantFormat.QDQ``; per-tensor or per-channel weights.
    name : str, optional
        Display name (defaults to the file stem).
    batch : int
        Pins a dynamic batch dimension.
    realize : bool
        Run ``RealizeInteger`` (int8 conv / matmul with fixed-point requantization). False
        keeps the QDQ (simulated) module. Layers that stay fp32 are listed in ``Model.notes``.

    Returns
    -------
    Model
        Layers are named as :func:`tvm_compress.frontend.importers.from_onnx` names them on the fp32
        model the QDQ model was made from.
    """
    from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx

    where = str(source) if not hasattr(source, "graph") else (name or "ONNX QDQ model")
    model = frontend._read_onnx(source)
    if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        raise UserError(f"{where} has no DequantizeLinear node: it is not a QDQ model; import "
                        "it with tvm_compress.from_onnx or quantize it with quantize_static")
    frontend._check_onnx_ops(model, where)
    input_name, shape, dtype, notes = frontend._onnx_input(model, where, batch)
    renamed, token_to_layer = _quantized_weights(model)
    try:
        mod = tvm_from_onnx(renamed, shape_dict={input_name: shape},
                            dtype_dict={input_name: dtype}, keep_params_in_input=True)
    except tvm.error.OpNotImplemented as exc:
        raise UserError(f"{where}: {str(exc).splitlines()[0]}") from None
    mod = _bind_after_folding(mod, token_to_layer)
    # The layer table reads fp32 weights: fold a copy (variable names survive folding).
    layers = LayerTable.from_module(relax.transform.FoldConstant()(mod))
    if realize:
        mod = RealizeInteger()(mod)
        fp32 = float_layers(mod)
        notes.append(f"realized {len(layers) - len(fp32)} of {len(layers)} layers as integer "
                     f"kernels" + (f"; fp32: {', '.join(fp32)}" if fp32 else ""))
    stem = Path(source).stem if isinstance(source, (str, Path)) else "onnx_qdq_model"
    return Model(name=name or stem, mod=mod, input_name=input_name, input_shape=tuple(shape),
                 input_dtype=dtype, layers=layers, onnx_model=model, notes=notes)


# ------------------------------------------------------------------------------------ export

_SIMPLE = {"relax.add": "Add", "relax.subtract": "Sub", "relax.multiply": "Mul",
           "relax.divide": "Div", "relax.maximum": "Max", "relax.minimum": "Min",
           "relax.nn.relu": "Relu", "relax.sigmoid": "Sigmoid", "relax.tanh": "Tanh",
           "relax.matmul": "MatMul"}
_RESHAPES = ("relax.reshape", "relax.flatten", "relax.squeeze", "relax.expand_dims")
_DTYPE_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}


def _array(expr: relax.Expr) -> np.ndarray | None:
    return expr.value.numpy() if is_const(expr) else None


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


class _OnnxGraph:
    """Relax bindings -> ONNX nodes; conv + int32 bias become one Conv (ORT's integer pattern)."""

    def __init__(self, func: relax.Function, where: str) -> None:
        self.view = DataflowView.of(func)
        self.where = where
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: dict[relax.Expr, str] = {}
        self.tuples: dict[relax.Var, list[str]] = {}
        self.taken: set[str] = set()
        self.convs: dict[relax.Var, onnx.NodeProto] = {}

    def fresh(self, hint: str) -> str:
        name, i = hint or "t", 1
        while name in self.taken:
            name, i = f"{hint}_{i}", i + 1
        self.taken.add(name)
        return name

    def const(self, arr: np.ndarray, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        # np.array keeps 0-d scales 0-d (np.ascontiguousarray would make them 1-d: per axis).
        self.inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))
        return name

    def node(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        from onnx import helper

        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def value(self, expr: relax.Expr) -> str:
        if expr in self.names:
            return self.names[expr]
        if is_const(expr):
            return self.const(expr.value.numpy())
        if isinstance(expr, relax.Call):
            return self.translate(expr, "t")
        raise UserError(f"{self.where}: cannot export a {type(expr).__name__} operand to ONNX")

    def bind(self, var: relax.Var, value: relax.Expr) -> None:
        if isinstance(value, relax.Tuple):
            self.tuples[var] = [self.value(f) for f in value.fields]
        elif isinstance(value, relax.Call):
            self.names[var] = self.translate(value, var.name)
            if op_name(value) == "relax.nn.conv2d":
                self.convs[var] = self.nodes[-1]
        else:
            self.names[var] = self.value(value)

    def translate(self, call: relax.Call, hint: str) -> str:
        op = op_name(call)
        if op == "relax.add":
            fused = self.conv_bias(call)
            if fused is not None:
                return fused
        if op in _SIMPLE:
            return self.node(_SIMPLE[op], [self.value(a) for a in call.args], hint)
        key = "reshape" if op in _RESHAPES else (op or "").split(".")[-1]
        handler = getattr(self, f"op_{key}", None)
        if handler is None:
            raise UserError(f"{self.where}: operator {op or type(call.op).__name__} (binding "
                            f"'{hint}') has no ONNX QDQ translation; keep that layer fp32 or "
                            "report the op")
        return handler(call, hint)

    # ------------------------------------------------------------------- quantization
    def op_quantize(self, call: relax.Call, hint: str) -> str:
        x = self.redundant_activation(call)
        return self.node("QuantizeLinear", [self.value(x), *self.qparams(call)], hint,
                         **self.axis(call))

    def op_dequantize(self, call: relax.Call, hint: str) -> str:
        return self.node("DequantizeLinear", [self.value(call.args[0]), *self.qparams(call)],
                         hint, **self.axis(call))

    def qparams(self, call: relax.Call) -> list[str]:
        scale, zp = _array(call.args[1]), _array(call.args[2])
        if scale is None or zp is None:
            return [self.value(call.args[1]), self.value(call.args[2])]
        dtype = str(call.attrs.out_dtype) if op_name(call) == "relax.quantize" else \
            str(call.args[0].ty.dtype)
        return [self.const(scale.astype(np.float32), "scale"), self.const(zp.astype(dtype), "zp")]

    @staticmethod
    def axis(call: relax.Call) -> dict[str, int]:
        return {"axis": int(call.attrs.axis)} if len(call.args[1].ty.shape) else {}

    def redundant_activation(self, q: relax.Call) -> relax.Expr:
        """The input of a ReLU / clip that the quantize's saturation already applies (so ORT
        sees DQ -> Conv -> Q and fuses it into an integer kernel); else the quantize input."""
        x = q.args[0]
        act = self.view.values.get(x) if isinstance(x, relax.Var) else None
        scale, zp = _array(q.args[1]), _array(q.args[2])
        if op_name(act) not in ("relax.nn.relu", "relax.clip") or scale is None or scale.ndim \
                or zp is None or self.view.single_user(x) is None:
            return x
        qmin, qmax = _DTYPE_RANGE[str(q.attrs.out_dtype)]

        def level(v: float) -> float:
            return float(np.rint(np.float32(v) / np.float32(scale))) + int(zp)

        if op_name(act) == "relax.nn.relu":
            redundant = level(0.0) <= qmin
        else:
            lo, hi = float(act.args[1].value), float(act.args[2].value)
            redundant = level(lo) <= qmin and level(hi) >= qmax
        return act.args[0] if redundant else x

    def conv_bias(self, add: relax.Call) -> str | None:
        """``add(conv, dequantize(int32 bias))`` -> the conv's bias input (ONNX QDQ form)."""
        for mine, other in ((0, 1), (1, 0)):
            conv = add.args[mine]
            node = self.convs.get(conv)
            if node is None or len(node.input) != 2 or self.view.single_user(conv) is None:
                continue
            bias = self.view.values.get(add.args[other], add.args[other])
            data = _array(bias.args[0]) if op_name(bias) == "relax.dequantize" else None
            channels = int(conv.ty.shape[1])
            if data is None or data.dtype != np.int32 or data.size != channels or \
                    data.shape not in ((channels,), (1, channels, 1, 1), (channels, 1, 1)):
                continue
            scale, zp = _array(bias.args[1]), _array(bias.args[2])
            if scale is None or zp is None or scale.size not in (1, channels):
                continue
            inputs = [self.const(data.reshape(channels), "bias"),
                      self.const(scale.astype(np.float32), "bias_scale"),
                      self.const(zp.astype(np.int32), "bias_zp")]
            attrs = {"axis": 0} if scale.ndim else {}
            node.input.append(self.node("DequantizeLinear", inputs, "bias_dq", **attrs))
            self.nodes.insert(self.nodes.index(node), self.nodes.pop())  # keep topological
            return node.output[0]
        return None

    # ------------------------------------------------------------------------ layers
    def op_conv2d(self, call: relax.Call, hint: str) -> str:
        a = call.attrs
        if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
            raise UserError(f"{self.where}: conv2d '{hint}' has layout {a.data_layout}/"
                            f"{a.kernel_layout}; export the model before layout changes (NCHW)")
        kernel = _ints(call.args[1].ty.shape)[2:]
        return self.node("Conv", [self.value(call.args[0]), self.value(call.args[1])], hint,
                         kernel_shape=kernel, strides=_ints(a.strides), pads=_ints(a.padding),
                         dilations=_ints(a.dilation), group=int(a.groups))

    def pool(self, op_type: str, call: relax.Call, hint: str, **extra: int) -> str:
        a = call.attrs
        if str(a.layout) != "NCHW":
            raise UserError(f"{self.where}: pooling '{hint}' has layout {a.layout}; use NCHW")
        return self.node(op_type, [self.value(call.args[0])], hint,
                         kernel_shape=_ints(a.pool_size), strides=_ints(a.strides),
                         pads=_ints(a.padding), dilations=_ints(a.dilation),
                         ceil_mode=int(a.ceil_mode), **extra)

    def op_max_pool2d(self, call: relax.Call, hint: str) -> str:
        return self.pool("MaxPool", call, hint)

    def op_avg_pool2d(self, call: relax.Call, hint: str) -> str:
        return self.pool("AveragePool", call, hint,
                         count_include_pad=int(call.attrs.count_include_pad))

    def op_adaptive_avg_pool2d(self, call: relax.Call, hint: str) -> str:
        size = call.attrs.output_size
        if size is not None and _ints(size) != [1, 1]:
            raise UserError(f"{self.where}: adaptive_avg_pool2d '{hint}' to {_ints(size)} has "
                            "no ONNX equivalent; only global (1x1) pooling exports")
        return self.node("GlobalAveragePool", [self.value(call.args[0])], hint)

    # -------------------------------------------------------------------- tensor ops
    def op_clip(self, call: relax.Call, hint: str) -> str:
        dtype = str(call.args[0].ty.dtype)
        bounds = [self.const(np.array(float(v.value)).astype(dtype), "bound")
                  for v in call.args[1:3]]
        return self.node("Clip", [self.value(call.args[0]), *bounds], hint)

    def op_mean(self, call: relax.Call, hint: str) -> str:
        axes = {} if call.attrs.axis is None else {"axes": _ints(call.attrs.axis)}
        return self.node("ReduceMean", [self.value(call.args[0])], hint,
                         keepdims=int(call.attrs.keepdims), **axes)

    def op_reshape(self, call: relax.Call, hint: str) -> str:
        shape = self.const(np.array(_ints(call.ty.shape), np.int64), "shape")
        return self.node("Reshape", [self.value(call.args[0]), shape], hint)

    def op_permute_dims(self, call: relax.Call, hint: str) -> str:
        ndim = len(call.args[0].ty.shape)
        axes = call.attrs.axes
        perm = _ints(axes) if axes is not None else list(range(ndim))[::-1]
        return self.node("Transpose", [self.value(call.args[0])], hint, perm=perm)

    def op_concat(self, call: relax.Call, hint: str) -> str:
        parts = call.args[0]
        names = self.tuples[parts] if parts in self.tuples else \
            [self.value(f) for f in parts.fields]
        return self.node("Concat", names, hint, axis=int(call.attrs.axis))

    def op_astype(self, call: relax.Call, hint: str) -> str:
        from onnx import helper

        to = helper.np_dtype_to_tensor_dtype(np.dtype(str(call.attrs.dtype)))
        return self.node("Cast", [self.value(call.args[0])], hint, to=to)

    def op_softmax(self, call: relax.Call, hint: str) -> str:
        return self.node("Softmax", [self.value(call.args[0])], hint, axis=int(call.attrs.axis))


def _value_info(name: str, ty: relax.TensorType) -> onnx.ValueInfoProto:
    from onnx import helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(str(ty.dtype)))
    return helper.make_tensor_value_info(name, elem, _ints(ty.shape))


def _live(graph: _OnnxGraph, outputs: list[str]) -> tuple[list, list]:
    """Nodes and initializers the outputs depend on (fused-away nodes drop out here)."""
    needed = set(outputs)
    nodes = []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(node.input)
    return nodes[::-1], [i for i in graph.inits if i.name in needed]


def qdq_onnx_model(mod: tvm.IRModule, *, input_name: str | None = None,
                   expose: Sequence[str] = (), opset: int = 17) -> onnx.ModelProto:
    """Translate a QDQ Relax module (``QuantizedModel.simulated``) into an ONNX QDQ model.

    Parameters
    ----------
    mod : IRModule
        ``main`` takes one tensor; ops: quantize / dequantize, conv2d, matmul, elementwise
        arithmetic, relu / clip / sigmoid / tanh / softmax, mean, pooling, reshape-like ops,
        permute_dims, concat, astype. Anything else raises :class:`UserError` naming the op.
    input_name : str, optional
        Name of the ONNX graph input (default: the Relax parameter's name).
    expose : sequence of str
        Names of bound variables (e.g. ``q_<point>`` integer tensors) to add as graph outputs.
    opset : int
        ONNX opset (17 or newer; 17's ReduceMean takes ``axes`` as an attribute).
    """
    from onnx import checker, helper

    func = mod["main"]
    if len(func.params) != 1:
        raise UserError(f"qdq_onnx_model: main has {len(func.params)} inputs; only single-input "
                        "models export")
    integer = [b.var.name for b in bindings(func) if op_name(b.value) in _LAYER_CALLS
               and str(b.value.args[0].ty.dtype) != "float32"]
    if integer:
        raise UserError(f"qdq_onnx_model: layer '{integer[0]}' computes on integers, so this is "
                        "a realized module; export the QDQ one (QuantizedModel.simulated)")
    graph = _OnnxGraph(func, "export_qdq_onnx")
    param = func.params[0]
    graph.names[param] = graph.fresh(input_name or param.name)
    exposed: dict[str, relax.Var] = {}
    for b in bindings(func):
        graph.bind(b.var, b.value)
        if b.var.name in expose:
            exposed[b.var.name] = b.var
    missing = sorted(set(expose) - set(exposed))
    if missing:
        raise UserError(f"qdq_onnx_model: no bound variable named {missing[:3]}; expose names "
                        "from the module (e.g. int_tensor_name(point))")
    result = func.body.body
    results = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    outs = [(graph.value(r), r.ty) for r in results]
    outs += [(graph.names[v], v.ty) for v in exposed.values()]
    nodes, inits = _live(graph, [name for name, _ in outs])
    onnx_graph = helper.make_graph(nodes, "tvm_compress_qdq",
                                   [_value_info(graph.names[param], param.ty)],
                                   [_value_info(name, ty) for name, ty in outs], inits)
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="tvm-compress")
    model.ir_version = 8
    checker.check_model(model)
    return model


def export_qdq_onnx(qmodel: QuantizedModel, path: str | Path, *, expose_points: bool = False,
                    opset: int = 17) -> Path:
    """Write a quantized model as an ONNX QDQ file that ONNX Runtime runs with integer kernels.

    Parameters
    ----------
    qmodel : QuantizedModel
        From :func:`tvm_compress.quant.quantize.quantize`; its simulated module is exported (the
        realized module computes the same integers, up to 1 LSB).
    path : str or Path
        Output ``.onnx`` file (parent directories are created).
    expose_points : bool
        Also output every activation point's integer tensor, named ``q_<point>`` as in the
        Relax modules (for layer-by-layer comparisons).
    """
    expose = [n for n in (int_tensor_name(p) for p in qmodel.graph.points)
              if n in {b.var.name for b in bindings(qmodel.simulated["main"])}] \
        if expose_points else []
    model = qdq_onnx_model(qmodel.simulated, input_name=qmodel.model.input_name, expose=expose,
                           opset=opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path
