"""Metrics comparing a model's outputs with labels and with its fp32 reference."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvm_compress.graph.dataflow import DataflowView, is_const, op_name


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` (N, classes) against integer ``labels`` (N,)."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of samples where the top-1 class equals the reference model's top-1 class."""
    return float(np.mean(np.argmax(logits, axis=-1) == np.argmax(reference, axis=-1)))


def sqnr_db(output: np.ndarray, reference: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``output`` vs ``reference`` in dB (inf if equal)."""
    noise = float(np.sum((output.astype(np.float64) - reference) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def constant_bytes(mod: tvm.IRModule) -> int:
    """Bytes of all tensor constants in the module's Relax functions (each counted once)."""
    seen: set[relax.Expr] = set()

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, tvm.runtime.Tensor):
            seen.add(expr)

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sum(_nbytes(c, None) for c in seen)


def _nbytes(const: tvm.ir.expr.Constant, bits: int | None) -> int:
    arr = const.value
    n = int(np.prod(arr.shape))
    b = bits if bits is not None else tvm.runtime.DataType(arr.dtype).bits
    return (n * b + 7) // 8


def weight_bytes(mod: tvm.IRModule, bits: dict[str, int] | None = None) -> int:
    """Bytes of the conv / linear weights and biases, at their real bit-widths.

    ``bits`` gives the storage bits of a layer's weight (sub-8-bit weights are stored packed);
    without it a weight counts at its dtype's size. Weights are found through dequantize /
    transpose ops, biases as the constant added right after the layer (or its dequantize).
    For an unfolded fp32 model the BatchNorm parameters are not counted: compare folded models.
    """
    view = DataflowView.of(mod["main"])
    total = 0
    for b in view.bindings:
        if op_name(b.value) not in ("relax.nn.conv2d", "relax.matmul"):
            continue
        weight = _through_dequantize(view, b.value.args[1])
        if not is_const(weight):
            continue
        total += _nbytes(weight, (bits or {}).get(b.var.name))
        bias = _bias_after(view, b.var)
        if bias is not None:
            total += _nbytes(bias, None)
    return total


def _bias_after(view: DataflowView, var: relax.Var) -> tvm.ir.expr.Constant | None:
    """The constant bias added to a layer's output, possibly after it is dequantized
    (astype / multiply by the scale) in an integer graph."""
    for _ in range(4):
        user = view.single_user(var)
        if user is None:
            return None
        value = view.values[user]
        if op_name(value) == "relax.add":
            for arg in value.args:
                if not arg.same_as(var):
                    bias = _through_dequantize(view, arg)
                    return bias if is_const(bias) else None
        if op_name(value) not in ("relax.astype", "relax.multiply"):
            return None
        var = user
    return None


def _through_dequantize(view: DataflowView, expr: relax.Expr) -> relax.Expr:
    expr = view.resolve(expr)
    while op_name(expr) in ("relax.dequantize", "relax.astype"):
        expr = view.resolve(expr.args[0])
    return expr
