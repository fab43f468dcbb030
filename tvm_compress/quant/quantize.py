"""``quantize(model, config, calib_data)``: post-training quantization inside TVM.

Pipeline: FoldBatchNorm -> analyze (layers, activation points) -> calibrate -> InsertQDQ
(simulated) -> RealizeInteger (integer kernels). Layers the realization cannot handle stay fp32
and are reported, never silently wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm

from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import Model
from tvm_compress.frontend.inputs import Samples, num_samples, take
from tvm_compress.graph.dataflow import bindings, op_name
from tvm_compress.graph.qgraph import QuantGraph, analyze
from tvm_compress.passes.fold_batch_norm import FoldBatchNorm
from tvm_compress.passes.insert_qdq import InsertQDQ, weight_params
from tvm_compress.passes.realize_integer import RealizeInteger
from tvm_compress.quant.calibration import CalibrationStats, calibrate, calibration_stats
from tvm_compress.quant.config import QuantConfig
from tvm_compress.quant.qparams import QParams, channel_bits_qparams
from tvm_compress.runtime.metrics import weight_bytes

_FLOAT_LAYER_OPS = ("relax.nn.conv2d", "relax.matmul")


@dataclass
class QuantizedModel:
    """Result of :func:`quantize`: the realized model plus everything that defines it."""

    model: Model                 # realized integer module (``model.mod``)
    simulated: tvm.IRModule      # the QDQ module it was realized from
    folded: tvm.IRModule         # the fp32 BN-folded module (the reference for accuracy)
    config: QuantConfig
    act_params: dict[str, QParams]
    weight_params: dict[str, QParams]
    graph: QuantGraph
    fp32_layers: list[str] = field(default_factory=list)

    @property
    def weight_bits(self) -> dict[str, int]:
        return {s.layer.name: self.config.weight_spec(s.layer.name).bits for s in self.graph.layers}

    @property
    def weight_bytes(self) -> int:
        """Conv / linear weights at their real bit-widths plus int32 biases."""
        return weight_bytes(self.model.mod, self.weight_bits)

    @property
    def fp32_weight_bytes(self) -> int:
        return weight_bytes(self.folded)

    def summary(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "quantized_layers": len(self.graph.layers),
                "fp32_layers": self.fp32_layers, "weight_bytes": self.weight_bytes,
                "fp32_weight_bytes": self.fp32_weight_bytes,
                "activation_points": len(self.graph.points)}


def float_layers(mod: tvm.IRModule) -> list[str]:
    """Conv / matmul calls still computing in fp32 (their variable names)."""
    return [b.var.name for b in bindings(mod["main"])
            if op_name(b.value) in _FLOAT_LAYER_OPS and str(b.value.ty.dtype) == "float32"
            and str(b.value.args[0].ty.dtype) == "float32"]


def folded_weight_bytes(model: Model) -> int:
    """fp32 weight + bias bytes of a model with its BatchNorms folded (as it is deployed)."""
    return weight_bytes(FoldBatchNorm()(model.mod))


def collect_calibration(model: Model, config: QuantConfig, calib_data: np.ndarray, *,
                        histograms: bool = True, progress: bool = True) -> CalibrationStats:
    """Calibration statistics to pass to :func:`quantize` as ``stats=`` for several configs that
    share the calibrated points and samples (same overrides and ``calib_samples``; method, scheme,
    granularity and bits may differ), so the fp32 model runs on the data once."""
    calib_data = _check_calib(calib_data)
    folded = FoldBatchNorm()(model.mod)
    return calibration_stats(folded, analyze(folded, config), config, calib_data, model.inputs,
                             histograms=histograms, progress=progress)


def _check_calib(calib_data: Samples) -> Samples:
    if not isinstance(calib_data, Mapping):
        calib_data = np.asarray(calib_data)
        if calib_data.ndim == 0:
            raise UserError("calibration set is empty: give at least one calibration sample")
    if num_samples(calib_data) == 0:
        raise UserError("calibration set is empty: give at least one calibration sample")
    return calib_data


def quantize(model: Model, config: QuantConfig, calib_data: np.ndarray, *, realize: bool = True,
             progress: bool = True, stats: CalibrationStats | None = None,
             bias_correction: bool = False,
             channel_bits: dict[str, np.ndarray] | None = None) -> QuantizedModel:
    """Quantize a model with a configuration and calibration data.

    Parameters
    ----------
    model : Model
        From :func:`tvm_compress.load` / ``from_torch`` / ``from_onnx``.
    config : QuantConfig
        Bits, scheme, granularity, calibration method and sample count, per-layer overrides.
    calib_data : np.ndarray
        Calibration inputs (N, ...) matching the model's per-sample shape; the first
        ``config.calib_samples`` are used.
    realize : bool
        False keeps the simulated (QDQ) module as ``model.mod``.
    stats : CalibrationStats, optional
        From :func:`collect_calibration` on the same ``calib_data``: skips running the model.
    bias_correction : bool
        Subtract each layer's weight-quantization mean shift ``(W_q - W) @ E[x]`` from its bias
        (``tvm_compress.quant.bias_correction``; one more fp32 pass over the calibration data).
    channel_bits : mapping of layer name -> bits per output channel, optional
        Per-channel weight bit-widths (AJPQ plans); zeros mark channels already cropped away and
        are dropped. Those layers get symmetric per-channel weights at these widths.
    """
    calib_data = _check_calib(calib_data)
    _check_weights(model.mod)
    folded = FoldBatchNorm()(model.mod)
    graph = analyze(folded, config)
    spec = model.inputs
    act = calibrate(folded, graph, config, calib_data, spec, progress=progress, stats=stats)
    weights = {s.layer.name: weight_params(s, config) for s in graph.layers}
    weights.update(_channel_bit_weights(graph, channel_bits or {}))
    source = folded
    if bias_correction:
        from tvm_compress.quant.bias_correction import correct_biases, layer_input_means

        if len(spec) != 1:
            raise UserError("bias correction handles single-input models only; quantize "
                            "without it")
        means = layer_input_means(folded, graph, take(calib_data, 0, config.calib_samples),
                                  spec[0])
        source = correct_biases(folded, graph, weights, means)
        graph = analyze(source, config)  # same names, the new bias bindings
    simulated = InsertQDQ(config, act, weight_overrides=weights)(source)
    mod = RealizeInteger()(simulated) if realize else simulated
    fp32 = sorted(set(graph.fp32_layers) | set(float_layers(mod))) if realize else \
        list(graph.fp32_layers)
    return QuantizedModel(model.with_mod(mod), simulated, folded, config, act, weights, graph,
                          fp32)


def _channel_bit_weights(graph: QuantGraph, channel_bits: dict[str, np.ndarray]
                         ) -> dict[str, QParams]:
    sites = {s.layer.name: s for s in graph.layers}
    unknown = sorted(set(channel_bits) - set(sites))
    if unknown:
        raise UserError(f"per-channel bits name layers that are not quantized here: "
                        f"{', '.join(unknown[:5])}; see `tvm-compress inspect MODEL`")
    out = {}
    for name, bits in channel_bits.items():
        bits = np.asarray(bits)
        site = sites[name]
        out[name] = channel_bits_qparams(site.weight.value.numpy(), site.weight_axis,
                                         bits[bits > 0])
    return out


def _check_weights(mod: tvm.IRModule) -> None:
    from tvm import relax

    bad: list[str] = []

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, tvm.runtime.Tensor):
            arr = expr.value.numpy()
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                bad.append(str(arr.shape))

    relax.analysis.post_order_visit(mod["main"], visit)
    if bad:
        raise UserError(f"the model has NaN/Inf in {len(bad)} weight tensor(s) (shapes "
                        f"{', '.join(bad[:3])}); fix the checkpoint before quantizing")
