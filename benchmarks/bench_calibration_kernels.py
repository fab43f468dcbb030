"""Native calibration kernels vs their NumPy references (and plain NumPy idioms).

Times histogram accumulation and per-channel min/max over MobileNetV2-sized activations
(N x 32 x 112 x 112, the output of the first conv) and the KL / MSE threshold searches over
2048- and 8192-bin histograms. Writes benchmarks/results/calibration_kernels.{json,md}.

Usage: python benchmarks/bench_calibration_kernels.py [--repeats 5] [--batches 1 8 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from tvm_compress.backend.schedules.hardware import cpu_name
from tvm_compress.quant import entropy, native

RESULTS = Path(__file__).resolve().parent / "results"
HIST_BINS = 2048


def time_ms(fn: Callable[[], object], *, repeats: int) -> tuple[float, float]:
    """(median, min) wall time of ``fn`` in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def activation(batch: int, seed: int) -> np.ndarray:
    """A ReLU6-like activation: half zeros, a half-normal bulk, a few large outliers."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((batch, 32, 112, 112), dtype=np.float32), 0)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, 16)] = 40.0
    return x


def np_abs_histogram(x: np.ndarray, max_abs: float) -> np.ndarray:
    """What one would write without this package."""
    return np.histogram(np.abs(x), bins=HIST_BINS, range=(0, max_abs))[0]


def row(
    kernel: str,
    case: str,
    baseline: str,
    native_t: tuple[float, float],
    numpy_t: tuple[float, float],
    **extra: float,
) -> dict:
    return {
        "kernel": kernel,
        "case": case,
        "baseline": baseline,
        "native_ms": round(native_t[0], 3),
        "native_min_ms": round(native_t[1], 3),
        "numpy_ms": round(numpy_t[0], 3),
        "numpy_min_ms": round(numpy_t[1], 3),
        "speedup": round(numpy_t[0] / native_t[0], 1),
        **extra,
    }


def bench_collection(batches: list[int], repeats: int) -> list[dict]:
    """abs_histogram, histogram and channel_minmax over N x 32 x 112 x 112 activations."""
    rows = []
    for batch in batches:
        x = activation(batch, seed=batch)
        case = f"{batch}x32x112x112 ({x.size / 1e6:.1f} M values)"
        max_abs = float(np.abs(x).max())
        hist = np.zeros(HIST_BINS, dtype=np.int64)
        nat = time_ms(partial(native.abs_histogram, x, hist, max_abs=max_abs), repeats=repeats)
        ref = time_ms(
            partial(entropy.abs_histogram_numpy, x, max_abs=max_abs, bins=HIST_BINS),
            repeats=repeats,
        )
        rows.append(row("abs_histogram (2048 bins)", case, "entropy.abs_histogram_numpy", nat, ref))
        idiom = time_ms(partial(np_abs_histogram, x, max_abs), repeats=repeats)
        rows.append(row("abs_histogram (2048 bins)", case, "np.histogram(np.abs(x))", nat, idiom))
        nat = time_ms(partial(native.histogram, x, hist, lo=-1.0, hi=8.0), repeats=repeats)
        ref = time_ms(
            partial(entropy.histogram_numpy, x, lo=-1.0, hi=8.0, bins=HIST_BINS), repeats=repeats
        )
        rows.append(row("histogram (2048 bins)", case, "entropy.histogram_numpy", nat, ref))
        mins = np.full(32, np.inf, dtype=np.float32)
        maxs = np.full(32, -np.inf, dtype=np.float32)
        nat = time_ms(partial(native.channel_minmax, x, mins, maxs, axis=1), repeats=repeats)
        ref = time_ms(partial(entropy.channel_minmax_numpy, x, axis=1), repeats=repeats)
        rows.append(row("channel_minmax (axis 1)", case, "x.min/max(axis=(0,2,3))", nat, ref))
        del x
    return rows


def bench_search(repeats: int) -> list[dict]:
    """KL and MSE threshold searches on histograms of a Gaussian with outliers."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(2_000_000), rng.uniform(10, 40, 20)])
    x = x.astype(np.float32)
    max_abs = float(np.abs(x).max())
    rows = []
    for bins in (2048, 8192):
        hist = np.zeros(bins, dtype=np.int64)
        native.abs_histogram(x, hist, max_abs=max_abs)
        case = f"{bins} bins, 128 quant bins"
        slow_repeats = max(1, repeats // 3) if bins > 2048 else repeats
        nat = time_ms(partial(native.kl_threshold, hist, num_quant_bins=128), repeats=repeats)
        ref = time_ms(
            partial(entropy.kl_threshold_numpy, hist, num_quant_bins=128), repeats=slow_repeats
        )
        i, kl = native.kl_threshold(hist, num_quant_bins=128)
        assert i == entropy.kl_threshold_numpy(hist, num_quant_bins=128)[0]
        rows.append(
            row("kl_threshold", case, "entropy.kl_threshold_numpy", nat, ref,
                threshold=round(i * max_abs / bins, 4), max_abs=round(max_abs, 4))
        )  # fmt: skip
        case = f"{bins} bins, 127 levels"
        nat = time_ms(partial(native.mse_threshold, hist, max_abs=max_abs), repeats=repeats)
        ref = time_ms(
            partial(entropy.mse_threshold_numpy, hist, max_abs=max_abs), repeats=slow_repeats
        )
        i, _ = native.mse_threshold(hist, max_abs=max_abs)
        assert i == entropy.mse_threshold_numpy(hist, max_abs=max_abs)[0]
        rows.append(
            row("mse_threshold", case, "entropy.mse_threshold_numpy", nat, ref,
                threshold=round(i * max_abs / bins, 4), max_abs=round(max_abs, 4))
        )  # fmt: skip
    return rows


def write_results(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibration_kernels.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# Calibration kernels: native (tvm-ffi C++) vs NumPy",
        "",
        f"{meta['cpu']}, {meta['cores']} cores (shared with other jobs), single-threaded kernels; "
        f"median (min) of {meta['repeats']} runs (NumPy KL/MSE at 8192 bins: fewer); "
        "speedup = baseline median / native median. "
        "Activations: ReLU-like N x 32 x 112 x 112 float32 with 16 outliers; "
        "searches: |x| histogram of 2M Gaussian values + 20 outliers in [10, 40].",
        "",
        "| kernel | case | baseline | native ms (min) | baseline ms (min) | speedup |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['case']} | {r['baseline']} | "
            f"{r['native_ms']:.2f} ({r['native_min_ms']:.2f}) | "
            f"{r['numpy_ms']:.2f} ({r['numpy_min_ms']:.2f}) | {r['speedup']:.1f}x |"
        )
    (RESULTS / "calibration_kernels.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args()
    rows = bench_collection(args.batches, args.repeats) + bench_search(args.repeats)
    meta = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "repeats": args.repeats,
        "numpy": np.__version__,
        "library": str(native.library_path()),
    }
    write_results(rows, meta)
    for r in rows:
        print(f"{r['kernel']:28s} {r['case']:34s} {r['baseline']:30s} "
              f"{r['native_ms']:9.2f} {r['numpy_ms']:9.2f} {r['speedup']:6.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
