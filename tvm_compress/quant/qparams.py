"""Scales and zero points: from a calibrated range (activations) or from the weights themselves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvm_compress.errors import UserError
from tvm_compress.quant.config import QuantSpec

# A tensor whose calibrated range is empty (all zeros) gets the range [-1, 1]: any scale would
# represent it exactly, and this one keeps requantization multipliers well-conditioned.
_EMPTY_RANGE = 1.0


@dataclass(frozen=True)
class QParams:
    """Affine quantization parameters: ``q = clip(round(x / scale) + zero_point, qmin, qmax)``.

    ``scale`` / ``zero_point`` are 0-d for per-tensor, 1-d along ``axis`` for per-channel.
    ``dtype`` is the storage type of the quantized values (int8 / uint8; also for < 8 bits).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    dtype: str
    axis: int = -1
    bits: int = 8

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim == 1

    @property
    def symmetric(self) -> bool:
        return bool(np.all(self.zero_point == 0))

    def broadcast(self, arr: np.ndarray, ndim: int) -> np.ndarray:
        """Reshape a per-channel vector so it broadcasts along ``axis`` of an ``ndim`` tensor."""
        if arr.ndim == 0:
            return arr
        shape = [1] * ndim
        shape[self.axis] = arr.size
        return arr.reshape(shape)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        s = self.broadcast(self.scale, x.ndim)
        z = self.broadcast(self.zero_point, x.ndim)
        q = np.clip(np.round(x / s) + z, self.qmin, self.qmax)
        return q.astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        s = self.broadcast(self.scale, q.ndim)
        z = self.broadcast(self.zero_point, q.ndim)
        return ((q.astype(np.float32) - z) * s).astype(np.float32)


def _signed(bits: int) -> tuple[int, int]:
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax  # narrow range: symmetric around 0, no lone -128


def _pow2(scale: np.ndarray) -> np.ndarray:
    return np.power(2.0, np.ceil(np.log2(scale))).astype(np.float32)


def range_qparams(lo: np.ndarray | float, hi: np.ndarray | float, spec: QuantSpec, *,
                  axis: int = -1) -> QParams:
    """Quantization parameters covering ``[lo, hi]`` (scalars, or per-channel vectors)."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    bits = spec.bits
    nonnegative = bool(np.all(lo >= 0))
    if spec.scheme == "asymmetric" or (spec.scheme == "symmetric_uint8" and nonnegative):
        qmin, qmax = 0, 2 ** bits - 1
        span = hi - lo
        span = np.where(span > 0, span, _EMPTY_RANGE)
        scale = (span / qmax).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), qmin, qmax).astype(np.int32)
        return QParams(scale, zero, qmin, qmax, "uint8", axis, bits)
    qmin, qmax = _signed(bits)
    amax = np.maximum(np.abs(lo), np.abs(hi))
    amax = np.where(amax > 0, amax, _EMPTY_RANGE)
    scale = (amax / qmax).astype(np.float32)
    if spec.scheme == "power_of_two":
        scale = _pow2(scale)
    return QParams(scale, np.zeros_like(scale, dtype=np.int32), qmin, qmax, "int8", axis, bits)


def weight_qparams(weight: np.ndarray, spec: QuantSpec, *, axis: int) -> QParams:
    """Min/max parameters of a weight tensor, per tensor or per output channel along ``axis``."""
    if spec.granularity == "per_channel":
        moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        return range_qparams(moved.min(1), moved.max(1), spec, axis=axis)
    return range_qparams(weight.min(), weight.max(), spec)


def channel_bits_qparams(weight: np.ndarray, axis: int, bits: np.ndarray) -> QParams:
    """Symmetric per-channel parameters with a bit-width per channel (int8 storage).

    Channel ``c`` uses the integer range of ``bits[c]`` bits; the stored range is that of the
    widest channel (the kernel is int8 either way; packing uses the real bit-widths).
    """
    bits = np.asarray(bits)
    if bits.ndim != 1 or len(bits) != weight.shape[axis] or bits.min() < 2 or bits.max() > 8:
        raise UserError(f"per-channel bits: need one value in 2-8 for each of the "
                        f"{weight.shape[axis]} channels, got {bits.tolist()}")
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    amax = np.abs(moved).max(1).astype(np.float64)
    qmax_c = 2.0 ** (bits.astype(np.float64) - 1) - 1
    scale = np.where(amax > 0, amax / qmax_c, 1.0).astype(np.float32)
    top = int(bits.max())
    qmax = 2 ** (top - 1) - 1
    return QParams(scale, np.zeros(len(scale), dtype=np.int32), -qmax, qmax, "int8", axis, top)
