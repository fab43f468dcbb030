"""ONNX preparation ahead of TVM's importer, so that files written by others import.

Steps, in order; each change is described in ``PreparedOnnx.notes``:

1. read the file with its external data (``model.onnx`` + ``model.onnx.data``); refuse
   truncated files, non-ONNX files, missing data files and NaN/Inf weights with one clear line;
2. pin every input shape: a user's ``input_shapes={name: shape}``, a dynamic batch from ``batch``;
   any other dynamic dimension is an error that says how to pin it;
3. convert the opset where one of TVM's converters needs a newer form of an operator (an attribute
   that later became an input, as in Slice-1 or Split-11);
4. infer shapes and fold constant subgraphs (Shape -> Gather -> Concat chains feeding Reshape,
   Pad, Resize, Slice, Expand) with onnxslim, whose fusions are left off so that BatchNorms and
   layer weights stay as the exporter wrote them;
5. rewrite operators TVM lacks and fold zero Pads into the Conv they feed
   (``frontend.onnx_rewrites``);
6. check that the prepared model's outputs equal the original's under ONNX Runtime.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tvm_compress.errors import UserError
from tvm_compress.frontend.inputs import InputSpec
from tvm_compress.frontend.ort_check import compare_with_original

if TYPE_CHECKING:
    import onnx

_SLIM_SKIPS = ["graph_fusion", "weight_tying"]  # keep BatchNorm and every layer's own weight


@dataclass
class PreparedOnnx:
    """A model ready for TVM's importer and the record of how it got there."""

    model: Any                       # onnx.ModelProto, static shapes, ops TVM imports
    original: Any                    # onnx.ModelProto as read (external data loaded)
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- reading


