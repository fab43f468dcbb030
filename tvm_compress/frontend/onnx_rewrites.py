"""ONNX-level rewrites for operators TVM 0.27's Relax importer lacks: LSTM, ConvInteger and
com.microsoft DynamicQuantizeLSTM (all found in ddddocr's OCR models).

`rewrite_unsupported_ops` runs during model preparation, after the input shapes are pinned and the
constant subgraphs folded: an LSTM is unrolled over its (now static) sequence length into MatMul /
Add / Sigmoid / Tanh / Mul, so it needs static shapes. Each rewrite is local (one node in, a few
standard nodes out, same output names) and returns one human-readable note. A node whose
attributes fall outside what is rewritten raises a one-line :class:`UserError` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tvm_compress.errors import UserError

_LSTM_DEFAULT_ACTS = ["Sigmoid", "Tanh", "Tanh"]


class _Emitter:
    """Collects the nodes and initializers that replace one node; names stay unique in the graph."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], output: str | None = None,
           **attrs: object) -> str:
        out = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out],
                                           name=self.name(op_type), **attrs))
        return out


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _shape_of(shapes: dict[str, list[int | None]], name: str) -> list[int | None] | None:
    return shapes.get(name)


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> shape (None for unknown dims) after ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort; missing shapes are reported
        inferred = model
    shapes: dict[str, list[int | None]] = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        ttype = info.type.tensor_type
        if ttype.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None
                                 for d in ttype.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"


# ------------------------------------------------------------------------------------------ LSTM


def _check_lstm(node: onnx.NodeProto, attrs: dict[str, object], inputs: list[str],
                consts: dict[str, np.ndarray], seq: int) -> None:
    label = _node_label(node)
    acts = [_text(a) for a in attrs.get("activations", [])]
    problems = []
    if acts and [a.lower() for a in acts] != [a.lower() for a in _LSTM_DEFAULT_ACTS * (
            len(acts) // 3)]:
        problems.append(f"activations {acts}")
    if "clip" in attrs:
        problems.append("clip")
    if attrs.get("input_forget", 0):
        problems.append("input_forget=1")
    if attrs.get("layout", 0):
        problems.append("layout=1")
    if len(inputs) > 4 and inputs[4]:
        lens = consts.get(inputs[4])
        if lens is None or not np.all(lens == seq):
            problems.append("sequence_lens other than the full, constant sequence length")
    if problems:
        raise UserError(f"{label}: {', '.join(problems)} not supported by the LSTM rewrite "
                        "(supported: default activations, no clip, layout 0, full sequences)")


def _integer_matmul(em: _Emitter, x: str, weight: _QuantWeight) -> str:
    """``x @ dequantized(weight)`` as DynamicQuantizeLSTM computes it: ``x`` quantized to uint8
    per tensor, an exact integer MatMulInteger with the 8-bit weight, the int32 sums scaled by
    ``x``'s scale x the weight's (per column) scale. The 8-bit weight stays 8-bit (4x less
    memory traffic than a dequantized float32 copy: a batch-1 LSTM step streams it whole)."""
    q, scale, zp = em.name("q"), em.name("scale"), em.name("zero_point")
    em.nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [q, scale, zp],
                                     name=em.name("DynamicQuantizeLinear")))
    acc = em.op("MatMulInteger", [q, em.const(weight.q, "wq"), zp, em.const(weight.zp, "w_zp")])
    factor = em.op("Mul", [scale, em.const(weight.scale, "w_scale")])
    return em.op("Mul", [em.op("Cast", [acc], to=TensorProto.FLOAT), factor])


def _matmul(em: _Emitter, x: str, weight: np.ndarray | _QuantWeight, hint: str) -> str:
    """``x @ weight``: a float32 [K, N] weight as MatMul, an 8-bit one by
    :func:`_integer_matmul`."""
    if isinstance(weight, _QuantWeight):
        return _integer_matmul(em, x, weight)
    return em.op("MatMul", [x, em.const(weight, hint)])


