"""ZeroQ mixed precision: per-layer sensitivity, Pareto frontier by dynamic programming, choice.

Sensitivity of layer ``i`` at ``k`` bits is the mean KL(fp32 output || output with only layer
``i``'s weight quantized to ``k`` bits) on distilled data. It is simulated in PyTorch (fake-quant of
that one weight with the same :func:`~tvm_compress.quant.qparams.weight_qparams` the TVM pipeline
uses)
rather than by building a TVM module per (layer, bits); the chosen configuration is then realized
and measured with the real integer build. Per-channel symmetric quantization commutes with folding
a BatchNorm into the conv before it (folding scales whole output channels), so quantizing the
unfolded torch weight gives the folded weight TVM quantizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tvm_compress.errors import UserError
from tvm_compress.quant.config import LayerOverride, QuantConfig, QuantSpec
from tvm_compress.quant.qparams import weight_qparams

if TYPE_CHECKING:
    import torch

    from tvm_compress.frontend.importers import Model

# The issue's {2, 4, 6, 8} plus 3 and 5: with only even bits, an average of 4 can rarely differ from
# uniform 4-bit (a 6-bit layer must be paid for by a 2-bit one, which costs far more).
CANDIDATE_BITS = (2, 3, 4, 5, 6, 8)


# ----------------------------------------------------------------------------------- sensitivity


def layer_modules(model: Model, module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Torch module of every layer of the LayerTable (layer names are torch module paths)."""
    out = {}
    for name in model.layers.names:
        try:
            out[name] = module.get_submodule(name)
        except AttributeError:
            raise UserError(f"{model.name}: layer {name!r} has no torch module of that name; mixed "
                            "precision needs a model imported from torch or the zoo") from None
    return out


