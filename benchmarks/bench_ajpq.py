"""AJPQ vs L1 prune-then-quantize vs random joint search on the Fashion-MNIST zoo, in TVM.

Per model: the AJPQ search (hierarchical DDPG), the sequential baseline (L1 pruning to the budget,
then the best uniform bit-width) and random search in the same constrained joint space, all with
the same proxy reward (val-subset accuracy of the cropped, fake-quantized torch model); each final
plan gets the same short fake-quant fine-tune, is realized in TVM (CropChannels + integer
kernels with per-channel bit-widths) and measured: test accuracy, weight bytes at real bits,
latency vs the fp32 build. Writes benchmarks/results/ajpq_<model>.json (one per model, so models
can run as separate processes) and, with --merge, ajpq.json + ajpq.md + the plots.

    python benchmarks/bench_ajpq.py --models fmnist_resnet --episodes 100
    python benchmarks/bench_ajpq.py --merge
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run_model(name: str, args: argparse.Namespace) -> dict:
    import torch

    from tvm_compress import zoo
    from tvm_compress.tuning.ajpq.run import AJPQSettings, run_ajpq

    torch.set_num_threads(1)
    settings = AJPQSettings(budget=args.budget, episodes=args.episodes, seed=args.seed,
                            val_samples=args.val_samples, finetune_samples=args.finetune_samples,
                            test_samples=args.test_samples, latency_repeat=args.repeat,
                            finetune_lr=args.finetune_lr)
    suffix = "" if args.finetune_lr == 0.002 else f"_lr{args.finetune_lr:g}"
    if args.budget != "size=0.2":  # other budgets get their own files
        suffix += "_" + args.budget.replace("=", "").replace(",", "_")
    out = RESULTS / f"ajpq_{name}{suffix}"
    report = run_ajpq(zoo.torch_model(name), settings, name=name, out_dir=out, progress=True,
                      log=print)
    report["machine"] = {"cpu": platform.processor() or platform.machine(),
                         "cores": os.cpu_count(), "torch_threads": 1,
                         "load_avg_end": list(os.getloadavg())}
    (RESULTS / f"ajpq_{name}{suffix}.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def latency_check(name: str, repeat: int) -> dict:
    """Do cropped channels show up as speed? The same 8-bit integer model with all channels vs
    L1-pruned to half the MACs (``uniform_plan`` at ``macs=0.5``), compiled and timed in
    alternating rounds (no accuracy: the point is the kernels)."""
    import numpy as np
    import torch

    from tvm_compress import zoo
    from tvm_compress.backend.build import build
    from tvm_compress.data import fashion_mnist
    from tvm_compress.tuning.ajpq.joint import Budget, JointPlan, JointSpace, realize, uniform_plan

    torch.set_num_threads(1)
    calib = fashion_mnist("calib")[0][:64]
    space = JointSpace(zoo.torch_model(name), torch.zeros(1, 1, 28, 28), calib=calib)
    plans = {"8-bit, all channels": JointPlan({}, {x.name: 8.0 for x in space.layers}),
             "8-bit, L1-pruned to <= 0.5 MACs": uniform_plan(space, Budget(1.0, 0.5), 8)}
    fp32 = build(space.model)
    compiled = {k: build(realize(space, p, calib[:32]).quantized.model)
                for k, p in plans.items()}
    times: dict[str, list[float]] = {"fp32": [], **{k: [] for k in plans}}
    for _ in range(3):
        times["fp32"].append(fp32.latency(repeat=repeat).median_ms)
        for k, c in compiled.items():
            times[k].append(c.latency(repeat=repeat).median_ms)
    rows = {k: {"median_ms": float(np.median(v)),
                "macs_fraction": 1.0 if k == "fp32" else space.plan_macs(plans[k]) /
                space.fp32_macs} for k, v in times.items()}
    out = {"model": name, "rows": rows, "load_avg": list(os.getloadavg())}
    (RESULTS / f"ajpq_latency_{name}.json").write_text(json.dumps(out, indent=1))
    return out


def merge() -> None:
    reports = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("ajpq_fmnist_*.json"))]
    reports.sort(key=lambda r: (r["model"], r["settings"]["budget"] != "size=0.2",
                                r["settings"]["budget"], -r["settings"]["finetune_lr"]))
    (RESULTS / "ajpq.json").write_text(json.dumps(reports, indent=1))
    lines = ["# AJPQ: joint pruning + mixed precision, realized in TVM", ""]
    if reports:
        s = reports[0]["settings"]
        lines += [
            f"Machine: {reports[0]['machine']['cores']} shared CPU cores (load average "
            f"{', '.join(f'{x:.1f}' for x in reports[0]['load_avg'])} at the start), torch 1 "
            "thread, TVM x86 default schedules; latencies are noisy under that load.",
            f"Settings: budget `{s['budget']}` (weight bytes as a fraction of fp32, biases "
            f"included; per-channel bits packed), {s['episodes']} episodes for AJPQ and for "
            f"random search, reward = accuracy on the first {s['val_samples']} val images of "
            "the cropped + fake-quantized torch model (no fine-tune), bias compensation from "
            f"{s['calib_samples']} calib images, max sparsity {s['max_sparsity']} per group, "
            f"channel counts in multiples of {s['granule']}, size left unused by an episode's "
            "actions spent on bits (`fill_budget`, AJPQ and random alike); fine-tune of every "
            "final plan: "
            f"{s['finetune_epochs']} epoch on {s['finetune_samples']} train images (fake-quant "
            "weights, STE, SGD with the table's lr, cosine); accuracy on the first "
            f"{s['test_samples']} test images of the TVM integer model (8-bit activations).",
            "The sequential baseline (L1 pruning to the budget, then the best uniform bit-width "
            "2-8) needs only one evaluation per bit-width that fits. Accuracy differences below "
            "about 0.6 points are within the noise of 2000 test images.", ""]
    lines += ["| model | FT lr | method | size / fp32 | compression | MACs / fp32 | evals "
              "| best reward | test acc before FT | test acc (TVM) | drop vs fp32 (points) "
              "| TVM vs proxy agreement | latency ms | speedup vs fp32 |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        fp = r["fp32"]
        lat = (fp.get("latency") or {}).get("median_ms")
        lr = r["settings"]["finetune_lr"]
        budget = r["settings"]["budget"]
        label = r["model"] if budget == "size=0.2" else f"{r['model']} @ {budget}"
        lines.append(f"| {label} | - | fp32 | 1 | 1.0x | 1 | - | - | - | "
                     f"{fp['test_accuracy']:.4f} | - | - | {lat:.3f} | 1.00 |")
        for m, e in r["methods"].items():
            lines.append(
                f"| {label} | {lr:g} | {m} | {e['size_fraction']:.4f} | "
                f"{e['compression']:.1f}x | "
                f"{e['macs_fraction']:.3f} | {e['evaluations']} | {e['best_proxy_reward']:.3f} "
                f"| {e['test_accuracy_before_finetune']:.4f} | {e['test_accuracy']:.4f} | "
                f"{e['accuracy_drop_points']:+.2f} | {e['tvm_vs_proxy_top1_agreement']:.3f} | "
                f"{e['latency']['median_ms']:.3f} | {e['speedup_vs_fp32']:.2f} |")
    lines += ["", "Plots: `ajpq_<model>/ajpq_<model>.png` (episode rewards; accuracy vs size)."]
    for p in sorted(RESULTS.glob("ajpq_latency_*.json")):
        lat = json.loads(p.read_text())
        base = lat["rows"]["fp32"]["median_ms"]
        lines += ["", f"**Cropped channels as speed** ({lat['model']}, TVM x86, batch 1, median "
                  "of 3 alternating rounds, load "
                  f"{', '.join(f'{x:.1f}' for x in lat['load_avg'])}):", "",
                  "| model variant | MACs / fp32 | latency ms | speedup vs fp32 |",
                  "|---|---:|---:|---:|"]
        for k, r in lat["rows"].items():
            lines.append(f"| {k} | {r['macs_fraction']:.3f} | {r['median_ms']:.3f} | "
                         f"{base / r['median_ms']:.2f} |")
    (RESULTS / "ajpq.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["fmnist_resnet", "fmnist_mobilenet_v2"])
    p.add_argument("--budget", default="size=0.2")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-samples", type=int, default=500)
    p.add_argument("--finetune-samples", type=int, default=10000)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--finetune-lr", type=float, default=0.002)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--merge", action="store_true", help="only merge per-model results")
    p.add_argument("--latency-check", action="store_true",
                   help="only time all-channel vs half-MAC pruned 8-bit models (then merge)")
    args = p.parse_args()
    if args.latency_check:
        for name in args.models:
            latency_check(name, args.repeat)
    elif not args.merge:
        for name in args.models:
            run_model(name, args)
    merge()


if __name__ == "__main__":
    main()
