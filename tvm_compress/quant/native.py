"""Typed wrappers around the native calibration kernels (``libtvm_compress_native.so``).

The library is a tvm-ffi extension built by ``pip install -e .`` from ``tvm_compress/quant/csrc``.
NumPy arrays (and CPU torch tensors, through DLPack) reach the kernels without copies. Every
wrapper validates its inputs and raises :class:`~tvm_compress.errors.UserError`; there is no NumPy
fallback: the reference implementations in :mod:`tvm_compress.quant.entropy` define the same
numbers and
are used by tests and benchmarks only.

Accumulating functions update their output arrays in place. A batch containing NaN/Inf raises and
leaves the outputs exactly as they were, so the statistics of earlier batches survive.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tvm_compress.errors import UserError
from tvm_compress.quant import entropy

LIBRARY_NAME = "libtvm_compress_native" + (".dylib" if sys.platform == "darwin" else ".so")
FUNCTIONS = (
    "histogram",
    "abs_histogram",
    "channel_minmax",
    "kl_threshold",
    "kl_curve",
    "mse_threshold",
)


def library_path() -> Path:
    """Where the built library is: the first ``tvm_compress`` package directory holding it.

    An editable install lists both site-packages/tvm_compress (the built .so) and the source tree
    in the package ``__path__``; a regular install has only site-packages.
    """
    package = sys.modules["tvm_compress"]  # imported before any of its submodules

    for entry in package.__path__:
        candidate = Path(entry) / LIBRARY_NAME
        if candidate.is_file():
            return candidate
    raise UserError(
        f"native library {LIBRARY_NAME} not found in {list(package.__path__)}: rebuild it "
        "with `pip install --no-build-isolation -e . --no-deps` in the repository"
    )


@functools.lru_cache(maxsize=1)
def load() -> Any:
    """Load (once) and return the tvm-ffi module holding the calibration kernels."""
    import tvm_ffi

    path = library_path()
    module = tvm_ffi.load_module(str(path))
    missing = [name for name in FUNCTIONS if not module.implements_function(name)]
    if missing:
        raise UserError(
            f"native library {path} is out of date (missing {', '.join(missing)}): rebuild it "
            "with `pip install --no-build-isolation -e . --no-deps`"
        )
    return module


def _as_float32(x: Any, name: str) -> np.ndarray:
    """A zero-copy float32 C-contiguous NumPy view of ``x`` (ndarray or DLPack CPU tensor)."""
    if not isinstance(x, np.ndarray):
        if not hasattr(x, "__dlpack__"):
            raise UserError(f"{name} must be a NumPy array or CPU tensor, got {type(x).__name__}")
        try:
            x = np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError) as err:
            raise UserError(
                f"{name} cannot be viewed as a NumPy array ({err}): pass a detached CPU tensor"
            ) from err
    if x.dtype != np.float32:
        raise UserError(f"{name} has dtype {x.dtype}, expected float32: pass x.astype(np.float32)")
    if not x.flags.c_contiguous:
        raise UserError(f"{name} is not contiguous: pass np.ascontiguousarray({name})")
    return x


def _check_output(arr: Any, name: str, dtype: type, size: int | None = None) -> np.ndarray:
    """An in/out buffer must be the caller's own writable contiguous 1-D array (no copies)."""
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != 1 or arr.size == 0:
        got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise UserError(
            f"{name} must be a non-empty 1-D np.{np.dtype(dtype).name} array "
            f"(e.g. np.zeros(n, np.{np.dtype(dtype).name})), got {got}"
        )
    if not (arr.flags.c_contiguous and arr.flags.writeable):
        raise UserError(
            f"{name} must be writable and contiguous: allocate it with np.zeros/np.full"
        )
    if size is not None and arr.size != size:
        raise UserError(f"{name} has {arr.size} entries but x has {size} channels on that axis")
    return arr


def _raise_if_nonfinite(count: int, name: str, what: str) -> None:
    if count:
        raise UserError(
            f"{name} contains {count} NaN/Inf values ({what} left unchanged): check the model for "
            "overflow or drop that batch before calibrating"
        )


def histogram(x: Any, hist: np.ndarray, *, lo: float, hi: float) -> np.ndarray:
    """Add the values of ``x`` to ``hist`` (equal bins over ``[lo, hi]``, outside values clamped).

    Parameters
    ----------
    x : np.ndarray or CPU tensor
        float32, contiguous, any shape, finite.
    hist : np.ndarray
        int64 counts, 1-D; updated in place (bin rule in :mod:`tvm_compress.quant.entropy`).
    lo, hi : float
        Finite range, ``lo < hi``.

    Returns
    -------
    np.ndarray
        ``hist`` itself.
    """
    x = _as_float32(x, "x")
    _check_output(hist, "hist", np.int64)
    entropy.check_range(lo, hi)
    _raise_if_nonfinite(load().histogram(x, hist, float(lo), float(hi)), "x", "hist")
    return hist


