"""MobileNetV2 (ImageNet weights) W8A8 in TVM: per-channel vs per-tensor, calibration methods.

Calibration: crops of scikit-image photos (calib split); evaluation: the 20 labelled ImageNet
photos plus crops of other photos (eval split) - never the calibration photos. Reports top-1 on the
labelled photos, top-1 agreement with fp32 on all evaluation images, weight bytes, latency.
Writes benchmarks/results/quant_mobilenet_v2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import tvm_compress as tc
from tvm_compress.backend.build import build
from tvm_compress.data import imagenet_photos, real_photos
from tvm_compress.quant.config import QuantConfig, QuantSpec
from tvm_compress.quant.quantize import quantize
from tvm_compress.runtime.metrics import top1_agreement

RESULTS = Path(__file__).parent / "results"


def run(granularity: str, calibration: str, model, calib, images, labels, ref,  # noqa: ANN001
        bias_correction: bool = False) -> dict:
    config = QuantConfig(weight=QuantSpec(8, "symmetric", granularity),
                         calibration=calibration, calib_samples=len(calib))
    start = time.perf_counter()
    q = quantize(model, config, calib, progress=False, bias_correction=bias_correction)
    seconds = time.perf_counter() - start
    compiled = build(q.model)
    logits = compiled.predict(images)
    return {"config": config.short() + (" +bias corr" if bias_correction else ""),
            "granularity": granularity, "calibration": calibration,
            "bias_correction": bias_correction,
            "labelled_correct": int(np.sum(np.argmax(logits[:20], 1) == labels)),
            "agreement_all": top1_agreement(logits, ref),
            "agreement_labelled": top1_agreement(logits[:20], ref[:20]),
            "weight_bytes": q.weight_bytes, "fp32_weight_bytes": q.fp32_weight_bytes,
            "fp32_layers": q.fp32_layers, "quantize_seconds": seconds,
            "latency_ms": compiled.latency(repeat=10).median_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval-crops", type=int, default=100)
    parser.add_argument("--configs", nargs="*", default=["per_channel:minmax",
                        "per_tensor:minmax", "per_channel:percentile", "per_channel:kl",
                        "per_channel:mse"], help="granularity:method[:bc] (bc: bias correction)")
    args = parser.parse_args()
    model = tc.load("zoo:mobilenet_v2")
    photos, labels = imagenet_photos()
    images = np.concatenate([photos, real_photos("eval", n=args.eval_crops)])
    calib = real_photos("calib", n=args.calib)
    fp32 = build(model)
    ref = fp32.predict(images)
    rows = []
    for item in args.configs:
        granularity, calibration, *bc = item.split(":")
        rows.append(run(granularity, calibration, model, calib, images, labels, ref,
                        bias_correction=bc == ["bc"]))
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": "zoo:mobilenet_v2", "calibration_images": args.calib,
              "evaluation_images": len(images), "fp32_labelled_correct":
              int(np.sum(np.argmax(ref[:20], 1) == labels)),
              "fp32_latency_ms": fp32.latency(repeat=10).median_ms,
              "load_average": os.getloadavg(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    old = RESULTS / "quant_mobilenet_v2.json"
    if old.exists():  # keep earlier rows of other configs measured on the same data
        prev = json.loads(old.read_text())
        if (prev["calibration_images"], prev["evaluation_images"]) == (args.calib, len(images)):
            mine = {r["config"] for r in rows}
            rows[:0] = [r for r in prev["rows"] if r["config"] not in mine]
    (RESULTS / "quant_mobilenet_v2.json").write_text(json.dumps(result, indent=2))
    lines = [f"# MobileNetV2 W8A8 in TVM ({args.calib} calibration crops, {len(images)} evaluation "
             "images: 20 labelled photos + crops of other photos)", "",
             f"fp32: {result['fp32_labelled_correct']}/20 labelled, "
             f"{result['fp32_latency_ms']:.1f} ms. Load average {result['load_average']}.", "",
             "| config | labelled top-1 | agreement (all) | agreement (labelled) | weight bytes | "
             "int8 ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['labelled_correct']}/20 | {r['agreement_all']:.3f} | "
                     f"{r['agreement_labelled']:.3f} | {r['weight_bytes']:,} "
                     f"({r['weight_bytes'] / r['fp32_weight_bytes']:.3f}x) | "
                     f"{r['latency_ms']:.1f} |")
    (RESULTS / "quant_mobilenet_v2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
