"""InsertQDQ: simulated quantization - quantize/dequantize pairs per a QuantConfig.

Requires: a BatchNorm-folded fp32 module (``FoldBatchNorm``) and the activation parameters of every
calibrated point of :func:`tvm_compress.qgraph.analyze` on that same module.
Guarantees: every quantized layer's weight becomes ``dequantize(int constant)``; every activation
point ``t`` is followed by ``dequantize(quantize(t))`` and all users of ``t`` read the dequantized
value. Layer names are kept. Layers the config keeps fp32 are untouched. The result runs in fp32
(simulation) and is the input of ``RealizeInteger``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvm_compress.qconfig import QuantConfig
from tvm_compress.qgraph import LayerSite, QuantGraph, analyze
from tvm_compress.qparams import QParams, weight_qparams

_DTYPE_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def qdq(bb: relax.BlockBuilder, x: relax.Expr, qp: QParams) -> relax.Expr:
    """Emit ``dequantize(quantize(x))`` (with a clip for narrow or sub-8-bit ranges)."""
    q = bb.emit(quantize_expr(x, qp))
    return bb.emit(dequantize_expr(q, qp))


def _scale_zp(qp: QParams) -> tuple[relax.Expr, relax.Expr]:
    return (relax.const(qp.scale.astype("float32")),
            relax.const(qp.zero_point.astype(qp.dtype)))


def quantize_expr(x: relax.Expr, qp: QParams) -> relax.Expr:
    scale, zp = _scale_zp(qp)
    q = relax.op.quantize(x, scale, zp, qp.axis, qp.dtype)
    if (qp.qmin, qp.qmax) != _DTYPE_RANGE[qp.dtype]:
        q = relax.op.clip(q, qp.qmin, qp.qmax)
    return q


def dequantize_expr(q: relax.Expr, qp: QParams) -> relax.Expr:
    scale, zp = _scale_zp(qp)
    return relax.op.dequantize(q, scale, zp, qp.axis, "float32")


def weight_params(site: LayerSite, config: QuantConfig) -> QParams:
    return weight_qparams(site.weight.value.numpy(), config.weight_spec(site.layer.name),
                          axis=site.weight_axis)


@relax.expr_functor.mutator
class _Inserter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, graph: QuantGraph, act: dict[str, QParams],
                 weights: dict[str, QParams]) -> None:
        super().__init__(mod)
        self.sites = {s.var: s for s in graph.layers}
        self.points = {p.var: p for p in graph.points.values()}
        self.act = {p.name: act[p.shares or p.name] for p in graph.points.values()}
        self.weights = weights
        self.params_done = False

    def _quantize_params(self) -> None:
        self.params_done = True
        for var, point in self.points.items():
            if isinstance(var, relax.Var) and not isinstance(var, relax.DataflowVar) and \
                    point.name == "input":
                self.set_var_remap(var, qdq(self.builder_, var, self.act[point.name]))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if not self.params_done:
            self._quantize_params()
        site = self.sites.get(binding.var)
        if site is None:
            super().visit_var_binding_(binding)
        else:
            call = self.visit_expr(binding.value)
            qp = self.weights[site.layer.name]
            wq = relax.const(qp.quantize(site.weight.value.numpy()))
            new_call = self.builder_.normalize(
                relax.Call(call.op, [call.args[0], dequantize_expr(wq, qp)], call.attrs))
            var_type = relax.DataflowVar if isinstance(binding.var, relax.DataflowVar) \
                else relax.Var
            new_var = var_type(binding.var.name, binding.var.ty)
            self.builder_.emit_normalized(relax.VarBinding(new_var, new_call))
            self.set_var_remap(binding.var, new_var)
        point = self.points.get(binding.var)
        if point is not None:
            current = self.get_var_remap(binding.var)
            if current is None:  # the binding was re-emitted unchanged
                current = binding.var
            self.set_var_remap(binding.var, qdq(self.builder_, current, self.act[point.name]))


def insert_qdq(mod: tvm.IRModule, config: QuantConfig, act_params: dict[str, QParams], *,
               weight_overrides: dict[str, QParams] | None = None) -> tvm.IRModule:
    """Functional form of :class:`InsertQDQ`."""
    return InsertQDQ(config, act_params, weight_overrides=weight_overrides)(mod)


@tvm.ir.transform.module_pass(opt_level=0, name="tvmc.InsertQDQ")
class InsertQDQ:
    """Insert weight dequantization and activation quantize/dequantize pairs.

    Parameters
    ----------
    config : QuantConfig
    act_params : dict
        Point name -> QParams for every calibrated point (``calibrate`` computes them).
    weight_overrides : dict, optional
        Layer name -> weight QParams to use instead of min/max of the weights (e.g. to match
        another tool's parameters exactly).
    """

    def __init__(self, config: QuantConfig, act_params: dict[str, QParams], *,
                 weight_overrides: dict[str, QParams] | None = None) -> None:
        self.config = config
        self.act_params = act_params
        self.weight_overrides = weight_overrides or {}

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        graph = analyze(mod, self.config)
        missing = [p.name for p in graph.calibrated_points if p.name not in self.act_params]
        if missing:
            raise ValueError(f"InsertQDQ: no activation parameters for points {missing[:5]}")
        weights = {s.layer.name: self.weight_overrides.get(s.layer.name)
                   or weight_params(s, self.config) for s in graph.layers}
        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        inserter = _Inserter(out, graph, self.act_params, weights)
        out["main"] = inserter.visit_expr(mod["main"])
        return relax.transform.DeadCodeElimination(["main"])(out)