def _lstm_direction(em: _Emitter, xw: str, r_t: np.ndarray | _QuantWeight,
                    p: np.ndarray | None, h0: str | None, c0: str,
                    seq: int, hidden: int, reverse: bool) -> tuple[list[str], str, str]:
    """One direction: the per-step H (in time order), the final H and C. ``r_t``: the
    recurrent weight [h, 4h], float32 or (DynamicQuantizeLSTM) 8-bit, H then quantized per
    step (:func:`_matmul`)."""
    gate = {k: (em.const(np.array([i * hidden], np.int64)),
                em.const(np.array([(i + 1) * hidden], np.int64))) for i, k in enumerate("iofc")}
    axis = em.const(np.array([1], np.int64))
    peep = {k: em.const(p[i * hidden:(i + 1) * hidden]) for i, k in enumerate("iof")} \
        if p is not None else {}
    h, c = h0, c0
    outputs: list[str] = [""] * seq
    for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
        step = em.op("Gather", [xw, em.const(np.array(t, np.int64))], axis=0)
        if h is None:  # a zero initial state adds nothing (and cannot be quantized: scale 0)
            pre = step
        else:
            pre = em.op("Add", [step, _matmul(em, h, r_t, "r_t")])
        g = {k: em.op("Slice", [pre, *gate[k], axis]) for k in "iofc"}
        if peep:
            g["i"] = em.op("Add", [g["i"], em.op("Mul", [c, peep["i"]])])
            g["f"] = em.op("Add", [g["f"], em.op("Mul", [c, peep["f"]])])
        i_t, f_t = em.op("Sigmoid", [g["i"]]), em.op("Sigmoid", [g["f"]])
        c = em.op("Add", [em.op("Mul", [f_t, c]), em.op("Mul", [i_t, em.op("Tanh", [g["c"]])])])
        o_pre = em.op("Add", [g["o"], em.op("Mul", [c, peep["o"]])]) if peep else g["o"]
        h = em.op("Mul", [em.op("Sigmoid", [o_pre]), em.op("Tanh", [c])])
        outputs[t] = h
    return outputs, h, c


def _unroll_lstm(node: onnx.NodeProto, weights: _LstmWeights,
                 shapes: dict[str, list[int | None]],
                 consts: dict[str, np.ndarray]) -> tuple[_Emitter, int]:
    """Nodes computing ``node`` (an LSTM or a DynamicQuantizeLSTM) step by step.

    ``weights`` (:func:`_lstm_weights`): per direction W^T [in, 4h] and R^T [h, 4h], gates in
    ONNX order i, o, f, c; B [dirs, 8h] and P [dirs, 3h] or None. For DynamicQuantizeLSTM W and
    R stay 8-bit: X (whole sequence) and each step's H are quantized to uint8 per tensor before
    an integer MatMulInteger, as ONNX Runtime does at batch 1 (bit for bit); at larger batches
    ORT quantizes H per block of batch rows, so results differ within quantization noise.
    """
    w, r, b, p = weights
    attrs = _attrs(node)
    inputs = list(node.input)
    label = _node_label(node)
    x_shape = _shape_of(shapes, inputs[0])
    if not x_shape or len(x_shape) != 3 or any(d is None for d in x_shape):
        raise UserError(f"{label}: the input's shape is not static ({x_shape}); pin the model's "
                        "input shapes (--input-shape) so the LSTM can be unrolled")
    seq, batch, _ = (int(d) for d in x_shape)  # type: ignore[arg-type]
    _check_lstm(node, attrs, inputs, consts, seq)
    hidden = int(attrs["hidden_size"]) if "hidden_size" in attrs else _rows(r[0])
    direction = _text(attrs.get("direction", "forward"))
    dirs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
    em = _Emitter(node.name or f"lstm_{node.output[0]}")
    finals_h, finals_c, per_dir = [], [], []
    for d, reverse in enumerate(dirs):
        bias = (b[d, :4 * hidden] + b[d, 4 * hidden:]) if b is not None else \
            np.zeros(4 * hidden, np.float32)
        xw = em.op("Add", [_matmul(em, inputs[0], w[d], "w_t"),
                           em.const(bias.astype(np.float32), "bias")])  # [seq, batch, 4h]
        h0, c0 = (_initial_state(em, inputs, k, d, batch, hidden, consts) for k in (5, 6))
        c0 = c0 or em.const(np.zeros((batch, hidden), np.float32), "zero_state")
        steps, h, c = _lstm_direction(em, xw, r[d], None if p is None else p[d], h0, c0, seq,
                                      hidden, reverse)
        shape4 = em.const(np.array([1, 1, batch, hidden], np.int64))
        per_dir.append(em.op("Concat", [em.op("Reshape", [s, shape4]) for s in steps], axis=0))
        shape3 = em.const(np.array([1, batch, hidden], np.int64))
        finals_h.append(em.op("Reshape", [h, shape3]))
        finals_c.append(em.op("Reshape", [c, shape3]))
    outs = list(node.output) + [""] * (3 - len(node.output))
    for value, out in ((per_dir, outs[0]), (finals_h, outs[1]), (finals_c, outs[2])):
        if out:
            em.op("Concat", value, output=out, axis=1 if value is per_dir else 0)
    return em, seq


