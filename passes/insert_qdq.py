"""InsertQDQ: simulated quantization - quantize/dequantize pairs per a QuantConfig.

Requires: a BatchNorm-folded fp32 module (``FoldBatchNorm``) and the activation parameters of every
calibrated point of :func:`tvm_compress.graph.qgraph.analyze` on that same module.
Guarantees: every quantized layer's weight becomes ``dequantize(int constant)``; every activation
point ``t`` is followed by ``dequantize(quantize(t))`` and all users of ``t`` read the dequantized
value. Layer names are kept. Layers the config keeps fp32 are untouched. The result runs in fp32
(simulation) and is the input of ``RealizeInteger``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvm_compress.graph.dataflow import emit_named
from tvm_compress.graph.qgraph import LayerSite, QuantGraph, analyze
from tvm_compress.quant.config import QuantConfig
from tvm_compress.quant.qparams import QParams, weight_qparams

_DTYPE_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def int_tensor_name(point: str) -> str:
    """Name of the variable holding a point's integer values (kept by RealizeInteger)."""
    return "q_" + "".join(c if c.isalnum() else "_" for c in point)


def qdq(bb: relax.BlockBuilder, x: relax.Expr, qp: QParams, point: str) -> relax.Expr:
    """Emit ``dequantize(quantize(x))`` (with a clip for narrow or sub-8-bit ranges)."""
    q = bb.emit(quantize_expr(x, qp), name_hint=int_tensor_name(point))
    return bb.emit(dequantize_expr(q, qp))


def _scale_zp(qp: QParams) -> tuple[relax.Expr, relax.Expr]:
    return (relax.const(qp.scale.astype("float32")),
            relax.const(qp.zero_point.astype(qp.dtype)))


def quantize_expr(x: relax.Expr, qp: QParams) -> relax.Expr:
    """``quantize`` to the dtype range, clipped when the range is narrower (nested call: the
    clip reads the quantize directly, so RealizeInteger sees one integer tensor)."""
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
        self.bias_sites = {s.bias_var: s for s in graph.layers if s.bias_var is not None}
        self.points = {p.var: p for p in graph.points.values()}
        self.act = {p.name: act[p.shares or p.name] for p in graph.points.values()}
        self.weights = weights
        self.params_done = False

    def _quantize_params(self) -> None:
        self.params_done = True
        for var, point in self.points.items():
            if isinstance(var, relax.Var) and not isinstance(var, relax.DataflowVar) and \
                    (point.name == "input" or point.name.startswith("input:")):
                self.set_var_remap(var, qdq(self.builder_, var, self.act[point.name],
                                            point.name))

    def _emit(self, binding: relax.VarBinding, value: relax.Expr) -> None:
        """Bind ``value`` to a new variable with the old one's name (layer names survive)."""
        self.set_var_remap(binding.var, emit_named(
            self.builder_, value, binding.var.name,
            dataflow=isinstance(binding.var, relax.DataflowVar)))

    def _int32_bias(self, binding: relax.VarBinding, site: LayerSite) -> relax.Expr:
        """``add(layer, dequantize(int32 bias))`` with the bias in accumulator units, as the
        integer kernel will add it (ONNX QDQ convention: scale = input scale x weight scale)."""
        add = binding.value
        const_pos = 0 if isinstance(add.args[0], tvm.ir.expr.Constant) else 1
        bias = add.args[const_pos].value.numpy()
        point = self.points[site.data]
        x_scale = float(self.act[point.name].scale)
        w_scale = self.weights[site.layer.name].scale.astype(np.float64)
        scale = (x_scale * w_scale).astype(np.float32)
        channel_axis = next(i for i, d in enumerate(bias.shape) if d > 1) if bias.size > 1 \
            else bias.ndim - 1
        shape = [1] * bias.ndim
        shape[channel_axis] = -1
        # in float64: float32 rounds the clip bound 2^31 - 1 up to 2^31, which the cast turns
        # into -2^31 (a saturated bias of a near-dead channel, weights ~1e-20, changed sign)
        wide = bias.astype(np.float64)
        q = np.round(wide / scale.reshape(shape) if scale.ndim else wide / scale)
        q = np.clip(q, -(2**31 - 1), 2**31 - 1).astype(np.int32)
        dq = relax.op.dequantize(relax.const(q, "int32"), relax.const(scale),
                                 relax.const(np.zeros_like(scale, dtype=np.int32), "int32"),
                                 channel_axis if scale.ndim else -1, "float32")
        args = [self.visit_expr(a) for a in add.args]
        args[const_pos] = dq
        return relax.op.add(*args)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if not self.params_done:
            self._quantize_params()
        site = self.sites.get(binding.var)
        if binding.var in self.bias_sites:
            self._emit(binding, self._int32_bias(binding, self.bias_sites[binding.var]))
        elif site is None:
            super().visit_var_binding_(binding)
        else:
            call = self.visit_expr(binding.value)
            qp = self.weights[site.layer.name]
            wq = relax.const(qp.quantize(site.weight.value.numpy()))
            self._emit(binding, relax.Call(call.op, [call.args[0], dequantize_expr(wq, qp)],
                                           call.attrs))
        point = self.points.get(binding.var)
        if point is not None:
            current = self.get_var_remap(binding.var)
            if current is None:  # the binding was re-emitted unchanged
                current = binding.var
            self.set_var_remap(binding.var,
                               qdq(self.builder_, current, self.act[point.name], point.name))


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
