"""MobileNetV2 layer by layer: ONNX Runtime's own profile against TVM's kernels, fp32 and int8.

ONNX Runtime runs the fp32 model and its own int8 model (``quantize_static``, QDQ) with
``SessionOptions.enable_profiling``; every node's per-call minimum over the profiled runs is
read from its trace. TVM runs the fp32 build and the default int8 build (7-bit weights,
depthwise at 8 bits on AVX2 without VNNI) with each kernel's per-call minimum inside the running
model (``bench_int8.kernel_timer``, each build compiled once). Both sides are matched per layer
by kind (conv / depthwise / dense), output size and input / output channels; what has no
counterpart (ONNX Runtime's layout reorders, Transposes, QuantizeLinear, QLinearAdd; TVM's
layout transforms) is listed as "other". The engines alternate over ``--rounds`` rounds in this
one process and the minimum over rounds is kept; each ONNX Runtime session (threads spinning
between nodes, its default) is closed, and its threads idle, before TVM's kernels are timed.
Sorted by the gap TVM - ONNX Runtime: the largest gaps are where the next kernel work pays.
Writes benchmarks/results/ort_profile.{json,md}.

    python benchmarks/bench_ort_profile.py [--rounds 3] [--runs 20] [--out PATH_PREFIX]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import (  # noqa: E402
    THREADS,
    _layer_key,
    _target,
    keep_faster,
    kernel_timer,
    machine_load,
    prepare,
)

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = {"fp32": ("fp32.onnx", "fp32.json"), "int8": ("int8.onnx", "int8_w7.json")}
_DENSE = {"Gemm", "MatMul", "FusedGemm", "QGemm", "QLinearMatMul", "MatMulInteger"}
_CONV = {"Conv", "FusedConv", "QLinearConv"}


def ort_session(path: Path, profile_prefix: Path, optimized: Path):  # noqa: ANN201
    """A profiling ONNX Runtime session that saves its optimized graph (to read node kinds)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_prefix)
    options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def node_kinds(optimized: Path) -> dict[str, dict]:
    """Per node of ONNX Runtime's optimized graph: op type, group and channels_last."""
    import onnx

    out = {}
    for node in onnx.load(str(optimized)).graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out[node.name] = {"op": node.op_type, "group": int(attrs.get("group", 1)),
                          "channels_last": bool(attrs.get("channels_last", 0))}
    return out


def ort_profile(session, runs: int) -> dict[str, dict]:  # noqa: ANN001
    """Per node: per-call minimum (ms) over ``runs`` profiled runs, op name and shapes."""
    x = np.random.default_rng(0).random((1, 3, 224, 224), "float32")
    name = session.get_inputs()[0].name
    for _ in range(runs):
        session.run(None, {name: x})
    trace = json.loads(Path(session.end_profiling()).read_text())
    nodes: dict[str, dict] = {}
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node = nodes.setdefault(event["name"][:-len("_kernel_time")], {
            "op": event["args"].get("op_name", ""), "us": [],
            "input": _first_shape(event["args"].get("input_type_shape", [])),
            "output": _first_shape(event["args"].get("output_type_shape", []))})
        node["us"].append(float(event["dur"]))
    return {n: {**v, "ms": min(v["us"]) / 1e3, "us": None} for n, v in nodes.items()}


def _first_shape(shapes: list[dict]) -> list[int]:
    return [int(d) for d in next(iter(shapes[0].values()))] if shapes else []


