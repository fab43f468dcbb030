"""NumPy reference implementations of the calibration statistics and threshold searches.

These define the numbers: the native kernels in ``tvm_compress/quant/csrc`` (wrapped by
:mod:`tvm_compress.quant.native`) compute the same bins and pick the same thresholds, only faster.
Tests compare the two; the benchmark times them side by side.

Conventions shared by every function here:

- A histogram of ``n`` bins over ``[lo, hi]`` puts value ``v`` in bin
  ``clamp(floor((v - lo) * (n / (hi - lo))), 0, n - 1)``, computed in float64, so values outside
  the range land in the end bins and ``v == hi`` lands in the last bin (as in ``np.histogram``).
- The threshold searches take a histogram of ``|x|`` over ``[0, max_abs]``, bin width
  ``w = max_abs / n``. Candidate ``i`` keeps bins ``[0, i)`` and clips at the upper edge of bin
  ``i - 1``: **threshold = i * w** (not ``(i + 0.5) * w``). Candidates are ``n, n - stride, ...``
  down to ``start_bin``, so ``i = n`` (no clipping) is always tried.
- Among candidates whose score is within ``TIE_REL_TOL * |best| + TIE_ABS_TOL`` of the best, the
  smallest ``i`` wins; scores are float sums whose last bits depend on summation order, and the
  tolerance keeps NumPy and native picking the same index on exact ties.
"""

from __future__ import annotations

import numpy as np

from tvm_compress.errors import UserError

SMOOTH_EPS = 1e-4
TIE_REL_TOL = 1e-9
TIE_ABS_TOL = 1e-12


def histogram_numpy(x: np.ndarray, *, lo: float, hi: float, bins: int) -> np.ndarray:
    """Counts of ``x`` in ``bins`` equal bins over ``[lo, hi]``, outside values clamped to the ends.

    Parameters
    ----------
    x : np.ndarray
        Values of any shape; NaN/Inf are not allowed.
    lo, hi : float
        Finite range with ``lo < hi``.
    bins : int
        Number of bins (>= 1).

    Returns
    -------
    np.ndarray
        int64 counts of length ``bins``; they sum to ``x.size``.
    """
    check_range(lo, hi)
    if bins < 1:
        raise UserError(f"bins={bins} must be >= 1 (2048 is usual for calibration)")
    scale = bins / (hi - lo)
    t = (np.asarray(x, dtype=np.float64).ravel() - lo) * scale
    idx = np.clip(np.floor(t), 0, bins - 1).astype(np.int64)
    return np.bincount(idx, minlength=bins).astype(np.int64)


def abs_histogram_numpy(x: np.ndarray, *, max_abs: float, bins: int) -> np.ndarray:
    """Histogram of ``|x|`` over ``[0, max_abs]``; see :func:`histogram_numpy`."""
    return histogram_numpy(np.abs(np.asarray(x, dtype=np.float32)), lo=0.0, hi=max_abs, bins=bins)


