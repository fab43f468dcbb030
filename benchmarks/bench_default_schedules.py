"""MobileNetV2 batch 1 on this CPU: TVM unscheduled vs TVM default schedules vs ONNX Runtime fp32
vs PyTorch eager, plus per-kernel GFLOP/s and ResNet-style 3x3 convolutions.

Every engine lives in its own worker process (TVM, ONNX Runtime and OpenMP thread pools spin
after each call and would slow whichever engine runs next in a shared process). The parent
interleaves them: each round asks every worker for a few timed calls, so load from other
processes on the shared machine hits all engines alike. Medians and minima are reported with
the load average. Writes benchmarks/results/default_schedules.{json,md}.

    python benchmarks/bench_default_schedules.py [--rounds 12] [--per-round 5]
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tvm_compress.runtime.threads import set_threads

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
set_threads(THREADS)  # TVM would start 1 worker on a 2-CPU x86 VM (runtime/threads.py)
# ResNet-style 3x3 convolutions (cin, cout, spatial, stride), batch 1, followed by ReLU.
RESNET_CONVS = [(64, 64, 56, 1), (128, 128, 28, 1), (256, 256, 14, 1), (64, 128, 56, 2)]


def _target():
    import tvm

    from tvm_compress.backend.schedules.hardware import host_cpu

    return tvm.target.Target({"kind": "llvm", **host_cpu(), "num-cores": THREADS})


def _workload(name: str):
    """(torch module, input) for ``mobilenet_v2`` or ``conv:cin,cout,size,stride``."""
    import torch

    torch.manual_seed(0)
    if name == "mobilenet_v2":
        from tvm_compress.zoo.mobilenet_v2 import mobilenet_v2_imagenet

        return mobilenet_v2_imagenet().eval(), torch.randn(1, 3, 224, 224)
    cin, cout, size, stride = (int(v) for v in name.split(":")[1].split(","))
    layer = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, stride, 1), torch.nn.ReLU())
    return layer.eval(), torch.randn(1, cin, size, size)


def _relax(model, x):
    import torch
    import tvm.relax.frontend.torch  # noqa: F401  (registers the frontend)
    from tvm import relax

    with torch.no_grad():
        return relax.frontend.torch.from_exported_program(torch.export.export(model, (x,)))


def _engine(kind: str, workload: str) -> tuple[Callable[[], object], Callable[[], np.ndarray]]:
    """(run once, output as NumPy) for an engine kind on a workload, built in this process."""
    import torch

    torch.set_num_threads(THREADS)
    model, x = _workload(workload)
    if kind in ("tvm_default_schedules", "tvm_unscheduled"):
        import tvm
        from tvm import relax

        from tvm_compress.backend.schedules import default_schedule_pipeline

        mod, target = _relax(model, x), _target()
        if kind == "tvm_default_schedules":
            mod = default_schedule_pipeline(target)(mod)
        vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
        data = tvm.runtime.tensor(x.numpy())
        return (lambda: vm["main"](data)), (lambda: vm["main"](data)[0].numpy())
    if kind == "onnxruntime_fp32":
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "model.onnx")
            torch.onnx.export(model, (x,), path, dynamo=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = THREADS
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        return (lambda: session.run(None, feed)), (lambda: session.run(None, feed)[0])

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run, lambda: run().numpy()


def _worker(kind: str, workload: str, conn) -> None:
    run, output = _engine(kind, workload)
    run()
    conn.send(output())
    while (count := conn.recv()) is not None:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        conn.send(times)


def interleaved(kinds: list[str], workload: str, *, rounds: int, per_round: int,
                slow: frozenset[str] = frozenset()) -> tuple[dict, dict]:
    """Timings (ms) and outputs of each engine, one worker process each, interleaved rounds."""
    from tvm_compress.runtime.bench import SETTLE_PROCESSES_S, settle

    ctx = mp.get_context("spawn")
    workers = {}
    for kind in kinds:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(kind, workload, child), daemon=True)
        proc.start()
        workers[kind] = (proc, parent)
    outputs = {kind: conn.recv() for kind, (_, conn) in workers.items()}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_index in range(rounds + 1):  # round 0 is warm-up
        for kind, (_, conn) in workers.items():
            if kind in slow and round_index > 3:
                continue
            settle(SETTLE_PROCESSES_S)
            conn.send(1 if kind in slow else per_round)
            measured = conn.recv()
            if round_index:
                times[kind] += measured
    for proc, conn in workers.values():
        conn.send(None)
        proc.join(timeout=30)
    stats = {kind: {"median_ms": float(np.median(t) * 1e3), "min_ms": float(np.min(t) * 1e3),
                    "runs": len(t)} for kind, t in times.items()}
    return stats, outputs


def machine_load() -> dict:
    """Load average and the busiest processes (the machine is shared with other agents)."""
    top = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
                         capture_output=True, text=True, check=False).stdout.splitlines()[:4]
    return {"loadavg": [round(v, 2) for v in os.getloadavg()],
            "top_processes": [line.strip() for line in top]}


def per_kernel() -> list[dict]:
    """Each fused MobileNetV2 kernel timed alone (min of repeats), times its call count."""
    import tvm
    from tvm import relax

    from tvm_compress.backend.schedules.pipeline import lower_passes
    from tvm_compress.backend.schedules.rules import apply_default_schedules

    target = _target()
    with target:
        lowered = tvm.transform.Sequential(lower_passes(target))(_relax(*_workload("mobilenet_v2")))
    counts: collections.Counter = collections.Counter()
    call_tir = tvm.ir.Op.get("relax.call_tir")
    relax.analysis.post_order_visit(lowered["main"], lambda e: counts.update(
        [e.args[0].name_hint]) if isinstance(e, relax.Call) and e.op == call_tir else None)
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


def resnet_convs(*, rounds: int) -> list[dict]:
    """GFLOP/s of single 3x3 conv+ReLU layers: TVM default schedules vs PyTorch."""
    rows = []
    for index, (cin, cout, size, stride) in enumerate(RESNET_CONVS):
        kinds = ["tvm_default_schedules", "pytorch_eager"]
        if index == 0:  # the untuned baseline is slow; one shape is enough to show it
            kinds.append("tvm_unscheduled")
        stats, _ = interleaved(kinds, f"conv:{cin},{cout},{size},{stride}", rounds=rounds,
                               per_round=5, slow=frozenset({"tvm_unscheduled"}))
        gflop = 2 * cin * cout * 9 * (size // stride) ** 2 / 1e9
        rows.append({"conv": f"{cin}->{cout} 3x3 s{stride} @{size}x{size}", "gflop": gflop,
                     **{f"{k}_min_ms": v["min_ms"] for k, v in stats.items()},
                     **{f"{k}_gflops": gflop / v["min_ms"] * 1e3 for k, v in stats.items()}})
    return rows


# (cin, cout, spatial, kernel, stride): the int8 micro-kernel against the fp32 kernel.
INT8_CONVS = [(64, 64, 56, 3, 1), (24, 144, 56, 1, 1), (144, 24, 56, 1, 1), (320, 1280, 7, 1, 1)]


def int8_microkernel() -> list[dict]:
    """Prototype AVX2 u8 x s8 conv (``schedules/int8.py``) vs the fp32 schedule, same shapes."""
    import tvm
    from tvm import s_tir, te

    from tvm_compress.backend.schedules.blocks import find_kernel
    from tvm_compress.backend.schedules.compute import CONV_NCHWC, conv2d_nchwc
    from tvm_compress.backend.schedules.conv2d import schedule_conv2d_nchwc
    from tvm_compress.backend.schedules.int8 import (
        CONV_NCHWC_U8S8,
        conv2d_nchwc_u8s8,
        schedule_conv2d_nchwc_u8s8,
    )

    target, rows = _target(), []
    for cin, cout, size, k, stride in INT8_CONVS:
        pad, times = (k - 1) // 2, {}
        for dtype in ("uint8", "float32"):
            data = te.placeholder((1, cin // 8, size, size, 8), dtype, name="data")
            if dtype == "uint8":
                weight = te.placeholder((cout // 8, cin // 8, k, k, 2, 8, 4), "int8", name="w")
                conv = conv2d_nchwc_u8s8(data, weight, strides=(stride,) * 2, padding=(pad,) * 4)
            else:
                weight = te.placeholder((cout // 8, cin // 8, k, k, 8, 8), dtype, name="w")
                conv = conv2d_nchwc(data, weight, strides=(stride,) * 2, padding=(pad,) * 4,
                                    dilation=(1, 1), groups=1, out_dtype=dtype)
            sch = s_tir.Schedule(te.create_prim_func([data, weight, conv]))
            if dtype == "uint8":
                schedule_conv2d_nchwc_u8s8(sch, find_kernel(sch, CONV_NCHWC_U8S8), registers=16,
                                           cores=THREADS)
            else:
                schedule_conv2d_nchwc(sch, find_kernel(sch, CONV_NCHWC), lanes=8, registers=16,
                                      cores=THREADS)
            lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target)
            args = [tvm.runtime.tensor(np.zeros([int(d) for d in t.shape], str(t.dtype)))
                    for t in (data, weight, conv)]
            timer = lib.mod.time_evaluator("main", tvm.cpu(), number=10, repeat=9,
                                           min_repeat_ms=10)
            times[dtype] = min(timer(*args).results) * 1e3
        gop = 2 * cin * cout * k * k * (size // stride) ** 2 / 1e9
        rows.append({"conv": f"{cin}->{cout} {k}x{k} s{stride} @{size}x{size}",
                     "int8_ms": times["uint8"], "fp32_ms": times["float32"],
                     "int8_gops": gop / times["uint8"] * 1e3,
                     "fp32_gflops": gop / times["float32"] * 1e3,
                     "speedup": times["float32"] / times["uint8"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=5)
    args = parser.parse_args()
    load_before = machine_load()
    kinds = ["tvm_default_schedules", "onnxruntime_fp32", "pytorch_eager", "tvm_unscheduled"]
    timings, outputs = interleaved(kinds, "mobilenet_v2", rounds=args.rounds,
                                   per_round=args.per_round,
                                   slow=frozenset({"tvm_unscheduled"}))
    ort = timings["onnxruntime_fp32"]
    for entry in timings.values():
        entry["ratio_to_ort_median"] = entry["median_ms"] / ort["median_ms"]
        entry["ratio_to_ort_min"] = entry["min_ms"] / ort["min_ms"]
    reference = outputs["pytorch_eager"]
    result = {
        "model": "mobilenet_v2 (ImageNet weights), batch 1, fp32", "target": str(_target()),
        "threads": THREADS, "timings": timings,
        "max_abs_diff_vs_torch": {k: float(np.abs(v - reference).max())
                                  for k, v in outputs.items() if k != "pytorch_eager"},
        "load_before": load_before, "load_after_engines": machine_load(),
        "per_kernel": per_kernel(), "resnet_convs": resnet_convs(rounds=max(args.rounds // 2, 3)),
        "int8_microkernel": int8_microkernel(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_schedules.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "default_schedules.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    """The results as a markdown report."""
    lines = ["# Default CPU schedules: MobileNetV2 batch 1 (fp32)", "",
             f"Target `{result['target']}`, {result['threads']} threads, one process per engine, "
             f"interleaved rounds. Load average before {result['load_before']['loadavg']}, after "
             f"{result['load_after_engines']['loadavg']} on this 2-core machine (shared with "
             "other jobs; busiest processes in the JSON).", "",
             "| engine | median ms | min ms | median / ORT | min / ORT |", "|---|---|---|---|---|"]
    for name, t in result["timings"].items():
        lines.append(f"| {name} | {t['median_ms']:.2f} | {t['min_ms']:.2f} | "
                     f"{t['ratio_to_ort_median']:.2f} | {t['ratio_to_ort_min']:.2f} |")
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in result["max_abs_diff_vs_torch"].items())
    lines += ["", f"Max abs output difference vs PyTorch: {diffs}.", "",
              "## Per kernel (each timed alone, min of repeats)", "",
              "| kernel | calls | ms | total ms | GFLOP/s | input -> output |",
              "|---|---|---|---|---|---|"]
    for row in result["per_kernel"]:
        gflops = f"{row['gflops']:.1f}" if row["gflops"] else "-"
        lines.append(f"| {row['kernel']} | {row['calls']} | {row['ms']:.3f} | "
                     f"{row['total_ms']:.3f} | {gflops} | {row['input']} -> {row['output']} |")
    total = sum(r["total_ms"] for r in result["per_kernel"])
    lines += ["", f"Sum of kernels: {total:.2f} ms.", "",
              "## ResNet-style 3x3 conv + ReLU (min of interleaved runs)", "",
              "| conv | GFLOP | TVM ms | TVM GFLOP/s | PyTorch ms | PyTorch GFLOP/s |",
              "|---|---|---|---|---|---|"]
    for row in result["resnet_convs"]:
        lines.append(f"| {row['conv']} | {row['gflop']:.3f} | "
                     f"{row['tvm_default_schedules_min_ms']:.2f} | "
                     f"{row['tvm_default_schedules_gflops']:.1f} | "
                     f"{row['pytorch_eager_min_ms']:.2f} | {row['pytorch_eager_gflops']:.1f} |")
    first = result["resnet_convs"][0]
    if "tvm_unscheduled_min_ms" in first:
        lines += ["", f"Unscheduled TVM on {first['conv']}: "
                  f"{first['tvm_unscheduled_min_ms']:.1f} ms."]
    lines += ["", "## Prototype AVX2 int8 micro-kernel (vpmaddubsw + vpmaddwd) vs fp32, one conv",
              "", "Kernels timed alone (min of repeats); u8 activations x s8 weights -> s32, no "
              "requantization epilogue yet.", "",
              "| conv | int8 ms | int8 GOP/s | fp32 ms | fp32 GFLOP/s | speedup |",
              "|---|---|---|---|---|---|"]
    for row in result.get("int8_microkernel", []):
        lines.append(f"| {row['conv']} | {row['int8_ms']:.3f} | {row['int8_gops']:.0f} | "
                     f"{row['fp32_ms']:.3f} | {row['fp32_gflops']:.0f} | {row['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
