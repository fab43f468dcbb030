"""``tvm-compress compress MODEL --plan a.json [--plan b.json ...] --target T -o DIR``.

Applies plans in order (crops, then one quantization) and writes the artifact for the target: a
runner bundle for CPU targets (x86, aarch64; run under qemu here to check it), the library and
CUDA sources for CUDA targets. Reports accuracy (or agreement with fp32), weight bytes and host
latency of the compressed model next to the uncompressed one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

HELP = "apply CompressionPlans (crop, then quantize) and write the deployable artifact"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tvm_compress.cli.common import add_common

    add_common(p, target=True)
    p.add_argument("--plan", action="append", default=[], metavar="PLAN.json",
                   help="a plan written by precrop / quantize / quantune / zeroq / ajpq "
                        "(repeatable; applied in order)")
    p.add_argument("--calib", help="calibration inputs (.npz, one array per input name) for a "
                                   "quantizing plan (default: the zoo task's calibration split)")
    p.add_argument("--data", help="evaluation inputs (.npz; 'labels' array optional; default: "
                                  "the zoo task's test split)")
    p.add_argument("--limit", type=int, default=500, help="evaluate on at most N inputs")
    p.add_argument("--repeat", type=int, default=30, help="timed host runs (0: no latency)")
    p.add_argument("-o", "--output", required=True, help="output directory (bundle / package)")


def _plans(paths: list[str]) -> list[Any]:
    from tvm_compress.errors import UserError
    from tvm_compress.plan import CompressionPlan

    if not paths:
        raise UserError("give at least one --plan PLAN.json (written by a method's -o DIR)")
    return [CompressionPlan.load(p) for p in paths]


def _data(args: argparse.Namespace, model: Any, split: str) -> tuple[np.ndarray | None,
                                                                      np.ndarray | None]:
    from tvm_compress.cli.common import npz_images
    from tvm_compress.runtime.evaluation import task_data

    path = args.calib if split == "calib" else args.data
    if path:
        return npz_images(path, "calib" if split == "calib" else "data", model.input_dtype)
    if model.task is None:
        return None, None
    return task_data(model.task, split)


def run(args: argparse.Namespace, con: Any) -> dict[str, Any]:
    from tvm_compress.backend.build import build
    from tvm_compress.backend.schedules.hardware import missing_host_features
    from tvm_compress.backend.targets import resolve_target
    from tvm_compress.cli.common import load_model
    from tvm_compress.errors import UserError
    from tvm_compress.plan import apply_plans
    from tvm_compress.quant.quantize import folded_weight_bytes
    from tvm_compress.runtime.deploy import (
        _check_output_dir,
        host_arch,
        run_bundle,
        target_arch,
        write_artifact,
    )
    from tvm_compress.runtime.evaluation import evaluate
    from tvm_compress.runtime.metrics import top1_agreement

    target = resolve_target(args.target)
    out = Path(args.output)
    _check_output_dir(out)
    plans = _plans(args.plan)
    with con.step(f"importing {args.model}"):
        model = load_model(args)
    calib = None
    if any(p.quantizes for p in plans):
        calib, _ = _data(args, model, "calib")
        if calib is None:
            raise UserError(f"a plan quantizes and {args.model} has no built-in data: pass "
                            "--calib FILE.npz with calibration inputs")
    with con.step("applying " + " -> ".join(p.method for p in plans)):
        result = apply_plans(model, plans, calib=calib)
    quantized = result if hasattr(result, "simulated") else None
    compressed = quantized.model if quantized is not None else result
    images, labels = _data(args, model, "test")
    report: dict[str, Any] = {"model": args.model, "target": args.target,
                              "plans": [p.to_dict() for p in plans]}
    fp32_bytes = folded_weight_bytes(model)
    bytes_after = quantized.weight_bytes if quantized is not None else \
        folded_weight_bytes(compressed)
    report["weight_bytes"] = {"before": fp32_bytes, "after": bytes_after}
    if quantized is not None:
        report["fp32_layers"] = list(quantized.fp32_layers)
    if images is not None:
        images = images[: args.limit]
        labels = None if labels is None else labels[: args.limit]
        with con.step("measuring before and after on the host"):
            host = resolve_target("x86")
            before = build(model, target=host)
            after = build(compressed, target=host)
            m_before = evaluate(before, images, labels=labels,
                                latency_repeat=args.repeat)
            m_after = evaluate(after, images, labels=labels, reference=m_before.pop("logits"),
                               latency_repeat=args.repeat)
            m_after.pop("logits")
        for m in (m_before, m_after):
            if "latency" in m:
                m["latency_ms"] = m.pop("latency")["median_ms"]
        report["host"] = {"before": m_before, "after": m_after}
    with con.step(f"compiling for {args.target}"):
        compiled = build(compressed, target=target)
    arch = target_arch(target)
    extra = {"plans": [p.method for p in plans], "weight_bytes": bytes_after}
    with con.step(f"writing {out}"):
        meta = write_artifact(compiled, out, model_name=model.name, preset=args.target,
                              sample=images[:1] if images is not None else None,
                              extra_meta=extra)
    report["artifact"] = {"dir": str(out), "bytes": meta["bytes"]}
    missing = missing_host_features(target) if arch == host_arch() else []
    if missing:  # e.g. an x86-vnni bundle written on an AVX2 machine: it would die here
        report["artifact"]["run"] = f"not run here: this CPU lacks {', '.join(missing)}"
    elif arch != "cuda":
        with con.step(f"running the bundle ({'qemu' if arch != 'x86_64' else 'native'})"):
            outs, _ = run_bundle(out)
        if images is not None:  # the host build of the same compressed model
            host_out = after.predict(images[:1])
            report["artifact"]["max_abs_diff_vs_host"] = float(
                np.max(np.abs(outs[0].astype(np.float64) - host_out.astype(np.float64))))
            report["artifact"]["top1_agrees_with_host"] = bool(
                top1_agreement(outs[0], host_out) == 1.0)
    (out / "compress.json").write_text(json.dumps(report, indent=1, default=str))
    for i, plan in enumerate(plans):
        plan.save(out / f"plan_{i + 1}_{plan.method}.json")
    _print(con, report)
    return report


def _print(con: Any, r: dict[str, Any]) -> None:
    rows = [["weight bytes", f"{r['weight_bytes']['before']:,}", f"{r['weight_bytes']['after']:,}"]]
    host = r.get("host")
    if host:
        for key, label in (("accuracy", "accuracy"), ("agreement", "top-1 agreement"),
                           ("latency_ms", "host latency ms")):
            b, a = host["before"].get(key), host["after"].get(key)
            if a is not None:
                fmt = (lambda v: f"{v:.3f}") if key != "latency_ms" else (lambda v: f"{v:.2f}")
                rows.append([label, "-" if b is None else fmt(b), fmt(a)])
    con.table(f"{r['model']} -> {r['target']}", ["", "before", "after"], rows)
    art = r["artifact"]
    con.out.print(f"wrote {art['dir']} ({sum(art['bytes'].values()):,} bytes)")
