"""CPU kernels, one run: every zoo model at batch 1 (and MobileNetV2 at batch 16) through TVM
untuned default schedules, TVM with the shipped tuning database, TVM int8 (realized integer
kernels: 8-bit weights everywhere, and the weight bits ``--wbits auto`` starts from), ONNX
Runtime fp32 and int8 (its quantize_static QDQ model) and PyTorch eager, as ratios to ONNX
Runtime fp32; plus a measured machine fp32 peak (numpy/BLAS matmul) and memory bandwidth, and
the achieved GFLOP/s of each hot convolution of the tuned builds (roofline plot).

Every engine runs in its own process with 2 threads, timed in interleaved rounds (``--rounds``
x ``--per-round`` calls), so load from the other processes on the shared machine hits every
engine alike. Each turn starts after a pause (the previous engine's threads go idle) and 5 ms of
untimed calls; TVM's input is copied into a TVM tensor once, not in the timed call (ONNX Runtime
and PyTorch take the numpy array as it is). ``typical`` is the median over rounds of each
round's fastest call. Kernel times are per-call minima over 30 runs inside the running tuned
model (VM instrumentation), taken once the other engines' processes have exited. Writes
benchmarks/results/kernels.{json,md} and kernels_roofline.png (``--out``: another stem there,
or a path prefix).

    python benchmarks/bench_kernels.py [--rounds 8] [--per-round 5] [--models ...] [--out STEM]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tvm_compress.runtime.threads import set_threads

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
set_threads(THREADS)  # TVM would start 1 worker on a 2-CPU x86 VM (runtime/threads.py)
ENGINES = ["tvm_untuned", "tvm_tuned", "tvm_int8", "tvm_int8_auto", "tvm_cropped_int8",
           "onnxruntime_fp32", "onnxruntime_int8", "pytorch_eager"]
MODELS = ["mobilenet_v2", "fmnist_resnet", "fmnist_mobilenet_v2", "fmnist_shufflenet_v2",
          "fmnist_squeezenet", "fmnist_googlenet", "fmnist_vgg"]


def _target():
    import tvm

    from tvm_compress.backend.schedules.hardware import host_cpu

    return tvm.target.Target({"kind": "llvm", **host_cpu(), "num-cores": THREADS})


# ---------------------------------------------------------------------------- machine roofs


def measured_peak() -> dict[str, float]:
    """Machine fp32 peak: the best of many short BLAS matmuls (numpy and torch, 2 threads), so
    that, like the kernels' per-call minima, it is the speed when the cores are not preempted;
    copy bandwidth the same way."""
    import torch

    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    best = {}
    for n in (256, 384, 512):
        a, b = rng.random((n, n), "float32"), rng.random((n, n), "float32")
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.empty(n, n)
        for name, fn in (("numpy", lambda a=a, b=b: a @ b),
                         ("torch", lambda ta=ta, tb=tb, tc=tc: torch.mm(ta, tb, out=tc))):
            t = min(_timed(fn) for _ in range(200))
            best[f"{name}_{n}"] = 2 * n ** 3 / t / 1e9
    big = rng.random(8 * 1024 * 1024 // 4, "float32")
    out = np.empty_like(big)
    copy = min(_timed(lambda: np.copyto(out, big)) for _ in range(50))
    key = max(best, key=best.get)
    return {"matmul_gflops": best[key], "best_of": key, "all": best,
            "copy_gbs": 2 * big.nbytes / copy / 1e9}


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -------------------------------------------------------------------------------- engines


def _calibration(model: Any, n: int) -> np.ndarray:
    from tvm_compress.data import real_photos
    from tvm_compress.runtime.evaluation import task_data

    if model.input_shape[-1] == 224:
        return real_photos("calib", n=n)
    images, _ = task_data(model.task, "calib")
    return images[:n]


def prepare(name: str, batch: int, calib_n: int, tmp: Path) -> np.ndarray:
    """Calibration data, the input batch and both ONNX Runtime models, written to ``tmp``."""
    import onnx

    import tvm_compress as tc
    from tvm_compress.quant.ort_quant import ort_quantize_static
    from tvm_compress.runtime.bench import onnx_of

    model = tc.load(f"zoo:{name}", batch=batch)
    calib = _calibration(model, calib_n).astype(model.input_dtype)
    x = np.repeat(calib[:1], batch, axis=0)
    np.save(tmp / "calib.npy", calib)
    np.save(tmp / "x.npy", x)
    fp32_onnx = onnx_of(model, x)
    onnx.save(fp32_onnx, str(tmp / "fp32.onnx"))
    try:
        onnx.save(ort_quantize_static(fp32_onnx, calib), str(tmp / "int8.onnx"))
    except Exception as err:  # noqa: BLE001 - the engine reports it
        (tmp / "int8.onnx.error").write_text(f"{type(err).__name__}: {err}"[:300])
    return x


def _engine(kind: str, name: str, batch: int, tmp: Path) -> tuple[Any, dict]:
    """(run on the input batch, info) for one engine, built in this (worker) process."""
    import torch

    torch.set_num_threads(THREADS)
    if kind.startswith("onnxruntime"):
        import onnx

        from tvm_compress.runtime.bench import onnxruntime_session

        path = tmp / f"{kind[12:]}.onnx"
        if not path.exists():
            raise RuntimeError((tmp / f"{path.name}.error").read_text())
        session = onnxruntime_session(onnx.load(str(path)), threads=THREADS)
        input_name = session.get_inputs()[0].name
        return (lambda inp: session.run(None, {input_name: inp})[0]), {}
    import tvm_compress as tc

    model = tc.load(f"zoo:{name}", batch=batch)
    if kind == "pytorch_eager":
        module = model.torch_module.eval()

        def run(inp: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(inp)).numpy()

        return run, {}
    from tvm_compress.backend.build import build
    from tvm_compress.runtime.bench import vm_runner

    target = _target()
    if kind == "tvm_cropped_int8":
        compiled = _cropped_int8(name, batch, tmp, target)
    elif kind in ("tvm_int8", "tvm_int8_auto"):
        from tvm_compress.quant.config import QuantConfig, at_target_bits
        from tvm_compress.quant.quantize import quantize

        calib = np.load(tmp / "calib.npy")
        config = QuantConfig(calib_samples=len(calib))
        if kind == "tvm_int8_auto":  # the weight bits --wbits auto starts from on this target
            config = at_target_bits(config, target, model.layers, mod=model.mod)
        qmodel = quantize(model, config, calib, progress=False)
        compiled = build(qmodel.model, target=target)
    else:
        compiled = build(model, target=target, database=None if kind == "tvm_tuned" else False)
    run = vm_runner(compiled.vm)
    info = {"tuned_functions": compiled.tuned_functions}
    if kind == "tvm_tuned" and batch == 1:
        info["kernels"] = lambda x: kernel_table(model, compiled, x)
    return run, info


def _cropped_int8(name: str, batch: int, tmp: Path, target: Any) -> Any:
    """The int8 model with its channel groups L1-pruned to <= half the MACs (AJPQ's joint space,
    8 bits everywhere, channels physically removed): latency only, not accuracy."""
    import torch

    from tvm_compress import zoo
    from tvm_compress.backend.build import build
    from tvm_compress.tuning.ajpq.joint import Budget, JointSpace, realize, uniform_plan

    if not name.startswith("fmnist_") or batch != 1:
        raise NotApplicable("cropped+int8 rows: Fashion-MNIST models at batch 1")
    calib = np.load(tmp / "calib.npy")
    space = JointSpace(zoo.torch_model(name), torch.zeros(1, 1, 28, 28), calib=calib)
    plan = uniform_plan(space, Budget(1.0, 0.5), 8)
    return build(realize(space, plan, calib).quantized.model, target=target)


class NotApplicable(RuntimeError):
    """This engine does not apply to this row (shown as "-", not as an error)."""


def _worker(kind: str, name: str, batch: int, tmp: str, conn) -> None:
    from tvm_compress.runtime.bench import timed_turn

    if kind == "pytorch_eager":  # OpenMP threads block instead of spinning between calls
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        start = time.perf_counter()
        run, info = _engine(kind, name, batch, Path(tmp))
        x = np.load(Path(tmp) / "x.npy")
        run(x)
    except NotApplicable:
        conn.send({"error": "n/a"})
        return
    except Exception as err:  # noqa: BLE001 - reported in the results
        conn.send({"error": f"{type(err).__name__}: {err}"[:300]})
        return
    kernels = info.pop("kernels", None)
    conn.send({"build_seconds": time.perf_counter() - start, **info})
    while (count := conn.recv()) is not None:
        if count == "kernels":
            conn.send(kernels(x) if kernels else [])
            continue
        conn.send(timed_turn(lambda: run(x), count))


def interleaved(name: str, batch: int, tmp: Path, *, rounds: int, per_round: int
                ) -> tuple[dict, dict, list]:
    """Every engine in its own process (no thread pools spinning against each other), timed
    in interleaved rounds; returns timings, per-engine build info, and the tuned kernels."""
    import multiprocessing as mp

    from tvm_compress.runtime.bench import SETTLE_PROCESSES_S, settle

    ctx = mp.get_context("spawn")
    workers = {}
    for kind in ENGINES:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(kind, name, batch, str(tmp), child),
                           daemon=True)
        proc.start()
        workers[kind] = (proc, parent)
    info = {kind: conn.recv() for kind, (_, conn) in workers.items()}
    live = {k: w for k, w in workers.items() if "error" not in info[k]}
    times: dict[str, list[list[float]]] = {k: [] for k in live}
    for round_index in range(rounds + 1):  # round 0 warms up
        for kind, (_, conn) in live.items():
            settle(SETTLE_PROCESSES_S)
            conn.send(per_round)
            measured = conn.recv()
            if round_index:
                times[kind].append(measured)
    # the kernel profile last, with every other engine's process gone: their thread pools
    # (ONNX Runtime's spin after each call) would otherwise share the cores with it
    for kind, (proc, conn) in workers.items():
        if kind != "tvm_tuned" and proc.is_alive():
            conn.send(None)
            proc.join(timeout=60)
    kernels: list = []
    if "tvm_tuned" in live:
        live["tvm_tuned"][1].send("kernels")
        kernels = live["tvm_tuned"][1].recv()
    for proc, conn in workers.values():
        if proc.is_alive():
            conn.send(None)
        proc.join(timeout=60)
    out = {}
    for kind, t in times.items():
        ms = np.array(t) * 1e3
        out[kind] = {"typical_ms": float(np.median(ms.min(axis=1))),
                     "median_ms": float(np.median(ms)), "min_ms": float(ms.min())}
    return out, info, kernels


# -------------------------------------------------------------------------------- kernels


def kernel_table(model: Any, compiled: Any, x: np.ndarray, runs: int = 30) -> list[dict]:
    """Per-call minimum time and GFLOP/s of each float32 conv/matmul kernel of ``compiled``."""
    import tvm
    from tvm import s_tir, tirx

    from tvm_compress.backend.tuning_ms import tuning_module
    from tvm_compress.runtime.bench import kernel_call_times

    target = compiled.target
    unscheduled = tuning_module(model, target)
    calls = kernel_call_times(compiled.vm, tvm.runtime.tensor(x), runs=runs)
    names = {gv.name_hint for gv in unscheduled.get_global_vars()}
    rows = []
    for name, per_call in calls.items():
        if name not in names or ("conv2d" not in name and "matmul" not in name):
            continue
        func = unscheduled[name]
        if not isinstance(func, tirx.PrimFunc):
            continue
        flops = float(s_tir.analysis.estimate_tir_flops(tvm.IRModule({"main": func})))
        nbytes = sum(int(np.prod([int(d) for d in p.ty.shape])) * np.dtype(str(p.ty.dtype)).itemsize
                     for p in func.params)
        weight = [int(d) for d in func.params[1].ty.shape]
        kind = ("depthwise" if "depthwise" in name else
                "matmul" if "matmul" in name else
                f"conv{weight[2]}x{weight[3]}" if len(weight) == 6 else "conv")
        rows.append({"kernel": name, "kind": kind, "calls": len(per_call),
                     "us_per_call": float(per_call.mean() * 1e6), "ms_total": float(
                         per_call.sum() * 1e3), "gflops": flops / float(per_call.mean()) / 1e9,
                     "intensity": flops / nbytes, "flops": flops})
    return sorted(rows, key=lambda r: -r["ms_total"])


# -------------------------------------------------------------------------------- report


def load_info() -> dict:
    return {"loadavg": [round(v, 2) for v in os.getloadavg()]}


def roofline(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak, bw = result["peak"]["matmul_gflops"], result["peak"]["copy_gbs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = np.logspace(-1, 3, 100)
    ax.plot(xs, np.minimum(peak, bw * xs), "k-", label=f"roof: {peak:.0f} GFLOP/s, {bw:.0f} GB/s")
    marks = {"conv3x3": "o", "conv1x1": "s", "depthwise": "^", "matmul": "x"}
    for row in result["models"]:
        for k in row.get("kernels", [])[:12]:
            ax.scatter(k["intensity"], k["gflops"], marker=marks.get(k["kind"], "."), s=18,
                       label=f"{row['model']} {k['kind']}")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=6, ncol=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of kernel arguments)")
    ax.set_ylabel("achieved GFLOP/s (tuned build)")
    ax.set_title("Hot kernels vs measured machine roofs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result: dict, roofline_png: str = "kernels_roofline.png") -> str:
    peak = result["peak"]
    lines = [
        "# CPU kernels: untuned / tuned / int8 vs ONNX Runtime and PyTorch",
        "",
        f"Machine: {result['machine']}, {THREADS} threads per engine, target `{result['target']}`"
        f" (shipped database `llvm-core-avx2` applies). Load average at start "
        f"{result['load_start']['loadavg']}, at end {result['load_end']['loadavg']} (shared "
        "machine). Typical = median over rounds of each round's fastest call "
        f"({result['rounds']} rounds x {result['per_round']} calls, engines interleaved).",
        "",
        f"Measured fp32 peak: {peak['matmul_gflops']:.1f} GFLOP/s (best of 200 short BLAS "
        f"matmuls, {peak['best_of']}, 2 threads), copy bandwidth {peak['copy_gbs']:.1f} GB/s.",
        "",
        "tvm_int8: 8-bit weights everywhere; tvm_int8_auto: the weight bits `quantize --wbits "
        "auto` starts from on this target (7 bits on AVX2 without VNNI, depthwise layers 8, "
        "small depthwise layers before a float island fp32; 8 bits elsewhere).",
        "",
        "tvm_cropped_int8: the int8 model with its channel groups L1-pruned to <= 0.5 of the "
        "MACs (channels removed by CropChannels; latency only, Fashion-MNIST models); '-' = not "
        "applicable.",
        "",
        "| model | batch | " + " | ".join(ENGINES) + " | tuned kernels |",
        "|---|---|" + "---|" * (len(ENGINES) + 1),
    ]
    for row in result["models"]:
        cells = []
        ort = row["timings"].get("onnxruntime_fp32", {}).get("typical_ms")
        for kind in ENGINES:
            t = row["timings"].get(kind)
            if t is None:
                cells.append("-" if row.get("errors", {}).get(kind) == "n/a" else "error")
            elif ort:
                cells.append(f"{t['typical_ms']:.2f} ms ({t['typical_ms'] / ort:.2f}x)")
            else:
                cells.append(f"{t['typical_ms']:.2f} ms")
        lines.append(f"| {row['model']} | {row['batch']} | " + " | ".join(cells)
                     + f" | {row['tuned_functions']} |")
    lines += ["", "Ratios in parentheses are to ONNX Runtime fp32 of the same row.", ""]
    for row in result["models"]:
        errors = {k: v for k, v in row.get("errors", {}).items() if v != "n/a"}
        if errors:
            lines.append(f"Errors in {row['model']} (batch {row['batch']}): {errors}")
    lines += ["", "## Hot kernels of the tuned builds (GFLOP/s vs measured peak)", "",
              "MobileNetV2 at batch 1: every kernel; other rows: the six slowest.", "",
              "| model | kernel | kind | calls | us/call | GFLOP/s | % of peak |",
              "|---|---|---|---|---|---|---|"]
    for row in result["models"]:
        full = row["model"] == "mobilenet_v2" and row["batch"] == 1
        for k in row.get("kernels", [])[:None if full else 6]:
            lines.append(f"| {row['model']} b{row['batch']} | {k['kernel']} | {k['kind']} | "
                         f"{k['calls']} | {k['us_per_call']:.1f} | {k['gflops']:.1f} | "
                         f"{100 * k['gflops'] / peak['matmul_gflops']:.0f}% |")
    lines += ["", f"![roofline]({roofline_png})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--no-batch16", action="store_true")
    parser.add_argument("--out", default="kernels",
                        help="results file stem in benchmarks/results, or a path prefix")
    args = parser.parse_args()
    import platform

    out = Path(args.out) if os.sep in args.out else RESULTS / args.out
    out.parent.mkdir(parents=True, exist_ok=True)

    result: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, "
                                         f"{os.cpu_count()} CPUs",
                              "target": str(_target()), "rounds": args.rounds,
                              "per_round": args.per_round, "load_start": load_info(),
                              "peak": measured_peak(), "models": []}
    jobs = [(m, 1) for m in args.models]
    if not args.no_batch16 and "mobilenet_v2" in args.models:
        jobs.append(("mobilenet_v2", 16))
    for name, batch in jobs:
        print(f"[{name} b{batch}] building", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            prepare(name, batch, args.calib, Path(tmp))
            timings, info, kernels = interleaved(name, batch, Path(tmp), rounds=args.rounds,
                                                 per_round=args.per_round)
        errors = {k: v["error"] for k, v in info.items() if "error" in v}
        row = {"model": name, "batch": batch, "timings": timings, "kernels": kernels,
               "tuned_functions": info.get("tvm_tuned", {}).get("tuned_functions", 0),
               "build_seconds": {k: v.get("build_seconds") for k, v in info.items()},
               "errors": errors, "load": load_info()}
        result["models"].append(row)
        ort = timings.get("onnxruntime_fp32", {}).get("typical_ms")
        print(f"[{name} b{batch}] " + ", ".join(
            f"{k} {v['typical_ms']:.2f} ms" + (f" ({v['typical_ms'] / ort:.2f}x)" if ort else "")
            for k, v in timings.items()) + (f"; errors {errors}" if errors else ""), flush=True)
        Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    result["load_end"] = load_info()
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    roofline(result, out.with_name(f"{out.name}_roofline.png"))
    text = markdown(result, f"{out.name}_roofline.png")
    Path(f"{out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