def _ort_key(node: dict, kind: dict | None) -> tuple | None:
    """The layer key of an ONNX Runtime node (as ``bench_int8._layer_key`` keys TVM kernels)."""
    op = node["op"]
    if op in _DENSE:
        out = node["output"]
        return ("dense", tuple(out), -(-node["input"][-1] // 16), -(-out[-1] // 16))
    if op not in _CONV or kind is None or len(node["input"]) != 4:
        return None
    data, out = node["input"], node["output"]
    if kind["channels_last"]:
        c_in, c_out, hw = data[3], out[3], tuple(out[1:3])
    else:
        c_in, c_out, hw = data[1], out[1], tuple(out[2:4])
    depthwise = kind["group"] > 1 and kind["group"] == c_in
    return ("depthwise" if depthwise else "conv", hw, -(-c_in // 16), -(-c_out // 16))


def match(ort: dict[str, dict], kinds: dict[str, dict], tvm: dict[str, dict]) -> list[dict]:
    """Rows per layer key: ONNX Runtime nodes and TVM kernels side by side (ms, summed)."""
    rows: dict[tuple, dict] = {}

    def row(key: tuple) -> dict:
        return rows.setdefault(key, {"kind": key[0], "output": list(key[1]),
                                     "in_blocks16": key[2], "out_blocks16": key[3],
                                     "ort_nodes": [], "tvm_kernels": [],
                                     "ort_ms": 0.0, "tvm_ms": 0.0})

    for name, node in ort.items():
        kind = kinds.get(name) or kinds.get(re.sub(r"_token_\d+$", "", name))
        key = _ort_key(node, kind) or ("other", (), 0, 0)
        r = row(key)
        r["ort_nodes"].append(f"{node['op']}:{name}")
        r["ort_ms"] += node["ms"]
    for name, k in tvm.items():
        key = _layer_key(name, k)
        if key[0] == "other" or key not in rows:
            key = ("other", (), 0, 0)
        r = row(key)
        r["tvm_kernels"].append(name)
        r["tvm_ms"] += k["ms"]
    return sorted(rows.values(), key=lambda r: -(r["tvm_ms"] - r["ort_ms"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20, help="profiled runs per round")
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS / "ort_profile"))
    args = parser.parse_args()
    result = {"model": "zoo:mobilenet_v2 (ImageNet weights), batch 1", "target": str(_target()),
              "threads": THREADS, "rounds": args.rounds, "runs": args.runs, "precisions": {}}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        prepare(tmp, args.calib)
        result["load_before"] = machine_load()
        best_ort: dict[str, dict] = {}
        best_tvm: dict[str, dict] = {}
        kinds: dict[str, dict] = {}
        timers = {precision: kernel_timer(tmp / tvm_file)
                  for precision, (_, tvm_file) in PAIRS.items()}
        for _ in range(args.rounds):
            for precision, (onnx_file, _) in PAIRS.items():
                optimized = tmp / f"ort_{precision}.onnx"
                session = ort_session(tmp / onnx_file, tmp / f"profile_{precision}", optimized)
                profile = ort_profile(session, args.runs)
                del session
                time.sleep(0.5)  # ONNX Runtime's pool threads stop spinning
                if precision not in kinds:  # the same optimized graph every round
                    kinds[precision] = node_kinds(optimized)
                kernels = timers[precision](args.runs)
                keep_faster(best_ort.setdefault(precision, {}), profile)
                keep_faster(best_tvm.setdefault(precision, {}), kernels)
        result["load_after"] = machine_load()
    for precision in PAIRS:
        rows = match(best_ort[precision], kinds[precision], best_tvm[precision])
        result["precisions"][precision] = {
            "tvm_build": PAIRS[precision][1].removesuffix(".json"), "layers": rows,
            "ort_total_ms": sum(r["ort_ms"] for r in rows),
            "tvm_total_ms": sum(r["tvm_ms"] for r in rows)}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["# MobileNetV2 layer by layer: ONNX Runtime's profile vs TVM's kernels", "",
             f"Target `{result['target']}`, {result['threads']} threads per engine, batch 1. "
             f"Per node / kernel: the per-call minimum inside the running model over "
             f"{result['runs']} runs, best of {result['rounds']} alternating rounds, summed per "
             "layer (same kind, output size and channels in blocks of 16). Load average before "
             f"{result['load_before']['loadavg']}, after {result['load_after']['loadavg']}. "
             "Sorted by the gap TVM - ONNX Runtime, largest first.", ""]
    for precision, data in result["precisions"].items():
        lines += [f"## {precision} (TVM build: {data['tvm_build']})", "",
                  f"Sum: ONNX Runtime {data['ort_total_ms']:.3f} ms, TVM "
                  f"{data['tvm_total_ms']:.3f} ms "
                  f"({data['tvm_total_ms'] / data['ort_total_ms']:.2f}x).", "",
                  "| kind | output HxW | in / out channels (16s) | ORT nodes | TVM kernels "
                  "| ORT ms | TVM ms | TVM / ORT | gap ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for r in data["layers"]:
            ratio = f"{r['tvm_ms'] / r['ort_ms']:.2f}" if r["ort_ms"] else "-"
            lines.append(
                f"| {r['kind']} | {'x'.join(map(str, r['output'])) or '-'} | "
                f"{r['in_blocks16']} / {r['out_blocks16']} | {len(r['ort_nodes'])} | "
                f"{len(r['tvm_kernels'])} | {r['ort_ms']:.3f} | {r['tvm_ms']:.3f} | {ratio} | "
                f"{r['tvm_ms'] - r['ort_ms']:+.3f} |")
            totals[r["kind"]].update({"ort": r["ort_ms"], "tvm": r["tvm_ms"]})
        lines += ["", "| kind | ORT ms | TVM ms | TVM / ORT |", "|---|---|---|---|"]
        for kind, t in totals.items():
            ratio = f"{t['tvm'] / t['ort']:.2f}" if t["ort"] else "-"
            lines.append(f"| {kind} | {t['ort']:.3f} | {t['tvm']:.3f} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
