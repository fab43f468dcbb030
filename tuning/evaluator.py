"""Evaluators: measure one configuration, cached by (model, data, target, config) in records.

:class:`Evaluator` holds the cache and the records file; a subclass says how to measure.
:class:`QuantEvaluator` is the real one: it quantizes the model with the configuration, builds
the realized integer module for the target and measures top-1 accuracy on a validation split
(and weight bytes, and latency when asked). Each finished trial is appended to the records file
before :meth:`Evaluator.evaluate` returns, so a rerun of the same search replays the measured
trials from the cache and continues where the interrupted one stopped.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import tvm

from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import Model
from tvm_compress.quant.calibration import CalibrationStats
from tvm_compress.quant.config import QuantConfig
from tvm_compress.tuning.quantune.features import model_descriptors
from tvm_compress.tuning.quantune.space import Knobs, config_key, mixed_precision_layers
from tvm_compress.tuning.records import BASELINE_KEY, Record, RecordsFile, Result


class Evaluator(ABC):
    """Cached, recorded measurement of configurations of one model on one data set.

    Subclasses set ``model``, ``model_id``, ``context``, ``target``, ``descriptors`` and
    ``mixed_layers`` (through ``__init__``) and implement :meth:`measure` and
    :meth:`measure_baseline`.
    """

    def __init__(self, *, model: str, model_id: str, context: str, target: str,
                 descriptors: dict[str, float], mixed_layers: Sequence[str],
                 records: RecordsFile | str | Path | None = None,
                 measure_latency: bool = False) -> None:
        self.model, self.model_id, self.context, self.target = model, model_id, context, target
        self.descriptors = dict(descriptors)
        self.mixed_layers = tuple(mixed_layers)
        self.records = records if isinstance(records, RecordsFile) else RecordsFile(records)
        self.measure_latency = measure_latency
        self._cache = {r.key: r.result for r in self.records.latest().values()
                       if r.identity[:3] == (model_id, context, target)}
        self.measured = 0  # trials measured (not replayed) by this evaluator

    def config(self, knobs: Knobs) -> QuantConfig:
        return knobs.config(self.mixed_layers)

    def cached(self, knobs: Knobs) -> Result | None:
        """The recorded result of ``knobs`` if it satisfies this evaluator's measurements."""
        return self._usable(self._cache.get(config_key(self.config(knobs))))

    def _usable(self, result: Result | None) -> Result | None:
        if result is None or (self.measure_latency and result.latency_ms is None
                              and result.error is None):
            return None
        return result

    def evaluate(self, knobs: Knobs) -> Result:
        """Result of one configuration: from the records when measured before, else measured
        now and appended to the records."""
        config = self.config(knobs)
        key = config_key(config)
        hit = self._usable(self._cache.get(key))
        if hit is not None:
            return hit
        start = time.perf_counter()
        try:
            result = self.measure(knobs, config)
        except UserError as exc:  # the core rejects this config for this model: a failed trial
            result = Result(accuracy=0.0, error=str(exc))
        result = replace(result, seconds=round(time.perf_counter() - start, 6))
        self._store(key, result, knobs, config)
        return result

    def baseline(self) -> Result:
        """The fp32 model's result (recorded like a trial under the key ``"fp32"``)."""
        hit = self._usable(self._cache.get(BASELINE_KEY))
        if hit is not None:
            return hit
        start = time.perf_counter()
        result = replace(self.measure_baseline(), seconds=round(time.perf_counter() - start, 6))
        self._store(BASELINE_KEY, result, None, None)
        return result

    def _store(self, key: str, result: Result, knobs: Knobs | None,
               config: QuantConfig | None) -> None:
        self.records.append(Record(model=self.model, model_id=self.model_id,
                                   context=self.context, target=self.target, key=key,
                                   result=result, descriptors=self.descriptors, knobs=knobs,
                                   config=config))
        self._cache[key] = result
        if knobs is not None:
            self.measured += 1

    @abstractmethod
    def measure(self, knobs: Knobs, config: QuantConfig) -> Result:
        """Measure one configuration (``seconds`` is filled in by :meth:`evaluate`)."""

    @abstractmethod
    def measure_baseline(self) -> Result:
        """Measure the fp32 model."""


def model_fingerprint(mod: tvm.IRModule) -> str:
    """Stable hash of a module's operators and constant values (the same across processes)."""
    from tvm import relax

    from tvm_compress.graph.dataflow import bindings, op_name

    digest = hashlib.sha256()
    for b in bindings(mod["main"]):
        digest.update(f"{op_name(b.value)}:{b.value.ty};".encode())

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, tvm.runtime.Tensor):
            digest.update(np.ascontiguousarray(expr.value.numpy()).tobytes())

    relax.analysis.post_order_visit(mod["main"], visit)
    return digest.hexdigest()[:16]


