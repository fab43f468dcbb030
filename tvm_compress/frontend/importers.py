"""Frontends: ONNX file / ModelProto and torch.nn.Module -> :class:`Model` (Relax + LayerTable).

Both frontends import with the weights as function parameters first, so every conv / linear call can
be named after its weight (the torch parameter name, or for ONNX the exporting module's path), then
bind the weights as constants. The same torch model therefore gets the same layer names whether it
arrives as a ``torch.nn.Module`` or as the ONNX file exported from it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tvm
from tvm import relax

from tvm_compress.errors import UserError
from tvm_compress.frontend.inputs import InputSpec
from tvm_compress.frontend.layers import LayerTable, name_layers
from tvm_compress.frontend.prepare import check_tvm_ops, pin_input_shapes, prepare_onnx, read_onnx

if TYPE_CHECKING:
    import onnx
    import torch

# Weight initializers are renamed to this prefix + index before the ONNX import, so the importer's
# name sanitizer cannot change them and each maps back to exactly one layer.
_WEIGHT_TOKEN = "tvmcw_"
_WEIGHTED_ONNX_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Model:
    """A model in Relax form with everything needed to compress, build and compare it.

    ``mod["main"]`` takes the inputs in ``inputs`` order (``input_name`` / ``input_shape`` /
    ``input_dtype`` describe the first) and returns one tensor, or a tuple when ``outputs`` names
    several; weights are bound as constants. ``torch_module`` / ``onnx_model`` keep the source
    when there is one (PyTorch and ONNX Runtime baselines, gradient-based algorithms).
    """

    name: str
    mod: tvm.IRModule
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    layers: LayerTable
    torch_module: Any = None
    onnx_model: Any = None
    task: str | None = None  # "imagenet" / "fashion_mnist" for zoo models: which data evaluates it
    notes: list[str] = field(default_factory=list)
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[str, ...] = ()    # output names when known (ONNX); one output otherwise

    def __post_init__(self) -> None:
        if not self.inputs:
            self.inputs = (InputSpec(self.input_name, tuple(self.input_shape), self.input_dtype),)

    def with_mod(self, mod: tvm.IRModule, **changes: Any) -> Model:
        """Same model, rewritten module (the LayerTable is re-read from the new module)."""
        return replace(self, mod=mod, layers=LayerTable.from_module(mod), **changes)


def finalize(mod: tvm.IRModule, layer_names: dict[str, str]) -> tvm.IRModule:
    """Name layers after their weights, bind the weights as constants and simplify the
    importer's float -> integer casts (``casts``)."""
    from tvm.relax.frontend import detach_params

    from tvm_compress.frontend.casts import simplify_integer_casts

    mod, params = detach_params(mod)
    mod = simplify_integer_casts(mod)
    mod = name_layers(mod, layer_names)
    weights = params.get("main", []) if params else []
    if weights:
        func = mod["main"]
        n_inputs = len(func.params) - len(weights)
        mod = relax.transform.BindParams(
            "main", {p.name: w for p, w in zip(func.params[n_inputs:], weights, strict=True)})(mod)
    return relax.transform.FoldConstant()(mod)


# ----------------------------------------------------------------------------------------- ONNX