def channel_minmax_numpy(x: np.ndarray, *, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel minimum and maximum of ``x`` over every axis except ``axis``."""
    others = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    return x.min(axis=others), x.max(axis=others)


def _smooth(d: np.ndarray) -> np.ndarray | None:
    """MXNet/TensorRT smoothing on raw counts: ``SMOOTH_EPS`` onto each zero, taken evenly from the
    nonzero entries. None when nothing is nonzero or the result would not be positive."""
    zero = d == 0
    zeros = int(zero.sum())
    nonzeros = d.size - zeros
    if nonzeros == 0:
        return None
    eps1 = SMOOTH_EPS * zeros / nonzeros
    out = np.where(zero, SMOOTH_EPS, d - eps1)
    return out if bool((out > 0).all()) else None


def kl_for_candidate(hist: np.ndarray, i: int, num_quant_bins: int) -> float:
    """KL(P || Q) for candidate ``i`` of the entropy calibration search (``inf`` if undefined).

    P is ``hist[:i]`` with the clipped tail ``hist[i:].sum()`` added to bin ``i - 1``. Q is built
    from ``hist[:i]`` *without* the tail (the TensorRT / MXNet recipe): the bins are summed in
    ``num_quant_bins`` groups of ``i // num_quant_bins`` bins (the last group also takes the
    ``i % num_quant_bins`` leftover bins) and each group sum is spread evenly over the bins of the
    group where P is nonzero. Both are smoothed with :data:`SMOOTH_EPS` on raw counts, normalized,
    and ``sum(p * log(p / q))`` is returned.
    """
    p = hist[:i].astype(np.float64)
    p[i - 1] += float(hist[i:].sum())
    width = i // num_quant_bins
    starts = np.arange(num_quant_bins) * width
    nonzero = p != 0
    sums = np.add.reduceat(hist[:i], starts)
    counts = np.add.reduceat(nonzero.astype(np.int64), starts)
    share = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    group = np.minimum(np.arange(i) // width, num_quant_bins - 1)
    q = np.where(nonzero, share[group], 0.0)
    p_s, q_s = _smooth(p), _smooth(q)
    if p_s is None or q_s is None:
        return float("inf")
    pn = p_s / p_s.sum()
    return float(np.sum(pn * np.log(pn / (q_s / q_s.sum()))))


def mse_for_candidate(hist: np.ndarray, i: int, *, width: float, num_levels: int) -> float:
    """Mean squared error of symmetric quantization clipped at ``i * width`` with ``num_levels``
    steps per side (127 for int8), every count placed at its bin center ``(k + 0.5) * width`` and
    rounded half to even. The level is ``rint(center * (num_levels / (i * width)))`` (a product,
    not ``center / step``, so the native loop needs no division; both round identically)."""
    step = i * width / num_levels
    inv_step = num_levels / (i * width)
    centers = (np.arange(hist.size, dtype=np.float64) + 0.5) * width
    err = np.minimum(np.rint(centers * inv_step), num_levels) * step - centers
    return float(np.sum(hist * err * err) / float(hist.sum()))


def candidate_bins(n: int, start_bin: int, stride: int) -> np.ndarray:
    """Candidate bin counts ``n, n - stride, ...`` down to ``start_bin``, in increasing order."""
    return np.arange(n, start_bin - 1, -stride)[::-1]


def pick_best(bins: np.ndarray, scores: np.ndarray) -> tuple[int, float]:
    """Smallest candidate within the tie tolerance of the best finite score; (-1, inf) if none."""
    best = float(np.min(scores))
    if not np.isfinite(best):
        return -1, float("inf")
    first = int(np.argmax(scores <= best + TIE_REL_TOL * abs(best) + TIE_ABS_TOL))
    return int(bins[first]), float(scores[first])


def kl_threshold_numpy(
    hist: np.ndarray, *, num_quant_bins: int = 128, start_bin: int | None = None, stride: int = 1
) -> tuple[int, float]:
    """Entropy (KL) calibration: the number of kept bins ``i`` minimizing KL(P || Q).

    Parameters
    ----------
    hist : np.ndarray
        Integer counts of ``|x|`` (1-D, non-negative, not all zero).
    num_quant_bins : int
        Quantized levels Q may use; 128 for int8 symmetric on ``|x|``.
    start_bin : int, optional
        Smallest candidate; defaults to ``num_quant_bins`` and may not be smaller.
    stride : int
        Distance between candidates (1 tries every bin).

    Returns
    -------
    tuple[int, float]
        ``(i, kl)``; the clipping threshold is ``i * max_abs / len(hist)``.

    Notes
    -----
    P, Q and the smoothing are described in :func:`kl_for_candidate`. Exact zeros (ReLU outputs)
    pile up in bin 0 and dominate Q's first group, which drags the threshold down: on ReLU of a
    Gaussian the search clips at 1.8 sigma, at 4.4 sigma once ``hist[0]`` is set to 0 (zeros are
    exact in any symmetric scheme, so dropping them loses nothing).
    """
    bins, scores = kl_curve_numpy(
        hist, num_quant_bins=num_quant_bins, start_bin=start_bin, stride=stride
    )
    return checked_result(pick_best(bins, scores), int(bins[-1]))  # bins[-1] == len(hist)


def kl_curve_numpy(
    hist: np.ndarray, *, num_quant_bins: int = 128, start_bin: int | None = None, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates of :func:`kl_threshold_numpy` and their KL divergences (``inf`` where
    undefined), both in increasing candidate order."""
    hist, start_bin = check_kl_args(hist, num_quant_bins, start_bin, stride)
    bins = candidate_bins(hist.size, start_bin, stride)
    scores = np.array([kl_for_candidate(hist, int(i), num_quant_bins) for i in bins])
    return bins, scores


