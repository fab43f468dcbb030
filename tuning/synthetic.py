"""A synthetic evaluator: accuracy is a known function of the knobs and the model descriptors.

For testing and comparing tuners without compiling anything. The function mimics what PTQ does
to real CNNs (one calibration image is poor, per-tensor weights hurt depthwise-heavy models,
power-of-two scales cost accuracy, KL clipping helps deep models, keeping the first and last
layers fp32 helps small models most), so that what one model teaches about another is partly
true, as in the paper's cross-model transfer. A seeded hash adds small per-(model, config)
noise, which also makes the best configuration of each model unique.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path

from tvm_compress.quant.config import QuantConfig
from tvm_compress.tuning.evaluator import Evaluator
from tvm_compress.tuning.quantune.features import DESCRIPTORS
from tvm_compress.tuning.quantune.space import Knobs
from tvm_compress.tuning.records import RecordsFile, Result

# Descriptor sets shaped like the six Fashion-MNIST zoo families (counts, not the real ones).
SYNTHETIC_MODELS: dict[str, dict[str, float]] = {
    "resnet": {"nodes": 60, "conv": 17, "bn": 17, "activation": 17, "skip": 8, "depthwise": 0,
               "pointwise": 3, "params": 700_000},
    "mobilenet_v2": {"nodes": 150, "conv": 52, "bn": 52, "activation": 35, "skip": 10,
                     "depthwise": 17, "pointwise": 34, "params": 2_200_000},
    "shufflenet_v2": {"nodes": 170, "conv": 56, "bn": 56, "activation": 36, "skip": 0,
                      "depthwise": 20, "pointwise": 36, "params": 1_300_000},
    "squeezenet": {"nodes": 70, "conv": 26, "bn": 26, "activation": 26, "skip": 0,
                   "depthwise": 0, "pointwise": 17, "params": 730_000},
    "googlenet": {"nodes": 190, "conv": 57, "bn": 57, "activation": 57, "skip": 0,
                  "depthwise": 0, "pointwise": 36, "params": 5_600_000},
    "vgg": {"nodes": 40, "conv": 13, "bn": 13, "activation": 15, "skip": 0, "depthwise": 0,
            "pointwise": 0, "params": 9_000_000},
}


def _noise(model: str, knobs: Knobs, seed: int) -> float:
    """Deterministic value in [-1, 1) per (model, config, seed)."""
    digest = hashlib.sha256(f"{seed}|{model}|{knobs.key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 63 - 1.0


def synthetic_accuracy(knobs: Knobs, d: Mapping[str, float], *, fp32: float = 0.9,
                       calib_available: int = 1000) -> float:
    """Noise-free synthetic accuracy of a configuration on a model with descriptors ``d``."""
    dw = d["depthwise"] / max(d["conv"], 1.0)
    depth = math.log10(max(d["nodes"], 10.0))
    level = math.log10(knobs.calib_samples) / max(math.log10(calib_available), 1e-9)
    loss = 0.03 * (1.0 - level) ** 2 * (1.0 + d["skip"] / 10.0)
    loss += {"asymmetric": 0.0, "symmetric": 0.002 + 0.006 * dw,
             "symmetric_uint8": 0.001 + 0.01 * (1.0 - d["activation"] / max(d["conv"], 1.0)),
             "power_of_two": 0.008 + 0.02 * dw}[knobs.scheme]
    loss += {"minmax": 0.006 * (depth - 1.4), "kl": 0.003 + 0.012 * (1.0 - level),
             "percentile": 0.002 * depth + 0.004, "mse": 0.003 * depth}[knobs.clipping]
    if knobs.granularity == "per_tensor":
        loss += 0.003 + 0.05 * dw
    if knobs.precision == "mixed":
        loss -= 0.004 + 0.004 * (6.5 - math.log10(d["params"]))
    loss += 0.004 * (8 - knobs.weight_bits) ** 1.5
    return fp32 - loss


class SyntheticEvaluator(Evaluator):
    """Evaluator over :func:`synthetic_accuracy` (records, cache and resume as the real one).

    Parameters
    ----------
    name : str
        Model name; a key of :data:`SYNTHETIC_MODELS` unless ``descriptors`` are given.
    noise : float
        Amplitude of the deterministic per-config noise added to the accuracy.
    """

    def __init__(self, name: str, *, descriptors: Mapping[str, float] | None = None,
                 fp32: float = 0.9, calib_available: int = 1000, noise: float = 0.0005,
                 seed: int = 0, records: RecordsFile | str | Path | None = None,
                 measure_latency: bool = False) -> None:
        d = dict(descriptors if descriptors is not None else SYNTHETIC_MODELS[name])
        if set(d) != set(DESCRIPTORS):
            raise ValueError(f"descriptors must be {DESCRIPTORS}")
        self.fp32, self.calib_available, self.noise, self.seed = fp32, calib_available, noise, seed
        model_id = hashlib.sha256(f"synthetic|{name}|{sorted(d.items())}".encode()).hexdigest()
        super().__init__(model=f"synthetic:{name}", model_id=model_id[:16],
                         context=f"synthetic-{seed}", target="none", descriptors=d,
                         mixed_layers=("first", "last"), records=records,
                         measure_latency=measure_latency)

    def true_accuracy(self, knobs: Knobs) -> float:
        """What :meth:`measure` returns for ``knobs`` (noise included)."""
        acc = synthetic_accuracy(knobs, self.descriptors, fp32=self.fp32,
                                 calib_available=self.calib_available)
        return round(acc + self.noise * _noise(self.model, knobs, self.seed), 6)

    def measure(self, knobs: Knobs, config: QuantConfig) -> Result:
        params = self.descriptors["params"]
        kept = 0.02 if knobs.precision == "mixed" else 0.0
        size = int(params * ((1 - kept) * knobs.weight_bits / 8 + kept * 4))
        latency = None
        if self.measure_latency:
            latency = 1.0 + 0.2 * (knobs.granularity == "per_channel") + 0.5 * kept * 10 \
                + 0.1 * (knobs.scheme == "asymmetric")
        return Result(accuracy=self.true_accuracy(knobs), weight_bytes=size, latency_ms=latency)

    def measure_baseline(self) -> Result:
        return Result(accuracy=self.fp32, weight_bytes=int(self.descriptors["params"] * 4),
                      latency_ms=2.0 if self.measure_latency else None)
