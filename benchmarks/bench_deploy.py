"""Deployment bundles at full size: MobileNetV2 and a cropped+int8 zoo model on aarch64 (qemu).

For each case: build for the host (x86) and for aarch64, write both bundles, run the aarch64 one
under qemu-aarch64-static and the x86 one natively on the same inputs, and record the largest
output difference (fp32: goal <= 1e-5; int8: goal exactly equal), top-1 agreement, bundle sizes.
qemu timings are emulation and say nothing about ARM speed; they are recorded only as run cost.

    .venv/bin/python benchmarks/bench_deploy.py [--quick]

Writes benchmarks/results/deploy.json and deploy.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _crop_plan(mod, keep: float) -> dict[int, list[int]]:
    from tvm_compress.graph.channel_groups import analyze_channel_groups

    return {g.id: list(range(max(1, math.ceil(keep * g.size))))
            for g in analyze_channel_groups(mod) if g.prunable}


def _cases(quick: bool):
    from tvm_compress import load
    from tvm_compress.passes.crop_channels import crop_channels
    from tvm_compress.quant.config import QuantConfig
    from tvm_compress.quant.quantize import quantize
    from tvm_compress.runtime.evaluation import task_data

    mnv2 = load("zoo:mobilenet_v2")
    photos, _ = task_data("imagenet", "test")
    n = 2 if quick else 4
    yield "mobilenet_v2 fp32", mnv2, photos[:n].astype("float32"), "fp32"
    calib, _ = task_data("imagenet", "calib")
    q = quantize(mnv2, QuantConfig(calib_samples=16), calib[:16], progress=False)
    yield "mobilenet_v2 int8 (W8A8 per-channel)", q.model, photos[:n].astype("float32"), "int8"
    resnet = load("zoo:fmnist_resnet")
    cropped = resnet.with_mod(crop_channels(resnet.mod, _crop_plan(resnet.mod, 0.75)))
    fm, _ = task_data("fashion_mnist", "calib")
    qc = quantize(cropped, QuantConfig(calib_samples=32), fm[:32], progress=False)
    test, _ = task_data("fashion_mnist", "test")
    yield ("fmnist_resnet cropped to 75% channels + int8", qc.model,
           test[: (4 if quick else 16)].astype("float32"), "int8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer inputs")
    args = parser.parse_args()
    import tvm

    from tvm_compress.backend.build import build
    from tvm_compress.runtime import deploy

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        for name, model, images, kind in _cases(args.quick):
            print(f"== {name}", flush=True)
            start = time.perf_counter()
            x86 = build(model, target="x86")
            a64 = build(model, target="aarch64")
            build_s = time.perf_counter() - start
            paths = {}
            for arch, compiled in (("x86", x86), ("aarch64", a64)):
                paths[arch] = Path(tmp) / f"{len(rows)}-{arch}"
                deploy.write_bundle(compiled, paths[arch], model_name=name, preset=arch,
                                    sample=images[:1])
            diffs, agree, qemu_ms = [], 0, []
            for i in range(len(images)):
                x = images[i:i + 1]
                ref, _ = deploy.run_bundle(paths["x86"], [x])
                got, rep = deploy.run_bundle(paths["aarch64"], [x], repeat=1, warmup=0)
                vm_ref = x86.run(x)
                assert np.array_equal(ref[0], vm_ref), "x86 runner differs from the Python VM"
                diffs.append(float(np.abs(got[0] - ref[0]).max()))
                agree += int(got[0].argmax() == ref[0].argmax())
                qemu_ms.append(rep["median_ms"])
                print(f"  input {i}: max |aarch64 - x86| = {diffs[-1]:.3g}", flush=True)
            sizes = deploy.bundle_sizes(paths["aarch64"])
            goal = 1e-5 if kind == "fp32" else 0.0
            rows.append({"case": name, "kind": kind, "inputs": len(images),
                         "max_abs_diff": max(diffs), "goal_max_abs_diff": goal,
                         "met": max(diffs) <= goal, "top1_agreement": agree / len(images),
                         "bundle_bytes": sizes["total"], "model_so_bytes": sizes["model.so"],
                         "runtime_bytes": sizes["lib/libtvm_runtime.so"]
                         + sizes["lib/libtvm_ffi.so"] + sizes["runner"],
                         "qemu_run_ms_median": float(np.median(qemu_ms)),
                         "build_seconds": round(build_s, 1)})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(), "tvm": tvm.__version__, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick,
            "qemu": "qemu-aarch64-static -L /usr/aarch64-linux-gnu (emulation: timings are not "
                    "ARM speed)"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "deploy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Deployment bundles: aarch64 (qemu) vs x86, same inputs", "",
             f"Machine: {meta['machine']}, {meta['cpus']} CPUs, load {meta['loadavg'][0]:.1f}; "
             f"TVM {meta['tvm']}; {meta['date']}. aarch64 bundles run under {meta['qemu']}.",
             "x86 outputs come from the x86 bundle's C++ runner (checked equal to the Python VM).",
             "", "| case | inputs | max abs diff aarch64 vs x86 | goal | met | top-1 agreement "
             "| bundle bytes | model.so bytes | qemu ms/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['inputs']} | {r['max_abs_diff']:.3g} | "
                     f"{'exact' if r['goal_max_abs_diff'] == 0 else r['goal_max_abs_diff']} | "
                     f"{'yes' if r['met'] else 'no'} | {r['top1_agreement']:.2f} | "
                     f"{r['bundle_bytes']:,} | {r['model_so_bytes']:,} | "
                     f"{r['qemu_run_ms_median']:.0f} |")
    (RESULTS / "deploy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
