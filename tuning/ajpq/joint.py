"""AJPQ: joint channel pruning and mixed-precision quantization (arXiv 2011.06231).

Pruning a channel is quantizing it to 0 bits, so one search decides both. The search space here:

* **layer controller**: per channel group (the coupled channels of
  :mod:`tvm_compress.graph.channel_groups`: a conv's outputs, its BN, the depthwise conv after it,
  every
  tensor joined by a residual add) a sparsity in ``[0, max_sparsity]``, decided at the group's
  first producer layer in graph order, kept-channel counts rounded to ``granule``;
* **channel controller**: per layer a mean bit-width ``B`` in ``[2, 8]`` spread over its kept
  output channels on the levels {2, 4, 6, 8}: the most important channels get the upper level
  ``lo + 2``, the rest ``lo = 2 * floor(B / 2)``, in the proportion that makes the mean ``B``;
* **one importance criterion** for both: the L1 norm of a group channel over all its producers'
  BN-folded weights (each producer normalized by its mean, so a depthwise conv counts as much as
  the 1x1 conv before it). The least important channels get 0 bits, the most important the most.

Per-channel bit-widths are realized exactly by the integer kernels: weights stay int8 tensors
quantized per output channel, a ``b``-bit channel has the scale ``max|w| / (2^(b-1) - 1)`` so its
integers lie in the ``b``-bit range, and its size is counted packed at ``b`` bits
(:func:`JointSpace.plan_bytes`). Pruned channels are removed with ``CropChannels``.

The whole search runs on the BN-folded torch model (``fold_batch_norm_torch``) and its Relax
import, so the torch proxy (masked, fake-quantized weights) and the TVM realization read the same
weights; biases are fp32 in the proxy and int32 in TVM, activations are fp32 in the proxy and
8-bit in TVM (the realized accuracy is always measured and reported).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tvm_compress.errors import UserError

if TYPE_CHECKING:
    import torch
    import tvm
    from torch import nn

    from tvm_compress.frontend.importers import Model
    from tvm_compress.quant.quantize import QuantizedModel

BIT_LEVELS = (2, 4, 6, 8)
KINDS = ("conv", "depthwise", "linear")


# ------------------------------------------------------------------------------------- budget

@dataclass(frozen=True)
class Budget:
    """Resource budget as fractions of the fp32 model: weight bytes and (optionally) MACs."""

    size: float
    macs: float | None = None

    def describe(self) -> str:
        return f"size={self.size:g}" + (f",macs={self.macs:g}" if self.macs else "")


def parse_budget(text: str) -> Budget:
    """``"size=0.2"`` or ``"size=0.2,macs=0.5"`` (fractions of fp32 in (0, 1])."""
    values: dict[str, float] = {}
    for part in str(text).split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in ("size", "macs"):
            raise UserError(f"bad budget {text!r}: write size=F[,macs=F] with fractions of the "
                            "fp32 model, e.g. --budget size=0.2")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not 0.0 < number <= 1.0:
            raise UserError(f"bad budget {text!r}: {key} must be a fraction in (0, 1], got "
                            f"{value!r}")
        values[key] = number
    if "size" not in values:
        raise UserError(f"bad budget {text!r}: size=F is required, e.g. --budget size=0.2")
    return Budget(values["size"], values.get("macs"))


# --------------------------------------------------------------------------- torch BN folding

def fold_batch_norm_torch(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every ``BatchNorm2d`` at ``<seq>.<i+1>`` folded into the
    ``Conv2d`` at ``<seq>.<i>`` (the conv gets a bias, the BN becomes ``nn.Identity``)."""
    import torch
    from torch import nn

    folded = copy.deepcopy(module).eval()
    convs = {name: m for name, m in folded.named_modules() if isinstance(m, nn.Conv2d)}
    with torch.no_grad():
        for name, conv in convs.items():
            parent, _, index = name.rpartition(".")
            if not index.isdigit():
                continue
            owner = folded.get_submodule(parent) if parent else folded
            sibling = str(int(index) + 1)
            bn = getattr(owner, sibling, None)
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            std = torch.sqrt(bn.running_var + bn.eps)
            gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
            scale = gamma / std
            bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
            conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + beta)
            setattr(owner, sibling, nn.Identity())
    return folded


# ------------------------------------------------------------------------------ joint space

@dataclass
class LayerInfo:
    """One conv / linear layer in torch layout (out axis 0, in axis 1)."""

    name: str
    kind: str
    index: int
    weight: np.ndarray
    bias: np.ndarray | None
    out_group: np.ndarray    # per output position: group id
    out_rank: np.ndarray     # per output position: importance rank inside its group (0 = top)
    in_group: np.ndarray     # per input position (len 0 for depthwise)
    in_rank: np.ndarray
    kernel_elems: int        # weight elements per (out, in) pair
    pixels: int              # output pixels (MACs per weight element)
    stride: int
    decides: int | None      # group whose sparsity this layer's step decides (first producer)

    @property
    def out_channels(self) -> int:
        return len(self.out_group)

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1])


