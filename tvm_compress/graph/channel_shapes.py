"""Where channel counts live in Relax op arguments: slice bounds, split points, reshape targets.

Shared by the channel analysis (which channels a tensor holds) and CropChannels (which new
arguments an op needs once channels are gone).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tvm import relax

CH = 1  # channel axis of NCHW activations and of (N, C) features


class Unsupported(Exception):
    """An op the channel analysis cannot follow; the message becomes the blocked reason."""


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """The shape of a tensor-typed expression if all dimensions are known, else None."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or ty.ndim < 0:
        return None
    try:
        return tuple(int(d) for d in ty.shape)
    except (TypeError, ValueError):  # symbolic dimension
        return None


def rank(expr: relax.Expr) -> int:
    """Number of dimensions of a tensor with a static shape (0 when unknown)."""
    return len(static_shape(expr) or ())


def prim(value: object) -> float:
    inner = getattr(value, "value", value)
    return float(getattr(inner, "value", inner))


def slice_bounds(call: relax.Call, channels: int) -> tuple[int, int] | None:
    """(begin, end) of a stride-1 strided_slice along the channel axis, clamped to [0, C]."""
    axes = [int(a) for a in call.args[1].fields]
    ndim = rank(call.args[0])
    axes = [a + ndim if a < 0 else a for a in axes]
    if CH not in axes:
        return None
    i = axes.index(CH)
    begin, end = int(call.args[2].fields[i]), int(call.args[3].fields[i])
    stride = int(call.args[4].fields[i]) if len(call.args) > 4 else 1
    if stride != 1:
        raise Unsupported(f"channel slice with stride {stride}")
    begin, end = (b + channels if b < 0 else b for b in (begin, end))
    return min(max(begin, 0), channels), min(max(end, 0), channels)


def split_points(call: relax.Call, channels: int) -> list[int]:
    """Boundaries of a channel split: [0, i1, i2, ..., C]."""
    sections = call.attrs.indices_or_sections
    if not isinstance(sections, Sequence):
        n = int(sections)
        return [k * channels // n for k in range(n + 1)]
    return [0, *(min(int(i), channels) for i in sections), channels]


def reshape_kind(x: tuple[int, ...], out: tuple[int, ...]) -> str | None:
    """``keep``: the channel axis stays axis 1 (only spatial axes change); ``flatten``: (N, C, ...)
    -> (N, C * rest), each channel becomes ``rest`` consecutive features; else None."""
    if len(x) not in (2, 4) or len(out) not in (2, 4) or x[0] != out[0]:
        return None
    rest = int(np.prod(x[2:]))
    if out[CH] == x[CH] and int(np.prod(out[2:])) == rest:
        return "keep"
    if len(out) == 2 and out[CH] == x[CH] * rest:
        return "flatten"
    return None
