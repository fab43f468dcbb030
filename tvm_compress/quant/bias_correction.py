"""Bias correction of weight quantization error (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", 2019; empirical-mean variant).

Quantizing the weights shifts the mean of each output channel by ``(W_q - W) @ E[x]``; subtracting
that shift from the layer's bias removes the systematic part of the error. ``E[x]`` is the
per-input-channel mean of the layer's input on the calibration data (fp32, BN-folded module),
averaged over batch and spatial positions (zero padding at the borders is ignored). Layers
without a bias are left as they are.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvm_compress.backend.build import InputSpec, build
from tvm_compress.graph.dataflow import emit_named
from tvm_compress.graph.qgraph import LayerSite, QuantGraph
from tvm_compress.passes.expose_tensors import ExposeTensors, binding_positions
from tvm_compress.quant.qparams import QParams


def layer_input_means(mod: tvm.IRModule, graph: QuantGraph, images: np.ndarray,
                      spec: InputSpec) -> dict[str, np.ndarray]:
    """Per-input-channel mean of every quantized layer's data input on ``images``."""
    data = list(dict.fromkeys(s.data for s in graph.layers if isinstance(s.data, relax.Var)))
    compiled = build(ExposeTensors(binding_positions(mod["main"], data))(mod), input_spec=spec)
    sums: dict[relax.Var, np.ndarray] = {}
    count = 0
    batch = spec.shape[0]
    for start in range(0, len(images) - batch + 1, batch):
        outputs = list(compiled.vm["main"](tvm.runtime.tensor(
            np.ascontiguousarray(images[start:start + batch]))))[1:]
        for var, out in zip(data, outputs, strict=True):
            x = out.numpy().astype(np.float64)
            axes = (0, 2, 3) if x.ndim == 4 else tuple(range(x.ndim - 1))
            sums[var] = sums.get(var, 0) + x.mean(axis=axes)
        count += 1
    return {s.layer.name: sums[s.data] / max(count, 1) for s in graph.layers if s.data in sums}


def bias_shift(site: LayerSite, params: QParams, mean: np.ndarray) -> np.ndarray:
    """``(W_q - W) @ E[x]`` per output channel."""
    w = site.weight.value.numpy().astype(np.float64)
    error = params.dequantize(params.quantize(w)).astype(np.float64) - w
    if site.layer.kind == "linear":  # (K, M) weight: mean over K inputs
        return mean @ error
    groups = site.layer.groups
    out_ch, per_group = error.shape[:2]
    summed = error.sum(axis=(2, 3)).reshape(groups, out_ch // groups, per_group)
    return np.einsum("goi,gi->go", summed, mean.reshape(groups, per_group)).reshape(out_ch)


@relax.expr_functor.mutator
class _BiasRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, shifts: dict[relax.Var, tuple[relax.Var, np.ndarray]]
                 ) -> None:
        super().__init__(mod)
        self.shifts = shifts

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.shifts:
            super().visit_var_binding_(binding)
            return
        layer_var, shift = self.shifts[binding.var]
        value = binding.value
        args = []
        for arg in value.args:
            if isinstance(arg, tvm.ir.expr.Constant):
                bias = arg.value.numpy()
                arg = relax.const((bias.astype(np.float64) - shift.reshape(bias.shape))
                                  .astype(bias.dtype), str(bias.dtype))
            args.append(self.visit_expr(arg))
        new = relax.Call(value.op, args, value.attrs, value.ty_args)
        self.set_var_remap(binding.var, emit_named(
            self.builder_, new, binding.var.name,
            dataflow=isinstance(binding.var, relax.DataflowVar)))


def correct_biases(mod: tvm.IRModule, graph: QuantGraph, weights: dict[str, QParams],
                   means: dict[str, np.ndarray]) -> tvm.IRModule:
    """``mod`` with each quantized layer's bias reduced by its weight-quantization mean shift."""
    shifts = {}
    for site in graph.layers:
        name = site.layer.name
        if site.bias_var is None or name not in means or name not in weights:
            continue
        shifts[site.bias_var] = (site.var, bias_shift(site, weights[name], means[name]))
    if not shifts:
        return mod
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = _BiasRewriter(out, shifts).visit_expr(mod["main"])
    return out