@dataclass
class JointPlan:
    """A point of the joint space: kept channels per group and mean bits per layer."""

    keep: dict[int, int]            # group id -> kept channel count (top by importance)
    bits: dict[str, float]          # layer -> mean bit-width B of its kept output channels
    actions: list[tuple[float, float]] = field(default_factory=list)

    def to_dict(self, space: JointSpace) -> dict[str, Any]:
        return {"keep": {str(g): n for g, n in sorted(self.keep.items())},
                "mean_bits": {k: round(v, 4) for k, v in self.bits.items()},
                "channel_bits": {layer.name: space.channel_bits(self, layer).tolist()
                                 for layer in space.layers},
                "crop_plan": {str(g): v for g, v in space.crop_plan(self).items()}}


def compression_plan(space: JointSpace, plan: JointPlan, *, method: str = "ajpq",
                     budget: str | None = None, seed: int | None = None,
                     metrics: dict[str, Any] | None = None) -> Any:
    """A joint plan as a :class:`~tvm_compress.plan.CompressionPlan`: crop + per-channel bits.

    The plan holds the structure only; AJPQ's fine-tuned weights are not part of it.
    """
    from tvm_compress.plan import CompressionPlan, Provenance, crop_plan_by_name
    from tvm_compress.quant.config import QuantConfig, QuantSpec

    config = QuantConfig(weight=QuantSpec(8, "symmetric", "per_channel"),
                         activation=QuantSpec(8, "asymmetric"), calibration="minmax")
    return CompressionPlan(
        crop=crop_plan_by_name(space.model.mod, space.crop_plan(plan)), quant=config,
        channel_bits={layer.name: tuple(int(b) for b in space.channel_bits(plan, layer))
                      for layer in space.layers},
        provenance=Provenance(method, budget=budget, seed=seed, metrics=metrics or {}))


