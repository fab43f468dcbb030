"""Calibration: activation ranges of the quantization points from real (or distilled) data.

The fp32 module is run with the points exposed as extra outputs (``ExposeTensors``), batch by
batch; only running statistics are kept (min/max, then |x| histograms for the clipping methods),
never the activations themselves. Histogram accumulation and the KL / MSE threshold searches run
in the native tvm-ffi extension.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import tvm

from tvm_compress.backend.build import InputSpec, build
from tvm_compress.errors import UserError
from tvm_compress.frontend.inputs import (
    Samples,
    as_specs,
    batches,
    check_samples,
    num_samples,
    take,
)
from tvm_compress.graph.qgraph import Point, QuantGraph
from tvm_compress.passes.expose_tensors import ExposeTensors, binding_positions
from tvm_compress.quant import native
from tvm_compress.quant.config import QuantConfig
from tvm_compress.quant.qparams import QParams, range_qparams

HISTOGRAM_BINS = 2048


@dataclass
class PointStats:
    lo: float = np.inf
    hi: float = -np.inf
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, np.int64))

    @property
    def max_abs(self) -> float:
        return max(abs(self.lo), abs(self.hi))


def _check_images(images: Samples, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    if num_samples(images) == 0:
        raise UserError("calibration set is empty: give at least one calibration sample")
    feed = check_samples(images, specs, "calibration")
    for name, arr in feed.items():
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise UserError(f"calibration samples of input '{name}' contain NaN or Inf; clean "
                            "the calibration data")
    return feed


def _progress(total: int, description: str, enabled: bool):  # noqa: ANN202
    from rich.progress import Progress

    progress = Progress(disable=not enabled, transient=True)
    return progress, progress.add_task(description, total=total)


def collect_stats(mod: tvm.IRModule, graph: QuantGraph, images: Samples,
                  spec: InputSpec | Sequence[InputSpec], *, histograms: bool,
                  progress: bool = True, target: str = "x86") -> dict[str, PointStats]:
    """Run the fp32 module on ``images`` (one array, or one per input name) and accumulate
    statistics for every calibrated point."""
    points = graph.calibrated_points
    specs = as_specs(spec)
    feed = _check_images(images, specs)
    positions = binding_positions(mod["main"], [p.var for p in points])
    compiled = build(ExposeTensors(positions)(mod), target=target, input_spec=specs)
    stats = {p.name: PointStats() for p in points}
    passes = 2 if histograms else 1
    batch = specs[0].shape[0]
    bar, task = _progress(passes * -(-num_samples(feed) // batch), "calibrating", progress)
    with bar:
        for pass_index in range(passes):
            for chunk, n in batches(feed, batch, pad="repeat"):
                outputs = compiled.vm["main"](*[tvm.runtime.tensor(chunk[s.name])
                                                for s in specs])
                for point, out in zip(points, list(outputs)[1:], strict=True):
                    _update(stats[point.name], out.numpy()[:n], point, pass_index)
                bar.advance(task)
    return stats


def _update(st: PointStats, x: np.ndarray, point: Point, pass_index: int) -> None:
    if pass_index == 0:
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise UserError(f"activation {point.name} has NaN/Inf on the calibration data; the "
                            "model or its weights are broken (check for NaN/Inf weights)")
        st.lo, st.hi = min(st.lo, lo), max(st.hi, hi)
    elif st.max_abs > 0:
        native.abs_histogram(np.ascontiguousarray(x, dtype=np.float32), st.hist,
                             max_abs=st.max_abs)


def clip_range(st: PointStats, config: QuantConfig, bits: int) -> tuple[float, float]:
    """The calibrated ``[lo, hi]`` of one point under the config's calibration method."""
    if config.calibration == "minmax" or st.max_abs == 0 or st.hist.sum() == 0:
        return st.lo, st.hi
    width = st.max_abs / HISTOGRAM_BINS
    nonnegative = st.lo >= 0
    levels = 2 ** bits - 1 if nonnegative else 2 ** (bits - 1) - 1
    if config.calibration == "percentile":
        cdf = np.cumsum(st.hist) / st.hist.sum()
        kept = int(np.searchsorted(cdf, config.percentile / 100.0)) + 1
    elif config.calibration == "kl":
        hist = st.hist
        if nonnegative:  # the ReLU's exact zeros pile up in bin 0 and drag the threshold down
            hist = hist.copy()
            hist[0] = 0
        kept, _ = native.kl_threshold(hist, num_quant_bins=levels + 1)
    else:  # mse
        kept, _ = native.mse_threshold(st.hist, max_abs=st.max_abs, num_levels=levels)
    threshold = min(kept, HISTOGRAM_BINS) * width
    return max(st.lo, -threshold), min(st.hi, threshold)


def activation_params(graph: QuantGraph, stats: dict[str, PointStats], config: QuantConfig
                      ) -> dict[str, QParams]:
    """QParams of every calibrated point from its statistics."""
    out = {}
    for point in graph.calibrated_points:
        spec = replace(config.activation, bits=point.bits)
        lo, hi = clip_range(stats[point.name], config, point.bits)
        out[point.name] = range_qparams(lo, hi, spec)
    return out


@dataclass
class CalibrationStats:
    """Statistics of calibrated points, reusable by configs that calibrate the same points on the
    same samples (method, scheme, granularity and bits may differ): see ``quantize(stats=...)``."""

    points: dict[str, PointStats]
    samples: int
    histograms: bool

    def check(self, graph: QuantGraph, config: QuantConfig, samples: int) -> None:
        missing = [p.name for p in graph.calibrated_points if p.name not in self.points]
        if missing:
            raise UserError(f"calibration stats lack {len(missing)} point(s) of this config "
                            f"(e.g. {missing[0]}); collect them with the same fp32 layers")
        if samples != self.samples:
            raise UserError(f"calibration stats were collected on {self.samples} samples but the "
                            f"config calibrates on {samples}; collect them again")
        if config.calibration != "minmax" and not self.histograms:
            raise UserError(f"calibration '{config.calibration}' needs histograms: collect the "
                            "stats with histograms=True")


def calibration_stats(mod: tvm.IRModule, graph: QuantGraph, config: QuantConfig,
                      images: Samples, spec: InputSpec | Sequence[InputSpec], *,
                      histograms: bool = True, progress: bool = True) -> CalibrationStats:
    """Statistics of ``graph``'s points on the first ``config.calib_samples`` images."""
    images = take(images, 0, config.calib_samples)
    points = collect_stats(mod, graph, images, spec, progress=progress, histograms=histograms)
    return CalibrationStats(points, num_samples(images), histograms)


def calibrate(mod: tvm.IRModule, graph: QuantGraph, config: QuantConfig, images: Samples,
              spec: InputSpec | Sequence[InputSpec], *, progress: bool = True,
              stats: CalibrationStats | None = None) -> dict[str, QParams]:
    """Activation QParams for ``graph``'s points from the first ``config.calib_samples`` images
    (or from ``stats`` collected before on the same samples)."""
    if stats is None:
        stats = calibration_stats(mod, graph, config, images, spec, progress=progress,
                                  histograms=config.calibration != "minmax")
    else:
        stats.check(graph, config, min(num_samples(images), config.calib_samples))
    return activation_params(graph, stats.points, config)