def abs_histogram(x: Any, hist: np.ndarray, *, max_abs: float) -> np.ndarray:
    """Add ``|x|`` to ``hist`` (equal bins over ``[0, max_abs]``, larger values in the last bin).

    The input of :func:`kl_threshold` and :func:`mse_threshold`. Same preconditions as
    :func:`histogram`; ``max_abs`` must be finite and > 0. Returns ``hist``.
    """
    x = _as_float32(x, "x")
    _check_output(hist, "hist", np.int64)
    if not (np.isfinite(max_abs) and max_abs > 0):
        raise UserError(f"max_abs={max_abs} must be finite and > 0 (e.g. max |x| of batch one)")
    _raise_if_nonfinite(load().abs_histogram(x, hist, float(max_abs)), "x", "hist")
    return hist


def channel_minmax(
    x: Any, mins: np.ndarray, maxs: np.ndarray, *, axis: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Update running per-channel ranges: ``mins[c] = min(mins[c], x.take(c, axis).min())``.

    Parameters
    ----------
    x : np.ndarray or CPU tensor
        float32, contiguous, finite, ``x.ndim >= 1``.
    mins, maxs : np.ndarray
        float32 of length ``x.shape[axis]``, updated in place; start from ``+inf`` / ``-inf``.
    axis : int
        The channel axis (1 for NCHW activations; negative counts from the end).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(mins, maxs)`` themselves.
    """
    x = _as_float32(x, "x")
    if not -x.ndim <= axis < x.ndim:
        raise UserError(f"axis={axis} is out of range for x of shape {x.shape}")
    channels = x.shape[axis]
    _check_output(mins, "mins", np.float32, channels)
    _check_output(maxs, "maxs", np.float32, channels)
    if x.size:
        count = load().channel_minmax(x, axis % x.ndim, mins, maxs)
        _raise_if_nonfinite(count, "x", "mins/maxs")
    return mins, maxs


def kl_threshold(
    hist: np.ndarray, *, num_quant_bins: int = 128, start_bin: int | None = None, stride: int = 1
) -> tuple[int, float]:
    """Entropy (KL) calibration over a histogram of ``|x|``: the number of kept bins ``i``.

    Exactly :func:`tvm_compress.quant.entropy.kl_threshold_numpy` (see there for the P/Q
    construction,
    smoothing and tie rule). The clipping threshold is ``i * max_abs / len(hist)``.

    Returns
    -------
    tuple[int, float]
        ``(i, kl)`` with ``start_bin <= i <= len(hist)``.
    """
    hist, start_bin = entropy.check_kl_args(hist, num_quant_bins, start_bin, stride)
    best = load().kl_threshold(hist, int(num_quant_bins), int(start_bin), int(stride))
    return entropy.checked_result((int(best[0]), float(best[1])), hist.size)


def kl_curve(
    hist: np.ndarray, *, num_quant_bins: int = 128, start_bin: int | None = None, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate of :func:`kl_threshold` with its KL divergence, for plots and diagnostics.

    Computed with the O(num_quant_bins)-per-candidate prefix-sum evaluation, which agrees with
    :func:`tvm_compress.quant.entropy.kl_curve_numpy` to about 1e-9 relative (``inf`` where
    undefined).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(bins, kl)``: int64 candidates in increasing order and float64 divergences.
    """
    hist, start_bin = entropy.check_kl_args(hist, num_quant_bins, start_bin, stride)
    bins = entropy.candidate_bins(hist.size, start_bin, stride).astype(np.int64)
    out = np.empty(bins.size, dtype=np.float64)
    load().kl_curve(hist, int(num_quant_bins), int(start_bin), int(stride), out)
    return bins, out


def mse_threshold(
    hist: np.ndarray, *, max_abs: float, num_levels: int = 127, start_bin: int = 1, stride: int = 1
) -> tuple[int, float]:
    """The number of kept bins ``i`` minimizing the expected symmetric quantization MSE.

    Exactly :func:`tvm_compress.quant.entropy.mse_threshold_numpy`. The clipping threshold is
    ``i * max_abs / len(hist)``; the MSE is in squared units of ``x``.

    Returns
    -------
    tuple[int, float]
        ``(i, mse)`` with ``start_bin <= i <= len(hist)``.
    """
    hist = entropy.check_mse_args(hist, max_abs, num_levels, start_bin, stride)
    best = load().mse_threshold(hist, float(max_abs), int(num_levels), int(start_bin), int(stride))
    return int(best[0]), float(best[1])
