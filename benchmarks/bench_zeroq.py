"""ZeroQ data-free quantization, measured with the real TVM integer builds.

MobileNetV2 (ImageNet weights): W8A8 calibrated on distilled data vs on real photos vs on Gaussian
noise (evaluation: the 20 labelled photos + crops of other photos, top-1 agreement with fp32), and
mixed precision at <= 1/6 of the fp32 weight bytes; pipeline wall time (distill + sensitivity +
frontier + quantize/build) with distillation separate. Fashion-MNIST zoo: W8A8 data-free accuracy
drop, and mixed precision at an average of 4 weight bits vs uniform 4-bit weights.
Writes benchmarks/results/zeroq.{json,md} (each part is saved as soon as it is measured) and
benchmarks/results/zeroq_frontier_mobilenet_v2.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads must not spin
import torch  # noqa: E402

import tvm_compress as tc  # noqa: E402
from tvm_compress.backend.build import build
from tvm_compress.quant.config import QuantConfig, QuantSpec
from tvm_compress.quant.quantize import quantize
from tvm_compress.runtime.metrics import accuracy, sqnr_db, top1_agreement
from tvm_compress.tuning.zeroq.distill import distill, gaussian_images
from tvm_compress.tuning.zeroq.mixed import plan_mixed, plot_frontier, sensitivity

RESULTS = Path(__file__).parent / "results"
JSON = RESULTS / "zeroq.json"


def _save(part: str, value: Any) -> None:
    data = json.loads(JSON.read_text()) if JSON.exists() else {}
    data[part] = value
    RESULTS.mkdir(exist_ok=True)
    JSON.write_text(json.dumps(data, indent=1, default=float))
    _write_md(data)


def _measure(model: Any, config: QuantConfig, calib: np.ndarray, images: np.ndarray,
             ref: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    start = time.perf_counter()
    q = quantize(model, config, calib.astype(np.float32), progress=False)
    logits = build(q.model).predict(images)
    row = {"config": config.short(), "agreement": top1_agreement(logits, ref),
           "sqnr_db": sqnr_db(logits, ref), "weight_bytes": q.weight_bytes,
           "fp32_weight_bytes": q.fp32_weight_bytes, "fp32_layers": q.fp32_layers,
           "quantize_build_s": time.perf_counter() - start}
    if labels is not None:
        row["accuracy"] = accuracy(logits[: len(labels)], labels)
        row["correct"] = int(np.sum(np.argmax(logits[: len(labels)], 1) == labels))
    print(json.dumps({k: v for k, v in row.items() if k != "fp32_layers"}), flush=True)
    return row


def mobilenet(args: argparse.Namespace) -> None:
    """W8A8 agreement for distilled / Gaussian / real-photo calibration over several seeds (each
    measurement saved as it lands; a rerun resumes), then the timed pipeline on seed 0."""
    from tvm_compress.data import imagenet_photos, real_photos

    model = tc.load("zoo:mobilenet_v2")
    photos, labels = imagenet_photos()
    images = np.concatenate([photos, real_photos("eval", n=args.eval_crops)])
    ref = build(model).predict(images)
    old = json.loads(JSON.read_text()).get("mobilenet_v2", {}) if JSON.exists() else {}
    recipe = {"samples": args.samples, "iterations": args.iterations, "lr": args.lr,
              "label_weight": args.label_weight, "eval_crops": args.eval_crops}
    out: dict[str, Any] = old if old.get("recipe") == recipe else {}
    out.update(recipe=recipe, evaluation_images=len(images),
               fp32_correct=int(np.sum(np.argmax(ref[:20], 1) == labels)))
    out.setdefault("load_average_start", os.getloadavg())
    out.setdefault("distillations", {})
    out.setdefault("w8a8", [])
    done = {(r["method"], r["source"], r["seed"]) for r in out["w8a8"]}
    shape = tuple(model.input_shape[1:])
    distilled = {}
    for seed in range(args.seeds):
        d = distill(model, batch=args.samples, iterations=args.iterations, lr=args.lr,
                    label_weight=args.label_weight, seed=seed, progress=False)
        distilled[seed] = d
        out["distillations"][str(seed)] = {**d.settings, "initial_loss": d.initial_loss,
                                           "final_loss": d.final_loss, "seconds": d.seconds}
        print(json.dumps(out["distillations"][str(seed)]), flush=True)
        sources = {"distilled": d.images,
                   "gaussian": gaussian_images(shape, args.samples, seed=seed),
                   "real_photos": real_photos("calib", n=args.samples, seed=seed)}
        for method in args.methods.split(","):
            config = QuantConfig(calib_samples=args.samples, calibration=method)
            for source, calib in sources.items():
                if (method, source, seed) in done:
                    continue
                row = _measure(model, config, calib, images, ref, labels)
                out["w8a8"].append({"method": method, "source": source, "seed": seed, **row})
                _save("mobilenet_v2", out)
    # the pipeline `tvm-compress zeroq --size-budget` runs, timed stage by stage (seed 0)
    d = distilled[0]
    t = time.perf_counter()
    sens = sensitivity(model, model.torch_module, d.images[: args.sens_samples], progress=False)
    out["sensitivity_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fp32_bytes = out["w8a8"][0]["fp32_weight_bytes"]
    w8a8 = QuantConfig(calib_samples=args.samples, calibration=args.mixed_method)
    plan = plan_mixed(model, model.torch_module, sens, size_budget=fp32_bytes // 6)
    out["frontier_s"] = time.perf_counter() - t
    mixed = _measure(model, plan.config(w8a8), d.images, images, ref, labels)
    out["mixed"] = {**mixed, "budget_bytes": fp32_bytes // 6,
                    "average_weight_bits": plan.average_bits(),
                    "total_sensitivity": plan.chosen.sensitivity,
                    "bits": plan.bits}
    out["pipeline_s"] = (d.seconds + out["sensitivity_s"] + out["frontier_s"]
                         + mixed["quantize_build_s"])
    plot_frontier(plan, RESULTS / "zeroq_frontier_mobilenet_v2.png",
                  title="ZeroQ MobileNetV2 (budget 1/6 of fp32 bytes)")
    out["load_average_end"] = os.getloadavg()
    _save("mobilenet_v2", out)


def fmnist(args: argparse.Namespace) -> None:
    from tvm_compress.data import fashion_mnist
    from tvm_compress.zoo import FMNIST_ARCHS

    images, labels = fashion_mnist("test")
    images, labels = images[: args.test], labels[: args.test]
    rows = json.loads(JSON.read_text()).get("fmnist", {}) if JSON.exists() else {}
    for arch in args.archs or FMNIST_ARCHS:
        name = f"fmnist_{arch}"
        if name in rows:
            continue
        model = tc.load(f"zoo:{name}", batch=50)
        with torch.no_grad():
            ref = np.concatenate([model.torch_module(torch.from_numpy(images[i:i + 500])).numpy()
                                  for i in range(0, len(images), 500)])
        d = distill(model, batch=32, iterations=args.fmnist_iterations,
                    label_weight=args.fmnist_label_weight, progress=False)
        row: dict[str, Any] = {"fp32_accuracy": accuracy(ref, labels), "distillation": d.settings,
                               "distill_s": d.seconds, "distill_loss": [d.initial_loss,
                                                                        d.final_loss]}
        base = QuantConfig(calib_samples=32)
        row["w8a8_distilled"] = _measure(model, base, d.images, images, ref, labels)
        sens = sensitivity(model, model.torch_module, d.images[:16], progress=False)
        plan = plan_mixed(model, model.torch_module, sens, avg_bits=4)
        row["mixed4"] = {**_measure(model, plan.config(base), d.images, images, ref, labels),
                         "average_weight_bits": plan.average_bits(), "bits": plan.bits}
        row["uniform4"] = _measure(model, QuantConfig(
            weight=QuantSpec(4, "symmetric", "per_channel"), calib_samples=32), d.images, images,
            ref, labels)
        row["load_average"] = os.getloadavg()
        rows[name] = row
        _save("fmnist", rows)


def _mobilenet_md(mb: dict[str, Any]) -> list[str]:
    rc = mb["recipe"]
    dists = mb["distillations"]
    first = next(iter(dists.values()))
    lines = ["## MobileNetV2 (ImageNet weights), distilled on this CPU", "",
             f"Distillation: {rc['samples']} inputs, {rc['iterations']} Adam steps, lr "
             f"{rc['lr']} (cosine decay), label weight {rc['label_weight']}, inputs kept in the "
             f"normalized pixel range (`input_range='auto'`), torch on {first['threads']} "
             "threads; BN loss per seed: "
             + ", ".join(f"{d['initial_loss']:.3g} -> {d['final_loss']:.3g} ({d['seconds']:.0f} s)"
                         for d in dists.values()) + ".",
             f"Evaluation: {mb['evaluation_images']} images (20 labelled ImageNet photos + "
             f"{rc['eval_crops']} crops of other photos), top-1 agreement with fp32; fp32 gets "
             f"{mb['fp32_correct']}/20. Each seed draws its own distilled set, Gaussian noise "
             f"and real-photo crops ({rc['samples']} calibration inputs each). Load average "
             f"{[round(v, 2) for v in mb['load_average_start']]} at the start.", "",
             "| W8A8 activation calibration | source | agreement per seed | mean | labelled "
             "correct (mean) |", "|---|---|---|---:|---:|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in mb["w8a8"]:
        groups.setdefault((r["method"], r["source"]), []).append(r)
    for (method, source), rows in groups.items():
        agree = [r["agreement"] for r in rows]
        lines.append(f"| {method} | {source} | {' / '.join(f'{a:.3f}' for a in agree)} | "
                     f"{np.mean(agree):.3f} | {np.mean([r['correct'] for r in rows]):.1f}/20 |")
    if "mixed" in mb:
        r = mb["mixed"]
        lines += ["", f"Mixed precision (seed 0, {r['config']}), budget {r['budget_bytes']:,} "
                  f"bytes (1/6 of fp32 {r['fp32_weight_bytes']:,}): "
                  f"{r['average_weight_bits']:.2f} weight bits on average, real weight bytes "
                  f"{r['weight_bytes']:,} "
                  f"({r['weight_bytes'] / r['fp32_weight_bytes']:.3f}x fp32), "
                  f"labelled {r['correct']}/20, agreement {r['agreement']:.3f}, SQNR "
                  f"{r['sqnr_db']:.1f} dB.", "",
                  f"Pipeline (distill {first['seconds']:.0f} s + sensitivity "
                  f"{mb['sensitivity_s']:.0f} s + frontier {mb['frontier_s']:.1f} s + "
                  f"quantize/build {r['quantize_build_s']:.0f} s): **{mb['pipeline_s']:.0f} s**. "
                  f"Load average at the end {[round(v, 2) for v in mb['load_average_end']]}.",
                  "Frontier plot: `zeroq_frontier_mobilenet_v2.png`."]
    return lines


def _write_md(data: dict[str, Any]) -> None:
    lines = ["# ZeroQ: data-free quantization (TVM integer builds)", "",
             "Machine: 2 CPU cores. Distillation settings are reduced from the paper's (32 "
             "inputs, 500 steps) to fit this machine, stated per part; the paper's recipe run on "
             "a GPU is in `zeroq_gpu.md`.", ""]
    mb = data.get("mobilenet_v2")
    if mb and "recipe" in mb:
        lines += _mobilenet_md(mb)
    rows = data.get("fmnist")
    if rows:
        lines += ["", "## Fashion-MNIST zoo", "",
                  f"Test subset: first {data.get('fmnist_test', 2000)} test images. "
                  "Distillation: batch 32, inputs kept in the normalized pixel range, settings "
                  "in zeroq.json. Mixed: average 4 weight bits "
                  "(candidates 2, 3, 4, 5, 6, 8), activations 8 bits, both calibrated on the "
                  "distilled data.", "",
                  "| model | fp32 acc | W8A8 data-free acc (drop) | uniform 4-bit acc / SQNR / "
                  "bytes | mixed avg-4 acc / SQNR / bytes |", "|---|---|---|---|---|"]
        for name, r in rows.items():
            w, u, m = r["w8a8_distilled"], r["uniform4"], r["mixed4"]
            lines.append(
                f"| {name} | {r['fp32_accuracy']:.4f} | {w['accuracy']:.4f} "
                f"({100 * (r['fp32_accuracy'] - w['accuracy']):+.2f} pt) | {u['accuracy']:.4f} / "
                f"{u['sqnr_db']:.1f} / {u['weight_bytes']:,} | {m['accuracy']:.4f} / "
                f"{m['sqnr_db']:.1f} / {m['weight_bytes']:,} |")
    (RESULTS / "zeroq.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("part", choices=["mobilenet", "fmnist", "all"])
    parser.add_argument("--samples", type=int, default=8, help="MobileNetV2 distilled inputs")
    parser.add_argument("--iterations", type=int, default=200, help="MobileNetV2 distill steps")
    parser.add_argument("--lr", type=float, default=0.5, help="MobileNetV2 distillation lr")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="minmax,percentile",
                        help="W8A8 activation calibrations to compare")
    parser.add_argument("--mixed-method", default="percentile",
                        help="activation calibration of the mixed-precision pipeline")
    parser.add_argument("--sens-samples", type=int, default=8)
    parser.add_argument("--eval-crops", type=int, default=400)
    parser.add_argument("--label-weight", type=float, default=0.0,
                        help="MobileNetV2: 0 = the paper's BN-only loss")
    parser.add_argument("--fmnist-label-weight", type=float, default=1.0)
    parser.add_argument("--test", type=int, default=2000, help="Fashion-MNIST test images")
    parser.add_argument("--fmnist-iterations", type=int, default=100)
    parser.add_argument("--archs", nargs="*")
    args = parser.parse_args()
    if args.part in ("mobilenet", "all"):
        mobilenet(args)
    if args.part in ("fmnist", "all"):
        _save("fmnist_test", args.test)
        fmnist(args)


if __name__ == "__main__":
    main()