def _split_bits(mean: float) -> tuple[int, float]:
    """Lower level and the fraction of channels at ``lo + 2`` for a mean bit-width."""
    mean = min(max(float(mean), 2.0), 8.0)
    lo = min(2 * int(mean // 2), 8)
    return lo, (0.0 if lo == 8 else (mean - lo) / 2.0)


class JointSpace:
    """The joint pruning + quantization space of a torch model (see the module doc).

    Parameters
    ----------
    module : torch.nn.Module
        Trained model; its BNs are folded first (conv at ``<seq>.<i>``, BN at ``<seq>.<i+1>``).
    example : torch.Tensor
        Example input (batch 1) for the Relax import.
    max_sparsity : float
        Largest fraction of a group's channels the layer controller may prune.
    granule : int
        Kept channel counts are multiples of this (or the whole group).
    """

    def __init__(self, module: nn.Module, example: torch.Tensor, *, max_sparsity: float = 0.5,
                 granule: int = 8, calib: np.ndarray | None = None) -> None:
        from tvm_compress.frontend.importers import from_torch
        from tvm_compress.graph.channel_groups import analyze_channel_groups
        from tvm_compress.runtime.metrics import weight_bytes

        if not 0.0 <= max_sparsity < 1.0:
            raise UserError(f"max_sparsity must be in [0, 1), got {max_sparsity}")
        if granule < 1:
            raise UserError(f"granule must be >= 1, got {granule}")
        self.max_sparsity, self.granule = max_sparsity, granule
        self.folded = fold_batch_norm_torch(module)
        self.example = example
        self.model: Model = from_torch(self.folded, example)
        self.groups = analyze_channel_groups(self.model.mod)
        self.fp32_bytes = weight_bytes(self.model.mod)
        self._build_layers()
        self.in_means = self._input_means(calib) if calib is not None else None
        self.fp32_macs = sum(layer.out_channels * layer.in_channels * layer.kernel_elems *
                             layer.pixels for layer in self.layers)

    # ------------------------------------------------------------------------ construction
    @staticmethod
    def _slice_safe_order(group: Any, importance: np.ndarray) -> np.ndarray:
        """Channels by importance, except that the best channel of every slice (a member tensor
        holding only part of the group: one side of a channel split, one input of a concat)
        comes first, so any kept count >= the number of slices leaves every tensor non-empty."""
        order = np.argsort(-importance, kind="stable")
        firsts: list[int] = []
        for m in group.members:
            ch = np.asarray(m.channels)
            ch = np.unique(ch[ch >= 0])
            if 0 < len(ch) < group.size:
                best = int(ch[np.argmax(importance[ch])])
                if best not in firsts:
                    firsts.append(best)
        if not firsts:
            return order
        firsts.sort(key=lambda c: (-importance[c], c))
        rest = order[~np.isin(order, firsts)]
        return np.concatenate([np.array(firsts, dtype=np.int64), rest.astype(np.int64)])

    def _build_layers(self) -> None:
        from torch import nn

        params = {name: m for name, m in self.folded.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear))}
        ngroups = len(self.groups)
        out_pos: dict[str, list[tuple[np.ndarray, int, np.ndarray]]] = {}
        in_pos: dict[str, list[tuple[np.ndarray, int, np.ndarray]]] = {}
        for g in self.groups:
            for m in g.members:
                ch = np.array(m.channels)
                pos = np.nonzero(ch >= 0)[0]
                if m.kind in ("conv_out", "depthwise", "linear_out"):
                    out_pos.setdefault(m.name, []).append((pos, g.id, ch[pos]))
                elif m.kind in ("conv_in", "linear_in"):
                    in_pos.setdefault(m.name, []).append((pos, g.id, ch[pos]))
        self.prunable = [g.prunable and g.zero_preserving and g.size > self.granule
                         for g in self.groups]
        # importance: per group channel, L1 of the folded producer weights, normalized per layer
        importance = [np.zeros(g.size) for g in self.groups]
        self.layers: list[LayerInfo] = []
        for layer in self.model.layers:
            module = params.get(layer.name)
            if module is None:
                raise UserError(f"AJPQ: layer '{layer.name}' is not a Conv2d / Linear module "
                                "path of the model; import the model with from_torch")
            weight = module.weight.detach().numpy().astype(np.float32)
            if layer.kind == "grouped":
                raise UserError(f"AJPQ: grouped conv '{layer.name}' is not supported "
                                "(only plain, depthwise and linear layers)")
            l1 = np.abs(weight.reshape(weight.shape[0], -1)).sum(1)
            l1 = l1 / max(float(l1.mean()), 1e-12)
            out_g = np.full(weight.shape[0], -1)
            out_c = np.full(weight.shape[0], -1)
            for pos, gid, ch in out_pos.get(layer.name, []):
                out_g[pos], out_c[pos] = gid, ch
                importance[gid][ch] += l1[pos]
            if (out_g < 0).any():
                raise UserError(f"AJPQ: output channels of '{layer.name}' are not in a group")
            in_g = np.full(weight.shape[1], -1)
            in_c = np.full(weight.shape[1], -1)
            if layer.kind != "depthwise":
                for pos, gid, ch in in_pos.get(layer.name, []):
                    in_g[pos], in_c[pos] = gid, ch
            pixels = int(np.prod(layer.output_shape[2:])) if layer.kind != "linear" else 1
            bias = None if module.bias is None else module.bias.detach().numpy().copy()
            self.layers.append(LayerInfo(
                layer.name, "linear" if layer.kind == "linear" else layer.kind,
                len(self.layers), weight, bias, out_g, out_c, in_g, in_c,
                int(np.prod(weight.shape[2:])) if weight.ndim == 4 else 1, pixels,
                int(layer.stride[0]) if layer.stride else 1, None))
        self.importance = importance
        # rank of each group channel by importance (0 = most important); stable order
        self.order = [self._slice_safe_order(g, imp) for g, imp in zip(self.groups, importance,
                                                                        strict=True)]
        rank = []
        for order in self.order:
            r = np.empty(len(order), dtype=np.int64)
            r[order] = np.arange(len(order))
            rank.append(r)
        decided: set[int] = set()
        for layer in self.layers:
            layer.out_rank = np.array([rank[g][c] for g, c in zip(layer.out_group, layer.out_rank,
                                                                   strict=True)])
            layer.in_rank = np.array([rank[g][c] if g >= 0 else 0 for g, c in
                                      zip(layer.in_group, layer.in_rank, strict=True)],
                                     dtype=np.int64)
            gid = int(layer.out_group[0])
            if len(set(layer.out_group.tolist())) == 1 and self.prunable[gid] and \
                    gid not in decided:
                layer.decides = gid
                decided.add(gid)
        self.sizes = np.array([g.size for g in self.groups])
        self._ngroups = ngroups

    def _input_means(self, calib: np.ndarray) -> dict[str, np.ndarray]:
        """Per layer, the mean of each input channel over ``calib`` (for bias compensation)."""
        import torch

        means: dict[str, np.ndarray] = {}
        hooks = []
        for layer in self.layers:
            module = self.folded.get_submodule(layer.name)

            def hook(_m, inputs, _out, name=layer.name):  # noqa: ANN001, ANN202
                x = inputs[0].detach()
                dims = [0] + list(range(2, x.ndim))
                means[name] = x.mean(dims).numpy().astype(np.float32)

            hooks.append(module.register_forward_hook(hook))
        try:
            with torch.inference_mode():
                self.folded(torch.from_numpy(np.asarray(calib, dtype=np.float32)))
        finally:
            for h in hooks:
                h.remove()
        return means

    def start_weights(self, plan: JointPlan) -> dict[str, torch.Tensor]:
        """Folded weights and biases for ``plan``: each consumer's bias absorbs the mean
        contribution of its pruned input channels (measured on the calibration images), so
        removing a channel removes its variation, not its average."""
        import torch

        out = {n: p.detach().clone() for n, p in self.folded.named_parameters()}
        if self.in_means is None:
            return out
        keep = self.keep_array(plan)
        for layer in self.layers:
            if layer.kind == "depthwise" or layer.bias is None or not (layer.in_group >= 0).any():
                continue
            pruned = (layer.in_group >= 0) & \
                (layer.in_rank >= keep[np.maximum(layer.in_group, 0)])
            if not pruned.any():
                continue
            w = layer.weight.reshape(layer.weight.shape[0], layer.weight.shape[1], -1).sum(2)
            delta = w[:, pruned] @ self.in_means[layer.name][pruned]
            out[f"{layer.name}.bias"] = out[f"{layer.name}.bias"] + torch.from_numpy(
                delta.astype(np.float32))
        return out

    # ---------------------------------------------------------------------------- mapping
    def kept_count(self, gid: int, sparsity: float) -> int:
        """Channels kept in group ``gid`` at ``sparsity`` (multiple of the granule)."""
        size = int(self.sizes[gid])
        if not self.prunable[gid]:
            return size
        sparsity = min(max(float(sparsity), 0.0), self.max_sparsity)
        n = int(round(size * (1.0 - sparsity) / self.granule)) * self.granule
        low = max(self.granule, int(math.ceil(size * (1.0 - self.max_sparsity) / self.granule))
                  * self.granule)
        return int(min(max(n, min(low, size)), size))

    @property
    def prunable_groups(self) -> list[int]:
        return [g for g, ok in enumerate(self.prunable) if ok]

    def min_keep(self, gid: int) -> int:
        return self.kept_count(gid, self.max_sparsity)

    def full_keep(self) -> np.ndarray:
        return self.sizes.copy()

    def _layer_cost(self, layer: LayerInfo, keep: np.ndarray, mean_bits: float
                    ) -> tuple[int, int, int]:
        """(weight bits, bias bytes, MACs) of a layer with ``keep[g]`` channels per group."""
        n_out = int(np.sum(layer.out_rank < keep[layer.out_group]))
        n_in = 1 if layer.kind == "depthwise" else \
            int(np.sum((layer.in_group < 0) | (layer.in_rank < keep[np.maximum(layer.in_group,
                                                                                0)])))
        lo, frac = _split_bits(mean_bits)
        n_hi = int(round(frac * n_out))
        per_out = n_in * layer.kernel_elems
        weight_bits = (n_out * lo + 2 * n_hi) * per_out
        bias_bytes = 4 * n_out if layer.bias is not None else 0
        return weight_bits, bias_bytes, n_out * per_out * layer.pixels

    def layer_bytes(self, layer: LayerInfo, keep: np.ndarray, mean_bits: float) -> int:
        wbits, bias, _ = self._layer_cost(layer, keep, mean_bits)
        return (wbits + 7) // 8 + bias

    def cost(self, keep: np.ndarray, bits: Sequence[float]) -> tuple[int, int]:
        """(weight bytes, MACs) of a full assignment (``bits`` per layer, in order)."""
        total, macs = 0, 0
        for layer, b in zip(self.layers, bits, strict=True):
            wbits, bias, m = self._layer_cost(layer, keep, b)
            total += (wbits + 7) // 8 + bias
            macs += m
        return total, macs

    def keep_array(self, plan: JointPlan) -> np.ndarray:
        keep = self.full_keep()
        for gid, n in plan.keep.items():
            keep[gid] = n
        return keep

    def plan_bytes(self, plan: JointPlan) -> int:
        return self.cost(self.keep_array(plan), [plan.bits[x.name] for x in self.layers])[0]

    def plan_macs(self, plan: JointPlan) -> int:
        return self.cost(self.keep_array(plan), [plan.bits[x.name] for x in self.layers])[1]

    def channel_bits(self, plan: JointPlan, layer: LayerInfo) -> np.ndarray:
        """Bits per output position of ``layer`` (0 = pruned)."""
        keep = self.keep_array(plan)
        kept = layer.out_rank < keep[layer.out_group]
        lo, frac = _split_bits(plan.bits[layer.name])
        bits = np.where(kept, lo, 0).astype(np.int64)
        n_hi = int(round(frac * int(kept.sum())))
        if n_hi:
            # most important kept channels (by their group rank) get the upper level
            idx = np.nonzero(kept)[0]
            top = idx[np.argsort(layer.out_rank[idx], kind="stable")[:n_hi]]
            bits[top] = lo + 2
        return bits

    def crop_plan(self, plan: JointPlan) -> dict[int, list[int]]:
        """Group id -> kept channel indices, for the groups that lose channels."""
        out = {}
        for gid, n in sorted(plan.keep.items()):
            if n < self.sizes[gid]:
                out[gid] = sorted(int(c) for c in self.order[gid][:n])
        return out

    # ------------------------------------------------------------------------- the proxy
    def proxy_params(self, plan: JointPlan, weights: dict[str, torch.Tensor] | None = None,
                     *, ste: bool = False) -> dict[str, torch.Tensor]:
        """Masked, fake-quantized weight / bias tensors of ``plan`` for ``functional_call``.

        ``weights`` (name -> tensor) replaces the folded weights (fine-tuning); with ``ste`` the
        rounding passes gradients straight through.
        """
        import torch

        keep = self.keep_array(plan)
        if weights is None:
            weights = self.start_weights(plan)
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            w = weights[f"{layer.name}.weight"]
            bits = torch.from_numpy(self.channel_bits(plan, layer))
            out_mask = (bits > 0).to(w.dtype)
            shape = (-1,) + (1,) * (w.ndim - 1)
            if layer.kind != "depthwise" and (layer.in_group >= 0).any():
                in_keep = (layer.in_group < 0) | \
                    (layer.in_rank < keep[np.maximum(layer.in_group, 0)])
                w = w * torch.from_numpy(in_keep.astype(np.float32)).view(
                    (1, -1) + (1,) * (w.ndim - 2))
            w = w * out_mask.view(shape)
            qmax = torch.clamp(2.0 ** (bits.to(w.dtype) - 1) - 1, min=1.0).view(shape)
            amax = w.detach().abs().reshape(w.shape[0], -1).amax(1).view(shape)
            scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
            q = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
            out[f"{layer.name}.weight"] = w + (q - w).detach() if ste else q
            if layer.bias is not None:
                b = weights[f"{layer.name}.bias"]
                out[f"{layer.name}.bias"] = b * out_mask
        return out

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        return functional_call(self.folded, params, (x,), strict=False)

    def proxy_accuracy(self, plan: JointPlan, images: torch.Tensor, labels: torch.Tensor,
                       weights: dict[str, torch.Tensor] | None = None,
                       batch: int = 500) -> float:
        """Top-1 accuracy of the cropped + fake-quantized torch model (zeroed channels)."""
        import torch

        with torch.inference_mode():
            params = self.proxy_params(plan, weights)
            correct = 0
            for s in range(0, len(images), batch):
                logits = self.forward(params, images[s:s + batch])
                correct += int((logits.argmax(1) == labels[s:s + batch]).sum())
        return correct / len(images)

    def proxy_logits(self, plan: JointPlan, images: torch.Tensor,
                     weights: dict[str, torch.Tensor] | None = None) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.forward(self.proxy_params(plan, weights), images).numpy()

    # ------------------------------------------------------------------------ description
    def layer_features(self) -> np.ndarray:
        """Static part of the state: per layer index, kind, in/out channels, kernel, stride,
        log params, log MACs; min-max normalized over the layers (AMC)."""
        rows = []
        n = len(self.layers)
        for layer in self.layers:
            params = layer.weight.size
            macs = params * layer.pixels
            rows.append([layer.index / max(n - 1, 1), *(float(layer.kind == k) for k in KINDS),
                         layer.in_channels, layer.out_channels, layer.kernel_elems,
                         layer.stride, math.log(params + 1), math.log(macs + 1),
                         float(layer.decides is not None)])
        arr = np.array(rows, dtype=np.float32)
        lo, hi = arr.min(0), arr.max(0)
        return np.where(hi > lo, (arr - lo) / np.where(hi > lo, hi - lo, 1), arr)


