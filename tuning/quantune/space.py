"""Quantune's search space: five knobs whose product is a list of :class:`QuantConfig`.

The paper's space (arXiv 2202.05048) has 3 calibration sizes x 4 schemes x 2 clippings x 2 weight
granularities x 2 precisions = 96 configurations. The scheme applies to weights and activations
alike; activations are always per tensor. "mixed" precision keeps the most sensitive layers in
fp32; here those are, deterministically, the first and the last conv/linear layer of the model
(the layers that see raw pixels and produce logits, the usual choice in PTQ practice).

The extended space adds percentile and MSE clipping and 6-bit weights (384 configurations).
Enumeration order is the product of the dimensions in declaration order, last one fastest, so
grid search and every record key are stable across runs and machines.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from tvm_compress.errors import UserError
from tvm_compress.frontend.layers import LayerTable
from tvm_compress.quant.config import (
    CALIBRATIONS,
    GRANULARITIES,
    SCHEMES,
    LayerOverride,
    QuantConfig,
    QuantSpec,
)

PRECISIONS = ("int8", "mixed")
PAPER_SCHEMES = ("asymmetric", "symmetric", "symmetric_uint8", "power_of_two")


@dataclass(frozen=True, order=True)
class Knobs:
    """One point of the space: the five Quantune knobs (plus the weight bit-width)."""

    calib_samples: int
    scheme: str
    clipping: str
    granularity: str
    precision: str
    weight_bits: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise UserError(f"calib_samples must be a positive integer, got {self.calib_samples!r}")
        for value, choices, what in ((self.scheme, SCHEMES, "scheme"),
                                     (self.clipping, CALIBRATIONS, "clipping"),
                                     (self.granularity, GRANULARITIES, "granularity"),
                                     (self.precision, PRECISIONS, "precision")):
            if value not in choices:
                raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")

    @property
    def key(self) -> str:
        """Readable stable label, e.g. ``n100/asymmetric/kl/per_channel/int8/w8``."""
        return (f"n{self.calib_samples}/{self.scheme}/{self.clipping}/{self.granularity}/"
                f"{self.precision}/w{self.weight_bits}")

    def config(self, mixed_layers: Sequence[str] = ()) -> QuantConfig:
        """The QuantConfig of this point; ``mixed_layers`` stay fp32 when precision is mixed."""
        overrides = {name: LayerOverride(fp32=True) for name in mixed_layers} \
            if self.precision == "mixed" else {}
        return QuantConfig(weight=QuantSpec(self.weight_bits, self.scheme, self.granularity),
                           activation=QuantSpec(8, self.scheme, "per_tensor"),
                           calibration=self.clipping, calib_samples=self.calib_samples,
                           overrides=tuple(overrides.items()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Knobs:
        names = {f.name for f in fields(cls)}
        if set(d) != names and set(d) != names - {"weight_bits"}:
            raise UserError(f"knobs must have the keys {sorted(names)}, got {sorted(d)}")
        return cls(**d)


KNOB_NAMES = tuple(f.name for f in fields(Knobs))


def config_key(config: QuantConfig) -> str:
    """Stable 16-hex-digit key of a configuration (hash of its canonical JSON)."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()[:16]


def calib_sizes(available: int) -> tuple[int, ...]:
    """Three calibration sizes scaled to the calibration set: 1, a tenth of it, all of it.

    The paper's {1, 1000, 10000} for ImageNet; {1, 100, 1000} for the 1,000-image Fashion-MNIST
    calibration split. Sizes that coincide on tiny sets are kept once.
    """
    if available < 1:
        raise UserError("the calibration set is empty: give at least one calibration sample")
    return tuple(sorted({1, max(1, available // 10), available}))


def mixed_precision_layers(layers: LayerTable) -> tuple[str, ...]:
    """The layers kept fp32 by "mixed" precision: the first and the last conv/linear layer."""
    names = layers.names
    if not names:
        raise UserError("the model has no conv or linear layer to quantize")
    return tuple(dict.fromkeys([names[0], names[-1]]))


class SearchSpace:
    """An ordered product of knob values.

    Parameters
    ----------
    dims : mapping of knob name -> sequence of values
        Every knob of :class:`Knobs` must appear (``weight_bits`` may be left out: 8).
    """

    def __init__(self, dims: Mapping[str, Sequence[Any]]) -> None:
        dims = dict(dims)
        dims.setdefault("weight_bits", (8,))
        unknown = set(dims) - set(KNOB_NAMES)
        missing = set(KNOB_NAMES) - set(dims)
        if unknown or missing:
            raise UserError(f"search space dimensions must be {list(KNOB_NAMES)}; unknown "
                            f"{sorted(unknown)}, missing {sorted(missing)}")
        for name, values in dims.items():
            if not values or len(set(values)) != len(values):
                raise UserError(f"search space dimension {name!r} needs distinct values, got "
                                f"{list(values)}")
        self.dims: dict[str, tuple[Any, ...]] = {n: tuple(dims[n]) for n in KNOB_NAMES}
        self._points = [Knobs(**dict(zip(KNOB_NAMES, combo, strict=True)))
                        for combo in itertools.product(*self.dims.values())]
        self._index = {p: i for i, p in enumerate(self._points)}

    @classmethod
    def paper(cls, *, calib_available: int = 1000) -> SearchSpace:
        """The published 96-configuration space (fewer when the calibration set is tiny)."""
        return cls({"calib_samples": calib_sizes(calib_available), "scheme": PAPER_SCHEMES,
                    "clipping": ("minmax", "kl"), "granularity": GRANULARITIES,
                    "precision": PRECISIONS})

    @classmethod
    def extended(cls, *, calib_available: int = 1000) -> SearchSpace:
        """The paper's space plus percentile and MSE clipping and 6-bit weights (384 points)."""
        return cls({"calib_samples": calib_sizes(calib_available), "scheme": PAPER_SCHEMES,
                    "clipping": ("minmax", "kl", "percentile", "mse"),
                    "granularity": GRANULARITIES, "precision": PRECISIONS,
                    "weight_bits": (8, 6)})

    def restrict(self, **values: Sequence[Any]) -> SearchSpace:
        """A subspace keeping only the given values of some knobs (in this space's order)."""
        dims = dict(self.dims)
        for name, keep in values.items():
            if name not in dims:
                raise UserError(f"unknown knob {name!r}; knobs: {', '.join(KNOB_NAMES)}")
            bad = [v for v in keep if v not in dims[name]]
            if bad:
                raise UserError(f"knob {name!r} has no values {bad} in this space; it has "
                                f"{list(dims[name])}")
            dims[name] = tuple(v for v in dims[name] if v in keep)
        return SearchSpace(dims)

    def __iter__(self) -> Iterator[Knobs]:
        return iter(self._points)

    def __len__(self) -> int:
        return len(self._points)

    def __getitem__(self, i: int) -> Knobs:
        return self._points[i]

    def __contains__(self, knobs: object) -> bool:
        return knobs in self._index

    def index(self, knobs: Knobs) -> int:
        """Position of ``knobs`` in the enumeration order."""
        return self._index[knobs]

    def to_dict(self) -> dict[str, list[Any]]:
        return {n: list(v) for n, v in self.dims.items()}


SPACES = ("paper", "extended")


def make_space(name: str, *, calib_available: int) -> SearchSpace:
    """A named space (``--space``): "paper" (96 configs) or "extended" (384)."""
    if name not in SPACES:
        raise UserError(f"unknown search space {name!r}; choose one of {', '.join(SPACES)}")
    factory = SearchSpace.paper if name == "paper" else SearchSpace.extended
    return factory(calib_available=calib_available)
