"""The native calibration kernels agree with the NumPy references in tvm_compress.quant.entropy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tvm_compress
from tvm_compress.errors import UserError
from tvm_compress.quant import entropy, native

RNG_SEED = 1234


def _abs_hist(x: np.ndarray, bins: int) -> tuple[np.ndarray, float]:
    max_abs = float(np.abs(x).max()) or 1.0
    hist = np.zeros(bins, dtype=np.int64)
    native.abs_histogram(x.astype(np.float32), hist, max_abs=max_abs)
    return hist, max_abs


def _datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(RNG_SEED)
    gauss = rng.standard_normal(200_000).astype(np.float32)
    return {
        "gauss": gauss,
        "gauss_outliers": np.concatenate([gauss, np.float32([45.0, -70.0])]),
        "cauchy": rng.standard_cauchy(100_000).astype(np.float32),
        "relu": np.maximum(gauss, 0),
        "tiny_sample": rng.standard_normal(50).astype(np.float32),
        "constant": np.full(1000, 3.5, dtype=np.float32),
        "two_values": np.float32([0.0] * 500 + [2.0] * 3),
    }


DATASETS = _datasets()


# --- histograms ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (2, 16, 28, 28)])
@pytest.mark.parametrize("lo_hi", [(-3.0, 3.0), (-0.5, 2.0), (0.0, 1e-3)])
def test_histogram_matches_numpy(shape: tuple[int, ...], lo_hi: tuple[float, float]) -> None:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    lo, hi = lo_hi
    hist = np.zeros(101, dtype=np.int64)
    native.histogram(x, hist, lo=lo, hi=hi)
    np.testing.assert_array_equal(hist, entropy.histogram_numpy(x, lo=lo, hi=hi, bins=101))
    assert hist.sum() == x.size


def test_histogram_edges_match_np_histogram() -> None:
    # Values on bin edges (exact in binary): the same bins as np.histogram, hi in the last bin.
    x = np.arange(0, 16.5, 0.5, dtype=np.float32)
    hist = np.zeros(16, dtype=np.int64)
    native.histogram(x, hist, lo=0.0, hi=16.0)
    np.testing.assert_array_equal(hist, np.histogram(x, bins=16, range=(0.0, 16.0))[0])


def test_histogram_clamps_outside_values_into_end_bins() -> None:
    x = np.float32([-1e30, -5.0, 0.5, 7.0, 3e38])
    hist = np.zeros(4, dtype=np.int64)
    native.histogram(x, hist, lo=0.0, hi=1.0)
    np.testing.assert_array_equal(hist, [2, 0, 1, 2])


def test_abs_histogram_matches_numpy_and_accumulates() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.laplace(size=(4, 8, 9, 9)).astype(np.float32) for _ in range(3)]
    hist = np.zeros(2048, dtype=np.int64)
    for batch in batches:
        native.abs_histogram(batch, hist, max_abs=4.0)
    expected = entropy.abs_histogram_numpy(np.concatenate(batches), max_abs=4.0, bins=2048)
    np.testing.assert_array_equal(hist, expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=4, max_side=9),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    lo=st.floats(-100, 100),
    width=st.floats(1e-3, 1e3),
    bins=st.integers(1, 300),
)
def test_histogram_property(x: np.ndarray, lo: float, width: float, bins: int) -> None:
    hist = np.zeros(bins, dtype=np.int64)
    native.histogram(x, hist, lo=lo, hi=lo + width)
    assert hist.sum() == x.size  # clamping never drops a value
    np.testing.assert_array_equal(hist, entropy.histogram_numpy(x, lo=lo, hi=lo + width, bins=bins))


def test_histogram_accepts_torch_tensor_without_copy() -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(2, 3, 8, 8)
    hist = np.zeros(64, dtype=np.int64)
    native.abs_histogram(t, hist, max_abs=3.0)
    expected = entropy.abs_histogram_numpy(t.numpy(), max_abs=3.0, bins=64)
    np.testing.assert_array_equal(hist, expected)


# --- channel min/max -----------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_channel_minmax_matches_numpy_over_batches(axis: int) -> None:
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((3, 6, 5, 13)).astype(np.float32) * (i + 1) for i in range(3)]
    channels = batches[0].shape[axis]
    mins = np.full(channels, np.inf, dtype=np.float32)
    maxs = np.full(channels, -np.inf, dtype=np.float32)
    for batch in batches:
        native.channel_minmax(batch, mins, maxs, axis=axis)
    ref_min, ref_max = entropy.channel_minmax_numpy(np.concatenate(batches, axis=0), axis=axis)
    if axis == 0:  # concatenation along the channel axis would merge channels; reduce per batch
        ref_min = np.min([entropy.channel_minmax_numpy(b, axis=0)[0] for b in batches], axis=0)
        ref_max = np.max([entropy.channel_minmax_numpy(b, axis=0)[1] for b in batches], axis=0)
    np.testing.assert_array_equal(mins, ref_min)
    np.testing.assert_array_equal(maxs, ref_max)


def test_channel_minmax_rejects_nan_and_keeps_state() -> None:
    x = np.ones((2, 4, 3, 3), dtype=np.float32)
    mins = np.full(4, -1.0, dtype=np.float32)
    maxs = np.full(4, 2.0, dtype=np.float32)
    x[1, 2, 0, 1] = np.nan
    with pytest.raises(UserError, match="NaN/Inf"):
        native.channel_minmax(x, mins, maxs, axis=1)
    np.testing.assert_array_equal(mins, -1.0)
    np.testing.assert_array_equal(maxs, 2.0)


# --- KL (entropy) threshold ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("bins,nq", [(512, 128), (2048, 128)])
def test_kl_threshold_matches_numpy(name: str, bins: int, nq: int) -> None:
    hist, _ = _abs_hist(DATASETS[name], bins)
    got = native.kl_threshold(hist, num_quant_bins=nq)
    want = entropy.kl_threshold_numpy(hist, num_quant_bins=nq)
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], rel=1e-8, abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(
    counts=hnp.arrays(
        np.int64,
        st.integers(16, 400),
        elements=st.one_of(st.just(0), st.integers(0, 5), st.integers(0, 10**7)),
    ),
    nq=st.integers(1, 16),
    stride=st.integers(1, 7),
)
def test_kl_fast_path_matches_literal(counts: np.ndarray, nq: int, stride: int) -> None:
    # Arbitrary (sparse, spiky) histograms: the prefix-sum evaluation must track the literal one.
    counts[-1] += 1  # never all zero
    got_bins, got = native.kl_curve(counts, num_quant_bins=nq, stride=stride)
    want_bins, want = entropy.kl_curve_numpy(counts, num_quant_bins=nq, stride=stride)
    np.testing.assert_array_equal(got_bins, want_bins)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-7, atol=1e-10)
    result = native.kl_threshold(counts, num_quant_bins=nq, stride=stride)
    assert result[0] == entropy.kl_threshold_numpy(counts, num_quant_bins=nq, stride=stride)[0]


def test_kl_sparse_histogram_uses_literal_fallback() -> None:
    # 3 nonzero bins out of 2048: the smoothing shift exceeds the Taylor range for most candidates.
    hist = np.zeros(2048, dtype=np.int64)
    hist[[3, 700, 1500]] = [10_000, 3, 1]
    got = native.kl_threshold(hist)
    assert got[0] == entropy.kl_threshold_numpy(hist)[0]


def test_kl_clips_outliers_of_a_gaussian() -> None:
    hist, max_abs = _abs_hist(DATASETS["gauss_outliers"], 2048)
    i, _ = native.kl_threshold(hist)
    threshold = i * max_abs / hist.size
    assert 2.0 < threshold < 0.15 * max_abs  # near the Gaussian's bulk, far below the outliers


def test_kl_threshold_beats_max_calibration_on_outliers() -> None:
    # The point of entropy calibration: the bulk of the values (all but the two outliers) keeps
    # far more int8 resolution than with the trivial max |x| calibration.
    x = DATASETS["gauss_outliers"].astype(np.float64)
    bulk = x[np.abs(x) < 10]
    hist, max_abs = _abs_hist(x, 2048)
    i, _ = native.kl_threshold(hist)

    def int8_mse(threshold: float) -> float:
        scale = threshold / 127
        return float(np.mean((np.clip(np.rint(bulk / scale), -127, 127) * scale - bulk) ** 2))

    assert int8_mse(i * max_abs / hist.size) < 0.05 * int8_mse(max_abs)


def test_kl_constant_input_keeps_everything() -> None:
    hist, _ = _abs_hist(DATASETS["constant"], 2048)  # all mass in the last bin
    assert native.kl_threshold(hist) == (2048, pytest.approx(0.0, abs=1e-12))


def test_kl_candidates_respect_start_bin_and_stride() -> None:
    hist, _ = _abs_hist(DATASETS["gauss_outliers"], 1024)
    i, _ = native.kl_threshold(hist, num_quant_bins=64, start_bin=300, stride=10)
    assert i >= 300 and (1024 - i) % 10 == 0
    assert i == entropy.kl_threshold_numpy(hist, num_quant_bins=64, start_bin=300, stride=10)[0]


# --- MSE threshold -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("bins,levels", [(512, 127), (2048, 127), (2048, 7)])
def test_mse_threshold_matches_numpy(name: str, bins: int, levels: int) -> None:
    hist, max_abs = _abs_hist(DATASETS[name], bins)
    got = native.mse_threshold(hist, max_abs=max_abs, num_levels=levels)
    want = entropy.mse_threshold_numpy(hist, max_abs=max_abs, num_levels=levels)
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], rel=1e-9)


def test_mse_threshold_is_sensible() -> None:
    uniform = np.random.default_rng(3).uniform(-1, 1, 100_000).astype(np.float32)
    hist, max_abs = _abs_hist(uniform, 1024)
    i, _ = native.mse_threshold(hist, max_abs=max_abs, num_levels=127)
    assert i > 0.97 * hist.size  # nothing worth clipping in a uniform distribution
    hist, max_abs = _abs_hist(DATASETS["gauss"], 1024)
    i, _ = native.mse_threshold(hist, max_abs=max_abs, num_levels=7)  # 4-bit: clip hard
    assert i * max_abs / hist.size < 0.7 * max_abs


# --- errors --------------------------------------------------------------------------------------


def test_bad_inputs_raise_user_error() -> None:
    hist = np.zeros(16, dtype=np.int64)
    x = np.ones((4, 4), dtype=np.float32)
    with pytest.raises(UserError, match="float32"):
        native.histogram(x.astype(np.float64), hist, lo=0, hi=1)
    with pytest.raises(UserError, match="contiguous"):
        native.histogram(x[:, ::2], hist, lo=0, hi=1)
    with pytest.raises(UserError, match="int64"):
        native.abs_histogram(x, hist.astype(np.int32), max_abs=1.0)
    with pytest.raises(UserError, match="lo < hi"):
        native.histogram(x, hist, lo=1.0, hi=1.0)
    with pytest.raises(UserError, match="max_abs"):
        native.abs_histogram(x, hist, max_abs=float("nan"))
    with pytest.raises(UserError, match="channels"):
        native.channel_minmax(x, np.zeros(3, np.float32), np.zeros(4, np.float32), axis=1)
    readonly = np.zeros(16, dtype=np.int64)
    readonly.flags.writeable = False
    with pytest.raises(UserError, match="writable"):
        native.histogram(x, readonly, lo=0, hi=1)


def test_nonfinite_batch_raises_and_leaves_hist_unchanged() -> None:
    hist = np.zeros(8, dtype=np.int64)
    native.abs_histogram(np.ones(5, np.float32), hist, max_abs=2.0)
    before = hist.copy()
    bad = np.float32([1.0, np.inf, 0.5, np.nan])
    with pytest.raises(UserError, match="2 NaN/Inf"):
        native.abs_histogram(bad, hist, max_abs=2.0)
    np.testing.assert_array_equal(hist, before)


def test_threshold_search_input_errors() -> None:
    with pytest.raises(UserError, match="empty"):
        native.kl_threshold(np.zeros(256, np.int64))
    with pytest.raises(UserError, match="negative"):
        native.mse_threshold(np.array([3, -1, 2]), max_abs=1.0)
    with pytest.raises(UserError, match="integer"):
        native.kl_threshold(np.ones(256, np.float32))
    with pytest.raises(UserError, match="num_quant_bins"):
        native.kl_threshold(np.ones(100, np.int64), num_quant_bins=128)
    with pytest.raises(UserError, match="start_bin"):
        native.kl_threshold(np.ones(256, np.int64), num_quant_bins=128, start_bin=64)


def test_missing_library_tells_to_reinstall(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    native.load.cache_clear()
    monkeypatch.setattr(tvm_compress, "__path__", [str(tmp_path)])
    try:
        with pytest.raises(UserError, match="pip install"):
            native.abs_histogram(np.ones(3, np.float32), np.zeros(4, np.int64), max_abs=1.0)
    finally:
        native.load.cache_clear()