def _initial_state(em: _Emitter, inputs: list[str], index: int, d: int, batch: int,
                   hidden: int, consts: dict[str, np.ndarray]) -> str | None:
    """The direction's initial H or C as [batch, hidden], None when it is all zeros."""
    name = inputs[index] if len(inputs) > index else ""
    if not name or name in consts and not np.any(consts[name]):
        return None
    picked = em.op("Gather", [inputs[index], em.const(np.array(d, np.int64))], axis=0)
    return em.op("Reshape", [picked, em.const(np.array([batch, hidden], np.int64))])


class _QuantWeight(NamedTuple):
    """One direction's 8-bit weight of a DynamicQuantizeLSTM as a MatMulInteger B operand:
    ``q`` [K, N], ``zp`` and ``scale`` scalars or per column [N]."""

    q: np.ndarray
    zp: np.ndarray
    scale: np.ndarray


_LstmWeights = tuple[list, list, "np.ndarray | None", "np.ndarray | None"]


def _rows(weight: np.ndarray | _QuantWeight) -> int:
    return (weight.q if isinstance(weight, _QuantWeight) else weight).shape[0]


def _lstm_weights(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> _LstmWeights:
    """Per direction W^T [in, 4h] and R^T [h, 4h] (float32 for LSTM, :class:`_QuantWeight`
    for DynamicQuantizeLSTM), then B and P (float32 or None)."""
    inputs = list(node.input) + [""] * 12
    for i, what in ((1, "W"), (2, "R")):
        if inputs[i] not in consts:
            raise UserError(f"{_node_label(node)}: its {what} weights are not constant; "
                            "only LSTMs with initializer weights are unrolled")
    get = lambda i: consts[inputs[i]].astype(np.float32) if inputs[i] in consts else None  # noqa: E731
    if inputs[3] and inputs[3] not in consts or inputs[7] and inputs[7] not in consts:
        raise UserError(f"{_node_label(node)}: its bias / peephole inputs are not constant")
    if node.op_type == "LSTM":  # W [dirs, 4h, in], R [dirs, 4h, h]
        w, r = get(1), get(2)
        return ([m.T.copy() for m in w], [m.T.copy() for m in r], get(3), get(7))
    # com.microsoft DynamicQuantizeLSTM: W [dirs, in, 4h], R [dirs, h, 4h] int8/uint8 with
    # per-direction (or per-direction-and-column) scales and zero points at inputs 8-11.
    out = []
    for q, s, z in ((1, 8, 9), (2, 10, 11)):
        weight = consts[inputs[q]]
        scale = consts[inputs[s]].astype(np.float32).reshape(weight.shape[0], -1)
        zp = consts[inputs[z]].astype(weight.dtype).reshape(weight.shape[0], -1)
        out.append([_QuantWeight(weight[d], zp[d] if zp.shape[1] > 1 else zp[d, 0],
                                 scale[d] if scale.shape[1] > 1 else scale[d, 0])
                    for d in range(weight.shape[0])])
    return out[0], out[1], get(3), get(7)


# ------------------------------------------------------------------------------------ ConvInteger


def _conv_integer(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> _Emitter:
    """ConvInteger(x, w, x_zp, w_zp) -> Cast(Conv(float(x) - x_zp, float(w) - w_zp), int32).

    Integer products summed in float32 are exact below 2**24, which int8 convolutions of
    the sizes in CNNs stay under in practice."""
    em = _Emitter(node.name or f"convint_{node.output[0]}")
    inputs = list(node.input) + ["", ""]
    xf = em.op("Cast", [inputs[0]], to=TensorProto.FLOAT)
    if inputs[2]:
        xf = em.op("Sub", [xf, em.op("Cast", [inputs[2]], to=TensorProto.FLOAT)])
    if inputs[1] in consts and (not inputs[3] or inputs[3] in consts):
        w = consts[inputs[1]].astype(np.float32)
        if inputs[3]:
            zp = consts[inputs[3]].astype(np.float32)
            w = w - (zp.reshape(-1, *[1] * (w.ndim - 1)) if zp.size > 1 else zp)
        wf = em.const(w, "weight")
    else:
        wf = em.op("Cast", [inputs[1]], to=TensorProto.FLOAT)
        if inputs[3]:
            zp = em.op("Cast", [inputs[3]], to=TensorProto.FLOAT)
            zp = em.op("Reshape", [zp, em.const(np.array([-1, 1, 1, 1], np.int64))])
            wf = em.op("Sub", [wf, zp])
    conv = em.op("Conv", [xf, wf], **_attrs(node))
    em.op("Cast", [em.op("Round", [conv])], output=node.output[0], to=TensorProto.INT32)
    return em


# ------------------------------------------------------------------------------------- the driver


def _constant_protos(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node values by name, not yet converted to arrays."""
    protos = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            protos[node.output[0]] = node.attribute[0].t
    return protos


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {k: numpy_helper.to_array(v) for k, v in _constant_protos(model).items()}


def rewrite_unsupported_ops(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Rewrite LSTM, DynamicQuantizeLSTM and ConvInteger nodes into standard ops TVM imports.

    Parameters
    ----------
    model : onnx.ModelProto
        Input shapes pinned (an LSTM's sequence length must be static). Not modified.

    Returns
    -------
    (model, notes): a rewritten copy (or ``model`` itself when nothing matched) and one note per
    rewritten node. Raises :class:`UserError` naming the node when one cannot be rewritten.
    """
    targets = ("LSTM", "DynamicQuantizeLSTM", "ConvInteger")
    if not any(n.op_type in targets for n in model.graph.node):
        return model, []
    model = onnx.ModelProto.FromString(model.SerializeToString())
    consts = _constants(model)
    shapes = _static_shapes(model) if any("LSTM" in n.op_type for n in model.graph.node) else {}
    new_nodes: list[onnx.NodeProto] = []
    notes: list[str] = []
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in targets:
            new_nodes.append(node)
            continue
        if node.op_type == "ConvInteger":
            em = _conv_integer(node, consts)
            counts["ConvInteger"] = counts.get("ConvInteger", 0) + 1
        else:
            em, seq = _unroll_lstm(node, _lstm_weights(node, consts), shapes, consts)
            extra = (" with integer MatMulInteger products on its 8-bit weights"
                     if node.op_type == "DynamicQuantizeLSTM" else "")
            notes.append(f"{_node_label(node)} unrolled over {seq} time steps into MatMul / Add "
                         f"/ Sigmoid / Tanh / Mul ({len(em.nodes)} nodes){extra}")
        new_nodes.extend(em.nodes)
        model.graph.initializer.extend(em.inits)
    if counts.get("ConvInteger"):
        notes.append(f"{counts['ConvInteger']} ConvInteger node(s) rewritten as float Conv on "
                     "zero-point-shifted integers, cast back to int32 (exact for sums < 2**24)")
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    _drop_unused(model)
    return model, notes


def _drop_unused(model: onnx.ModelProto) -> None:
    """Drop the replaced nodes' weights (now unused initializers) and opset imports left without
    nodes (the com.microsoft domain of DynamicQuantizeLSTM)."""
    graph = model.graph
    used = _names_used(graph)
    keep_inits = [i for i in graph.initializer if i.name in used]
    if len(keep_inits) != len(graph.initializer):
        dropped = {i.name for i in graph.initializer} - used
        keep_inputs = [i for i in graph.input if i.name not in dropped]
        del graph.initializer[:], graph.input[:]
        graph.initializer.extend(keep_inits)
        graph.input.extend(keep_inputs)
    used = {n.domain for n in model.graph.node}
    keep = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)


def _names_used(graph: onnx.GraphProto) -> set[str]:
    """Tensor names read by the graph's nodes (subgraphs included) or returned by it."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                used |= _names_used(sub)
    return used


def _pad_amounts(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto], rank: int
                 ) -> list[int] | None:
    """The ``[begin..., end...]`` pads over all ``rank`` axes of a constant-zero Pad, or None."""
    attrs = _attrs(node)
    if attrs.get("mode", b"constant") != b"constant":
        return None
    if len(node.input) == 1:  # before opset 11: attributes
        pads, value, axes = list(attrs.get("pads", [])), attrs.get("value", 0.0), None
    else:  # pads, constant_value, axes are inputs; each must be a constant
        names = [*node.input[1:], "", ""][:3]
        if any(name and name not in consts for name in names):
            return None
        pads, value, axes = (numpy_helper.to_array(consts[name]) if name else None
                             for name in names)
        pads = [int(p) for p in pads.reshape(-1)]
    if value is not None and np.any(np.asarray(value) != 0):
        return None
    if axes is not None:
        full = [0] * (2 * rank)
        for i, axis in enumerate(int(a) % rank for a in axes.reshape(-1)):
            full[axis], full[rank + axis] = pads[i], pads[len(pads) // 2 + i]
        pads = full
    return [int(p) for p in pads] if len(pads) == 2 * rank else None


def fold_pads_into_convs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Fold each zero-constant Pad of the spatial axes that feeds only a Conv into that Conv's
    ``pads`` (exact: both pad with zeros).

    Exporters write "same" padding (TensorFlow-style, or PyTorch's ``Conv2dSame``) as a Pad node
    before the Conv. Kept, it is an op of its own between two layers: in the blocked layout the
    Conv kernels use it costs two layout transforms, and after quantization the padding is done
    in float before the quantize instead of with the zero point inside the integer kernel.

    Returns ``(model, notes)``: a copy with the Pads folded (or ``model`` when none is) and one
    note.
    """
    if not any(n.op_type == "Pad" for n in model.graph.node):
        return model, []
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    consts = _constant_protos(model)
    folds: dict[str, tuple[str, list[int]]] = {}  # Pad output -> (Pad input, pads of all axes)
    for node in model.graph.node:
        if node.op_type != "Pad" or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])  # a Conv reading it twice is listed twice
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != node.output[0] \
                or _attrs(users[0]).get("auto_pad", b"NOTSET") != b"NOTSET" \
                or users[0].input[1] not in consts:
            continue
        rank = len(consts[users[0].input[1]].dims)  # the weight's (a Pad's axes may be partial)
        pads = _pad_amounts(node, consts, rank)
        if pads is None or min(pads) < 0 or any(pads[a] or pads[rank + a] for a in (0, 1)):
            continue
        folds[node.output[0]] = (node.input[0], pads)
    if not folds:
        return model, []
    model = onnx.ModelProto.FromString(model.SerializeToString())
    kept = []
    for node in model.graph.node:
        if node.op_type == "Pad" and node.output[0] in folds:
            continue
        if node.op_type == "Conv" and node.input[0] in folds:
            source, pads = folds[node.input[0]]
            rank = len(pads) // 2
            spatial = rank - 2
            attr = next((a for a in node.attribute if a.name == "pads"), None)
            old = list(attr.ints) if attr is not None else [0] * (2 * spatial)
            new = [old[i] + pads[2 + i] for i in range(spatial)] + \
                [old[spatial + i] + pads[rank + 2 + i] for i in range(spatial)]
            if attr is not None:
                node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("pads", new))
            node.input[0] = source
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_unused(model)
    return model, [f"{len(folds)} zero Pad node(s) folded into the padding of the Conv each "
                   "feeds"]
