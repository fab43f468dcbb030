"""Pruning-at-initialization scorers on a freshly initialized torch model (PreCrop's first step).

Each scorer gives one score per weight of every ``nn.Conv2d`` / ``nn.Linear`` (higher = keep):

* ``snip``: ``|w * dL/dw|`` on a labelled batch (Lee et al., 2019);
* ``grasp``: ``w * (H g)``, the Hessian-gradient product of the loss (temperature 200) at ``w``;
  keeping the largest values removes the weights whose removal hurts gradient flow least
  (Wang et al., 2020);
* ``synflow``: ``|w * dR/dw|`` with ``R`` the sum of the outputs of the network with all weights
  replaced by their absolute values on an all-ones input, in float64, repeated for ``iterations``
  rounds with an exponential sparsity schedule (Tanaka et al., 2020). Needs no data. Clipped
  activations (ReLU6) are linear there: every activation of the linearized network is positive;
* ``magnitude``: ``|w|``; ``random``: uniform scores from ``seed`` (the baselines).

:func:`layer_densities` turns scores into layer-wise densities at a global sparsity (one threshold
over all weights), the quantity PreCrop keeps while replacing the sparse mask by narrower layers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tvm_compress.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

SCORERS = ("snip", "grasp", "synflow", "magnitude", "random")
DATA_SCORERS = ("snip", "grasp")
GRASP_TEMPERATURE = 200.0


def weight_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Module path -> ``nn.Conv2d`` / ``nn.Linear`` (the LayerTable names of its Relax import)."""
    from torch import nn

    return {name: m for name, m in module.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def _check_scorer(scorer: str) -> None:
    if scorer not in SCORERS:
        raise UserError(f"unknown scorer {scorer!r}: use one of {', '.join(SCORERS)}")


def score_weights(module: nn.Module, scorer: str, *, example: torch.Tensor,
                  data: tuple[np.ndarray, np.ndarray] | None = None, sparsity: float = 0.0,
                  iterations: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-weight scores of every conv / linear layer of ``module`` (unchanged).

    Parameters
    ----------
    module
        The freshly initialized model.
    scorer
        One of :data:`SCORERS`.
    example
        One input batch (shape, dtype) of the model; SynFlow feeds ones of that shape (batch 1).
    data
        (images, labels) for ``snip`` / ``grasp`` (a few hundred suffice).
    sparsity, iterations
        Iterative SynFlow's final sparsity and number of rounds; weights it pruned in earlier
        rounds score 0. Ignored by the other scorers.
    seed
        Random scores (``random``).

    Returns
    -------
    dict
        Layer name -> float64 array of the weight's torch shape.
    """
    import torch

    _check_scorer(scorer)
    layers = weight_layers(module)
    if not layers:
        raise UserError(f"{type(module).__name__} has no Conv2d / Linear layers to score")
    if scorer == "random":
        rng = np.random.default_rng(seed)
        return {n: rng.random(tuple(m.weight.shape)) for n, m in layers.items()}
    if scorer == "magnitude":
        return {n: m.weight.detach().abs().double().numpy() for n, m in layers.items()}
    if scorer == "synflow":
        return _synflow(module, tuple(example.shape[1:]), sparsity, iterations)
    if data is None:
        raise UserError(f"scorer {scorer!r} needs labelled data (images, labels); "
                        "use synflow, magnitude or random for data-free scoring")
    images, labels = (torch.as_tensor(np.asarray(a)) for a in data)
    if len(images) == 0 or len(images) != len(labels):
        raise UserError(f"scorer {scorer!r} needs as many labels as images (>0), got "
                        f"{len(images)} and {len(labels)}")
    work = copy.deepcopy(module).train()
    torch.manual_seed(seed)
    work_layers = weight_layers(work)
    weights = [m.weight for m in work_layers.values()]
    if scorer == "snip":
        grads = _loss_grads(work, weights, images, labels, 1.0)
        return {n: (w * g).abs().double().detach().numpy()
                for n, w, g in zip(work_layers, weights, grads, strict=True)}
    return _grasp(work, work_layers, weights, images, labels)


def _batches(images: torch.Tensor, labels: torch.Tensor, size: int = 128):  # noqa: ANN202
    for start in range(0, len(images), size):
        yield images[start:start + size], labels[start:start + size]


def _loss_grads(model: nn.Module, weights: list[torch.Tensor], images: torch.Tensor,
                labels: torch.Tensor, temperature: float) -> list[torch.Tensor]:
    import torch

    total = [torch.zeros_like(w) for w in weights]
    for x, y in _batches(images, labels):
        loss = torch.nn.functional.cross_entropy(model(x) / temperature, y, reduction="sum")
        grads = torch.autograd.grad(loss / len(images), weights)
        total = [t + g for t, g in zip(total, grads, strict=True)]
    return total


def _grasp(model: nn.Module, layers: Mapping[str, nn.Module], weights: list[torch.Tensor],
           images: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    import torch

    g = _loss_grads(model, weights, images, labels, GRASP_TEMPERATURE)
    hg = [torch.zeros_like(w) for w in weights]
    for x, y in _batches(images, labels):
        loss = torch.nn.functional.cross_entropy(model(x) / GRASP_TEMPERATURE, y,
                                                 reduction="sum") / len(images)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        z = sum((a * b.detach()).sum() for a, b in zip(grads, g, strict=True))
        hg = [h + d for h, d in zip(hg, torch.autograd.grad(z, weights), strict=True)]
    return {n: (w * h).double().detach().numpy()
            for n, w, h in zip(layers, weights, hg, strict=True)}


def _linearize(module: nn.Module) -> nn.Module:
    """A float64 copy with |parameters| and buffers, clipped activations replaced by identity."""
    import torch
    from torch import nn

    work = copy.deepcopy(module).double().eval()
    for parent in work.modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.ReLU6, nn.Hardtanh)):
                setattr(parent, name, nn.Identity())
    with torch.no_grad():
        for tensor in (*work.parameters(), *work.buffers()):
            if tensor.is_floating_point():
                tensor.abs_()
    return work


def _synflow(module: nn.Module, sample_shape: tuple[int, ...], sparsity: float,
             iterations: int) -> dict[str, np.ndarray]:
    import torch

    if iterations < 1:
        raise UserError(f"synflow needs iterations >= 1, got {iterations}")
    flush = torch.set_flush_denormal(True)  # tiny float64 products are slow as denormals
    try:
        return _synflow_rounds(_linearize(module), sample_shape, sparsity, iterations)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _synflow_rounds(work: nn.Module, sample_shape: tuple[int, ...], sparsity: float,
                    iterations: int) -> dict[str, np.ndarray]:
    import torch

    layers = weight_layers(work)
    weights = [m.weight for m in layers.values()]
    originals = [w.detach().clone() for w in weights]
    masks = [torch.ones_like(w) for w in weights]
    ones = torch.ones((1, *sample_shape), dtype=torch.float64)
    scores: list[torch.Tensor] = []
    rounds = iterations if sparsity > 0 else 1
    for k in range(1, rounds + 1):
        with torch.no_grad():
            for w, w0, m in zip(weights, originals, masks, strict=True):
                w.copy_(w0 * m)
        grads = torch.autograd.grad(work(ones).sum(), weights)
        scores = [(g * w).abs().detach() * m
                  for g, w, m in zip(grads, weights, masks, strict=True)]
        if k < rounds or sparsity > 0:
            keep = (1.0 - sparsity) ** (k / rounds)
            flat = torch.cat([s.reshape(-1) for s in scores])
            kept = max(1, int(round(keep * flat.numel())))
            threshold = torch.topk(flat, kept, sorted=True).values[-1]
            masks = [(s >= threshold).to(s.dtype) * m for s, m in zip(scores, masks, strict=True)]
    return {n: (s * m).numpy() for n, s, m in zip(layers, scores, masks, strict=True)}


def layer_densities(scores: Mapping[str, np.ndarray], sparsity: float,
                    layers: Sequence[str] | None = None) -> dict[str, float]:
    """Layer-wise densities of the global mask that keeps the top ``1 - sparsity`` of all scores.

    ``layers`` restricts the pool (default: every scored layer). Ties at the threshold are broken
    by position, so exactly ``round((1 - sparsity) * N)`` weights are kept.
    """
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    names = list(layers) if layers is not None else list(scores)
    flat = np.concatenate([np.asarray(scores[n], dtype=np.float64).reshape(-1) for n in names])
    if not np.all(np.isfinite(flat)):
        raise UserError("scores contain NaN or inf; check the model's initialization")
    kept = max(1, int(round((1.0 - sparsity) * flat.size)))
    order = np.argsort(-flat, kind="stable")[:kept]
    mask = np.zeros(flat.size, dtype=bool)
    mask[order] = True
    out, start = {}, 0
    for n in names:
        size = int(np.asarray(scores[n]).size)
        out[n] = float(mask[start:start + size].mean())
        start += size
    return out


def layer_masks(scores: Mapping[str, np.ndarray], densities: Mapping[str, float]
                ) -> dict[str, np.ndarray]:
    """Unstructured masks keeping, per layer, the top ``density`` fraction of its scores (PAI)."""
    masks = {}
    for name, density in densities.items():
        s = np.asarray(scores[name], dtype=np.float64)
        kept = int(round(float(density) * s.size))
        mask = np.zeros(s.size, dtype=bool)
        mask[np.argsort(-s.reshape(-1), kind="stable")[:kept]] = True
        masks[name] = mask.reshape(s.shape)
    return masks


def apply_masks(module: nn.Module, masks: Mapping[str, np.ndarray]) -> nn.Module:
    """Fix unstructured masks on ``module`` in place (``torch.nn.utils.prune``: masked weights get
    no gradient and stay 0 through training)."""
    import torch
    from torch.nn.utils import prune

    layers = weight_layers(module)
    for name, mask in masks.items():
        if name not in layers:
            raise UserError(f"mask for unknown layer {name!r}")
        prune.custom_from_mask(layers[name], "weight", torch.as_tensor(mask))
    return module


def remove_masks(module: nn.Module) -> nn.Module:
    """Make fixed masks permanent (plain ``weight`` parameters with the zeros baked in)."""
    from torch.nn.utils import prune

    for m in weight_layers(module).values():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
    return module
