"""Metrics comparing a model's outputs with labels and with its fp32 reference."""

from __future__ import annotations

import numpy as np
import tvm


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


def weight_bytes(mod: tvm.IRModule) -> int:
    """Bytes of all constants in the module's Relax functions, each shared constant counted once.

    Sub-8-bit weights are stored packed (several per byte) by the quantizer, so counting the bytes
    of what is stored gives their real size.
    """
    from tvm import relax

    seen: set[relax.Expr] = set()

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, tvm.runtime.Tensor):
            seen.add(expr)

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sum(int(np.prod(c.value.shape)) * tvm.runtime.DataType(c.value.dtype).bits // 8
               for c in seen)
