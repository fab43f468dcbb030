"""CropChannels: physically remove channels from a Relax module, by channel group.

Requires: a module as the frontends produce it (NCHW conv2d / matmul with constant weights, with or
without ``batch_norm``) and a crop plan ``{group_id: kept channel indices}`` whose ids come from
:func:`tvm_compress.graph.channel_groups.analyze_channel_groups` on the same module.
Guarantees: every weight, bias / scale constant and BatchNorm parameter of a cropped group loses the
removed channels; depthwise convs get their new ``groups``; reshapes (flatten, channel shuffle) and
channel slices / splits get their new sizes; all shapes are re-inferred. Layer names are kept.
The result computes exactly what the input module computes when the removed channels are zero
everywhere (see :func:`zero_channels`, the masked reference).

Invalid plans (unknown or unprunable group, empty, duplicate or out-of-range indices) raise
``UserError``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvm_compress.graph.channel_groups import ChannelAnalysis, CropPlan, analyze
from tvm_compress.graph.channel_shapes import CH, slice_bounds, split_points
from tvm_compress.graph.dataflow import is_const, op_name

_BINARY_ZEROED = ("relax.add", "relax.subtract", "relax.maximum", "relax.minimum")


def _take(array: np.ndarray, axis: int, keep: np.ndarray | None, zero: bool) -> np.ndarray:
    """Crop ``array`` to ``keep`` along ``axis``, or (``zero``) set the other positions to 0."""
    if keep is None:
        return array
    if not zero:
        return np.take(array, keep, axis=axis)
    out = np.zeros_like(array)
    index = [slice(None)] * array.ndim
    index[axis] = keep
    out[tuple(index)] = array[tuple(index)]
    return out


@relax.expr_functor.mutator
class _Cropper(relax.PyExprMutator):
    """Crop (or, with ``zero=True``, zero) the channels that ``mask`` drops."""

    def __init__(self, mod: tvm.IRModule, analysis: ChannelAnalysis, mask: np.ndarray,
                 zero: bool) -> None:
        super().__init__(mod)
        self.flow = analysis.flow
        self.mask = mask
        self.zero = zero

    def kept(self, expr: relax.Expr) -> np.ndarray | None:
        elems = self.flow.maps.get(expr) if isinstance(expr, relax.Var) else None
        return None if elems is None else ChannelAnalysis.kept(elems, self.mask)

    def _emit(self, binding: relax.VarBinding, value: relax.Expr) -> None:
        """Bind ``value`` to a new variable with the old one's name (layer names survive)."""
        value = self.builder_.normalize(value)
        var_type = relax.DataflowVar if isinstance(binding.var, relax.DataflowVar) else relax.Var
        new_var = var_type(binding.var.name, value.ty)
        self.builder_.emit_normalized(relax.VarBinding(new_var, value))
        self.set_var_remap(binding.var, new_var)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        rewrite = _REWRITES.get(op_name(value) or "")
        new = getattr(self, rewrite)(binding.var, value) if rewrite is not None else None
        if new is None:
            super().visit_var_binding_(binding)
        else:
            self._emit(binding, new)

    def _args(self, call: relax.Call) -> list[relax.Expr]:
        return [self.visit_expr(a) for a in call.args]

    # ----------------------------------------------------------------------------- rewrites
    def _conv(self, var: relax.Var, call: relax.Call) -> relax.Expr | None:
        layer = self.flow.layers.get(var)
        if layer is None or var not in self.flow.maps or not is_const(call.args[1]):
            return None
        out_keep, in_keep = self.kept(var), self.kept(call.args[0])
        if out_keep is None and (in_keep is None or self.zero):
            return None
        weight = _take(call.args[1].value.numpy(), 0, out_keep, self.zero)
        data = self.visit_expr(call.args[0])
        if layer.kind == "conv" and not self.zero:
            weight = _take(weight, 1, in_keep, False)
        if layer.kind != "depthwise" or self.zero or in_keep is None:
            return relax.Call(call.op, [data, relax.const(weight)], call.attrs)
        a = call.attrs
        return relax.op.nn.conv2d(
            data, relax.const(weight), strides=a.strides, padding=a.padding, dilation=a.dilation,
            groups=len(in_keep), data_layout=a.data_layout, kernel_layout=a.kernel_layout,
            out_layout=a.out_layout, out_dtype=a.out_dtype)

    def _matmul(self, var: relax.Var, call: relax.Call) -> relax.Expr | None:
        if var not in self.flow.maps or var not in self.flow.layers:
            return None
        out_keep, in_keep = self.kept(var), self.kept(call.args[0])
        if out_keep is None and (in_keep is None or self.zero):
            return None
        weight = _take(call.args[1].value.numpy(), 1, out_keep, self.zero)
        if not self.zero:
            weight = _take(weight, 0, in_keep, False)
        return relax.Call(call.op, [self.visit_expr(call.args[0]), relax.const(weight)],
                          call.attrs)

    def _batch_norm(self, var: relax.Var, call: relax.Call) -> relax.Expr | None:
        keep = self.kept(call.args[0])
        if keep is None or var not in self.flow.tuples:
            return None
        args = self._args(call)
        # Zeroing gamma and beta makes the BN output exactly 0 on dropped channels.
        for i in range(1, 5):
            if not self.zero or i in (1, 2):
                args[i] = relax.const(_take(call.args[i].value.numpy(), 0, keep, self.zero))
        return relax.Call(call.op, args, call.attrs)

    def _binary(self, var: relax.Var, call: relax.Call) -> relax.Expr | None:
        const_pos = next((i for i, a in enumerate(call.args) if is_const(a)), None)
        if const_pos is None or var not in self.flow.maps:
            return None
        x = call.args[1 - const_pos]
        keep = self.kept(x)
        value = call.args[const_pos].value.numpy()
        axis = CH - (len(x.ty.shape) - value.ndim)
        if keep is None or not 0 <= axis < value.ndim or value.shape[axis] == 1:
            return None
        if self.zero and op_name(call) not in _BINARY_ZEROED:
            return None  # a scale multiplies a zero channel: nothing to do
        args = self._args(call)
        args[const_pos] = relax.const(_take(value, axis, keep, self.zero))
        return relax.Call(call.op, args, call.attrs)

    def _reshape(self, var: relax.Var, call: relax.Call) -> relax.Expr | None:
        if self.zero:
            return None
        target = [int(d) for d in call.args[1].values]
        if var in self.flow.shuffles:
            keep = self.kept(call.args[0])
            if keep is None:
                return None
            target[2] = len(keep) // self.flow.shuffles[var]
        else:
            keep = self.kept(var)
            if keep is None:
                return None
            target[CH] = len(keep)
        return relax.op.reshape(self.visit_expr(call.args[0]), target)

    def _strided_slice(self, var: relax.Var, call: relax.Call) -> relax.Expr | None:
        keep = self.kept(call.args[0])
        if self.zero or keep is None or var not in self.flow.channel_slices:
            return None
        old = len(self.flow.maps[call.args[0]])
        begin, end = slice_bounds(call, old) or (0, old)
        axes = [int(a) % len(call.args[0].ty.shape) for a in call.args[1].fields]
        begins = [int(b) for b in call.args[2].fields]
        ends = [int(e) for e in call.args[3].fields]
        i = axes.index(CH)
        begins[i], ends[i] = int(np.sum(keep < begin)), int(np.sum(keep < end))
        strides = [int(s) for s in call.args[4].fields] if len(call.args) > 4 else None
        return relax.op.strided_slice(self.visit_expr(call.args[0]), axes, begins, ends, strides,
                                      assume_inbound=call.attrs.assume_inbound)

    def _split(self, var: relax.Var, call: relax.Call) -> relax.Expr | None:
        keep = self.kept(call.args[0])
        if self.zero or keep is None or var not in self.flow.channel_slices:
            return None
        points = split_points(call, len(self.flow.maps[call.args[0]]))
        indices = [int(np.sum(keep < p)) for p in points[1:-1]]
        return relax.op.split(self.visit_expr(call.args[0]), indices, axis=call.attrs.axis)


