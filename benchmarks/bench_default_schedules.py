"""MobileNetV2 batch 1 on this CPU: TVM unscheduled vs TVM default schedules vs ONNX Runtime fp32
vs PyTorch eager, plus per-layer GFLOP/s of the scheduled kernels.

Engines are timed in interleaved rounds (each round runs every engine a few times) so that load
from other processes on the shared machine hits all of them alike; medians and minima are
reported, with the load average before and after. Writes
benchmarks/results/default_schedules.{json,md}.

    python benchmarks/bench_default_schedules.py [--rounds 12] [--per-round 5]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import tvm
import tvm.relax.frontend.torch  # noqa: F401  (registers the frontend)
from tvm import relax

from tvm_compress.schedules import default_schedule_pipeline
from tvm_compress.schedules.pipeline import lower_passes
from tvm_compress.schedules.rules import apply_default_schedules
from tvm_compress.zoo.mobilenet_v2 import mobilenet_v2_imagenet

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
TARGET = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": THREADS}


def machine_load() -> dict:
    """Load average and the busiest other processes (the machine is shared)."""
    top = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
                         capture_output=True, text=True, check=False).stdout.splitlines()[:4]
    return {"loadavg": [round(v, 2) for v in os.getloadavg()],
            "top_processes": [line.strip() for line in top]}


def interleaved(engines: dict[str, Callable[[], object]], *, rounds: int, per_round: int,
                slow: set[str]) -> dict[str, dict]:
    """Per-call wall times of each engine over interleaved rounds, after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_index in range(rounds + 1):
        for name, fn in engines.items():
            if name in slow and round_index > 2:
                continue
            for _ in range(1 if name in slow else per_round):
                start = time.perf_counter()
                fn()
                if round_index:
                    times[name].append(time.perf_counter() - start)
    return {name: {"median_ms": float(np.median(t) * 1e3), "min_ms": float(np.min(t) * 1e3),
                   "runs": len(t)} for name, t in times.items()}


def _vm_runner(mod: tvm.IRModule, target: tvm.target.Target, x: np.ndarray):
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    data = tvm.runtime.tensor(x)
    return (lambda: vm["main"](data)), (lambda: vm["main"](data)[0].numpy())


def per_layer(mod: tvm.IRModule, target: tvm.target.Target) -> list[dict]:
    """Each fused kernel timed alone (min of repeats), times its call count in the model."""
    with target:
        lowered = tvm.transform.Sequential(lower_passes(target))(mod)
    counts: collections.Counter = collections.Counter()

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.call_tir"):
            counts[expr.args[0].name_hint] += 1

    relax.analysis.post_order_visit(lowered["main"], visit)
    scheduled = apply_default_schedules(lowered, target)
    rows = []
    for name, calls in counts.items():
        func = scheduled[name]
        shapes = [tuple(int(d) for d in p.shape) for p in func.params]
        args = [tvm.runtime.tensor(np.random.rand(*s).astype(p.dtype))
                for s, p in zip(shapes, func.params, strict=True)]
        lib = tvm.compile(func.with_attr("global_symbol", "main"), target)
        timer = lib.mod.time_evaluator("main", tvm.cpu(), number=10, repeat=9, min_repeat_ms=10)
        ms = min(timer(*args).results) * 1e3
        # conv kernels: weight (O/ob, I/ib, kh, kw, ib, ob), output NCHW[ob]c
        macs = (int(np.prod(shapes[-1])) * int(np.prod(shapes[1][1:5]))
                if "conv2d" in name else 0)
        rows.append({"kernel": name, "calls": calls, "ms": ms, "total_ms": ms * calls,
                     "gflops": 2 * macs / ms / 1e6 if macs else None,
                     "input": shapes[0], "output": shapes[-1]})
    return sorted(rows, key=lambda r: -r["total_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    load_before = machine_load()
    model = mobilenet_v2_imagenet().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x).numpy()
        exported = torch.export.export(model, (x,))
    mod = relax.frontend.torch.from_exported_program(exported)
    target = tvm.target.Target(TARGET)

    start = time.perf_counter()
    scheduled = default_schedule_pipeline(target)(mod)
    pipeline_s = time.perf_counter() - start
    run_default, out_default = _vm_runner(scheduled, target, x.numpy())
    run_plain, out_plain = _vm_runner(mod, target, x.numpy())

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "mobilenet_v2.onnx")
        torch.onnx.export(model, (x,), path, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}

    def run_torch() -> None:
        with torch.inference_mode():
            model(x)

    engines = {"tvm_default_schedules": run_default, "onnxruntime_fp32": lambda: session.run(
        None, feed), "pytorch_eager": run_torch, "tvm_unscheduled": run_plain}
    timings = interleaved(engines, rounds=args.rounds, per_round=args.per_round,
                          slow={"tvm_unscheduled"})
    ort_ms = timings["onnxruntime_fp32"]["median_ms"]
    for entry in timings.values():
        entry["ratio_to_ort_median"] = entry["median_ms"] / ort_ms
        entry["ratio_to_ort_min"] = entry["min_ms"] / timings["onnxruntime_fp32"]["min_ms"]
    result = {
        "model": "mobilenet_v2 (ImageNet weights), batch 1, fp32", "target": str(TARGET),
        "threads": THREADS, "pipeline_seconds": pipeline_s, "timings": timings,
        "max_abs_diff_vs_torch": {"tvm_default_schedules": float(np.abs(out_default() - reference)
                                                                 .max()),
                                  "tvm_unscheduled": float(np.abs(out_plain() - reference).max())},
        "load_before": load_before, "load_after": machine_load(),
        "per_layer": per_layer(mod, target),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_schedules.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "default_schedules.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    """The results as a markdown report."""
    lines = ["# Default CPU schedules: MobileNetV2 batch 1 (fp32)", "",
             f"Target `{result['target']}`, {result['threads']} threads. Load average before "
             f"{result['load_before']['loadavg']}, after {result['load_after']['loadavg']} "
             "(shared machine; see JSON for the busiest processes). Interleaved rounds.", "",
             "| engine | median ms | min ms | median / ORT | min / ORT |", "|---|---|---|---|---|"]
    for name, t in result["timings"].items():
        lines.append(f"| {name} | {t['median_ms']:.2f} | {t['min_ms']:.2f} | "
                     f"{t['ratio_to_ort_median']:.2f} | {t['ratio_to_ort_min']:.2f} |")
    diff = result["max_abs_diff_vs_torch"]
    lines += ["", f"Max abs diff vs PyTorch: scheduled {diff['tvm_default_schedules']:.2e}, "
              f"unscheduled {diff['tvm_unscheduled']:.2e}. Pipeline (passes + schedules) "
              f"{result['pipeline_seconds']:.1f} s.", "",
              "## Per kernel (each timed alone, min of repeats)", "",
              "| kernel | calls | ms | total ms | GFLOP/s | input -> output |",
              "|---|---|---|---|---|---|"]
    for row in result["per_layer"]:
        gflops = f"{row['gflops']:.1f}" if row["gflops"] else "-"
        lines.append(f"| {row['kernel']} | {row['calls']} | {row['ms']:.3f} | "
                     f"{row['total_ms']:.3f} | {gflops} | {row['input']} -> {row['output']} |")
    total = sum(r["total_ms"] for r in result["per_layer"])
    lines += ["", f"Sum of kernels: {total:.2f} ms.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
