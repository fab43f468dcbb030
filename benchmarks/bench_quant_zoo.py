"""Fashion-MNIST zoo W8A8 in TVM: fp32 vs realized int8 test accuracy for every calibration method
x scheme x weight granularity.

Scheme applies to weights and activations together (symmetric: int8 both, zero point 0;
asymmetric: zero points for both). Calibration statistics are collected once per model
(``collect_calibration``) and reused by the 16 configs. Calibration: the first ``--calib`` images
of the "calib" split (training images); evaluation: the official test set (``--test`` first images).
Each row is written as soon as it is measured and a rerun resumes.
Writes benchmarks/results/quant_zoo.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import tvm_compress as tc
from tvm_compress.backend.build import build
from tvm_compress.data import fashion_mnist
from tvm_compress.quant.config import QuantConfig, QuantSpec
from tvm_compress.quant.quantize import collect_calibration, quantize
from tvm_compress.runtime.metrics import accuracy

RESULTS = Path(__file__).parent / "results"
MODELS = ("resnet", "mobilenet_v2", "shufflenet_v2", "squeezenet", "googlenet", "vgg")
METHODS = ("minmax", "percentile", "kl", "mse")
SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("per_tensor", "per_channel")
GOAL_DROP = 0.5  # accuracy points, best calibration method per model (issue 3)


def config_for(method: str, scheme: str, granularity: str, calib: int) -> QuantConfig:
    return QuantConfig(weight=QuantSpec(8, scheme, granularity), activation=QuantSpec(8, scheme),
                       calibration=method, calib_samples=calib)


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant_zoo.json").write_text(json.dumps(result, indent=2))
    rows = result["rows"]
    lines = [f"# Fashion-MNIST zoo W8A8 in TVM ({result['calibration_images']} calibration "
             "images; test images per model in the first table: the first N of the official "
             "test set, a subset for time on a shared 2-core machine)", "",
             f"Realized integer modules built for x86 (default schedules) and run on the TVM VM. "
             f"Machine: {result['machine']}; load average at the end {result['load_average']}. "
             "Scheme = weights and activations; granularity = weights (activations per tensor). "
             f"Goal (issue 3): drop <= {GOAL_DROP} points with the best calibration method.", "",
             "| model | test images | fp32 | best W8A8 (config) | drop | goal |",
             "|---|---:|---:|---|---:|---|"]
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["accuracy"])
        drop = 100 * (best["fp32_accuracy"] - best["accuracy"])
        lines.append(f"| {name} | {best.get('test_images', result['test_images'])} | "
                     f"{best['fp32_accuracy']:.4f} | {best['accuracy']:.4f} "
                     f"({best['config']}) | {drop:.2f} | "
                     f"{'met' if drop <= GOAL_DROP else 'missed'} |")
    lines += ["", "Accuracy drop in points (fp32 - W8A8) for every config:", "",
              "| model | granularity | scheme | " + " | ".join(METHODS) + " |",
              "|---|---|---|" + "---:|" * len(METHODS)]
    for name, gran, scheme in itertools.product(MODELS, GRANULARITIES, SCHEMES):
        cells = []
        for method in METHODS:
            r = next((r for r in rows if (r["model"], r["granularity"], r["scheme"],
                                          r["method"]) == (name, gran, scheme, method)), None)
            cells.append("" if r is None else f"{100 * (r['fp32_accuracy'] - r['accuracy']):.2f}")
        if any(cells):
            lines.append(f"| {name} | {gran} | {scheme} | " + " | ".join(cells) + " |")
    (RESULTS / "quant_zoo.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calib", type=int, default=500)
    parser.add_argument("--test", type=int, default=10_000)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--fresh", action="store_true", help="ignore earlier rows")
    parser.add_argument("--configs", nargs="*", default=None,
                        help="subset as granularity:scheme:method (default: all 16)")
    args = parser.parse_args()
    path = RESULTS / "quant_zoo.json"
    result = {"calibration_images": args.calib, "test_images": args.test,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "rows": []}
    if path.exists() and not args.fresh:  # rows keep their own test size
        old = json.loads(path.read_text())
        if old["calibration_images"] == args.calib:
            result["rows"] = old["rows"]
    done = {(r["model"], r["config"]) for r in result["rows"]}
    images, labels = fashion_mnist("test")
    images, labels = images[: args.test], labels[: args.test]
    calib, _ = fashion_mnist("calib")
    for name in args.models:
        configs = [config_for(m, s, g, args.calib)
                   for m, s, g in itertools.product(METHODS, SCHEMES, GRANULARITIES)
                   if args.configs is None or f"{g}:{s}:{m}" in args.configs]
        if all((name, c.short()) in done for c in configs):
            continue
        model = tc.load(f"zoo:fmnist_{name}", batch=args.batch)
        fp32 = accuracy(build(model).predict(images), labels)
        start = time.perf_counter()
        stats = collect_calibration(model, configs[0], calib, progress=False)
        calib_s = time.perf_counter() - start
        for config in configs:
            if (name, config.short()) in done:
                continue
            start = time.perf_counter()
            q = quantize(model, config, calib, progress=False, stats=stats)
            acc = accuracy(build(q.model).predict(images), labels)
            row = {"model": name, "config": config.short(), "method": config.calibration,
                   "scheme": config.activation.scheme, "granularity": config.weight.granularity,
                   "test_images": len(images), "fp32_accuracy": fp32, "accuracy": acc,
                   "fp32_layers": q.fp32_layers,
                   "calibration_seconds": calib_s,
                   "seconds": time.perf_counter() - start}
            result["rows"].append(row)
            result["load_average"] = [round(v, 2) for v in os.getloadavg()]
            write(result)
            print(f"{name:14s} {config.short():40s} fp32 {fp32:.4f} int8 {acc:.4f} "
                  f"({row['seconds']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
