"""Quantune leave-one-model-out, replayed from the zoo sweep's ground-truth records.

For every model whose 96 paper configurations are all measured (the held-out model), Quantune is
trained on the records of the *other* models (the prior; partially swept models count too) and
searches the held-out model's space through a :class:`ReplayEvaluator` (the measured accuracies,
nothing recompiled). Also measured: the rank variant, Quantune without a prior (2 random trials,
then its own model), and random, grid and genetic search on the same replay. Each tuner runs 10
seeds (grid is seed-independent; Quantune with a prior is deterministic up to XGBoost, whose
seed only matters without subsampling, so its seeds usually coincide - reported as measured).

Per held-out model and tuner: trials until the best-so-far first reaches the exhaustive best, is
within 0.1 point of it, and is within 0.5 point of fp32 (mean over seeds), plus the ratio of
random's mean to Quantune's. A run stops once it has reached the exhaustive best (its best-so-far
curve is flat from there). Writes benchmarks/results/quantune.{json,md} and quantune_loo.png, and
the ground-truth summary benchmarks/results/quantune_sweep.{json,md}.

    .venv/bin/python benchmarks/bench_quantune_loo.py [--records FILE] [--seeds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TUNERS = ("quantune", "quantune-rank", "quantune-noprior", "random", "grid", "genetic")


def trials_to(curve: list[float], level: float) -> int | None:
    """1-based index of the first best-so-far value >= level (None: never)."""
    for i, v in enumerate(curve):
        if v >= level - 1e-9:
            return i + 1
    return None


def run_one(recs, space, prior, tuner: str, seed: int, best: float) -> list[float]:  # noqa: ANN001
    """Best-so-far accuracy after each trial, until the exhaustive best is reached."""
    from tvm_compress.tuning.replay import ReplayEvaluator
    from tvm_compress.tuning.tuner import Objective, Task, make_tuner

    ev = ReplayEvaluator(recs)  # a fresh replay: empty cache
    baseline = ev.baseline()
    task = Task(model_id=ev.model_id, descriptors=ev.descriptors, objective=Objective(),
                baseline=baseline)
    options = {}
    name = tuner
    if tuner.startswith("quantune"):
        name = "quantune"
        options = {"prior": None if tuner.endswith("noprior") else prior,
                   "variant": "rank" if tuner.endswith("rank") else "regression"}
    built = make_tuner(name, space, task, seed=seed, **options)
    curve: list[float] = []
    cur = -1.0
    while len(curve) < len(space):
        (knobs,) = built.propose(1)
        res = ev.evaluate(knobs)
        built.update([knobs], [res])
        if res.error is None:
            cur = max(cur, res.accuracy)
        curve.append(cur)
        if cur >= best - 1e-9:
            break
    return curve + [cur] * (len(space) - len(curve))


def main(argv: list[str] | None = None) -> int:
    from tvm_compress.tuning.quantune.space import SearchSpace
    from tvm_compress.tuning.quantune.tuner import SHIPPED_PRIOR
    from tvm_compress.tuning.records import read_records
    from tvm_compress.tuning.replay import ReplayEvaluator, group_records

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=Path, default=SHIPPED_PRIOR)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--tuners", nargs="+", default=list(TUNERS), choices=TUNERS)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-partial", dest="partial", action="store_false",
                   help="hold out only fully swept models (default: also the finished "
                        "calibration-size slices of partly swept ones)")
    args = p.parse_args(argv)
    out = args.out
    warnings.filterwarnings("ignore")
    start = time.time()

    records = read_records(args.records)
    groups = group_records(records)
    sweep, held_out = {}, []
    for model, recs in groups.items():
        ev = ReplayEvaluator(recs)
        # the sweep's calibration sets: 1,000 Fashion-MNIST images, 32 photo crops (ImageNet)
        calib = 1000 if model.startswith("zoo:fmnist") else max(
            (r.knobs.calib_samples for r in recs if r.knobs), default=1)
        space = SearchSpace.paper(calib_available=calib)
        accs = [ev.truth(k).accuracy for k in space if k in ev._by_knobs]
        base = ev.baseline().accuracy
        complete = ev.covers(space)
        sweep[model] = {
            "fp32": base, "measured": len(accs), "space": len(space), "complete": complete,
            "best": max(accs) if accs else None,
            "best_drop_pts": round(100 * (base - max(accs)), 3) if accs else None,
            "worst": min(accs) if accs else None,
            "within_0.5pt": sum(100 * (base - a) <= 0.5 + 1e-9 for a in accs),
            "within_1pt": sum(100 * (base - a) <= 1.0 + 1e-9 for a in accs),
            "best_configs": [k.key for k in space if k in ev._by_knobs
                             and ev.truth(k).accuracy >= max(accs) - 1e-9] if accs else [],
            "measure_seconds_mean": float(np.mean([r.result.seconds for r in recs if r.knobs]))
            if accs else None,
        }
        if complete:
            held_out.append((model, recs, space))
        else:  # the sweep runs calibration-size-major: a finished size is a full 32-config slice
            done = tuple(n for n in space.dims["calib_samples"]
                         if ev.covers(space.restrict(calib_samples=(n,))))
            if done and args.partial:
                held_out.append((model, recs, space.restrict(calib_samples=done)))

    results: dict[str, dict] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for model, recs, space in held_out:
        truth = ReplayEvaluator(recs)
        best = max(truth.truth(k).accuracy for k in space)
        base = sweep[model]["fp32"]
        prior = [r for r in records if r.model != model]
        results[model] = {"best": best, "fp32": base, "space": len(space),
                          "calib_samples": list(space.dims["calib_samples"]),
                          "prior_models": sorted({r.model for r in prior}),
                          "prior_records": sum(r.knobs is not None for r in prior)}
        curves[model] = {}
        for tuner in args.tuners:
            runs = [run_one(recs, space, prior, tuner, seed, best) for seed in range(args.seeds)]
            t_best = [trials_to(c, best) for c in runs]
            t_01 = [trials_to(c, best - 0.001) for c in runs]
            t_drop = [trials_to(c, base - 0.005) for c in runs]

            def mean(xs: list[int | None]) -> float | None:
                return None if any(x is None for x in xs) else float(np.mean(xs))

            results[model][tuner] = {"trials_to_best": mean(t_best),
                                     "trials_to_within_0.1pt": mean(t_01),
                                     "trials_to_within_0.5pt_of_fp32": mean(t_drop),
                                     "per_seed_trials_to_best": t_best,
                                     "distinct_runs": len({tuple(c) for c in runs})}
            curves[model][tuner] = list(np.mean(np.asarray(runs), axis=0))
            print(f"{model:24s} {tuner:14s} best@{mean(t_best)} 0.1pt@{mean(t_01)} "
                  f"0.5pt-of-fp32@{mean(t_drop)}", flush=True)
        q, r = results[model].get("quantune"), results[model].get("random")
        if q and r and q["trials_to_best"]:
            results[model]["random_over_quantune"] = r["trials_to_best"] / q["trials_to_best"]

    summary = {}
    for tuner in args.tuners:
        vals = [results[m][tuner]["trials_to_best"] for m in results]
        summary[tuner] = float(np.mean(vals)) if vals else None
    if summary.get("quantune") and summary.get("random"):
        summary["random_over_quantune"] = summary["random"] / summary["quantune"]
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load": os.getloadavg(), "seeds": args.seeds, "records": str(args.records),
            "seconds": round(time.time() - start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantune_sweep.json").write_text(json.dumps({"meta": meta, "models": sweep},
                                                            indent=1))
    (out / "quantune.json").write_text(json.dumps(
        {"meta": meta, "held_out": results, "mean_trials_to_best": summary,
         "curves": curves}, indent=1))
    _plot(curves, results, out / "quantune_loo.png")
    _markdown(out, sweep, results, summary, meta, args.tuners)
    print(json.dumps(summary))
    return 0


def _plot(curves: dict, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        return
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.3), squeeze=False)
    for ax, (model, by_tuner) in zip(axes[0], curves.items(), strict=True):
        for tuner, curve in by_tuner.items():
            ax.plot(range(1, len(curve) + 1), 100 * np.asarray(curve), label=tuner)
        ax.axhline(100 * results[model]["best"], color="k", ls=":", lw=1, label="exhaustive best")
        ax.axhline(100 * results[model]["fp32"], color="gray", ls="--", lw=1, label="fp32")
        ax.set_xscale("log")
        ax.set_title(f"held out: {model} ({results[model]['space']} configs)", fontsize=9)
        ax.set_xlabel("trials")
        ax.set_ylabel("best accuracy so far (%), mean of seeds")
        ax.set_ylim(100 * results[model]["best"] - 3, 100 * results[model]["best"] + 0.5)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rel(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _fmt(x: float | None) -> str:
    return "never" if x is None else f"{x:.1f}"


def _markdown(out: Path, sweep: dict, results: dict, summary: dict, meta: dict,
              tuners: list[str]) -> None:
    lines = ["# Quantune ground truth (zoo sweep)", "",
             f"Machine: {meta['machine']}, {meta['cpus']} cores shared with other jobs. Records: "
             f"`{_rel(meta['records'])}`"
             " (written by `benchmarks/bench_quantune_sweep.py`: realized integer modules, x86, "
             "default schedules; Fashion-MNIST: accuracy on the first 500 validation images, "
             "calibration 1/100/1000; MobileNetV2: top-1 agreement with fp32 on 64 real-photo "
             "crops).", "",
             "| model | measured | fp32 | best | best drop (pts) | worst | within 0.5 pt | "
             "within 1 pt | s / trial |", "|---|---|---|---|---|---|---|---|---|"]
    for m, s in sweep.items():
        lines.append(f"| {m} | {s['measured']}/{s['space']} | {100 * s['fp32']:.1f} | "
                     f"{100 * s['best']:.1f} | {s['best_drop_pts']:+.2f} | {100 * s['worst']:.1f}"
                     f" | {s['within_0.5pt']} | {s['within_1pt']} | "
                     f"{s['measure_seconds_mean']:.1f} |")
    (out / "quantune_sweep.md").write_text("\n".join(lines) + "\n")

    lines = ["# Quantune leave-one-model-out (replayed ground truth)", "",
             f"Load average {tuple(round(x, 1) for x in meta['load'])}; {meta['seeds']} seeds per "
             f"tuner; replay took {meta['seconds']} s. Held-out models: those with all 96 paper "
             "configurations measured, and partly swept models on the calibration sizes whose 32 "
             "configurations are all measured (the space searched is then that slice); "
             "Quantune's prior: every record of the other models. "
             "Entries: mean trials until the best-so-far reaches the exhaustive best / is within "
             "0.1 point of it / is within 0.5 point of fp32.", "",
             "| held-out model (configs) | " + " | ".join(tuners) + " | random / quantune |",
             "|---|" + "---|" * (len(tuners) + 1)]
    for m, r in results.items():
        cells = [f"{_fmt(r[t]['trials_to_best'])} / {_fmt(r[t]['trials_to_within_0.1pt'])} / "
                 f"{_fmt(r[t]['trials_to_within_0.5pt_of_fp32'])}" for t in tuners]
        ratio = r.get("random_over_quantune")
        sub = "" if r["space"] == 96 else f", calib {r['calib_samples']} only"
        lines.append(f"| {m} ({r['space']}{sub}) | " + " | ".join(cells) + f" | {_fmt(ratio)}x |")
    lines += ["", "Mean trials to the exhaustive best over held-out models: " + ", ".join(
        f"{t} {_fmt(summary.get(t))}" for t in tuners)
        + (f"; random / quantune = {summary['random_over_quantune']:.1f}x (goal >= 10x, paper "
           "~36.5x)." if summary.get("random_over_quantune") else "."), "",
        "![best accuracy vs trials](quantune_loo.png)"]
    (out / "quantune.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