# ------------------------------------------------------------------------ episodes (budget)

class Episode:
    """One pass over the layers; actions are constrained so the budget can always be met.

    At layer ``t`` the action (sparsity action ``a_s`` for the group the layer decides, bits
    action ``a_b``) maps to sparsity ``a_s^2 * max_sparsity`` (quadratic: small sparsities, the
    ones a model survives without fine-tuning, get most of the action range) and mean bits
    ``2 + 6 a_b``. If even the
    smallest completion of the remaining layers (their undecided groups at maximal sparsity,
    2 bits) would break the budget, the action moves along the straight line towards
    (max sparsity, 2 bits) to the first point that keeps the budget reachable (AMC / HAQ clamp
    their actions the same way).
    """

    STEPS = 40

    def __init__(self, space: JointSpace, budget: Budget) -> None:
        self.space, self.budget = space, budget
        self.size_limit = budget.size * space.fp32_bytes
        self.macs_limit = None if budget.macs is None else budget.macs * space.fp32_macs
        self.keep = space.full_keep()
        self.t = 0
        self.bits: list[float] = []
        self.actions: list[tuple[float, float]] = []
        self.used_bytes, self.used_macs = 0, 0
        # undecided groups: the minimal completion keeps the fewest channels
        self.undecided = {layer.decides for layer in space.layers if layer.decides is not None}
        lowest = self._completion(0, self.keep)
        if lowest[0] > self.size_limit or (self.macs_limit and lowest[1] > self.macs_limit):
            raise UserError(
                f"budget {budget.describe()} cannot be met: the smallest model this space "
                f"allows (all prunable groups at sparsity {space.max_sparsity:g}, 2-bit weights) "
                f"has {lowest[0] / space.fp32_bytes:.3f} of the fp32 size and "
                f"{lowest[1] / space.fp32_macs:.3f} of the MACs; raise the budget")

    def _completion(self, start: int, keep: np.ndarray, deciding: int | None = None
                    ) -> tuple[int, int]:
        """Smallest (bytes, MACs) of layers ``start..`` given ``keep``: groups still undecided
        (other than ``deciding``, set in ``keep``) at their fewest channels, 2 bits."""
        keep = keep.copy()
        for gid in self.undecided - {deciding}:
            keep[gid] = self.space.min_keep(gid)
        total, macs = 0, 0
        for layer in self.space.layers[start:]:
            wbits, bias, m = self.space._layer_cost(layer, keep, 2.0)
            total += (wbits + 7) // 8 + bias
            macs += m
        return total, macs

    @property
    def done(self) -> bool:
        return self.t >= len(self.space.layers)

    @property
    def layer(self) -> LayerInfo:
        return self.space.layers[self.t]

    def state(self, features: np.ndarray) -> np.ndarray:
        """Layer embedding + previous actions + budget used / left (fractions of the budget)."""
        prev = self.actions[-1] if self.actions else (0.0, 0.0)
        used = self.used_bytes / self.size_limit
        rest = self._completion(self.t, self.keep)[0] / self.size_limit
        return np.concatenate([features[self.t],
                               [prev[0], prev[1], used, rest]]).astype(np.float32)

    def _feasible(self, keep: np.ndarray, bits: float) -> bool:
        layer = self.layer
        wbits, bias, macs = self.space._layer_cost(layer, keep, bits)
        rest = self._completion(self.t + 1, keep, layer.decides)
        size = self.used_bytes + (wbits + 7) // 8 + bias + rest[0]
        if size > self.size_limit:
            return False
        return self.macs_limit is None or self.used_macs + macs + rest[1] <= self.macs_limit

    def step(self, a_sparsity: float, a_bits: float) -> tuple[float, float]:
        """Apply (constrained) actions for the current layer; returns the actions taken."""
        layer, space = self.layer, self.space
        a_s = float(np.clip(a_sparsity, 0.0, 1.0)) if layer.decides is not None else 0.0
        a_b = float(np.clip(a_bits, 0.0, 1.0))
        for k in range(self.STEPS + 1):
            lam = k / self.STEPS
            s_act = a_s + lam * (1.0 - a_s) if layer.decides is not None else 0.0
            b_act = a_b * (1.0 - lam)
            keep = self.keep.copy()
            if layer.decides is not None:
                keep[layer.decides] = space.kept_count(layer.decides,
                                                       s_act ** 2 * space.max_sparsity)
            if self._feasible(keep, 2.0 + 6.0 * b_act):
                break
        self.keep = keep
        if layer.decides is not None:
            self.undecided.discard(layer.decides)
        bits = 2.0 + 6.0 * b_act
        wbits, bias, macs = space._layer_cost(layer, keep, bits)
        self.used_bytes += (wbits + 7) // 8 + bias
        self.used_macs += macs
        self.bits.append(bits)
        self.actions.append((s_act, b_act))
        self.t += 1
        return s_act, b_act

    def plan(self) -> JointPlan:
        if not self.done:
            raise RuntimeError("episode not finished")
        keep = {gid: int(self.keep[gid]) for gid, ok in enumerate(self.space.prunable) if ok}
        return JointPlan(keep, {layer.name: b for layer, b in zip(self.space.layers, self.bits,
                                                                   strict=True)},
                         list(self.actions))