def fake_quant(weight: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Quantize-dequantize a torch-layout weight (output channels on axis 0)."""
    qp = weight_qparams(weight, spec, axis=0)
    return qp.dequantize(qp.quantize(weight))


def _kl(log_p: torch.Tensor, logits: torch.Tensor) -> float:
    import torch

    log_q = torch.log_softmax(logits.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def sensitivity(model: Model, module: torch.nn.Module, images: np.ndarray, *,
                bits: Sequence[int] = CANDIDATE_BITS, weight: QuantSpec | None = None,
                threads: int | None = None, progress: bool = True) -> dict[str, dict[int, float]]:
    """Mean KL(fp32 || only-this-layer-quantized) for every layer and candidate bit-width.

    Parameters
    ----------
    images : np.ndarray
        Distilled (or real) inputs, (N, ...); all are used in one batch.
    weight : QuantSpec, optional
        Weight scheme / granularity (bits are replaced); default symmetric per-channel.
    threads : int, optional
        Torch threads (default: every core this process may use).
    """
    import torch
    from rich.progress import Progress

    from tvm_compress.tuning.zeroq.distill import torch_threads

    spec = weight or QuantSpec(8, "symmetric", "per_channel")
    modules = layer_modules(model, module)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    result: dict[str, dict[int, float]] = {}
    with torch_threads(threads), torch.inference_mode(), \
            Progress(disable=not progress, transient=True) as bar:
        log_p = torch.log_softmax(module(x).double(), dim=-1)
        task = bar.add_task("layer sensitivity", total=len(modules) * len(bits))
        for name, layer in modules.items():
            original = layer.weight.data.clone()
            w = original.numpy()
            result[name] = {}
            try:
                for b in bits:
                    layer.weight.data.copy_(torch.from_numpy(fake_quant(w, QuantSpec(
                        b, spec.scheme, spec.granularity))))
                    result[name][b] = max(_kl(log_p, module(x)), 0.0)
                    bar.advance(task)
            finally:
                layer.weight.data.copy_(original)
    return result


# -------------------------------------------------------------------------------------- frontier


@dataclass(frozen=True)
class ParetoPoint:
    size: int                  # summed integer layer sizes
    sensitivity: float         # summed sensitivities
    bits: tuple[int, ...]      # one choice per layer


def pareto_frontier(costs: Sequence[dict[int, float]], sizes: Sequence[dict[int, int]]
                    ) -> list[ParetoPoint]:
    """All Pareto-optimal (size, total sensitivity) choices of one bit-width per layer.

    Dynamic programming over layers: after each layer keep, per reachable total size, the
    minimum total sensitivity, then drop every point another one beats at equal or smaller
    size. Exact for integer sizes (callers round sizes to a bucket first). Sorted by size.
    """
    if len(costs) != len(sizes) or not costs:
        raise UserError("pareto_frontier needs one cost and one size table per layer (>= 1)")
    # states: list of (size, sensitivity, backpointer); backpointers index the previous layer.
    states: list[tuple[int, float, int]] = [(0, 0.0, -1)]
    history: list[list[tuple[int, float, int, int]]] = []
    for cost, size in zip(costs, sizes, strict=True):
        best: dict[int, tuple[float, int, int]] = {}
        for index, (s0, c0, _) in enumerate(states):
            for b in sorted(cost):
                s, c = s0 + int(size[b]), c0 + float(cost[b])
                if s not in best or c < best[s][0]:
                    best[s] = (c, index, b)
        kept: list[tuple[int, float, int, int]] = []
        for s in sorted(best):
            c, index, b = best[s]
            if not kept or c < kept[-1][1]:
                kept.append((s, c, index, b))
        history.append(kept)
        states = [(s, c, i) for s, c, i, _ in kept]
    frontier = []
    for point_index, (s, c, _, _) in enumerate(history[-1]):
        choice, index = [], point_index
        for layer in range(len(history) - 1, -1, -1):
            _, _, parent, b = history[layer][index]
            choice.append(b)
            index = parent
        frontier.append(ParetoPoint(s, c, tuple(reversed(choice))))
    return frontier


def choose(frontier: Sequence[ParetoPoint], budget: int,
           size_of: Callable[[ParetoPoint], int] | None = None) -> ParetoPoint:
    """The least sensitive frontier point whose size (``size_of(point)``, default its DP size)
    fits ``budget``."""
    size_of = size_of or (lambda p: p.size)
    fitting = [p for p in frontier if size_of(p) <= budget]
    if not fitting:
        raise UserError(f"no bit-width choice fits the size budget ({budget}); the smallest "
                        f"takes {min(size_of(p) for p in frontier)}: raise the budget")
    return min(fitting, key=lambda p: p.sensitivity)


# --------------------------------------------------------------------------------------- budgets


def parse_size(text: str) -> int:
    """``2.5MB`` / ``800kB`` / ``1.2MiB`` / ``123456`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]i?)?[bB]?\s*", str(text))
    if not m:
        raise UserError(f"size budget {text!r} is not a size; write e.g. 2.5MB, 800kB or 1200000")
    unit = (m.group(2) or "").lower()
    base = 1024 if unit.endswith("i") else 1000
    scale = {"": 1, "k": base, "m": base ** 2, "g": base ** 3}[unit[:1]]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise UserError(f"size budget {text!r} must be positive")
    return value


@dataclass
class MixedPlan:
    """Everything the mixed-precision search produced."""

    layers: list[str]
    weight_elements: list[int]
    sensitivities: dict[str, dict[int, float]]
    frontier: list[ParetoPoint]
    chosen: ParetoPoint
    unit: int                       # bytes per size unit of the DP
    bias_bytes: int                 # int32 biases (independent of the weight bits)
    budget_bytes: int               # weight-only budget the point was chosen for

    @property
    def bits(self) -> dict[str, int]:
        return dict(zip(self.layers, self.chosen.bits, strict=True))

    @property
    def candidate_bits(self) -> list[int]:
        return sorted(self.sensitivities[self.layers[0]])

    def weight_bytes(self, bits: Sequence[int]) -> int:
        return sum(math.ceil(n * b / 8) for n, b in zip(self.weight_elements, bits, strict=True))

    def uniform(self, b: int) -> tuple[int, float]:
        """Weight bytes and total sensitivity of all layers at ``b`` bits."""
        return (self.weight_bytes([b] * len(self.layers)),
                sum(self.sensitivities[n][b] for n in self.layers))

    def average_bits(self, bits: Sequence[int] | None = None) -> float:
        bits = self.chosen.bits if bits is None else bits
        return 8 * self.weight_bytes(bits) / sum(self.weight_elements)

    def config(self, base: QuantConfig) -> QuantConfig:
        """``base`` with a weight-bits override for every layer that differs from it."""
        return base.with_overrides({n: LayerOverride(weight_bits=b) for n, b in self.bits.items()
                                    if b != base.weight_spec(n).bits})

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "average_weight_bits": self.average_bits(),
                "weight_bytes": self.weight_bytes(self.chosen.bits),
                "bias_bytes": self.bias_bytes, "budget_weight_bytes": self.budget_bytes,
                "total_sensitivity": self.chosen.sensitivity, "frontier_points": len(self.frontier),
                "uniform": {b: dict(zip(("weight_bytes", "sensitivity"), self.uniform(b),
                                        strict=True)) for b in self.candidate_bits},
                "sensitivities": self.sensitivities}


def plan_mixed(model: Model, module: torch.nn.Module, sensitivities: dict[str, dict[int, float]],
               *, size_budget: int | None = None, avg_bits: float | None = None,
               buckets: int = 20000) -> MixedPlan:
    """Pareto frontier over the model's layers and the point for a budget.

    ``size_budget`` counts weights plus int32 biases in bytes (as ``metrics.weight_bytes`` does);
    ``avg_bits`` is the average bits per weight element. Give exactly one.
    """
    if (size_budget is None) == (avg_bits is None):
        raise UserError("give exactly one budget: --size-budget (e.g. 2.5MB) or --avg-bits")
    if avg_bits is not None and not 2 <= avg_bits <= 8:
        raise UserError(f"--avg-bits must be between 2 and 8, got {avg_bits}")
    modules = layer_modules(model, module)
    names = list(modules)
    elements = [int(modules[n].weight.numel()) for n in names]
    bias_bytes = sum(4 * model.layers[n].out_channels for n in names)
    if avg_bits is not None:
        budget = int(sum(elements) * avg_bits / 8)
    else:
        budget = int(size_budget) - bias_bytes
        if budget <= 0:
            raise UserError(f"size budget {size_budget} bytes does not even hold the "
                            f"{bias_bytes} bytes of int32 biases; raise it")
    unit = max(1, round(sum(elements) / buckets))
    # The DP runs on sizes rounded to ``unit`` bytes; the budget is checked on exact bytes.
    sizes = [{b: round(math.ceil(n * b / 8) / unit) for b in sensitivities[name]}
             for name, n in zip(names, elements, strict=True)]
    frontier = pareto_frontier([sensitivities[n] for n in names], sizes)
    plan = MixedPlan(names, elements, sensitivities, frontier, frontier[0], unit, bias_bytes,
                     budget)
    plan.chosen = choose(frontier, budget, lambda p: plan.weight_bytes(p.bits))
    return plan


def plot_frontier(plan: MixedPlan, path: str | Path, *, title: str = "") -> Path:
    """Frontier (total sensitivity vs weight MB) with the chosen and the uniform-bit points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-9
    mb = [plan.weight_bytes(p.bits) / 1e6 for p in plan.frontier]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(mb, [max(p.sensitivity, floor) for p in plan.frontier], where="post",
            label="Pareto frontier (DP)")
    for b in plan.candidate_bits:
        size, sens = plan.uniform(b)
        ax.scatter([size / 1e6], [max(sens, floor)], marker="s", label=f"uniform {b}-bit")
    ax.scatter([plan.weight_bytes(plan.chosen.bits) / 1e6], [max(plan.chosen.sensitivity, floor)],
               marker="*", s=200, color="red", zorder=5,
               label=f"chosen ({plan.average_bits():.2f} bits avg)")
    ax.axvline(plan.budget_bytes / 1e6, color="gray", linestyle=":", label="budget")
    ax.set_yscale("log")
    ax.set_xlabel("weight MB (packed, without biases)")
    ax.set_ylabel("total sensitivity (sum of KL)")
    ax.set_title(title or "ZeroQ mixed precision")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
