"""Schedule coverage: build the coverage test models (tests/coverage_models.py: U-Net with
ConvTranspose, a text-detector neck, odd/grouped/depthwise convs, attention, a 640x640 input) and
optionally zoo models, check them against ONNX Runtime, and profile every kernel: the rule that
scheduled it, its time share and GFLOP/s vs the measured machine peak.

Writes benchmarks/results/<out>.{json,md}.

    python benchmarks/bench_coverage.py [--models unet textdet_head ...] [--size 640] \
        [--zoo mobilenet_v2] [--runs 10] [--rounds 8] [--out coverage]

TVM and ONNX Runtime are also timed side by side (interleaved rounds, this process's cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))


def _target() -> Any:
    import tvm

    from tvm_compress.backend.schedules.hardware import host_cpu

    return tvm.target.Target({"kind": "llvm", **host_cpu(), "num-cores": os.cpu_count() or 1})


def load(name: str, size: int | None) -> tuple[Any, np.ndarray]:
    """(Model imported from its ONNX export, or through torch.export, input)."""
    import torch

    from tvm_compress.frontend.importers import export_onnx, from_onnx, from_torch

    if name.startswith("zoo:"):
        from tvm_compress.zoo import load_zoo

        model = load_zoo(name[4:])
        x = np.random.default_rng(0).standard_normal(model.input_shape).astype("float32")
        return model, x
    import coverage_models

    module, x = coverage_models.make(name)
    if size and name in coverage_models.SCALABLE:
        x = torch.randn(*x.shape[:2], size, size)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model = from_onnx(export_onnx(module, x, Path(tmp) / f"{name}.onnx"), name=name)
        except Exception:  # noqa: BLE001 - the ONNX importer's gaps are issue 15's; use torch
            model = from_torch(module, x, name=name)
    return model, x.numpy()


def interleaved(fns: dict[str, Any], rounds: int, per_round: int) -> dict[str, float]:
    """Typical ms of each engine: median over rounds of each round's fastest call, engines
    alternating round by round so that load from other processes hits them alike."""
    from tvm_compress.runtime.bench import settle

    for fn in fns.values():
        fn()
    best: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            settle()
            times = []
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            best[name].append(min(times))
    return {k: 1e3 * float(np.median(v)) for k, v in best.items()}


def measure(name: str, size: int | None, runs: int, rounds: int, peak: float,
            target: Any) -> dict:
    import tvm

    from tvm_compress.backend.build import build
    from tvm_compress.backend.report import rule_counts
    from tvm_compress.runtime.bench import onnx_of, onnxruntime_session
    from tvm_compress.runtime.profile import profile_kernels

    model, x = load(name, size)
    start = time.perf_counter()
    compiled = build(model, target=target, database=False)
    build_s = time.perf_counter() - start
    out = compiled.run(x)
    kernels = profile_kernels(compiled, x, runs=runs, peak_gflops=peak)
    session = onnxruntime_session(onnx_of(model, x), threads=os.cpu_count() or 1)
    feed = {session.get_inputs()[0].name: x}
    ref = session.run(None, feed)[0]
    arg = tvm.runtime.tensor(x)
    timing = interleaved({"tvm": lambda: compiled.vm["main"](arg),
                          "onnxruntime": lambda: session.run(None, feed)}, rounds, 3)
    return {"model": name, "input": list(x.shape), "build_s": build_s,
            "max_abs_diff_vs_onnxruntime": float(np.max(np.abs(out - ref))),
            "typical_ms": timing, "ratio_to_onnxruntime": timing["tvm"] / timing["onnxruntime"],
            "ms_per_run": sum(k.get("ms_per_run", 0.0) for k in kernels),
            "rules": rule_counts(compiled.kernels), "kernels": kernels}


def markdown(result: dict) -> str:
    lines = ["# Schedule coverage and per-kernel profile", "",
             f"Machine load average at start {result['load']} (shared machine: times are "
             "indicative only). Peak: " f"{result['peak']['gflops']:.1f} GFLOP/s "
             f"({result['peak']['method']}).", ""]
    for row in result["models"]:
        lines += [f"## {row['model']} {'x'.join(map(str, row['input']))}", "",
                  f"TVM {row['typical_ms']['tvm']:.2f} ms, ONNX Runtime "
                  f"{row['typical_ms']['onnxruntime']:.2f} ms ({row['ratio_to_onnxruntime']:.2f}x,"
                  " interleaved rounds); sum of kernel times "
                  f"{row['ms_per_run']:.2f} ms; max |TVM - ONNX Runtime| "
                  f"{row['max_abs_diff_vs_onnxruntime']:.2e}; rules {row['rules']}", "",
                  "| kernel | rule | calls | us/call | share | GFLOP/s | % peak |",
                  "|---|---|---|---|---|---|---|"]
        for k in row["kernels"]:
            if "ms_per_run" not in k:
                continue
            lines.append(f"| {k['name']} | {k['rule']} | {k['calls']} | {k['us_per_call']:.1f} "
                         f"| {100 * k['share']:.1f}% | {k['gflops']:.1f} | "
                         f"{k.get('pct_peak', 0.0):.0f}% |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    import coverage_models

    from tvm_compress.runtime.profile import measure_peak

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(coverage_models.MODELS))
    parser.add_argument("--zoo", nargs="*", default=[], help="zoo model names to add")
    parser.add_argument("--size", type=int, default=None,
                        help="input height = width of the fully convolutional models")
    parser.add_argument("--runs", type=int, default=10, help="instrumented runs per kernel")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved TVM/ORT rounds")
    parser.add_argument("--out", default="coverage",
                        help="results file stem in benchmarks/results, or a path prefix")
    args = parser.parse_args()
    target = _target()
    peak = measure_peak()
    result = {"target": str(target), "load": [round(v, 2) for v in os.getloadavg()],
              "peak": peak, "models": []}
    for name in [*args.models, *(f"zoo:{z}" for z in args.zoo)]:
        row = measure(name, args.size, args.runs, args.rounds, peak["gflops"], target)
        result["models"].append(row)
        print(f"[{name}] TVM {row['typical_ms']['tvm']:.2f} ms = "
              f"{row['ratio_to_onnxruntime']:.2f}x ONNX Runtime, diff "
              f"{row['max_abs_diff_vs_onnxruntime']:.1e}, rules {row['rules']}", flush=True)
    stem = Path(args.out) if os.sep in args.out else RESULTS / args.out
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    Path(f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
