"""The README's compose walk-through with numbers at every step.

PreCrop zoo:fmnist_resnet to half its MACs -> train the cropped net from scratch (seeded) ->
Quantune on it, and ZeroQ data-free as the alternative -> compose into an aarch64 bundle -> run
the bundle under qemu. Every step is the user's CLI command, run in this process. Accuracy on the
Fashion-MNIST test images, weight bytes at their real bit-widths, and host latency of the dense,
cropped and quantized models timed interleaved round by round in one process.

    python benchmarks/bench_walkthrough.py [--epochs 3] [--train-samples 20000] [--trials 8]

Writes benchmarks/results/walkthrough.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cli(argv: list[str]) -> dict:
    from tvm_compress.cli.main import main

    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--json"])
    if code != 0:
        raise SystemExit(f"step failed ({code}): tvm-compress {' '.join(argv)}")
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    result["_seconds"] = round(time.perf_counter() - start, 1)
    print(f"  {time.perf_counter() - start:6.1f} s  tvm-compress {' '.join(argv)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:fmnist_resnet")
    p.add_argument("--budget", default="macs=0.5")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="working directory; steps whose results are there are reused "
                                  "(e.g. to re-time on a quiet machine without retraining)")
    args = p.parse_args(argv)

    import tvm_compress
    from tvm_compress.backend.build import build
    from tvm_compress.backend.schedules.hardware import cpu_name
    from tvm_compress.data import fashion_mnist
    from tvm_compress.plan import CompressionPlan, apply_plans
    from tvm_compress.quant.quantize import folded_weight_bytes
    from tvm_compress.runtime.bench import interleaved
    from tvm_compress.runtime.evaluation import evaluate

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="walkthrough-"))
    print(f"working in {work}")
    d = {k: str(work / k) for k in ("precrop", "trained", "quantune", "zeroq", "bundle")}
    steps = _Steps(work / "steps")
    steps["precrop"] = lambda: cli(["precrop", args.model, "--budget", args.budget, "--seed",
                            str(args.seed), "-o", d["precrop"]])
    steps["train"] = lambda: cli(["train", args.model, "--plan", f"{d['precrop']}/plan.json",
                          "--epochs", str(args.epochs), "--train-samples",
                          str(args.train_samples), "--test-samples", "10000", "--seed",
                          str(args.seed), "-o", d["trained"]])
    trained = f"{d['trained']}/model.onnx"
    steps["quantune"] = lambda: cli(["quantune", trained, "--trials", str(args.trials), "--seed",
                             str(args.seed), "-o", d["quantune"]])
    steps["zeroq"] = lambda: cli(["zeroq", trained, "--seed", str(args.seed), "-o", d["zeroq"]])
    steps["compress"] = lambda: cli(["compress", trained, "--plan", f"{d['quantune']}/plan.json",
                             "--target", "aarch64", "--limit", "10000", "--repeat", "0",
                             "-o", d["bundle"]])

    # the four host models, measured the same way
    images, labels = fashion_mnist("test")
    calib, _ = fashion_mnist("calib")
    dense = tvm_compress.load(args.model)
    cropped = tvm_compress.load(trained)
    models = {"dense fp32 (zoo, full recipe)": (dense, folded_weight_bytes(dense)),
              "PreCrop fp32 (trained here)": (cropped, folded_weight_bytes(cropped))}
    for name in ("quantune", "zeroq"):
        plan = CompressionPlan.load(f"{d[name]}/plan.json")
        qm = apply_plans(cropped, [plan], calib=calib)
        models[f"PreCrop + {name} int8"] = (qm.model, qm.weight_bytes)
    rows, engines = {}, {}
    x1 = images[:1]
    for name, (model, nbytes) in models.items():
        compiled = build(model, target="x86")
        r = evaluate(compiled, images, labels=labels, latency_repeat=0)
        rows[name] = {"accuracy": r["accuracy"], "weight_bytes": int(nbytes),
                      "macs": int(model.layers.total_macs)}
        a = compiled._args((x1,))
        engines[name] = (lambda c=compiled, a=a: c.vm["main"](*a))
    timed = interleaved(engines, rounds=args.rounds, per_round=10, warmup=20)
    base = timed["dense fp32 (zoo, full recipe)"].median_ms
    for name, stats in timed.items():
        rows[name]["latency_ms"] = stats.median_ms
        rows[name]["latency_vs_dense"] = stats.median_ms / base
    bundle = steps["compress"]["artifact"]
    report = {"settings": vars(args), "steps": dict(steps), "host": rows, "bundle": bundle,
              "load_avg": list(os.getloadavg()), "cpu": cpu_name()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "walkthrough.json").write_text(json.dumps(report, indent=1, default=str))
    (RESULTS / "walkthrough.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


class _Steps(dict):
    """Step results, each saved as JSON when done and reused when already there."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def __setitem__(self, name: str, run: object) -> None:
        path = self.folder / f"{name}.json"
        if path.is_file():
            print(f"  reusing {name} from {path}")
            result = json.loads(path.read_text())
        else:
            result = run()  # type: ignore[operator]
            path.write_text(json.dumps(result, default=str))
        super().__setitem__(name, result)


def _markdown(r: dict) -> str:
    s = r["settings"]
    pc, tr = r["steps"]["precrop"], r["steps"]["train"]
    lines = [
        "# Compose walk-through", "",
        f"`benchmarks/bench_walkthrough.py`: {s['model']}, budget {s['budget']}, "
        f"{s['epochs']} epochs on {s['train_samples']} images, Quantune {s['trials']} trials, "
        f"seed {s['seed']}; {r['cpu']}, load {r['load_avg'][0]:.1f}. Accuracy on the 10,000 "
        "Fashion-MNIST test images; latency batch 1 on the host, interleaved rounds.", "",
        f"PreCrop: MACs {pc['achieved_fraction']['macs']:.3f}, params "
        f"{pc['achieved_fraction']['params']:.3f} of dense; trained in {tr['_seconds']} s.", "",
        "| model | test accuracy | weight bytes | MACs | host ms | x dense |",
        "|---|---:|---:|---:|---:|---:|"]
    for name, row in r["host"].items():
        lines.append(f"| {name} | {row['accuracy']:.4f} | {row['weight_bytes']:,} | "
                     f"{row['macs']:,} | {row['latency_ms']:.3f} | "
                     f"{row['latency_vs_dense']:.2f} |")
    b = r["bundle"]
    lines += ["", f"aarch64 bundle (Quantune plan): {sum(b['bytes'].values()):,} bytes "
              f"(model.so {b['bytes'].get('model.so', 0):,}); run under qemu, top-1 equal to the "
              f"host build: {b.get('top1_agrees_with_host')}; max |diff| "
              f"{b.get('max_abs_diff_vs_host', float('nan')):.2e}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