def data_fingerprint(*arrays: np.ndarray | None) -> str:
    digest = hashlib.sha256()
    for arr in arrays:
        if arr is None:
            digest.update(b"none")
            continue
        arr = np.ascontiguousarray(arr)
        digest.update(f"{arr.dtype}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()[:16]


class QuantEvaluator(Evaluator):
    """Quantize, build for ``target`` and measure on a validation split.

    Parameters
    ----------
    model : Model
        The fp32 model (BatchNorms unfolded, as imported).
    calib : np.ndarray
        Calibration inputs; a configuration uses the first ``calib_samples`` of them.
    images, labels : np.ndarray
        Validation inputs and integer labels. Without labels, "accuracy" is top-1 agreement
        with the fp32 model.
    target : str
        Target preset to build for; latency is only measured on host-runnable targets.
    records : path or RecordsFile, optional
        Where trials are appended and replayed from.
    measure_latency : bool
        Also measure the median latency (``latency_repeat`` timed runs).
    mixed_layers : sequence of str, optional
        Layers "mixed" precision keeps fp32 (default: first and last layer).
    schedule : {"default", "none"}
        Passed to :func:`tvm_compress.backend.build.build`; part of the cache identity, since it
        changes latency.
    """

    def __init__(self, model: Model, *, calib: np.ndarray, images: np.ndarray,
                 labels: np.ndarray | None = None, target: str = "x86",
                 records: RecordsFile | str | Path | None = None, measure_latency: bool = False,
                 latency_repeat: int = 30, mixed_layers: Sequence[str] | None = None,
                 schedule: str = "default") -> None:
        if len(images) == 0:
            raise UserError("the validation set is empty: give at least one image")
        if labels is not None and len(labels) != len(images):
            raise UserError(f"validation set has {len(images)} images but {len(labels)} labels")
        if len(calib) == 0:
            raise UserError("the calibration set is empty: give at least one calibration sample")
        self.fp32_model = model
        self.calib, self.images, self.labels = calib, images, labels
        self.latency_repeat, self.schedule = latency_repeat, schedule
        self._reference: np.ndarray | None = None
        self._stats: dict[tuple[object, ...], CalibrationStats] = {}
        self._folded: Model | None = None  # BatchNorms folded once, not once per trial
        super().__init__(model=model.name, model_id=model_fingerprint(model.mod),
                         context=data_fingerprint(calib, images, labels)
                         + ("" if schedule == "default" else f"/{schedule}"), target=target,
                         descriptors=model_descriptors(model.mod),
                         mixed_layers=mixed_layers or mixed_precision_layers(model.layers),
                         records=records, measure_latency=measure_latency)

    def _run(self, model: Model, *, is_reference: bool = False) -> Result:
        from tvm_compress.backend.build import build
        from tvm_compress.runtime.metrics import accuracy, top1_agreement

        compiled = build(model, target=self.target, schedule=self.schedule)
        logits = compiled.predict(self.images)
        if is_reference:
            self._reference = logits
        if self.labels is not None:
            acc = accuracy(logits, self.labels)
        else:
            acc = top1_agreement(logits, self.reference())
        latency = compiled.latency(repeat=self.latency_repeat).median_ms \
            if self.measure_latency else None
        return Result(accuracy=acc, latency_ms=latency)

    def reference(self) -> np.ndarray:
        """The fp32 model's outputs on the validation images (computed once)."""
        if self._reference is None:
            from tvm_compress.backend.build import build

            compiled = build(self.fp32_model, target=self.target, schedule=self.schedule)
            self._reference = compiled.predict(self.images)
        return self._reference

    def measure(self, knobs: Knobs, config: QuantConfig) -> Result:
        from tvm_compress.quant.quantize import quantize

        qmodel = quantize(self.folded_model(), config, self.calib, progress=False,
                          stats=self._calibration_stats(config))
        return replace(self._run(qmodel.model), weight_bytes=qmodel.weight_bytes)

    def folded_model(self) -> Model:
        """The fp32 model with its BatchNorms folded (quantize folds again: a no-op then)."""
        if self._folded is None:
            from tvm_compress.passes.fold_batch_norm import FoldBatchNorm

            self._folded = self.fp32_model.with_mod(FoldBatchNorm()(self.fp32_model.mod))
        return self._folded

    def _calibration_stats(self, config: QuantConfig) -> CalibrationStats:
        """Calibration statistics shared by every config that calibrates the same points on the
        same samples (same ``calib_samples`` and fp32 layers): the fp32 model runs on the
        calibration data once per such group instead of once per trial."""
        from tvm_compress.quant.quantize import collect_calibration

        key = (min(config.calib_samples, len(self.calib)), config.overrides)
        if key not in self._stats:
            self._stats[key] = collect_calibration(self.folded_model(), config, self.calib,
                                                   histograms=True, progress=False)
        return self._stats[key]

    def measure_baseline(self) -> Result:
        from tvm_compress.quant.quantize import folded_weight_bytes

        return replace(self._run(self.fp32_model, is_reference=True),
                       weight_bytes=folded_weight_bytes(self.fp32_model))