# op -> method of _Cropper (by name: the mutator decorator hides the methods on the class)
_REWRITES = {
    "relax.nn.conv2d": "_conv", "relax.matmul": "_matmul", "relax.nn.batch_norm": "_batch_norm",
    "relax.reshape": "_reshape", "relax.strided_slice": "_strided_slice", "relax.split": "_split",
    **{op: "_binary" for op in ("relax.add", "relax.subtract", "relax.multiply", "relax.divide",
                                "relax.maximum", "relax.minimum")},
}


def _rewrite(mod: tvm.IRModule, plan: CropPlan, zero: bool) -> tvm.IRModule:
    analysis = analyze(mod)
    mask = analysis.kept_mask(plan)
    source = analysis.mod  # point-wise call_tir raised to Relax ops
    out = tvm.IRModule(dict(source.functions), attrs=source.attrs)
    if mask.all():
        return out
    out["main"] = _Cropper(out, analysis, mask, zero).visit_expr(source["main"])
    return out


@tvm.ir.transform.module_pass(opt_level=0, name="tvmc.CropChannels")
class CropChannels:
    """Remove the channels a crop plan drops from every weight, bias, BN and shape.

    Parameters
    ----------
    plan : mapping of int to list of int
        Channel group id -> indices of the channels to keep (any order; each once).
        Groups not in the plan keep all their channels.
    """

    def __init__(self, plan: CropPlan) -> None:
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        return _rewrite(mod, self.plan, zero=False)


def crop_channels(mod: tvm.IRModule, plan: CropPlan) -> tvm.IRModule:
    """Functional form of :class:`CropChannels`."""
    return CropChannels(plan)(mod)


def zero_channels(mod: tvm.IRModule, plan: CropPlan) -> tvm.IRModule:
    """The masked reference of a crop: same shapes, the dropped channels' producers zeroed.

    Zeroes, for every dropped channel, the conv / depthwise / linear output weights, the bias
    constants and the BatchNorm gamma and beta, so the channel is exactly 0 after each of them.
    Cropping equals this module when every group in ``plan`` is ``zero_preserving`` (no op with
    f(0) != 0, such as a sigmoid, between the producers and the consumers).
    """
    return _rewrite(mod, plan, zero=True)