def mse_threshold_numpy(
    hist: np.ndarray, *, max_abs: float, num_levels: int = 127, start_bin: int = 1, stride: int = 1
) -> tuple[int, float]:
    """The number of kept bins ``i`` minimizing the expected symmetric quantization MSE.

    Parameters
    ----------
    hist : np.ndarray
        Integer counts of ``|x|`` over ``[0, max_abs]`` (1-D, non-negative, not all zero).
    max_abs : float
        Upper end of the histogram range; only scales the returned MSE.
    num_levels : int
        Quantization steps on each side of zero (127 for int8 symmetric).
    start_bin, stride : int
        Candidates are ``len(hist), len(hist) - stride, ...`` down to ``start_bin``.

    Returns
    -------
    tuple[int, float]
        ``(i, mse)``; the clipping threshold is ``i * max_abs / len(hist)``.
    """
    hist = check_mse_args(hist, max_abs, num_levels, start_bin, stride)
    width = max_abs / hist.size
    bins = candidate_bins(hist.size, start_bin, stride)
    scores = np.array(
        [mse_for_candidate(hist, int(i), width=width, num_levels=num_levels) for i in bins]
    )
    return pick_best(bins, scores)


def check_range(lo: float, hi: float) -> None:
    """Raise UserError unless ``lo < hi`` are finite."""
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise UserError(
            f"histogram range [{lo}, {hi}] is invalid: pass finite lo < hi "
            "(e.g. the min/max of the first calibration batch)"
        )


def check_counts(hist: np.ndarray) -> np.ndarray:
    """Validate a histogram used as search input; returns it as contiguous int64."""
    hist = np.asarray(hist)
    if hist.ndim != 1 or hist.size == 0 or not np.issubdtype(hist.dtype, np.integer):
        raise UserError(
            f"hist must be a non-empty 1-D integer array of counts, got {hist.dtype} {hist.shape}"
        )
    hist = np.ascontiguousarray(hist, dtype=np.int64)
    if bool((hist < 0).any()):
        raise UserError(
            "hist has negative counts: pass the counts from histogram()/abs_histogram()"
        )
    if int(hist.sum()) == 0:
        raise UserError("hist is empty (all zero): accumulate calibration batches before searching")
    return hist


def check_kl_args(
    hist: np.ndarray, num_quant_bins: int, start_bin: int | None, stride: int
) -> tuple[np.ndarray, int]:
    """Validate kl_threshold arguments; returns (int64 hist, resolved start_bin)."""
    hist = check_counts(hist)
    if not 1 <= num_quant_bins <= hist.size:
        raise UserError(
            f"num_quant_bins={num_quant_bins} must be in [1, len(hist)={hist.size}]: "
            "use more histogram bins (2048 is usual) or fewer quantized levels"
        )
    start_bin = num_quant_bins if start_bin is None else start_bin
    if not num_quant_bins <= start_bin <= hist.size:
        raise UserError(
            f"start_bin={start_bin} must be in [num_quant_bins={num_quant_bins}, {hist.size}]"
        )
    check_stride(stride)
    return hist, start_bin


def check_mse_args(
    hist: np.ndarray, max_abs: float, num_levels: int, start_bin: int, stride: int
) -> np.ndarray:
    """Validate mse_threshold arguments; returns the int64 hist."""
    hist = check_counts(hist)
    if not (np.isfinite(max_abs) and max_abs > 0):
        raise UserError(f"max_abs={max_abs} must be finite and > 0 (the histogram's upper end)")
    if num_levels < 1:
        raise UserError(f"num_levels={num_levels} must be >= 1 (127 for int8 symmetric)")
    if not 1 <= start_bin <= hist.size:
        raise UserError(f"start_bin={start_bin} must be in [1, len(hist)={hist.size}]")
    check_stride(stride)
    return hist


def check_stride(stride: int) -> None:
    """Raise UserError unless stride >= 1."""
    if stride < 1:
        raise UserError(f"stride={stride} must be >= 1 (1 tries every candidate bin)")


def checked_result(result: tuple[int, float], n: int) -> tuple[int, float]:
    """Turn "no candidate had a defined KL" into a UserError (possible only with > 10k bins)."""
    if result[0] < 0:
        raise UserError(
            f"no KL threshold candidate is defined for this {n}-bin histogram "
            "(smoothing made a count non-positive): use fewer bins (<= 8192)"
        )
    return result
