"""PreCrop: structured pruning at initialization by cropping channels (arXiv 2203.02549).

Accuracy after pruning at initialization depends on the layer-wise densities ``p_l``, not on which
weights a sparse mask keeps. PreCrop therefore builds a *dense* narrower network with those
densities and trains it from scratch. Steps, each usable on its own:

1. densities: a pruning-at-init scorer (:mod:`tvm_compress.tuning.precrop.scores`) at a global
sparsity
   (``allocation="score"``), or the budgeted allocation :func:`convex_densities` (maximize
   ``sum_l log p_l`` subject to a parameter or MAC budget; ``allocation="convex"``);
2. channel counts by the sqrt rule: a channel group (the coupled axes of
   :mod:`tvm_compress.graph.channel_groups`) is scaled by the density-weighted width ``sqrt(p_l)``
   of the
   layers producing it (``p_l`` itself for a depthwise producer, whose weights scale with one
   side only), rounded up to a ``multiple`` (default 8), at least ``min_channels``, at most the
   group. The published rule does not meet a budget exactly once widths are coupled and rounded, so
   all width factors are scaled by one ``alpha`` (bisection) to the largest plan within the budget;
   ``alpha`` is reported (1.0 is the plain rule);
3. the plan is a crop plan (group id -> kept channel indices, evenly spaced: when training from
   scratch, which channels stay does not matter) applied by CropChannels to the Relax import and by
   :func:`tvm_compress.graph.torch_crop.crop_torch_module` to the torch model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tvm_compress.errors import UserError
from tvm_compress.frontend.layers import Layer, LayerTable
from tvm_compress.graph.channel_groups import ChannelAnalysis, ChannelGroup, analyze
from tvm_compress.tuning.precrop.scores import SCORERS, layer_densities, score_weights

if TYPE_CHECKING:
    import torch
    import tvm
    from torch import nn

    from tvm_compress.frontend.importers import Model

BUDGET_KINDS = ("params", "macs")
ALLOCATIONS = ("score", "convex", "uniform")
PLAN_VERSION = 1
_OUT_KINDS = ("conv_out", "depthwise", "linear_out")
_IN_KINDS = ("conv_in", "linear_in")


@dataclass(frozen=True)
class Budget:
    """Keep at most ``fraction`` (0 < f <= 1) of the dense model's ``kind`` (params or macs)."""

    kind: str
    fraction: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise UserError(f"budget kind {self.kind!r} is not one of {', '.join(BUDGET_KINDS)}")
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction <= 1.0):
            raise UserError(f"budget {self.kind}={self.fraction} is outside (0, 1]: give the "
                            "fraction of the dense model to keep, e.g. params=0.3")

    def __str__(self) -> str:
        return f"{self.kind}={self.fraction:g}"


def parse_budget(text: str) -> Budget:
    """``"params=0.3"`` / ``"macs=0.5"`` -> :class:`Budget` (UserError on anything else)."""
    kind, sep, value = str(text).partition("=")
    try:
        fraction = float(value)
    except ValueError:
        fraction = math.nan
    if not sep or kind.strip() not in BUDGET_KINDS or not math.isfinite(fraction):
        raise UserError(f"bad budget {text!r}: write params=F or macs=F with F in (0, 1], "
                        "e.g. --budget params=0.3")
    return Budget(kind.strip(), fraction)


# ------------------------------------------------------------------------ budgeted allocation

def convex_densities(costs: Sequence[float], budget: float, *, minimum: float = 0.0,
                     fixed_cost: float = 0.0) -> np.ndarray:
    """Maximize ``sum_l log p_l`` s.t. ``sum_l p_l c_l + fixed_cost <= budget``, ``minimum <= p_l
    <= 1``.

    The problem is concave; its KKT solution is ``p_l = clip(1 / (lam * c_l), minimum, 1)`` for
    the multiplier ``lam >= 0``, found by bisection on ``log lam`` (the spent budget falls as
    ``lam`` grows). Every layer gets the same cost ``p_l c_l = 1 / lam`` unless clipped.

    Raises UserError when even ``p = minimum`` everywhere exceeds the budget.
    """
    c = np.asarray(costs, dtype=np.float64)
    if c.ndim != 1 or np.any(c <= 0):
        raise UserError("convex_densities needs positive per-layer costs")
    room = budget - fixed_cost
    if c.sum() <= room:
        return np.ones_like(c)
    floor = minimum * c.sum()
    if floor > room * (1 + 1e-12) or room <= 0:
        raise UserError(f"budget {budget:.4g} is below the smallest reachable "
                        f"{fixed_cost + floor:.4g} (every layer at density {minimum:g})")

    def spent(log_lam: float) -> float:
        return float(np.sum(np.clip(1.0 / (np.exp(log_lam) * c), minimum, 1.0) * c))

    lo, hi = -math.log(c.max()) - 1.0, -math.log(c.min()) + 60.0  # spent(lo) = sum c > room
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if spent(mid) > room else (lo, mid)
    return np.clip(1.0 / (np.exp(hi) * c), minimum, 1.0)


