"""CompressionPlan: what every method outputs, and the pipeline that applies plans inside TVM.

A plan holds (a) kept channels per channel group, (b) a QuantConfig with per-layer and, where a
method chose them, per-channel weight bit-widths (0 bits = pruned channel), (c) provenance: the
method, budget, seed and what it measured. Plans address groups and layers by stable layer names
(a group by its first producer layer), so a plan made on a torch model applies to its Relax
import and survives re-import. Plans compose in order: crops first, then at most one
quantization.

Compiler users take it through TVM's own entry point::

    ex = tvm.compile(mod, target, relax_pipeline=tvm_compress.pipeline(plan, "x86", calib=x))

or by name (``tvm.relax.get_pipeline("tvm_compress", plans=[...], target=..., calib=...)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from tvm_compress.errors import UserError
from tvm_compress.quant.config import QuantConfig

PLAN_VERSION = 1
PLAN_FORMAT = "tvm-compress-plan"
PIPELINE_NAME = "tvm_compress"


@dataclass(frozen=True)
class Provenance:
    """Where a plan came from: method, budget, seed, and metrics it measured (free-form)."""

    method: str
    model: str | None = None
    budget: str | None = None
    seed: int | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    base: tuple[str, ...] = ()  # methods of the plans this one was searched on top of


@dataclass(frozen=True)
class CompressionPlan:
    """Kept channels per group + quantization + provenance (frozen, versioned, JSON round-trip).

    Parameters
    ----------
    crop : mapping of group key -> kept channel indices
        A group is keyed by its first producer layer's name (``ChannelGroup.producers[0]``);
        groups not named keep all channels.
    quant : QuantConfig or None
        None leaves the model in fp32.
    channel_bits : mapping of layer name -> bits per output channel
        Per-channel weight bit-widths (2-8) of quantized layers; a layer not named uses
        ``quant``'s bits. A 0 marks a channel that ``crop`` removes.
    provenance : Provenance
    """

    crop: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    quant: QuantConfig | None = None
    channel_bits: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    provenance: Provenance = field(default_factory=lambda: Provenance("manual"))
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise UserError(f"plan version {self.version} is not supported (this tvm-compress "
                            f"reads version {PLAN_VERSION}); regenerate the plan")
        crop = {}
        for key, kept in dict(self.crop).items():
            idx = tuple(int(c) for c in kept)
            if not idx:
                raise UserError(f"plan crops group {key!r} to no channels; keep at least one")
            if len(set(idx)) != len(idx) or min(idx) < 0:
                raise UserError(f"plan: group {key!r} has duplicate or negative channel indices")
            crop[str(key)] = tuple(sorted(idx))
        object.__setattr__(self, "crop", crop)
        bits = {}
        for layer, per_channel in dict(self.channel_bits).items():
            values = tuple(int(b) for b in per_channel)
            if any(b != 0 and not 2 <= b <= 8 for b in values):
                raise UserError(f"plan: layer {layer!r} has channel bits outside 0 and 2-8")
            bits[str(layer)] = values
        if bits and self.quant is None:
            raise UserError("plan: per-channel bits need a quantization config (quant)")
        object.__setattr__(self, "channel_bits", bits)

    # ---------------------------------------------------------------------------- properties
    @property
    def method(self) -> str:
        return self.provenance.method

    @property
    def crops(self) -> bool:
        return bool(self.crop)

    @property
    def quantizes(self) -> bool:
        return self.quant is not None

    def describe(self) -> str:
        parts = [self.method]
        if self.crop:
            parts.append(f"crops {len(self.crop)} groups")
        if self.quant is not None:
            w, a = self.quant.weight, self.quant.activation
            parts.append(f"W{w.bits}A{a.bits} {w.scheme}/{w.granularity}, "
                         f"{self.quant.calibration} calibration")
            if self.quant.overrides:
                parts.append(f"{len(self.quant.overrides)} layer overrides")
        if self.channel_bits:
            parts.append(f"per-channel bits on {len(self.channel_bits)} layers")
        return "; ".join(parts)

    # ---------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        p = self.provenance
        return {"format": PLAN_FORMAT, "version": self.version,
                "crop": {k: list(v) for k, v in self.crop.items()},
                "quant": None if self.quant is None else self.quant.to_dict(),
                "channel_bits": {k: list(v) for k, v in self.channel_bits.items()},
                "provenance": {"method": p.method, "model": p.model, "budget": p.budget,
                               "seed": p.seed, "metrics": dict(p.metrics), "base": list(p.base)}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=json_default)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "plan") -> CompressionPlan:
        if data.get("format") != PLAN_FORMAT:
            raise UserError(f"{where} is not a tvm-compress plan")
        if data.get("version") != PLAN_VERSION:
            raise UserError(f"{where}: plan version {data.get('version')!r} is not supported "
                            f"(this tvm-compress reads {PLAN_VERSION}); regenerate the plan")
        quant = data.get("quant")
        prov = dict(data.get("provenance") or {"method": "manual"})
        prov["base"] = tuple(prov.get("base") or ())
        return cls(crop={k: tuple(v) for k, v in (data.get("crop") or {}).items()},
                   quant=None if quant is None else QuantConfig.from_json(json.dumps(quant)),
                   channel_bits={k: tuple(v) for k, v in (data.get("channel_bits") or {}).items()},
                   provenance=Provenance(**prov))

    @classmethod
    def from_json(cls, text: str, *, where: str = "plan") -> CompressionPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} is not JSON ({exc.msg} at line {exc.lineno}); give a "
                            "plan.json written by tvm-compress") from None
        if not isinstance(data, dict):
            raise UserError(f"{where} is not a tvm-compress plan (a JSON object)")
        if data.get("format") == PLAN_FORMAT:
            return cls.from_dict(data, where=where)
        return _from_old_format(data, where)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"plan file not found: {path} (write one with a method's -o DIR)")
        return cls.from_json(path.read_text(), where=str(path))

    # ----------------------------------------------------------------------------- resolving
    def crop_ids(self, mod: tvm.IRModule) -> dict[int, list[int]]:
        """The crop as ``{group id: kept channels}`` for CropChannels on ``mod``."""
        if not self.crop:
            return {}
        from tvm_compress.graph.channel_groups import analyze_channel_groups

        groups = analyze_channel_groups(mod)
        # a group is found by any of its producer layers (the key is the first of them where the
        # plan was made; another import may list the same producers in another order)
        by_key = {name: g for g in groups for name in g.producers}
        out = {}
        for key, kept in self.crop.items():
            group = by_key.get(key)
            if group is None:
                raise UserError(f"plan crops the group of layer {key!r}, which this model does "
                                f"not have (groups: {', '.join(sorted(by_key)[:8])}, ...); was "
                                "the plan made for another model?")
            if max(kept) >= group.size:
                raise UserError(f"plan keeps channel {max(kept)} of group {key!r}, which has "
                                f"only {group.size}; was the plan made for another model?")
            if len(kept) < group.size:
                out[group.id] = list(kept)
        return out

    def with_provenance(self, **changes: Any) -> CompressionPlan:
        return replace(self, provenance=replace(self.provenance, **changes))


def crop_plan_by_name(mod: tvm.IRModule, crop: Mapping[int, Sequence[int]]
                      ) -> dict[str, tuple[int, ...]]:
    """``{group id: kept}`` on ``mod`` -> ``{first producer layer: kept}`` (plan keys)."""
    from tvm_compress.graph.channel_groups import analyze_channel_groups

    groups = {g.id: g for g in analyze_channel_groups(mod)}
    out = {}
    for gid, kept in crop.items():
        group = groups.get(int(gid))
        if group is None or not group.producers:
            raise UserError(f"channel group {gid} does not exist or has no producer layer")
        out[group.producers[0]] = tuple(int(c) for c in kept)
    return out


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for NumPy values (and anything else as its string)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _from_old_format(data: Mapping[str, Any], where: str) -> CompressionPlan:
    """Files written before plans were unified: PreCrop plans and bare QuantConfigs."""
    if {"weight", "activation", "calibration"} <= set(data):
        config = QuantConfig.from_json(json.dumps(data))
        return CompressionPlan(quant=config, provenance=Provenance("quantize"))
    if {"scorer", "allocation", "crop", "groups"} <= set(data):
        producers = {int(g["id"]): g.get("producers") or [] for g in data["groups"]}
        crop = {}
        for gid, kept in data["crop"].items():
            names = producers.get(int(gid))
            if not names:
                raise UserError(f"{where}: old PreCrop plan group {gid} has no producer layer; "
                                "regenerate it with `tvm-compress precrop ... -o DIR`")
            crop[names[0]] = tuple(kept)
        return CompressionPlan(crop=crop, provenance=Provenance(
            "precrop", model=data.get("model"), budget=data.get("budget"),
            metrics={"achieved": data.get("achieved"), "dense": data.get("dense")}))
    raise UserError(f"{where} is neither a tvm-compress plan nor an older PreCrop plan / "
                    "quantization config; regenerate it with the method's command and -o DIR")


# ------------------------------------------------------------------------------- applying


def apply_plans(model: Any, plans: Sequence[CompressionPlan], *,
                calib: np.ndarray | None = None, progress: bool = False) -> Any:
    """Apply plans in order to a :class:`~tvm_compress.frontend.importers.Model`.

    Crops run CropChannels on the model as it is at that point; a quantizing plan needs
    ``calib`` (inputs, N x input shape) and must be the last one that changes the model.
    Returns the cropped ``Model``, or the ``QuantizedModel`` when a plan quantizes.
    """
    from tvm_compress.passes.crop_channels import crop_channels

    quantized = None
    for i, plan in enumerate(plans):
        if quantized is not None and (plan.crops or plan.quantizes):
            raise UserError(f"plan {i + 1} ({plan.method}) comes after a quantizing plan; "
                            "order plans as crops first, then one quantization")
        if plan.crops:
            ids = plan.crop_ids(model.mod)
            if ids:
                model = model.with_mod(crop_channels(model.mod, ids))
        if plan.quantizes:
            if calib is None:
                raise UserError(f"plan {i + 1} ({plan.method}) quantizes and needs calibration "
                                "inputs: pass --calib FILE.npz (or calib= in Python)")
            quantized = quantize_with_plan(model, plan, calib, progress=progress)
    return quantized if quantized is not None else model


def quantize_with_plan(model: Any, plan: CompressionPlan, calib: np.ndarray, *,
                       progress: bool = False) -> Any:
    """Quantize ``model`` with the plan's config and per-channel bits."""
    from tvm_compress.quant.config import LayerOverride
    from tvm_compress.quant.quantize import quantize

    assert plan.quant is not None
    bits = {k: np.asarray(v) for k, v in plan.channel_bits.items()}
    config = plan.quant
    # a layer's nominal width (sizes, reports) is its widest channel's
    config = config.with_overrides({k: LayerOverride(weight_bits=int(b.max()))
                                    for k, b in bits.items() if config.override(k) is None})
    return quantize(model, config, np.asarray(calib), progress=progress,
                    channel_bits=bits or None)


