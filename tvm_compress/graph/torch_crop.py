"""Crop a torch module the way CropChannels crops its Relax import (for training the result).

Supported modules: the ``nn.Conv2d`` / ``nn.Linear`` modules are found by layer name (the LayerTable
name of a layer is its torch module path, as both frontends name them); the ``nn.BatchNorm2d`` of a
conv is the next module of the same ``nn.Sequential`` (conv at ``<seq>.<i>``, BN at
``<seq>.<i+1>``, the layout of our zoo models and of torchvision's), checked against the values
Relax holds for it. Channel slices in ``forward`` (``x[:, a:b]``) whose bounds change are rewritten
in a ``torch.fx`` trace of the module; ``torch.split`` / ``chunk`` along channels whose sizes change
are not supported. Anything else raises ``UserError`` rather than producing a wrong module.
"""

from __future__ import annotations

import copy
import operator
from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import relax

from tvm_compress.errors import UserError
from tvm_compress.frontend.layers import Layer
from tvm_compress.graph.channel_groups import ChannelAnalysis, CropPlan, analyze
from tvm_compress.graph.channel_shapes import slice_bounds
from tvm_compress.graph.dataflow import op_name

if TYPE_CHECKING:
    import torch
    from torch import nn


def crop_torch_module(module: nn.Module, plan: CropPlan, *, mod: tvm.IRModule) -> nn.Module:
    """A copy of ``module`` with the channels ``plan`` drops removed.

    Parameters
    ----------
    module : torch.nn.Module
        The module ``mod`` was imported from (``tvm_compress.frontend.importers.from_torch``);
        unchanged.
    plan : mapping of int to list of int
        Channel group id (of ``analyze_channel_groups(mod)``) -> kept channel indices.
    mod : IRModule
        The Relax import of ``module`` that the plan's group ids refer to.

    Returns
    -------
    torch.nn.Module
        A deep copy with smaller parameters, buffers and module attributes (``in/out_channels``,
        ``groups``, ``num_features``, ``in/out_features``); a ``torch.fx.GraphModule`` when channel
        slice bounds in ``forward`` had to change. Same outputs as ``CropChannels(plan)(mod)``.
    """
    import torch

    analysis = analyze(mod)
    mask = analysis.kept_mask(plan)
    cropped = copy.deepcopy(module)
    flow = analysis.flow
    for b in flow.view.bindings:  # before any change: the BNs must be the ones Relax has
        if op_name(b.value) == "relax.nn.batch_norm" and b.var in flow.tuples and \
                _kept(analysis, b.value.args[0], mask) is not None:
            _check_batch_norm(cropped, flow.layer_of(b.value.args[0]), b.value)
    with torch.no_grad():
        for var, layer in flow.layers.items():
            if var in flow.maps:
                out_keep = _kept(analysis, var, mask)
                _crop_layer(cropped, layer, _kept(analysis, flow.view.values[var].args[0], mask),
                            out_keep)
                if out_keep is not None and layer.kind != "linear":
                    _crop_batch_norm(cropped, layer, out_keep)
    return _patch_slices(cropped, analysis, mask)


def _kept(analysis: ChannelAnalysis, expr: relax.Expr, mask: np.ndarray) -> np.ndarray | None:
    elems = analysis.flow.maps.get(expr)
    return None if elems is None else ChannelAnalysis.kept(elems, mask)


def _submodule(root: nn.Module, name: str, kind: type, what: str) -> nn.Module:
    try:
        sub = root.get_submodule(name)
    except AttributeError:
        sub = None
    if not isinstance(sub, kind):
        raise UserError(f"crop_torch_module: {what} '{name}' is not a {kind.__name__} of "
                        f"{type(root).__name__}; layer names must be the torch module paths "
                        "(import the module with tvm_compress.frontend.importers.from_torch)")
    return sub


def _crop_layer(root: nn.Module, layer: Layer, in_keep: np.ndarray | None,
                out_keep: np.ndarray | None) -> None:
    import torch
    from torch import nn

    if in_keep is None and out_keep is None:
        return
    linear = layer.kind == "linear"
    sub = _submodule(root, layer.name, nn.Linear if linear else nn.Conv2d, "layer")
    expected = layer.weight_shape[::-1] if linear else layer.weight_shape
    if tuple(sub.weight.shape) != tuple(expected):
        raise UserError(f"crop_torch_module: '{layer.name}' has weight shape "
                        f"{tuple(sub.weight.shape)} but the Relax layer has {expected}")
    weight, bias = sub.weight.detach(), sub.bias
    if out_keep is not None:
        index = torch.as_tensor(out_keep)
        weight = weight[index]
        bias = None if bias is None else bias.detach()[index]
        setattr(sub, "out_features" if linear else "out_channels", len(out_keep))
    if in_keep is not None and layer.kind in ("conv", "linear"):
        weight = weight[:, torch.as_tensor(in_keep)]
        setattr(sub, "in_features" if linear else "in_channels", len(in_keep))
    elif in_keep is not None and layer.kind == "depthwise":
        sub.in_channels = sub.groups = len(in_keep)
    sub.weight = nn.Parameter(weight.clone())
    if bias is not None:
        sub.bias = nn.Parameter(bias.clone())