# ------------------------------------------------------------------------------ channel plans

@dataclass
class _LayerAxes:
    """The channel members of one layer: (group id, channels tuple) of its output / input axes."""

    layer: Layer
    weight_params: int
    outs: list[tuple[int, np.ndarray]] = field(default_factory=list)
    ins: list[tuple[int, np.ndarray]] = field(default_factory=list)


class ChannelBudget:
    """Exact params / MACs of every layer of ``mod`` under a crop plan, and plans from widths."""

    def __init__(self, mod: tvm.IRModule, *, multiple: int = 8, min_channels: int = 8) -> None:
        if multiple < 1 or min_channels < 1:
            raise UserError(f"multiple and min_channels must be >= 1, got {multiple} and "
                            f"{min_channels}")
        self.analysis: ChannelAnalysis = analyze(mod)
        self.groups: list[ChannelGroup] = self.analysis.groups
        self.table = LayerTable.from_module(self.analysis.mod)
        self.multiple, self.min_channels = multiple, min_channels
        self.axes: dict[str, _LayerAxes] = {}
        for layer in self.table:
            self.axes[layer.name] = _LayerAxes(layer, int(np.prod(layer.weight_shape)))
        for g in self.groups:
            for m in g.members:
                if m.name in self.axes and m.kind in _OUT_KINDS + _IN_KINDS:
                    side = self.axes[m.name].outs if m.kind in _OUT_KINDS else self.axes[m.name].ins
                    side.append((g.id, np.asarray(m.channels)))
        self.prunable = [g.id for g in self.groups if g.prunable]
        self.unplaced = [name for name, ax in self.axes.items() if not ax.outs]
        self.dense = {"params": self.table.total_params, "macs": self.table.total_macs}

    # ----------------------------------------------------------------------------- counting
    def layer_sizes(self, plan: Mapping[int, Sequence[int]]) -> dict[str, tuple[int, int]]:
        """Layer name -> (params, MACs) after cropping with ``plan``."""
        kept = {}
        for g, k in plan.items():
            kept[g] = np.zeros(self.groups[g].size, dtype=bool)
            kept[g][np.asarray(k, dtype=np.int64)] = True
        out = {}
        for name, ax in self.axes.items():
            layer = ax.layer
            fo = self._fraction(ax.outs, kept)
            fi = 1.0 if layer.kind == "depthwise" else self._fraction(ax.ins, kept)
            bias = layer.params - ax.weight_params
            weight = ax.weight_params * fo * fi
            macs = layer.macs * fo * fi
            out[name] = (int(round(weight + bias * fo)), int(round(macs)))
        return out

    @staticmethod
    def _fraction(sides: list[tuple[int, np.ndarray]], kept: Mapping[int, np.ndarray]) -> float:
        total = sum(int(np.sum(ch >= 0)) for _, ch in sides)
        if total == 0:
            return 1.0
        count = 0
        for gid, ch in sides:
            ch = ch[ch >= 0]
            count += int(kept[gid][ch].sum()) if gid in kept else len(ch)
        return count / total

    def totals(self, plan: Mapping[int, Sequence[int]]) -> dict[str, int]:
        sizes = self.layer_sizes(plan).values()
        return {"params": sum(p for p, _ in sizes), "macs": sum(m for _, m in sizes)}

    # ------------------------------------------------------------------------------ widths
    def count(self, gid: int, factor: float) -> int:
        """Channels kept of group ``gid`` at width ``factor``: ceil, rounded up to the multiple,
        at least min_channels, at most the group."""
        size = self.groups[gid].size
        c = math.ceil(size * min(1.0, max(0.0, factor)) - 1e-9)
        c = math.ceil(c / self.multiple) * self.multiple
        return int(min(size, max(c, self.min_channels, 1)))

    @staticmethod
    def spread(size: int, count: int) -> list[int]:
        """``count`` evenly spaced channel indices of ``size`` (all when count >= size)."""
        if count >= size:
            return list(range(size))
        return sorted({int(i * size // count) for i in range(count)})

    def counts_for(self, factors: Mapping[int, float], alpha: float = 1.0) -> dict[int, int]:
        """Kept channels per prunable group at width ``alpha * factor``."""
        return {gid: self.count(gid, alpha * factors.get(gid, 1.0)) for gid in self.prunable}

    def plan_of(self, counts: Mapping[int, int]) -> dict[int, list[int]]:
        """Crop plan keeping ``counts[gid]`` evenly spaced channels (full groups left out)."""
        return {gid: self.spread(self.groups[gid].size, k) for gid, k in counts.items()
                if k < self.groups[gid].size}

    def plan_for(self, factors: Mapping[int, float], alpha: float = 1.0) -> dict[int, list[int]]:
        return self.plan_of(self.counts_for(factors, alpha))

    def group_factors(self, densities: Mapping[str, float]) -> dict[int, float]:
        """The sqrt rule: each prunable group's width factor from its producers' densities."""
        factors = {}
        for gid in self.prunable:
            wishes, weights = [], []
            for name in self.groups[gid].producers:
                if name not in densities:
                    continue
                p = min(1.0, max(0.0, float(densities[name])))
                ax = self.axes[name]
                wishes.append(p if ax.layer.kind == "depthwise" else math.sqrt(p))
                weights.append(max(1, ax.weight_params))
            if wishes:
                factors[gid] = float(np.average(wishes, weights=weights))
        return factors

    def fit(self, factors: Mapping[int, float], kind: str, target: float
            ) -> tuple[dict[int, list[int]], float]:
        """Largest ``alpha`` whose cropped ``kind`` total is <= ``target``, then the budget left
        by rounding filled one ``multiple`` at a time, group furthest below its width first.
        Returns the plan and ``alpha``."""
        def cost(counts: Mapping[int, int]) -> int:
            return self.totals(self.plan_of(counts))[kind]

        smallest = cost(self.counts_for(factors, 0.0))
        if smallest > target:
            raise UserError(f"budget {kind}={target / self.dense[kind]:.4g} cannot be met: the "
                            f"smallest plan (every group at {self.min_channels} channels or "
                            f"its multiple) keeps {smallest / self.dense[kind]:.4g}; raise the "
                            "budget or lower --min-channels / --multiple")
        positive = [f for f in factors.values() if f > 0]
        hi = 1.0 / min(positive) if positive else 1.0
        if cost(self.counts_for(factors, hi)) <= target:
            return self.plan_for(factors, hi), hi
        lo = 0.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cost(self.counts_for(factors, mid)) <= target else (lo, mid)
        counts = self.counts_for(factors, lo)
        want = {g: max(lo * factors.get(g, 1.0), 1e-6) * self.groups[g].size for g in counts}
        while True:
            open_groups = [g for g in counts if counts[g] < self.groups[g].size]
            for gid in sorted(open_groups, key=lambda g: counts[g] / want[g]):
                trial = {**counts, gid: min(self.groups[gid].size, counts[gid] + self.multiple)}
                if cost(trial) <= target:
                    counts = trial
                    break
            else:
                return self.plan_of(counts), lo


# ---------------------------------------------------------------------------------- PreCrop

@dataclass
class PreCropPlan:
    """A PreCrop result as data: the crop plan and what it achieves (JSON round-trip)."""

    model: str
    budget: str
    scorer: str
    allocation: str
    multiple: int
    min_channels: int
    alpha: float
    crop: dict[int, list[int]]
    dense: dict[str, int]
    achieved: dict[str, int]
    layers: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    unplaced: list[str]
    version: int = PLAN_VERSION

    @property
    def achieved_fraction(self) -> dict[str, float]:
        return {k: self.achieved[k] / self.dense[k] for k in self.dense}

    def to_json(self) -> str:
        data = asdict(self)
        data["crop"] = {str(k): v for k, v in self.crop.items()}
        data["achieved_fraction"] = self.achieved_fraction
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PreCropPlan:
        data = json.loads(text)
        if data.get("version") != PLAN_VERSION:
            raise UserError(f"PreCrop plan version {data.get('version')!r} is not "
                            f"{PLAN_VERSION}")
        data.pop("achieved_fraction", None)
        data["crop"] = {int(k): list(v) for k, v in data["crop"].items()}
        return cls(**data)

    def to_compression_plan(self, *, seed: int | None = None) -> Any:
        """The plan as a :class:`~tvm_compress.plan.CompressionPlan` (groups by producer name)."""
        from tvm_compress.plan import CompressionPlan, Provenance

        producers = {g["id"]: g["producers"] for g in self.groups}
        crop = {producers[gid][0]: tuple(kept) for gid, kept in self.crop.items()}
        return CompressionPlan(crop=crop, provenance=Provenance(
            "precrop", model=self.model, budget=self.budget, seed=seed,
            metrics={"scorer": self.scorer, "allocation": self.allocation,
                     "dense": dict(self.dense), "achieved": dict(self.achieved)}))

    def to_pass(self) -> Any:
        """The CropChannels pass of this plan (for the Relax module it was made on)."""
        from tvm_compress.passes.crop_channels import CropChannels

        return CropChannels(self.crop)


@dataclass
class PreCropResult:
    plan: PreCropPlan
    module: nn.Module          # cropped torch module (train it from scratch)
    mod: tvm.IRModule          # its Relax module (CropChannels on the dense import)
    dense: Model               # the dense Relax import the plan refers to
    densities: dict[str, float]  # the layer densities the widths were derived from


def scoring_data(task: str | None, *, n: int = 256, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """A labelled batch for SNIP / GraSP: Fashion-MNIST training images, or for ImageNet real
    calibration photos with seeded random labels (at initialization labels carry no signal the
    scorers could overfit); None for other tasks."""
    rng = np.random.default_rng(seed)
    if task == "fashion_mnist":
        from tvm_compress.data import fashion_mnist

        images, labels = fashion_mnist("train")
        index = rng.choice(len(images), size=min(n, len(images)), replace=False)
        return images[index], labels[index]
    if task == "imagenet":
        from tvm_compress.data import real_photos

        images = real_photos("calib", n=min(n, 32), seed=seed)
        return images, rng.integers(0, 1000, len(images))
    return None


def fresh_model(name: str, *, seed: int = 0) -> tuple[nn.Module, torch.Tensor, str]:
    """A freshly initialized zoo architecture (``zoo:fmnist_<arch>``, ``zoo:mobilenet_v2``),
    its example input and task."""
    import torch

    from tvm_compress.zoo import ZOO, zoo_entry

    key = name[4:] if name.startswith("zoo:") else name
    if not name.startswith("zoo:") or key not in ZOO:
        raise UserError(f"precrop needs a zoo architecture to initialize freshly, got {name!r}; "
                        f"use one of {', '.join('zoo:' + n for n in ZOO)} (or the Python API "
                        "tvm_compress.tuning.precrop.crop.precrop with your own torch module)")
    entry = zoo_entry(key)
    torch.manual_seed(seed)
    if key == "mobilenet_v2":
        from tvm_compress.zoo.mobilenet_v2 import MobileNetV2

        module = MobileNetV2()
    else:
        from tvm_compress.zoo.fmnist import ARCHITECTURES

        module = ARCHITECTURES[key.removeprefix("fmnist_")]()
    return module.eval(), torch.zeros((1, *entry.sample_shape)), entry.task


def precrop(module: nn.Module, example: torch.Tensor | np.ndarray, budget: Budget | str, *,
            scorer: str = "synflow", allocation: str = "score",
            data: tuple[np.ndarray, np.ndarray] | None = None, multiple: int = 8,
            min_channels: int = 8, seed: int = 0, iterations: int = 20, name: str | None = None,
            dense: Model | None = None, progress: Callable[[str], Any] | None = None
            ) -> PreCropResult:
    """Crop a freshly initialized ``module`` to a budget.

    Parameters
    ----------
    module, example
        The torch model (unchanged) and one input batch.
    budget
        :class:`Budget` or ``"params=0.3"`` / ``"macs=0.5"``: the fraction of the dense model's
        conv + linear parameters (or MACs) to keep.
    scorer, allocation
        ``allocation="score"``: layer densities of ``scorer`` (SNIP, GraSP, SynFlow, magnitude,
        random) at the global sparsity ``1 - fraction``. ``"convex"``: :func:`convex_densities`
        over the layers' params or MACs (no scorer). ``"uniform"``: every group at one width
        (the trivial baseline).
    data
        Labelled batch for SNIP / GraSP.
    multiple, min_channels
        Kept channels per group: a multiple of ``multiple``, at least ``min_channels``.
    seed, iterations
        Random scorer seed; SynFlow rounds.
    dense
        The Relax import of ``module`` when already made (``from_torch(module, example)``).
    """
    import torch

    from tvm_compress.frontend.importers import from_torch
    from tvm_compress.graph.torch_crop import crop_torch_module
    from tvm_compress.passes.crop_channels import crop_channels

    budget = parse_budget(budget) if isinstance(budget, str) else budget
    if allocation not in ALLOCATIONS:
        raise UserError(f"unknown allocation {allocation!r}: use one of {', '.join(ALLOCATIONS)}")
    if allocation == "score" and scorer not in SCORERS:
        raise UserError(f"unknown scorer {scorer!r}: use one of {', '.join(SCORERS)}")
    say = progress or (lambda _text: None)
    example = torch.as_tensor(example)
    if dense is None:
        say("importing the dense model to Relax")
        dense = from_torch(module, example, name=name)
    cb = ChannelBudget(dense.mod, multiple=multiple, min_channels=min_channels)
    if not cb.prunable:
        raise UserError(f"{dense.name} has no prunable channel group (all are coupled to the "
                        "input, the output or ops the analysis cannot follow)")
    layers = [n for n in cb.axes if any(g in cb.prunable for g, _ in cb.axes[n].outs +
                                        cb.axes[n].ins)]
    if allocation == "score":
        say(f"scoring with {scorer}")
        scores = score_weights(module, scorer, example=example, data=data,
                               sparsity=1.0 - budget.fraction, iterations=iterations, seed=seed)
        missing = [n for n in layers if n not in scores]
        if missing:
            raise UserError(f"layers {missing[:3]} of the Relax import are not Conv2d / Linear "
                            "modules at the same path in the torch model")
        densities = layer_densities(scores, 1.0 - budget.fraction, layers)
    elif allocation == "convex":
        costs = [cb.axes[n].layer.params if budget.kind == "params" else cb.axes[n].layer.macs
                 for n in layers]
        fixed = cb.dense[budget.kind] - sum(costs)
        p = convex_densities(np.maximum(costs, 1), budget.fraction * cb.dense[budget.kind],
                             minimum=0.0, fixed_cost=fixed)
        densities = dict(zip(layers, p.tolist(), strict=True))
    else:  # uniform: every group at the same width (the baseline)
        densities = dict.fromkeys(layers, budget.fraction)
    say("allocating channels")
    factors = cb.group_factors(densities)
    if allocation == "uniform":
        factors = dict.fromkeys(factors, 1.0)
    crop, alpha = cb.fit(factors, budget.kind, budget.fraction * cb.dense[budget.kind])
    cb.analysis.kept_mask(crop)  # validates (e.g. no emptied channel slice)
    sizes = cb.layer_sizes(crop)
    say("cropping the torch and Relax modules")
    mod = crop_channels(dense.mod, crop)
    cropped = crop_torch_module(module, crop, mod=dense.mod)
    after = LayerTable.from_module(mod)
    rows = []
    for layer in cb.table:
        new = after[layer.name] if layer.name in after else layer
        rows.append({"layer": layer.name, "kind": layer.kind, "in": layer.in_channels,
                     "out": layer.out_channels, "in_after": new.in_channels,
                     "out_after": new.out_channels, "params": layer.params,
                     "params_after": sizes[layer.name][0], "macs": layer.macs,
                     "macs_after": sizes[layer.name][1],
                     "density": densities.get(layer.name)})
    groups = [{"id": g.id, "size": g.size, "kept": len(crop.get(g.id, range(g.size))),
               "prunable": g.prunable, "factor": factors.get(g.id), "producers": g.producers,
               "reason": g.reason} for g in cb.groups]
    plan = PreCropPlan(model=dense.name, budget=str(budget), scorer=scorer if allocation ==
                       "score" else "none", allocation=allocation, multiple=multiple,
                       min_channels=min_channels, alpha=alpha, crop=crop, dense=cb.dense,
                       achieved=cb.totals(crop), layers=rows, groups=groups,
                       unplaced=cb.unplaced)
    return PreCropResult(plan, cropped, mod, dense, densities)


def achieved_layer_densities(plan: PreCropPlan) -> dict[str, float]:
    """Per-layer parameter density of the cropped model (what an equal-density mask keeps)."""
    return {r["layer"]: r["params_after"] / r["params"] for r in plan.layers}