def model_from_module(mod: tvm.IRModule, name: str = "module") -> Any:
    """A Model view of a Relax module whose ``main`` takes one input tensor (weights bound)."""
    from tvm_compress.frontend.importers import Model
    from tvm_compress.frontend.layers import LayerTable

    params = mod["main"].params
    if len(params) != 1:
        raise UserError(f"the compression pipeline needs main() with one input (weights bound "
                        f"as constants); this module's main takes {len(params)}")
    ty = params[0].ty
    return Model(name=name, mod=mod, input_name=params[0].name,
                 input_shape=tuple(int(d) for d in ty.shape), input_dtype=str(ty.dtype),
                 layers=LayerTable.from_module(mod))


def pipeline(plan: CompressionPlan | Sequence[CompressionPlan] | None = None,
             target: str | Mapping[str, Any] | tvm.target.Target = "x86", *,
             calib: np.ndarray | None = None, database: str | Path | bool | None = None,
             pack_weights: bool = True) -> tvm.transform.Pass:
    """A Pass for ``tvm.compile(mod, target, relax_pipeline=...)`` that compresses and lowers.

    Steps: apply the plans (crop, then quantize with ``calib`` as integer kernels), then on CPU
    targets our default schedules (and tuning ``database``; see ``backend.build.build``) and
    bit-packed weights, on GPU targets TVM's dlight defaults; then TVM's build pipeline.
    ``plan`` None (or []) compiles the model as it is, with our schedules.
    """
    from tvm_compress.backend.targets import resolve_target

    plans = [] if plan is None else [plan] if isinstance(plan, CompressionPlan) else list(plan)
    tgt = target if isinstance(target, tvm.target.Target) else resolve_target(target)

    @tvm.transform.module_pass(opt_level=0, name="tvm_compress.pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if plans:
            result = apply_plans(model_from_module(mod), plans, calib=calib)
            mod = getattr(result, "model", result).mod  # QuantizedModel.model / Model
        return lower_for_target(mod, tgt, database=database, pack_weights=pack_weights)

    return _pipeline


def lower_for_target(mod: tvm.IRModule, target: tvm.target.Target, *,
                     database: str | Path | bool | None = None, pack_weights: bool = True,
                     schedule: str = "default") -> tvm.IRModule:
    """Schedule ``mod`` for ``target`` and run TVM's build pipeline (what ``build`` compiles)."""
    from tvm import relax

    if target.kind.name == "llvm":
        if schedule == "default":
            mod = schedule_for_cpu(mod, target, database)
        if pack_weights:
            from tvm_compress.passes.pack_constants import PackConstants

            mod = PackConstants()(mod)
        with target:
            return relax.get_pipeline("default")(mod)
    with target:
        return relax.get_default_pipeline(target)(mod)


def schedule_for_cpu(mod: tvm.IRModule, target: tvm.target.Target,
                     database: str | Path | bool | None = None) -> tvm.IRModule:
    from tvm_compress.backend.databases import databases_for
    from tvm_compress.backend.schedules import default_schedule_pipeline

    return default_schedule_pipeline(target, databases_for(target, database))(mod)


def _registered(plans: Sequence[CompressionPlan] | None = None, target: Any = None,
                calib: np.ndarray | None = None, **options: Any) -> tvm.transform.Pass:
    if target is None:
        target = tvm.target.Target.current(allow_none=True) or "x86"
    return pipeline(list(plans or []), target, calib=calib, **options)


def register() -> None:
    """Register ``pipeline`` as the named Relax pipeline ``"tvm_compress"`` (idempotent)."""
    from tvm.relax import pipeline as relax_pipeline

    if PIPELINE_NAME not in relax_pipeline.PIPELINE_MAP:
        relax_pipeline.register_pipeline(PIPELINE_NAME)(_registered)