def read_onnx(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """The model with its external data loaded; bad files raise a one-line UserError."""
    return _read(source)[0]


def _read(source: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The model and the external data files it was read from."""
    import onnx
    from onnx import external_data_helper as ext

    if isinstance(source, onnx.ModelProto):
        return source, []
    path = Path(source)
    if not path.is_file():
        raise UserError(f"model file not found: {path} (give an ONNX file path or zoo:NAME)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: garbage or a cut-off download
        raise UserError(f"{path} is not a valid ONNX model ({type(exc).__name__}): the file is "
                        "truncated or not ONNX; re-download or re-export it") from None
    if not model.graph.node:
        raise UserError(f"{path} is not a valid ONNX model (it has no graph nodes): the file is "
                        "truncated or not ONNX; re-download or re-export it")
    tensors = [t for t in ext._get_all_tensors(model) if ext.uses_external_data(t)]
    locations = sorted({e.value for t in tensors for e in t.external_data if e.key == "location"})
    for loc in locations:
        if not (path.parent / loc).is_file():
            raise UserError(f"{path} keeps its weights in the external file '{loc}', which is "
                            f"missing from {path.parent}; put it next to the model file")
    if tensors:
        try:
            ext.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # a data file shorter than the offsets say
            raise UserError(f"{path}: the external data file(s) {', '.join(locations)} cannot be "
                            f"read ({type(exc).__name__}); it is truncated or belongs to another "
                            "export: copy the model and its data file again") from None
    return model, locations


def check_graph_complete(model: onnx.ModelProto, where: str) -> None:
    """Every tensor a node reads is defined (a file cut at a message boundary still parses)."""
    defined = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    defined |= {o for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        missing = [x for x in node.input if x and x not in defined]
        if missing:
            raise UserError(f"{where}: {node.op_type} node '{node.name or '?'}' reads "
                            f"'{missing[0]}', which the file does not define: it is truncated "
                            "or broken; re-download or re-export it")
    outputs = [o.name for o in model.graph.output if o.name not in defined]
    if outputs:
        raise UserError(f"{where}: graph output '{outputs[0]}' is not computed by any node: the "
                        "file is truncated or broken; re-download or re-export it")


def check_weights_finite(model: onnx.ModelProto, where: str) -> None:
    """NaN / Inf in a float initializer or Constant node is an error naming the tensor."""
    from onnx import numpy_helper

    users: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, f"{node.op_type} node '{node.name or '?'}'")
    tensors = [(t.name, t, users.get(t.name, "no node")) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    tensors.append((node.output[0], attr.t, f"Constant node '{node.name or '?'}'"))
    for name, tensor, user in tensors:
        if tensor.data_type not in (1, 10, 11, 16):  # float, float16, double, bfloat16
            continue
        arr = numpy_helper.to_array(tensor)
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise UserError(f"{where}: weight '{name}' (used by {user}) has {bad} NaN/Inf "
                            f"value(s) of {arr.size}; fix the checkpoint and export it again")


# ------------------------------------------------------------------------------ pinning shapes


def graph_inputs(model: onnx.ModelProto) -> list[Any]:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _dims(inp: Any) -> list[int | str] | None:
    ttype = inp.type.tensor_type
    if not ttype.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0
            else (d.dim_param or "?") for d in ttype.shape.dim]


def _fmt(dims: Sequence[Any]) -> str:
    return "x".join(str(d) for d in dims)


def _resolve_user_shapes(inputs: list[Any], input_shapes: Mapping[str | None, Sequence[int]],
                         where: str) -> dict[str, tuple[int, ...]]:
    listing = ", ".join(f"{i.name} {_fmt(_dims(i) or ['?'])}" for i in inputs)
    names = [i.name for i in inputs]
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in input_shapes.items():
        if key is None:
            if len(inputs) != 1:
                raise UserError(f"{where} has {len(inputs)} inputs ({listing}); name the input: "
                                "--input-shape NAME:1x3x224x224")
            key = names[0]
        if key not in names:
            raise UserError(f"{where} has no input '{key}'; its inputs are: {listing}")
        shape = tuple(int(d) for d in shape)
        if any(d <= 0 for d in shape):
            raise UserError(f"--input-shape {key}:{_fmt(shape)}: every dimension must be positive")
        out[key] = shape
    return out


def pin_input_shapes(model: onnx.ModelProto, where: str, *, batch: int = 1,
                     input_shapes: Mapping[str | None, Sequence[int]] | None = None
                     ) -> tuple[tuple[InputSpec, ...], list[str]]:
    """Write static shapes into ``model``'s inputs (in place); the specs and notes."""
    from onnx import helper

    inputs = graph_inputs(model)
    if not inputs:
        raise UserError(f"{where} has no graph inputs; export it with its input as a graph input")
    given = _resolve_user_shapes(inputs, input_shapes or {}, where)
    specs, notes = [], []
    for inp in inputs:
        dims = _dims(inp)
        elem = inp.type.tensor_type.elem_type
        dtype = str(helper.tensor_dtype_to_np_dtype(elem)) if elem else "float32"
        if inp.name in given:
            shape = given[inp.name]
            if dims is not None and len(dims) != len(shape):
                raise UserError(f"{where}: --input-shape {inp.name}:{_fmt(shape)} has rank "
                                f"{len(shape)} but input '{inp.name}' is {_fmt(dims)} (rank "
                                f"{len(dims)}); give {len(dims)} dimensions")
            for axis, (d, s) in enumerate(zip(dims or [], shape, strict=False)):
                if isinstance(d, int) and d != s:
                    raise UserError(f"{where}: input '{inp.name}' has dimension {axis} fixed to "
                                    f"{d} in the model ({_fmt(dims)}); --input-shape gives {s}")
        elif dims is None:
            raise UserError(f"{where}: input '{inp.name}' has no shape in the model; pin it with "
                            f"--input-shape {inp.name}:1x3x224x224 (its real shape)")
        else:
            shape = tuple(batch if (axis == 0 and not isinstance(d, int)) else d
                          for axis, d in enumerate(dims))
            for axis, d in enumerate(shape):
                if not isinstance(d, int):
                    example = _fmt(["<" + str(x) + ">" if not isinstance(x, int) else x
                                    for x in shape])
                    raise UserError(
                        f"{where}: input '{inp.name}' has a dynamic dimension {axis} ('{d}') in "
                        f"{_fmt(dims)}; pin it with --input-shape {inp.name}:{example} (Python: "
                        f"input_shapes={{'{inp.name}': (...)}})")
        shape = tuple(int(d) for d in shape)
        if dims != list(shape):
            how = "--input-shape" if inp.name in given else f"dynamic batch set by --batch {batch}"
            notes.append(f"input '{inp.name}' {_fmt(dims or ['?'])} pinned to {_fmt(shape)} "
                         f"({how})")
        inp.type.tensor_type.ClearField("shape")
        for d in shape:
            inp.type.tensor_type.shape.dim.add().dim_value = d
        specs.append(InputSpec(inp.name, shape, dtype))
    if notes:  # stale symbolic shapes of intermediates would contradict the pinned ones
        del model.graph.value_info[:]
        for out in model.graph.output:
            out.type.tensor_type.ClearField("shape")
    return tuple(specs), notes


# ----------------------------------------------------------------------------- opset, folding


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def convert_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Raise the opset when an operator's form at the model's opset is one TVM does not convert.

    TVM picks the newest converter at or below the model's opset, else its oldest one. That is
    only right when the operator's inputs and attributes did not move in between (Slice-1's
    ``starts`` attribute became an input in Slice-10): such models are converted up.
    """
    import onnx
    from onnx import defs
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    opset = _opset(model)
    convert_map = _get_convert_map()
    need, why = opset, ""
    for op in sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}):
        impls = [int(a[len("_impl_v"):]) for a in dir(convert_map.get(op)) if "_impl_v" in a]
        if not impls or min(impls) <= opset:
            continue
        try:
            old, new = defs.get_schema(op, opset), defs.get_schema(op, min(impls))
        except Exception:  # noqa: BLE001 - op unknown to this onnx: nothing to compare
            continue
        old_inputs, new_inputs = [i.name for i in old.inputs], [i.name for i in new.inputs]
        moved = (set(old.attributes) - set(new.attributes)
                 or (len(old_inputs) != len(new_inputs)
                     and new_inputs[: len(old_inputs)] != old_inputs))
        if moved and min(impls) > need:
            need, why = min(impls), f"{op} is converted from opset {min(impls)} on"
    if need == opset:
        return model, []
    try:
        converted = onnx.version_converter.convert_version(model, need)
    except Exception as exc:  # noqa: BLE001 - the converter lacks an adapter: import as it is
        return model, [f"opset {opset} could not be converted to {need} ({type(exc).__name__}); "
                       f"imported at opset {opset}"]
    return converted, [f"opset {opset} converted to {need} ({why} in TVM's importer)"]


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Shape inference and folding of constant subgraphs with onnxslim (fusions off)."""
    import onnx
    import onnxslim

    before = Counter(n.op_type for n in model.graph.node)
    copy = onnx.ModelProto.FromString(model.SerializeToString())  # slim edits its argument
    try:
        slimmed = onnxslim.slim(copy, skip_optimizations=_SLIM_SKIPS)
    except Exception as exc:  # noqa: BLE001 - folding is an optimization; TVM may cope without
        return model, [f"onnxslim could not fold this model ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); imported unfolded"]
    if slimmed is None:
        return model, []
    _keep_node_order(slimmed, model)
    after = Counter(n.op_type for n in slimmed.graph.node)
    removed, added = before - after, after - before
    if not removed and not added:
        return slimmed, []
    parts = ", ".join(f"{op} {n}" for op, n in removed.most_common())
    note = (f"onnxslim {onnxslim.__version__} folded constant subgraphs: "
            f"{sum(before.values())} -> {sum(after.values())} nodes (removed {parts or 'none'}")
    if added:
        note += "; added " + ", ".join(f"{op} {n}" for op, n in added.most_common())
    return slimmed, [note + ")"]


def _keep_node_order(slimmed: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Put ``slimmed``'s nodes back in the original order where it allows (in place).

    onnxslim re-sorts the graph topologically; the import would then enumerate layers and
    channel groups in another order than the torch frontend does for the same model. A stable
    topological sort keyed by each node's position in the original file (new nodes right after
    their inputs' producers) keeps the original order.
    """
    import heapq

    position = {n.name: i for i, n in enumerate(original.graph.node) if n.name}
    nodes = list(slimmed.graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    deps = [{producer[x] for x in n.input if x in producer} for n in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)

    def key(i: int) -> tuple[float, int]:
        return (position.get(nodes[i].name, -1.0), i)  # new nodes as early as their inputs allow

    waiting = [len(ds) for ds in deps]
    ready = [key(i) for i in range(len(nodes)) if waiting[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, key(u))
    if len(order) != len(nodes):  # a cycle cannot happen in a valid graph; keep slim's order
        return
    reordered = [nodes[i] for i in order]
    del slimmed.graph.node[:]
    slimmed.graph.node.extend(reordered)


def check_tvm_ops(model: onnx.ModelProto, where: str) -> None:
    """Every operator has a converter in TVM's ONNX importer, or a UserError names op and node."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = _get_convert_map()
    missing = [n for n in model.graph.node if n.op_type not in supported]
    if missing:
        ops = sorted({n.op_type for n in missing})
        node = missing[0]
        raise UserError(
            f"{where}: operator {node.op_type} (node '{node.name or '?'}'"
            + (f", and {len(missing) - 1} more node(s): {', '.join(ops)}" if len(missing) > 1
               else "") + ") is not supported by the TVM ONNX importer nor rewritten by "
            "tvm-compress; replace it in the exporter or report this op")


# ---------------------------------------------------------------------------------- entry point


def prepare_onnx(source: str | Path | onnx.ModelProto, *, batch: int = 1,
                 input_shapes: Mapping[str | None, Sequence[int]] | None = None,
                 where: str | None = None, check: bool = True) -> PreparedOnnx:
    """Make an ONNX model importable by TVM (see the module docstring for the steps).

    Parameters
    ----------
    source : path or onnx.ModelProto
        A path may have its weights in external data files next to it.
    batch : int
        Pins a dynamic first dimension of every input not in ``input_shapes``.
    input_shapes : {name: shape}, optional
        Full static shapes for inputs; the key None stands for the only input of a
        single-input model (the CLI's ``--input-shape 1x3x48x192``).
    check : bool
        Compare the prepared model with the original under ONNX Runtime when anything changed
        (the max |diff| goes into the notes); the original failing to run with the pinned shapes
        is a UserError.
    """
    import onnx

    from tvm_compress.frontend.onnx_rewrites import fold_pads_into_convs, rewrite_unsupported_ops

    where = where or (str(source) if isinstance(source, (str, Path)) else "ONNX model")
    original, external = _read(source)
    notes: list[str] = []
    if external:
        notes.append(f"weights read from external data file(s) {', '.join(external)}")
    check_graph_complete(original, where)
    check_weights_finite(original, where)
    model = onnx.ModelProto.FromString(original.SerializeToString())
    specs, pin_notes = pin_input_shapes(model, where, batch=batch, input_shapes=input_shapes)
    notes += pin_notes
    nodes_before = [(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]
    model, more = convert_opset(model)
    notes += more
    model, more = fold_constants(model)
    notes += more
    model, more = rewrite_unsupported_ops(model)
    notes += more
    if more:  # shape chains behind a rewritten op (a com.microsoft LSTM's outputs) fold only now
        model, _ = fold_constants(model)
    model, more = fold_pads_into_convs(model)
    notes += more
    check_tvm_ops(model, where)
    changed = nodes_before != [(n.op_type, tuple(n.input), tuple(n.output))
                               for n in model.graph.node]
    if check and (changed or pin_notes):  # pinned shapes the model cannot take fail here
        notes.append(compare_with_original(original, model, specs, where))
    outputs = tuple(o.name for o in model.graph.output)
    return PreparedOnnx(model, original, specs, outputs, notes)