def run_policy(space: JointSpace, budget: Budget,
               policy: Callable[[Episode, np.ndarray], tuple[float, float]], *,
               fill: bool = True) -> JointPlan:
    """One episode with ``policy(episode, state) -> (a_sparsity, a_bits)``; with ``fill`` the
    size budget the actions left unused is then spent on bits (:func:`fill_budget`)."""
    features = space.layer_features()
    ep = Episode(space, budget)
    while not ep.done:
        ep.step(*policy(ep, ep.state(features)))
    plan = ep.plan()
    return fill_budget(space, plan, budget) if fill else plan


def fill_budget(space: JointSpace, plan: JointPlan, budget: Budget, step: float = 0.5
                ) -> JointPlan:
    """Spend unused size budget on bits: repeatedly raise the mean bit-width of the layer with
    the fewest bits by ``step`` while the size stays within budget (keeps, MACs unchanged).
    The clamped actions leave slack whenever the policy asked for less than the budget; more
    bits on the same channels never lose accuracy in expectation, so a plan should not waste
    it (HAQ's agent learns the same thing with many more episodes)."""
    keep = space.keep_array(plan)
    bits = dict(plan.bits)
    limit = budget.size * space.fp32_bytes
    total = space.plan_bytes(plan)
    by_name = {layer.name: layer for layer in space.layers}
    while True:
        for name in sorted(bits, key=lambda n: (bits[n], by_name[n].index)):
            if bits[name] >= 8.0:
                continue
            layer = by_name[name]
            new = min(8.0, bits[name] + step)
            delta = space.layer_bytes(layer, keep, new) - space.layer_bytes(layer, keep,
                                                                             bits[name])
            if total + delta <= limit:
                bits[name], total = new, total + delta
                break
        else:
            break
    return JointPlan(dict(plan.keep), bits, list(plan.actions))


