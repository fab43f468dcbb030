"""MobileNetV2's depthwise kernels alone: int8 (8-bit and auto 7/8-bit weights) against fp32.

Each depthwise PrimFunc of the scheduled MobileNetV2 builds (the same kernels the model runs) is
compiled on its own and timed with TVM's ``time_evaluator`` on random inputs, the three builds
interleaved round by round; the minimum over rounds is kept. Built alone a kernel's data stay
in cache, so this measures compute, not memory traffic (inside the model the fp32 kernels also
read 4x the bytes: ``bench_int8.py``'s per-kernel table). Per kernel the vector instructions of
its loop nest are counted from the assembly, grouped into the steps of the int8 kernel
(u8 -> fp32 conversion of the taps, FMAs, fixed-point requantization epilogue, packing), which
is what says where the int8 kernel spends its time. Writes
benchmarks/results/depthwise_int8.{json,md}.

    python benchmarks/bench_depthwise_int8.py [--rounds 7] [--out PATH_PREFIX]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import _layer_key, _target, machine_load, prepare  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUILDS = {"int8": "8-bit weights", "int8_w7": "auto (7-bit, depthwise at 8)", "fp32": "fp32"}
# vector instructions by step of the int8 depthwise kernel (AVX2)
STEPS = {"convert": ("vpmovzxbd", "vcvtdq2ps"),
         "fma": ("vfmadd231ps", "vfmadd213ps", "vfmadd132ps", "vmulps", "vaddps"),
         "requantize": ("vcvttps2dq", "vpmuldq", "vpaddq", "vpsrlq", "vpshufd", "vpblendd",
                        "vpsravd", "vpaddd", "vpminsd", "vpmaxsd"),
         "pack": ("vpackssdw", "vpackuswb", "vextracti128", "vpermq", "vpermpd", "vpermd")}


def depthwise_kernels(path: Path) -> dict[tuple, tuple[str, object]]:
    import tvm

    from tvm_compress.backend.schedules import default_schedule_pipeline

    mod = default_schedule_pipeline(_target())(tvm.ir.load_json(path.read_text()))
    out = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and "depthwise" in gv.name_hint:
            shapes = {"input": [int(d) for d in func.params[0].shape],
                      "output": [int(d) for d in func.params[-1].shape]}
            out.setdefault(_layer_key(gv.name_hint, shapes), (gv.name_hint, func))
    return out


def _compile(func) -> tuple:  # noqa: ANN001
    import tvm

    lib = tvm.compile(func.with_attr("global_symbol", "main"), _target()).mod
    rng = np.random.default_rng(0)
    args = []
    for p in func.params:
        shape, dtype = [int(d) for d in p.shape], str(p.dtype)
        if dtype.startswith("float"):
            args.append(rng.standard_normal(shape).astype(dtype))
        else:
            info = np.iinfo(dtype)
            args.append(rng.integers(max(info.min, -100), min(info.max, 100), shape)
                        .astype(dtype))
    timer = lib.time_evaluator("main", tvm.cpu(), number=100, repeat=1)
    tensors = [tvm.runtime.tensor(a) for a in args]
    return (lambda: timer(*tensors).mean * 1e6), _steps(lib.inspect_source("asm"))


def _steps(asm: str) -> dict[str, int]:
    """Vector instruction counts of the kernel body (``main_compute_``), by step."""
    body = asm[asm.find("main_compute_:"):]
    ops = collections.Counter(line.split()[0] for line in body.splitlines()
                              if line.startswith("\t") and not line.startswith("\t."))
    return {step: sum(ops[op] for op in names) for step, names in STEPS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calib", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "depthwise_int8"))
    args = parser.parse_args()
    from tvm_compress.runtime.threads import set_threads

    set_threads(2)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        prepare(tmp, args.calib)
        kernels = {b: depthwise_kernels(tmp / f"{b}.json") for b in BUILDS}
    keys = [k for k in kernels["fp32"] if all(k in kernels[b] for b in BUILDS)]
    timers, steps = {}, {}
    for key in keys:
        for b in BUILDS:
            timers[(key, b)], steps[(key, b)] = _compile(kernels[b][key][1])
    load_before = machine_load()
    times: dict = collections.defaultdict(list)
    for _ in range(args.rounds):
        for k, fn in timers.items():
            times[k].append(fn())
    rows = []
    for key in keys:
        row = {"input": [int(d) for d in kernels["fp32"][key][1].params[0].shape],
               "output_hw": list(key[1]), "kernels": {}}
        for b in BUILDS:
            row["kernels"][b] = {"name": kernels[b][key][0], "us": min(times[(key, b)]),
                                 "vector_ops": steps[(key, b)]}
        rows.append(row)
    result = {"target": str(_target()), "rounds": args.rounds, "load_before": load_before,
              "load_after": machine_load(), "builds": BUILDS, "layers": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["# MobileNetV2 depthwise kernels alone: int8 vs fp32", "",
             f"Target `{result['target']}`, 2 threads; each kernel compiled alone, timed with "
             f"`time_evaluator` (100 calls), the three builds interleaved over "
             f"{result['rounds']} rounds, minimum kept. Load average before "
             f"{result['load_before']['loadavg']}, after {result['load_after']['loadavg']}. "
             "Data stay in cache: "
             "this is the compute cost; `int8_avx2.md` has the kernels inside the model.", "",
             "Vector instructions in the kernel body, per step (int8: u8 -> fp32 conversion "
             "of the taps, FMAs, fixed-point requantization, packing to u8):", "",
             "| input (N, C/8, H, W, 8) | out HxW | fp32 us | int8 us | auto us | int8 / fp32 "
             "| auto / fp32 | int8 ops: convert / fma / requantize / pack | fp32 ops: fma |",
             "|---|---|---|---|---|---|---|---|---|"]
    tot = collections.Counter()
    for r in result["layers"]:
        k = r["kernels"]
        for b in BUILDS:
            tot[b] += k[b]["us"]
        ops = k["int8"]["vector_ops"]
        lines.append(
            f"| {tuple(r['input'])} | {r['output_hw'][0]}x{r['output_hw'][1]} | "
            f"{k['fp32']['us']:.1f} | {k['int8']['us']:.1f} | {k['int8_w7']['us']:.1f} | "
            f"{k['int8']['us'] / k['fp32']['us']:.2f} | {k['int8_w7']['us'] / k['fp32']['us']:.2f}"
            f" | {ops['convert']} / {ops['fma']} / {ops['requantize']} / {ops['pack']} | "
            f"{k['fp32']['vector_ops']['fma']} |")
    lines.append(f"| **sum** | | {tot['fp32']:.1f} | {tot['int8']:.1f} | {tot['int8_w7']:.1f} | "
                 f"**{tot['int8'] / tot['fp32']:.2f}** | **{tot['int8_w7'] / tot['fp32']:.2f}** "
                 "| | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