def _sibling_name(layer: str) -> str | None:
    """``<seq>.<i+1>`` for a layer at ``<seq>.<i>``: where its BatchNorm2d sits if it has one."""
    parent, _, index = layer.rpartition(".")
    if not index.isdigit():
        return None
    return f"{parent}.{int(index) + 1}" if parent else str(int(index) + 1)


def _sibling_batch_norm(root: nn.Module, layer: str) -> nn.Module | None:
    from torch import nn

    name = _sibling_name(layer)
    try:
        sub = root.get_submodule(name) if name is not None else None
    except AttributeError:
        return None
    return sub if isinstance(sub, nn.BatchNorm2d) else None


def _check_batch_norm(root: nn.Module, layer: str | None, call: relax.Call) -> None:
    """The Relax BN after ``layer`` must be the BatchNorm2d next to it in torch."""
    from torch import nn

    if layer is not None:
        _submodule(root, layer, nn.Conv2d, "layer")
    bn = _sibling_batch_norm(root, layer) if layer is not None else None
    if bn is None:
        raise UserError(f"crop_torch_module: cannot place the BatchNorm that follows "
                        f"{layer or 'a non-conv op'}; supported: conv at '<seq>.<i>' with its "
                        "BatchNorm2d at '<seq>.<i+1>' of an nn.Sequential")
    relax_values = [call.args[i].value.numpy() for i in (1, 2, 3, 4)]
    torch_values = [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if not all(t is None or (r.shape == tuple(t.shape) and
                             np.allclose(r, t.detach().cpu().numpy(), rtol=1e-5, atol=1e-6))
               for r, t in zip(relax_values, torch_values, strict=True)):
        raise UserError(f"crop_torch_module: BatchNorm2d '{_sibling_name(layer or '')}' does "
                        f"not hold the values of the Relax BN after '{layer}'; crop the module "
                        "that mod was imported from")


def _crop_batch_norm(root: nn.Module, layer: Layer, keep: np.ndarray) -> None:
    """Crop the BatchNorm2d next to a conv with the conv's kept outputs (also when the Relax
    module has the BN folded away, as ONNX exports do)."""
    import torch
    from torch import nn

    bn = _sibling_batch_norm(root, layer.name)
    if bn is None or bn.num_features != layer.out_channels:
        return
    index = torch.as_tensor(keep)
    for name in ("weight", "bias"):
        if getattr(bn, name) is not None:
            setattr(bn, name, nn.Parameter(getattr(bn, name).detach()[index].clone()))
    for name in ("running_mean", "running_var"):
        if getattr(bn, name) is not None:
            setattr(bn, name, getattr(bn, name)[index].clone())
    bn.num_features = len(keep)


# ------------------------------------------------------------------------ slices in forward

def _slice_changes(analysis: ChannelAnalysis, mask: np.ndarray
                   ) -> list[tuple[int, tuple[int, int], tuple[int, int]]]:
    """(channels, old bounds, new bounds) of every non-trivial channel slice, in graph order."""
    flow = analysis.flow
    changes = []
    for var in flow.channel_slices:
        call = flow.view.values[var]
        elems = flow.maps[call.args[0]]
        keep = ChannelAnalysis.kept(elems, mask)
        if op_name(call) == "relax.split":
            if keep is not None:
                raise UserError(f"crop_torch_module: a channel split ('{var.name}') changes size; "
                                "write it as x[:, a:b] slices so it can be rewritten")
            continue
        begin, end = slice_bounds(call, len(elems)) or (0, len(elems))
        if (begin, end) == (0, len(elems)):
            continue
        kept = np.arange(len(elems)) if keep is None else keep
        new = (int(np.sum(kept < begin)), int(np.sum(kept < end)))
        changes.append((len(elems), (begin, end), new))
    return changes


def _channel_slice(node: torch.fx.Node) -> slice | None:
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    index = node.args[1]
    if isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None) and \
            isinstance(index[1], slice) and index[1].step in (None, 1):
        return index[1]
    return None


def _normalized(s: slice, channels: int) -> tuple[int, int]:
    begin, end, _ = s.indices(channels)
    return begin, max(end, begin)


def _patch_slices(module: nn.Module, analysis: ChannelAnalysis, mask: np.ndarray) -> nn.Module:
    import torch

    changes = _slice_changes(analysis, mask)
    if all(old == new for _, old, new in changes):
        return module
    try:
        traced = torch.fx.symbolic_trace(module)
    except Exception as exc:  # fx raises many types; all mean "cannot trace this forward"
        raise UserError(f"crop_torch_module: channel slices in {type(module).__name__}.forward "
                        f"change bounds, and torch.fx cannot trace it ({type(exc).__name__}); "
                        "make forward traceable or crop groups without channel splits") from None
    nodes = [(node, sl) for node in traced.graph.nodes
             if (sl := _channel_slice(node)) is not None and sl != slice(None)]
    matched = len(nodes) == len(changes) and all(
        _normalized(s, channels) == old for (_, s), (channels, old, _) in
        zip(nodes, changes, strict=True))
    if not matched:
        raise UserError(f"crop_torch_module: the channel slices in {type(module).__name__}."
                        "forward do not match those of the Relax module (order or bounds)")
    for (node, _), (_, _, new) in zip(nodes, changes, strict=True):
        index = node.args[1]
        node.args = (node.args[0], (index[0], slice(*new), *index[2:]))
    traced.recompile()
    return traced