def uniform_plan(space: JointSpace, budget: Budget, bits: int) -> JointPlan | None:
    """Sequential baseline: L1 pruning with one sparsity for all prunable groups, then uniform
    ``bits``; the smallest sparsity (on a 1/64 grid) that meets the budget, None if none does."""
    for k in range(65):
        s = k / 64 * space.max_sparsity
        keep = {gid: space.kept_count(gid, s) for gid, ok in enumerate(space.prunable) if ok}
        plan = JointPlan(keep, {layer.name: float(bits) for layer in space.layers})
        size, macs = space.plan_bytes(plan), space.plan_macs(plan)
        if size <= budget.size * space.fp32_bytes and \
                (budget.macs is None or macs <= budget.macs * space.fp32_macs):
            return plan
    return None


def within_budget(space: JointSpace, plan: JointPlan, budget: Budget) -> bool:
    size_ok = space.plan_bytes(plan) <= budget.size * space.fp32_bytes
    return size_ok and (budget.macs is None or
                        space.plan_macs(plan) <= budget.macs * space.fp32_macs)


# ------------------------------------------------------------------------------ fine-tuning

def finetune(space: JointSpace, plan: JointPlan, images: np.ndarray, labels: np.ndarray, *,
             epochs: int = 1, lr: float = 0.01, batch_size: int = 128, seed: int = 0,
             progress: bool = True) -> dict[str, torch.Tensor]:
    """Short quantization-aware fine-tune of ``plan`` (masked, fake-quant weights, STE).

    Returns the new folded weights and biases (name -> tensor), for :meth:`proxy_accuracy` and
    :func:`realize`.
    """
    import torch
    from rich import progress as rp

    from tvm_compress.zoo.train import augment

    weights = {n: p.requires_grad_(True) for n, p in space.start_weights(plan).items()}
    opt = torch.optim.SGD(list(weights.values()), lr=lr, momentum=0.9, nesterov=True)
    x_all, y_all = torch.from_numpy(np.asarray(images)), torch.from_numpy(np.asarray(labels))
    steps = epochs * ((len(x_all) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    space.folded.train()
    try:
        with rp.Progress(rp.TextColumn("fine-tune"), rp.BarColumn(), rp.MofNCompleteColumn(),
                         rp.TimeElapsedColumn(), disable=not progress) as bar:
            task = bar.add_task("ft", total=steps)
            for _ in range(epochs):
                order = torch.randperm(len(x_all), generator=gen)
                for s in range(0, len(x_all), batch_size):
                    idx = order[s:s + batch_size]
                    params = {**weights, **space.proxy_params(plan, weights, ste=True)}
                    logits = space.forward(params, augment(x_all[idx], gen))
                    loss = torch.nn.functional.cross_entropy(logits, y_all[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(task, advance=1)
    finally:
        space.folded.eval()
    return {n: w.detach() for n, w in weights.items()}


# ------------------------------------------------------------------------------ realization

def swap_weights(mod: tvm.IRModule, space: JointSpace,
                 weights: dict[str, torch.Tensor]) -> tvm.IRModule:
    """``mod`` (the Relax import of ``space.folded``) with each layer's weight and bias constants
    replaced by ``weights`` (torch names), without re-importing the model."""
    import tvm
    from tvm import relax

    from tvm_compress.graph.dataflow import DataflowView, is_const, op_name
    from tvm_compress.runtime.metrics import _bias_after

    view = DataflowView.of(mod["main"])
    table: dict[Any, np.ndarray] = {}
    for b in view.bindings:
        if op_name(b.value) not in ("relax.nn.conv2d", "relax.matmul") or \
                f"{b.var.name}.weight" not in weights:
            continue
        const = view.resolve(b.value.args[1])
        new = weights[f"{b.var.name}.weight"].detach().numpy()
        if is_const(const) and new.ndim == 2 and tuple(const.value.shape) == new.T.shape:
            new = np.ascontiguousarray(new.T)  # linear weights are stored (in, out)
        if not is_const(const) or tuple(const.value.shape) != new.shape:
            raise UserError(f"AJPQ: cannot place the weight of '{b.var.name}' in the Relax "
                            "module (not the torch-layout constant it was imported with)")
        table[const] = new
        bias = _bias_after(view, b.var)
        if bias is not None and f"{b.var.name}.bias" in weights:
            table[bias] = weights[f"{b.var.name}.bias"].detach().numpy().reshape(
                bias.value.shape)

    @relax.expr_functor.mutator
    class _Swap(relax.PyExprMutator):
        def visit_var_binding_(self, binding: relax.VarBinding) -> None:
            value = binding.value
            if isinstance(value, relax.Call) and any(
                    is_const(a) and a in table for a in value.args):
                args = [relax.const(table[a].astype(str(a.value.dtype)), str(a.value.dtype))
                        if is_const(a) and a in table else self.visit_expr(a)
                        for a in value.args]
                new = self.builder_.normalize(relax.Call(value.op, args, value.attrs))
                var_type = relax.DataflowVar if isinstance(binding.var, relax.DataflowVar) \
                    else relax.Var
                var = var_type(binding.var.name, new.ty)
                self.builder_.emit_normalized(relax.VarBinding(var, new))
                self.set_var_remap(binding.var, var)
            else:
                super().visit_var_binding_(binding)

    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = _Swap(out).visit_expr(mod["main"])
    return out


@dataclass
class Realized:
    """A plan realized in TVM: cropped Relax model with per-channel-bit integer kernels."""

    quantized: QuantizedModel
    crop_plan: dict[int, list[int]]
    plan_bytes: int            # packed at the per-channel bits
    layer_max_bytes: int       # metrics.weight_bytes at each layer's largest bit-width


def realize(space: JointSpace, plan: JointPlan, calib_images: np.ndarray, *,
            weights: dict[str, torch.Tensor] | None = None, batch: int = 1,
            progress: bool = False) -> Realized:
    """Crop (CropChannels) and quantize (integer kernels, per-channel bits) a plan in TVM."""
    import torch

    from tvm_compress.backend.build import InputSpec
    from tvm_compress.frontend.importers import from_torch
    from tvm_compress.graph.qgraph import analyze
    from tvm_compress.passes.crop_channels import crop_channels
    from tvm_compress.passes.insert_qdq import InsertQDQ
    from tvm_compress.passes.realize_integer import RealizeInteger
    from tvm_compress.quant.calibration import calibrate
    from tvm_compress.quant.config import LayerOverride, QuantConfig, QuantSpec
    from tvm_compress.quant.qparams import channel_bits_qparams
    from tvm_compress.quant.quantize import QuantizedModel, float_layers
    from tvm_compress.runtime.metrics import weight_bytes

    if weights is None:
        weights = space.start_weights(plan)
    if batch == space.example.shape[0]:
        model = space.model.with_mod(swap_weights(space.model.mod, space, weights))
    else:
        module = copy.deepcopy(space.folded)
        module.load_state_dict({**module.state_dict(), **weights})
        example = torch.zeros((batch, *space.example.shape[1:]), dtype=space.example.dtype)
        model = from_torch(module, example)
    crop = space.crop_plan(plan)
    mod = crop_channels(model.mod, crop) if crop else model.mod
    cropped = model.with_mod(mod)
    bits = {layer.name: space.channel_bits(plan, layer) for layer in space.layers}
    overrides = {name: LayerOverride(weight_bits=int(b.max())) for name, b in bits.items()}
    config = QuantConfig(weight=QuantSpec(8, "symmetric", "per_channel"),
                         activation=QuantSpec(8, "asymmetric"), calibration="minmax",
                         calib_samples=len(calib_images), overrides=overrides)
    graph = analyze(mod, config)
    spec = InputSpec(cropped.input_name, cropped.input_shape, cropped.input_dtype)
    act = calibrate(mod, graph, config, np.asarray(calib_images), spec, progress=progress)
    wq = {}
    for site in graph.layers:
        b = bits[site.layer.name]
        wq[site.layer.name] = channel_bits_qparams(site.weight.value.numpy(), site.weight_axis,
                                               b[b > 0])
    simulated = InsertQDQ(config, act, weight_overrides=wq)(mod)
    realized = RealizeInteger()(simulated)
    fp32 = sorted(set(graph.fp32_layers) | set(float_layers(realized)))
    qm = QuantizedModel(cropped.with_mod(realized), simulated, mod, config, act, wq, graph, fp32)
    return Realized(qm, crop, space.plan_bytes(plan),
                    weight_bytes(realized, {n: int(b.max()) for n, b in bits.items()}))