def _read_onnx(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    return read_onnx(source)


def _check_onnx_ops(model: onnx.ModelProto, where: str) -> None:
    check_tvm_ops(model, where)


def _onnx_input(model: onnx.ModelProto, where: str, batch: int
                ) -> tuple[str, list[int], str, list[str]]:
    """The single input of ``model`` with its batch pinned (``model`` is not changed)."""
    import onnx

    specs, notes = pin_input_shapes(onnx.ModelProto.FromString(model.SerializeToString()), where,
                                    batch=batch)
    if len(specs) != 1:
        raise UserError(f"{where}: expected exactly one graph input, found {len(specs)} "
                        f"({[s.name for s in specs]}); import it with tvm_compress.from_onnx")
    return specs[0].name, list(specs[0].shape), specs[0].dtype, notes


def _scope_to_module_path(scopes: list[str]) -> str:
    """torch.onnx scopes -> module path: ['features', 'features.1', 'conv', 'conv.0'] ->
    'features.1.conv.0' (a Sequential child repeats its parent's name with '.<index>')."""
    path, prev = "", ""
    for scope in scopes:
        if prev and scope.startswith(prev + "."):
            path += scope[len(prev):]
        else:
            path = f"{path}.{scope}" if path else scope
        prev = scope
    return path


def _onnx_layer_name(node: onnx.NodeProto, weight: str, index: int) -> str:
    if weight.endswith(".weight") and not weight.startswith("onnx::"):
        return weight[: -len(".weight")]
    # torch.onnx names nodes by module scope: '/features/features.0/features.0.0/Conv'.
    parts = node.name.split("/")
    if len(parts) >= 3 and parts[0] == "" and parts[-1].split("_")[0] == node.op_type:
        return _scope_to_module_path(parts[1:-1])
    return node.name or f"{node.op_type.lower()}_{index}"


def _rename_onnx_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Copy of ``model`` whose conv/linear weights are renamed to tokens; token -> layer name."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    init_names = {i.name for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    renames: dict[str, str] = {}
    token_to_layer: dict[str, str] = {}
    taken: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if node.op_type not in _WEIGHTED_ONNX_OPS or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in init_names or uses[weight] != 1 or weight in renames:
            continue
        layer = _onnx_layer_name(node, weight, index)
        if layer in taken:
            layer = f"{layer}#{index}"
        taken.add(layer)
        token = f"{_WEIGHT_TOKEN}{len(renames)}"
        renames[weight] = token
        token_to_layer[token] = layer
        node.input[1] = token
    for init in model.graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    return model, token_to_layer


def _tvm_import(model: onnx.ModelProto, inputs: Sequence[InputSpec], where: str) -> tvm.IRModule:
    """TVM's importer, quiet: its onnx.checker warnings and the operator it prints on failure
    (stdout) are kept off the terminal; the operator goes into the exception instead."""
    from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx

    printed, logged = io.StringIO(), []
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed), \
                _stderr_captured(logged):
            warnings.simplefilter("ignore")
            return tvm_from_onnx(model, shape_dict={s.name: list(s.shape) for s in inputs},
                                 dtype_dict={s.name: s.dtype for s in inputs},
                                 keep_params_in_input=True)
    except tvm.error.OpNotImplemented as exc:
        raise UserError(f"{where}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        found = re.search(r"Error converting operator (\w+)", printed.getvalue())
        if found is None:
            raise
        error = RuntimeError(f"TVM's ONNX importer failed on a {found.group(1)} node: "
                             f"{(str(exc).strip().splitlines() or [''])[0]}")
        error.add_note(printed.getvalue() + "".join(logged))  # for the log file
        raise error from exc


@contextlib.contextmanager
def _stderr_captured(into: list[str]) -> Iterator[None]:
    """Point file descriptor 2 (TVM's C++ warnings) at a temporary file; its text into ``into``."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr
        yield
        return
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            into.append(tmp.read())


def from_onnx(source: str | Path | onnx.ModelProto, *, name: str | None = None, batch: int = 1,
              task: str | None = None,
              input_shapes: Mapping[str | None, Sequence[int]] | None = None) -> Model:
    """Import an ONNX model (path or ModelProto) into Relax with weights bound as constants.

    The model is prepared first (``tvm_compress.frontend.prepare``: external data, pinned
    shapes, folded shape subgraphs, rewrites of operators TVM lacks, checked against ONNX
    Runtime); every change is listed in ``Model.notes``.

    Parameters
    ----------
    source : path or onnx.ModelProto
        A CNN with any number of inputs and outputs; its weights may be in external data files.
    name : str, optional
        Display name (defaults to the file stem).
    batch : int
        Pins a dynamic first dimension (noted in ``Model.notes``).
    input_shapes : {input name: shape}, optional
        Static shapes for inputs with other dynamic dimensions; the key None names the only
        input of a single-input model. Other dynamic dimensions are an error.
    """
    where = str(source) if not hasattr(source, "graph") else (name or "ONNX model")
    prepared = prepare_onnx(source, batch=batch, input_shapes=input_shapes, where=where)
    renamed, token_to_layer = _rename_onnx_weights(prepared.model)
    mod = _tvm_import(renamed, prepared.inputs, where)
    mod = finalize(mod, token_to_layer)
    stem = Path(source).stem if isinstance(source, (str, Path)) else "onnx_model"
    first = prepared.inputs[0]
    return Model(name=name or stem, mod=mod, input_name=first.name, input_shape=first.shape,
                 input_dtype=first.dtype, layers=LayerTable.from_module(mod),
                 onnx_model=prepared.original, task=task, notes=prepared.notes,
                 inputs=prepared.inputs, outputs=prepared.outputs)


# ---------------------------------------------------------------------------------------- torch


def from_torch(module: torch.nn.Module, example_input: torch.Tensor | np.ndarray, *,
               name: str | None = None, task: str | None = None) -> Model:
    """Import a ``torch.nn.Module`` (eval mode is set) through ``torch.export`` into Relax.

    Layer names are the module paths of the weights (``features.3.conv.1.0``), the same names the
    ONNX import of this module's ``torch.onnx.export`` gets.
    """
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    if not isinstance(module, torch.nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(module).__name__}")
    x = torch.as_tensor(example_input)
    module = module.eval()
    try:
        exported = torch.export.export(module, (x,))
    except Exception as exc:  # torch.export raises many types; all mean "cannot trace this"
        raise UserError(f"torch.export failed for {type(module).__name__} with input "
                        f"{tuple(x.shape)}: {str(exc).splitlines()[0]}") from None
    placeholder_to_param = dict(exported.graph_signature.inputs_to_parameters)
    mod = from_exported_program(exported, keep_params_as_input=True,
                                unwrap_unit_return_tuple=True)
    layer_names = {ph: re.sub(r"\.weight$", "", p) for ph, p in placeholder_to_param.items()
                   if p.endswith(".weight")}
    mod = finalize(mod, layer_names)
    return Model(name=name or type(module).__name__, mod=mod, input_name="input",
                 input_shape=tuple(x.shape), input_dtype=str(x.dtype).replace("torch.", ""),
                 layers=LayerTable.from_module(mod), torch_module=module, task=task)


def export_onnx(module: torch.nn.Module, example_input: Any, path: str | Path, *,
                keep_batchnorm: bool = False) -> Path:
    """Export a torch module to ONNX (legacy exporter: stable node names, BN folded by default)."""
    import torch

    path = Path(path)
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"],
                              "dynamo": False}
    if keep_batchnorm:
        kwargs.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    torch.onnx.export(module.eval(), (torch.as_tensor(example_input),), str(path), **kwargs)
    return path
