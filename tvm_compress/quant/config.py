"""Quantization configuration: frozen, validated, JSON round-trip, versioned.

A :class:`QuantConfig` says how weights and activations are quantized and how activation ranges
are calibrated; per-layer :class:`LayerOverride` entries change the bits of one layer or keep it
fp32. It covers Quantune's search space (calibration size, scheme, clipping, granularity,
mixed precision) and ZeroQ's per-layer mixed precision.
"""

from __future__ import annotations

import difflib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tvm_compress.errors import UserError

SCHEMES = ("symmetric", "asymmetric", "symmetric_uint8", "power_of_two")
GRANULARITIES = ("per_tensor", "per_channel")
CALIBRATIONS = ("minmax", "percentile", "kl", "mse")
CONFIG_VERSION = 1


def _check_bits(bits: int, what: str) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise UserError(f"{what} must be an integer from 2 to 8, got {bits!r}")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor (weights or activations) is quantized."""

    bits: int = 8
    scheme: str = "symmetric"
    granularity: str = "per_tensor"

    def __post_init__(self) -> None:
        _check_bits(self.bits, "bits")
        _check_choice(self.scheme, SCHEMES, "scheme")
        _check_choice(self.granularity, GRANULARITIES, "granularity")


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer exception: other weight/activation bits, or keep the layer in fp32."""

    weight_bits: int | None = None
    activation_bits: int | None = None
    fp32: bool = False

    def __post_init__(self) -> None:
        if self.weight_bits is not None:
            _check_bits(self.weight_bits, "override weight_bits")
        if self.activation_bits is not None:
            _check_bits(self.activation_bits, "override activation_bits")
        if self.fp32 and (self.weight_bits or self.activation_bits):
            raise UserError("a layer override is either fp32 or new bits, not both")


@dataclass(frozen=True)
class QuantConfig:
    """Post-training quantization configuration.

    Parameters
    ----------
    weight, activation : QuantSpec
        Activations are always per-tensor; weights may be per-channel (output channels).
    calibration : {"minmax", "percentile", "kl", "mse"}
        How activation ranges are chosen from the calibration statistics.
    calib_samples : int
        Number of calibration samples to use (the first ones of the calibration set).
    percentile : float
        For ``calibration="percentile"``: the percentile of |x| kept (e.g. 99.99).
    overrides : mapping of layer name -> LayerOverride
        Stored sorted by name so equal configs compare (and hash) equal.
    """

    weight: QuantSpec = field(default_factory=lambda: QuantSpec(8, "symmetric", "per_channel"))
    activation: QuantSpec = field(default_factory=lambda: QuantSpec(8, "asymmetric"))
    calibration: str = "minmax"
    calib_samples: int = 100
    percentile: float = 99.99
    overrides: tuple[tuple[str, LayerOverride], ...] = ()
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check_choice(self.calibration, CALIBRATIONS, "calibration method")
        if self.activation.granularity != "per_tensor":
            raise UserError("activations are quantized per tensor; use granularity='per_tensor'")
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise UserError(f"calib_samples must be a positive integer, got {self.calib_samples!r}")
        if not 50.0 < self.percentile <= 100.0 or math.isnan(self.percentile):
            raise UserError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.version != CONFIG_VERSION:
            raise UserError(f"config version {self.version} is not supported (this tvm-compress "
                            f"reads version {CONFIG_VERSION})")
        items = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
        object.__setattr__(self, "overrides", tuple(sorted((str(k), v) for k, v in items)))

    # ------------------------------------------------------------------------------- per layer
    def override(self, layer: str) -> LayerOverride | None:
        return dict(self.overrides).get(layer)

    def is_fp32(self, layer: str) -> bool:
        o = self.override(layer)
        return bool(o and o.fp32)

    def weight_spec(self, layer: str) -> QuantSpec:
        o = self.override(layer)
        return replace(self.weight, bits=o.weight_bits) if o and o.weight_bits else self.weight

    def activation_spec(self, layer: str) -> QuantSpec:
        o = self.override(layer)
        if o and o.activation_bits:
            return replace(self.activation, bits=o.activation_bits)
        return self.activation

    def with_overrides(self, overrides: Mapping[str, LayerOverride]) -> QuantConfig:
        merged = {**dict(self.overrides), **overrides}
        return replace(self, overrides=tuple(merged.items()))

    def check_layers(self, layer_names: Iterable[str]) -> None:
        """Every override must name a real layer (close matches are suggested)."""
        names = list(layer_names)
        for layer, _ in self.overrides:
            if layer not in names:
                close = difflib.get_close_matches(layer, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else \
                    "; see `tvm-compress inspect MODEL` for the layer names"
                raise UserError(f"override names unknown layer {layer!r}{hint}")

    # ------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = {k: {f: v for f, v in asdict(o).items() if v not in (None, False)}
                          for k, o in self.overrides}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
        known = {"weight", "activation", "calibration", "calib_samples", "percentile",
                 "overrides", "version"}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown quantization config keys {sorted(unknown)}; valid keys: "
                            f"{sorted(known)}")
        try:
            kwargs = dict(d)
            for key in ("weight", "activation"):
                if key in kwargs:
                    kwargs[key] = QuantSpec(**kwargs[key])
            if "overrides" in kwargs:
                kwargs["overrides"] = {k: LayerOverride(**v)
                                       for k, v in kwargs["overrides"].items()}
        except TypeError as exc:
            raise UserError(f"malformed quantization config: {exc}") from None
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"quantization config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def short(self) -> str:
        """Compact human label, e.g. ``w8 sym/pc a8 asym kl n=100``."""
        g = {"per_tensor": "pt", "per_channel": "pc"}
        s = {"symmetric": "sym", "asymmetric": "asym", "symmetric_uint8": "symu8",
             "power_of_two": "pow2"}
        fp32 = sum(o.fp32 for _, o in self.overrides)
        wcount = Counter(o.weight_bits for _, o in self.overrides if o.weight_bits)
        return (f"w{self.weight.bits} {s[self.weight.scheme]}/{g[self.weight.granularity]} "
                f"a{self.activation.bits} {s[self.activation.scheme]} {self.calibration} "
                f"n={self.calib_samples}" + (f" fp32x{fp32}" if fp32 else "")
                + "".join(f" w{b}x{n}" for b, n in sorted(wcount.items())))


def at_target_bits(config: QuantConfig, target: Any, layers: Iterable[Any],
                   bits: int | None = None, *, mod: Any = None) -> QuantConfig:
    """``config`` with the weight bits ``target``'s int8 kernels prefer and their per-layer
    exceptions (``hardware.preferred_weight_bits`` / ``preferred_weight_overrides``: on AVX2
    without VNNI 7 bits, the depthwise layers 8, and with the model's module ``mod`` the small
    depthwise layers that feed a float island fp32). ``bits`` replaces the preferred bits (8
    gives 8 everywhere, no exceptions)."""
    from tvm_compress.backend.schedules.hardware import (
        FP32,
        preferred_weight_bits,
        preferred_weight_overrides,
    )

    chosen = preferred_weight_bits(target) if bits is None else bits
    config = replace(config, weight=replace(config.weight, bits=chosen))
    if chosen != preferred_weight_bits(target):
        return config
    extra = {name: LayerOverride(fp32=True) if b == FP32 else LayerOverride(weight_bits=b)
             for name, b in preferred_weight_overrides(target, layers, mod).items()
             if config.override(name) is None}
    return config.with_overrides(extra) if extra else config
