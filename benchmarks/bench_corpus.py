"""The real-model corpus end to end (benchmarks/corpus.py): every model through inspect ->
compile (x86) -> compare with ONNX Runtime -> W8A8 quantize -> compile for aarch64 and
cuda-sm80 (codegen only), with TVM fp32 / int8 and ONNX Runtime fp32 / int8 latency (and TVM int8
with 7-bit weights on AVX2 hosts without VNNI, where they take the faster u8 x s8 kernel; the
depthwise layers keep 8 bits there, as ``quantize --wbits auto`` does).

Timing: each model runs in a fresh process, where its four engines are timed in interleaved
rounds (``--rounds`` x ``--per-round`` calls each, engines in turn, each turn after a pause and
5 ms of untimed calls: ``runtime.bench.settle`` / ``warm_turn``), so load from other processes
hits them alike; ``typical`` is the median over rounds of each round's fastest call. ORT int8 is
ONNX Runtime's own ``quantize_static`` (QDQ, u8/s8, per channel) on the same calibration data.
Calibration: real photos (scikit-image) or text crops, seed 0; agreement and SQNR of int8
against fp32 on other images (seed 1). Writes benchmarks/results/corpus.{json,md}.

    python benchmarks/bench_corpus.py                      # the full corpus (the real results)
    python benchmarks/bench_corpus.py --quick --models nudenet_320n resnet50_ts   # smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOGS = RESULTS / "corpus_logs"


class StageError(RuntimeError):
    """A stage failed; the message is the stage and the first line of the error."""


def _stage(name: str, entry: corpus.CorpusEntry, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - every failure is recorded, the run goes on
        LOGS.mkdir(parents=True, exist_ok=True)
        log = LOGS / f"{entry.name}.{name}.log"
        log.write_text(traceback.format_exc())
        first = (str(err).strip().splitlines() or [""])[0][:300]
        for line in str(err).splitlines():  # TVM's messages say the real thing last
            if "Error" in line or "Check failed" in line:
                first = line.strip()[:300]
        raise StageError(f"{name}: {type(err).__name__}: {first} (log: {log})") from None


def _inspect(entry: corpus.CorpusEntry, path: Path, model: Any) -> dict[str, Any]:
    import onnx

    original = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in original.graph.node)
    return {"ops": dict(ops.most_common()), "nodes": sum(ops.values()),
            "macs": int(model.layers.total_macs), "params": int(model.layers.total_params),
            "layers": len(model.layers), "notes": list(model.notes),
            "inputs": {s.name: list(s.shape) for s in model.inputs},
            "outputs": list(model.outputs)}


def _fp32_reasons(qmodel: Any) -> dict[str, str]:
    """Why each layer left in fp32 stayed there."""
    not_sites = set(qmodel.graph.fp32_layers)
    reasons = {}
    for name in qmodel.fp32_layers:
        if name in not_sites and qmodel.config.is_fp32(name):
            reasons[name] = "kept fp32 by the configuration"
        elif name in not_sites:
            reasons[name] = ("not a quantizable site: weight not a constant 4-D conv / 2-D linear "
                             "weight (computed, or a transpose not folded)")
        else:
            reasons[name] = "RealizeInteger found no integer form; runs as fp32"
    return reasons


def _outputs(run: Any, data: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
    """``run(feed)``'s outputs (a list of arrays) for each sample of ``data``, one at a time."""
    count = len(next(iter(data.values())))
    return [[np.asarray(o) for o in run({k: v[i:i + 1] for k, v in data.items()})]
            for i in range(count)]


def _quality(outputs: str, ref: list[list[np.ndarray]],
             out: list[list[np.ndarray]]) -> dict[str, Any]:
    """Agreement of the outputs ``out`` with ``ref`` (:func:`_outputs` of the same samples):
    SQNR per output, and top-1 agreement where ``outputs`` (``CorpusEntry.outputs``) are
    classes."""
    from tvm_compress.runtime.metrics import sqnr_db, top1_agreement

    per_output = [float(sqnr_db(np.stack([o[j] for o in out]), np.stack([r[j] for r in ref])))
                  for j in range(len(ref[0]))]
    result: dict[str, Any] = {"sqnr_db": per_output, "samples": len(ref)}
    if outputs in ("classes", "text"):
        a = np.concatenate([o[0].reshape(-1, o[0].shape[-1]) for o in out])
        b = np.concatenate([r[0].reshape(-1, r[0].shape[-1]) for r in ref])
        result["top1_agreement"] = top1_agreement(a, b)
    return result


def _quality_cell(q: dict) -> str:
    """Top-1 agreement where the outputs are classes, and the lowest SQNR over the outputs."""
    if not q or not q.get("sqnr_db"):
        return "-"
    top1 = f"top-1 {q['top1_agreement']:.2f}, " if "top1_agreement" in q else ""
    return top1 + f"SQNR {min(q['sqnr_db']):.1f} dB"


def _interleaved(engines: dict[str, Any], *, rounds: int, per_round: int) -> dict[str, Any]:
    """Each engine ``per_round`` timed calls per round, engines in turn, ``rounds`` rounds
    after one warm-up round; every turn starts with ``settle`` and ``warm_turn``."""
    from tvm_compress.backend.build import latency_stats
    from tvm_compress.runtime.bench import settle, timed_turn

    per: dict[str, list[float]] = {k: [] for k in engines}
    medians: dict[str, list[float]] = {k: [] for k in engines}
    for round_index in range(rounds + 1):
        for name, fn in engines.items():
            settle()
            stats = latency_stats(timed_turn(fn, per_round))
            if round_index:
                per[name].append(stats.p10_ms if per_round > 1 else stats.median_ms)
                medians[name].append(stats.median_ms)
    return {k: {"typical_ms": float(np.median(per[k])), "median_ms": float(np.median(medians[k]))}
            for k in engines}


def _engines(entry: corpus.CorpusEntry, path: Path, model: Any, compiled: Any, qcompiled: Any,
             calib: dict[str, np.ndarray], feed: dict[str, np.ndarray], result: dict,
             w7compiled: Any, held_out: tuple[dict[str, np.ndarray], list]) -> dict:
    """The engines to time; ONNX Runtime int8's agreement with fp32 on ``held_out`` (samples,
    TVM fp32's outputs on them) goes to ``result``."""
    import onnx
    import tvm

    from tvm_compress.backend.targets import host_cores
    from tvm_compress.quant.ort_quant import ort_quantize_static
    from tvm_compress.runtime.bench import onnxruntime_session
    from tvm_compress.runtime.threads import set_threads

    threads = set_threads(host_cores())  # TVM, ORT and PyTorch alike
    engines: dict[str, Any] = {}
    for name, cm in (("tvm_fp32", compiled), ("tvm_int8", qcompiled),
                     ("tvm_int8_w7", w7compiled)):
        if cm is not None:
            args = [tvm.runtime.tensor(feed[s.name]) for s in model.inputs]
            engines[name] = lambda vm=cm.vm, args=args: vm["main"](*args)
    original = onnx.load(str(path))
    fp32 = onnxruntime_session(original, threads=threads)
    engines["ort_fp32"] = lambda: fp32.run(None, feed)
    if entry.name == "ddddocr_common_old":
        result["ort_int8"] = "n/a: the file is already int8 (its fp32 timing is ORT's int8)"
    elif len(model.inputs) == 1:
        try:
            first = calib[model.inputs[0].name]
            int8 = onnxruntime_session(ort_quantize_static(_opset13(original), first),
                                       threads=threads)
            engines["ort_int8"] = lambda: int8.run(None, feed)
        except Exception as err:  # noqa: BLE001 - recorded
            result["ort_int8"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
        else:
            data, reference = held_out
            try:
                result["ort_int8_vs_fp32"] = _quality(
                    entry.outputs, reference, _outputs(lambda f: int8.run(None, f), data))
            except Exception as err:  # noqa: BLE001 - recorded
                result["ort_int8_vs_fp32"] = {"failed": f"{type(err).__name__}: {err}"[:200]}
    return engines


def _opset13(model: Any) -> Any:
    """ORT's per-channel QDQ needs DequantizeLinear's axis (opset 13): convert older files."""
    import onnx

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    return model if opset >= 13 else onnx.version_converter.convert_version(model, 13)


def _cross_builds(entry: corpus.CorpusEntry, model: Any, qmodel: Any) -> dict[str, str]:
    from tvm_compress.backend.build import build

    status = {}
    for target in ("aarch64", "cuda-sm80"):
        for precision, m in (("fp32", model), ("int8", qmodel)):
            if m is None:
                status[f"{target}_{precision}"] = "skipped (no int8 model)"
                continue
            start = time.perf_counter()
            try:
                _stage(f"build_{target}_{precision}", entry, build, m, target=target)
                status[f"{target}_{precision}"] = f"ok ({time.perf_counter() - start:.0f} s)"
            except StageError as err:
                status[f"{target}_{precision}"] = f"failed: {err}"
    return status


def _header(entry: corpus.CorpusEntry) -> dict[str, Any]:
    """What every result record of ``entry`` starts with, failed or not."""
    return {"name": entry.name, "description": entry.description, "source": entry.source,
            "outputs": entry.outputs}


def run_model(entry: corpus.CorpusEntry, args: argparse.Namespace) -> dict[str, Any]:
    import tvm_compress as tc
    from tvm_compress.backend.build import build
    from tvm_compress.backend.targets import resolve_target
    from tvm_compress.quant.config import QuantConfig, QuantSpec, at_target_bits
    from tvm_compress.quant.quantize import quantize

    shapes = entry.small_shapes if args.quick else entry.input_shapes
    result = {**_header(entry), "shapes": {k: list(v) for k, v in shapes.items()}}
    try:
        path = _stage("fetch", entry, corpus.fetch, entry)
        model = _stage("import", entry, tc.load, str(path), input_shapes=shapes)
        result["import"] = "ok"
        result["inspect"] = _inspect(entry, path, model)
        compiled = _stage("build_x86", entry, build, model, target="x86")
        result["compile_x86"] = "ok"
        feed = corpus.inputs(entry, shapes, seed=1)
        ours = compiled.run_outputs(feed)
        result["vs_onnxruntime"] = corpus.compare(entry, ours,
                                                  corpus.onnxruntime_outputs(path, feed))
        calib = corpus.inputs(entry, shapes, n=args.calib, seed=0)
        # held-out samples (not for calibration) and TVM fp32's outputs on them: the reference
        # of every int8 build's agreement, ours and ONNX Runtime's
        eval_data = corpus.inputs(entry, shapes, n=args.eval, seed=1)
        reference = _outputs(compiled.run_outputs, eval_data)
        qcompiled = qmodel = None
        try:
            config = QuantConfig(calib_samples=args.calib)
            calib_arg = calib if len(calib) > 1 else next(iter(calib.values()))
            qres = _stage("quantize", entry, quantize, model, config, calib_arg, progress=False)
            qmodel = qres.model
            result["quantize"] = {"status": "ok", "quantized_layers": len(qres.graph.layers),
                                  "fp32_layers": _fp32_reasons(qres)}
            qcompiled = _stage("build_x86_int8", entry, build, qmodel, target="x86")
            result["quantize"]["vs_fp32"] = _quality(
                entry.outputs, reference, _outputs(qcompiled.run_outputs, eval_data))
        except StageError as err:
            result["quantize"] = {"status": f"failed: {err}"}
        w7compiled = None
        if args.w7 and qcompiled is not None:
            try:
                # what --wbits auto gives on this host: 7 bits, the depthwise layers 8 (fp32 where
                # small and followed by a float island)
                w7 = at_target_bits(QuantConfig(weight=QuantSpec(7, "symmetric", "per_channel"),
                                                calib_samples=args.calib),
                                    resolve_target("x86"), model.layers, bits=7,
                                    mod=model.mod)
                w7res = _stage("quantize_w7", entry, quantize, model, w7, calib_arg,
                               progress=False)
                w7compiled = _stage("build_x86_int8_w7", entry, build, w7res.model,
                                    target="x86")
                result["quantize"]["w7_vs_fp32"] = _quality(
                    entry.outputs, reference, _outputs(w7compiled.run_outputs, eval_data))
            except StageError as err:
                result["quantize"]["w7"] = f"failed: {err}"
        engines = _engines(entry, path, model, compiled, qcompiled, calib, feed, result,
                           w7compiled, (eval_data, reference))
        result["latency"] = _interleaved(engines, rounds=args.rounds, per_round=args.per_round)
        if not args.host_only:
            result["cross_builds"] = _cross_builds(entry, model, qmodel)
    except StageError as err:
        result["failed"] = str(err)
    return result


def _run_isolated(entry: corpus.CorpusEntry, args: argparse.Namespace) -> dict[str, Any]:
    """``run_model`` in a fresh process: no model is timed in a process that built and ran the
    ones before it, and a worker that dies is recorded as that model's failure. (It does not
    settle `rapidocr_cls`: its TVM fp32 reads 0.33-0.37 ms in some processes and 0.63 ms in
    others, in a long-lived process or a fresh one alike; docs/status.md, session 18.)"""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(run_model, entry, args).result()
        except concurrent.futures.process.BrokenProcessPool as err:
            return {**_header(entry), "failed": f"worker process died: {err}"}


def _cell(value: Any, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ok(builds: dict[str, str], key: str) -> str:
    if key not in builds:
        return "-"
    return next(w for w in ("ok", "skipped", "FAIL") if builds[key].startswith(w) or w == "FAIL")


def _geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def ratio_summary(results: list[dict]) -> list[str]:
    """Latency ratios per model (typical / typical) and their geometric means: TVM fp32 vs ONNX
    Runtime fp32, TVM int8 vs ONNX Runtime int8, TVM int8 vs TVM fp32."""
    pairs = {"TVM fp32 / ORT fp32": ("tvm_fp32", "ort_fp32"),
             "TVM int8 / ORT int8": ("tvm_int8", "ort_int8"),
             "TVM int8 / TVM fp32": ("tvm_int8", "tvm_fp32")}
    if any("tvm_int8_w7" in r.get("latency", {}) for r in results):
        pairs.update({"TVM int8 7-bit w / ORT int8": ("tvm_int8_w7", "ort_int8"),
                      "TVM int8 7-bit w / TVM fp32": ("tvm_int8_w7", "tvm_fp32")})
    ratios: dict[str, dict[str, float]] = {label: {} for label in pairs}
    for r in results:
        lat = {k: v.get("typical_ms") for k, v in r.get("latency", {}).items()}
        for label, (a, b) in pairs.items():
            if lat.get(a) and lat.get(b):
                ratios[label][r["name"]] = lat[a] / lat[b]
    lines = ["## Ratios", "", "| model | " + " | ".join(pairs) + " |", "|---" * (len(pairs) + 1)
             + "|"]
    for r in results:
        cells = [_cell(ratios[label].get(r["name"])) for label in pairs]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    means = [f"**{_geomean(list(v.values())):.2f}** ({len(v)})" if v else "-"
             for v in ratios.values()]
    lines.append("| geometric mean (models) | " + " | ".join(means) + " |")
    fp32 = ratios["TVM fp32 / ORT fp32"]
    int8 = ratios["TVM int8 / TVM fp32"]
    lines += ["", f"TVM fp32 above 1.5x ONNX Runtime fp32: {sum(v > 1.5 for v in fp32.values())} "
              f"of {len(fp32)} ({', '.join(k for k, v in fp32.items() if v > 1.5) or 'none'}). "
              f"TVM int8 at or below 0.8x TVM fp32: {sum(v <= 0.8 for v in int8.values())} of "
              f"{len(int8)}."]
    w7 = ratios.get("TVM int8 7-bit w / TVM fp32")
    if w7:
        lines[-1] += (f" With 7-bit weights: {sum(v <= 0.8 for v in w7.values())} of {len(w7)}.")
        lines += ["", _w7_quality(results)]
    return lines


def _w7_quality(results: list[dict]) -> str:
    """Agreement with fp32 of the 8-bit and the 7-bit weight builds, side by side."""
    lines = ["### 8-bit vs 7-bit weights: agreement with TVM fp32", "",
             "| model | 8-bit weights | 7-bit weights |", "|---|---|---|"]
    for r in results:
        q = r.get("quantize", {})
        if "w7_vs_fp32" in q:
            lines.append(f"| {r['name']} | {_quality_cell(q.get('vs_fp32', {}))} | "
                         f"{_quality_cell(q['w7_vs_fp32'])} |")
    return "\n".join(lines)


def accuracy_summary(results: list[dict]) -> list[str]:
    """TVM int8's and ONNX Runtime int8's agreement with fp32 over the models that have both."""
    both = [(r["quantize"]["vs_fp32"], r["ort_int8_vs_fp32"]) for r in results
            if r.get("quantize", {}).get("vs_fp32", {}).get("sqnr_db")
            and r.get("ort_int8_vs_fp32", {}).get("sqnr_db")]
    if not both:
        return []
    ours = [min(a["sqnr_db"]) for a, _ in both]
    theirs = [min(b["sqnr_db"]) for _, b in both]
    top1 = [(a["top1_agreement"], b["top1_agreement"]) for a, b in both
            if "top1_agreement" in a and "top1_agreement" in b]
    line = (f"Accuracy next to it, over the {len(both)} models with both int8 builds (agreement "
            f"with TVM fp32 on held-out samples): median lowest SQNR TVM int8 "
            f"{np.median(ours):.1f} dB, ONNX Runtime int8 {np.median(theirs):.1f} dB; TVM int8 "
            f"the higher on {sum(a >= b for a, b in zip(ours, theirs, strict=True))} of "
            f"{len(both)}.")
    if top1:
        line += (f" Top-1 agreement over the {len(top1)} classifiers: TVM int8 "
                 f"{np.mean([a for a, _ in top1]):.2f}, ONNX Runtime int8 "
                 f"{np.mean([b for _, b in top1]):.2f} (mean).")
    return ["", line]


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Real-model corpus", "",
        f"{meta['machine']}; {meta['threads']} threads per engine; {meta['mode']} shapes; engines "
        f"timed in one process per model in {meta['rounds']} interleaved rounds x "
        f"{meta['per_round']} calls after 5 ms of untimed calls (typical = median over rounds of "
        f"the round's fastest call). Load average before {meta['load_before']}, after "
        f"{meta['load_after']}."
        + ("" if meta.get("cross_builds", True) else " Host only: no aarch64 / CUDA builds "
           "(`--host-only`)."), "",
        "| model | import | x86 | matches ORT (max rel diff) | W8A8 | int8 vs fp32 | ORT int8 vs "
        "fp32 | fp32 layers left | TVM fp32 ms | TVM int8 ms | TVM int8 7-bit w ms | ORT fp32 ms "
        "| ORT int8 ms | aarch64 fp32/int8 | cuda fp32/int8 |", "|---" * 15 + "|"]
    for r in results:
        if "failed" in r and "import" not in r:
            lines.append(f"| {r['name']} | **{r['failed']}** |" + " |" * 13)
            continue
        vs = r.get("vs_onnxruntime", {})
        q = r.get("quantize", {})
        lat = {k: v.get("typical_ms") for k, v in r.get("latency", {}).items()}
        cb = r.get("cross_builds", {})
        match = ("yes" if vs.get("match") else "**no**") + \
            f" ({_cell(vs.get('max_rel_diff'), '{:.1e}')})" if vs else r.get("failed", "-")
        lines.append(
            f"| {r['name']} | {r.get('import', '-')} | {r.get('compile_x86', 'FAIL')} | {match} | "
            f"{'ok' if q.get('status') == 'ok' else 'FAIL' if q else '-'} | "
            f"{_quality_cell(q.get('vs_fp32', {}))} | "
            f"{_quality_cell(r.get('ort_int8_vs_fp32', {}))} | "
            f"{len(q.get('fp32_layers', {})) if q.get('status') == 'ok' else '-'} | "
            f"{_cell(lat.get('tvm_fp32'))} | {_cell(lat.get('tvm_int8'))} | "
            f"{_cell(lat.get('tvm_int8_w7'))} | "
            f"{_cell(lat.get('ort_fp32'))} | {_cell(lat.get('ort_int8'))} | "
            f"{_ok(cb, 'aarch64_fp32')}/{_ok(cb, 'aarch64_int8')} | "
            f"{_ok(cb, 'cuda-sm80_fp32')}/{_ok(cb, 'cuda-sm80_int8')} |")
    lines += ["", *ratio_summary(results), *accuracy_summary(results), "", "## Per model", ""]
    for r in results:
        lines.append(f"### {r['name']}\n\n{r['description']}. Source: {r['source']}. Shapes: "
                     f"{r['shapes']}. Outputs: {r['outputs']}.\n")
        ins = r.get("inspect")
        if ins:
            ops = ", ".join(f"{k} {v}" for k, v in ins["ops"].items())
            lines.append(f"- {ins['nodes']} nodes ({ops}); {ins['macs'] / 1e9:.2f} GMACs, "
                         f"{ins['params'] / 1e6:.2f} M params in {ins['layers']} conv/linear "
                         "layers")
            lines += [f"- import note: {n}" for n in ins["notes"]]
        for key in ("failed", "ort_int8"):
            if key in r:
                lines.append(f"- {key}: {r[key]}")
        if "failed" in r.get("ort_int8_vs_fp32", {}):
            lines.append(f"- ORT int8 accuracy: failed: {r['ort_int8_vs_fp32']['failed']}")
        q = r.get("quantize", {})
        if q.get("status", "ok") != "ok":
            lines.append(f"- quantize: {q['status']}")
        for layer, why in q.get("fp32_layers", {}).items():
            lines.append(f"- fp32 in int8: `{layer}`: {why}")
        for k, v in r.get("cross_builds", {}).items():
            if not v.startswith("ok"):
                lines.append(f"- {k}: {v}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="corpus entries to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small shapes, 2 calibration / 1 eval samples, 2 rounds")
    parser.add_argument("--calib", type=int, default=16, help="calibration samples")
    parser.add_argument("--eval", type=int, default=8, help="images for int8-vs-fp32 quality")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--out", default="corpus",
                        help="results file stem in benchmarks/results, or a path prefix")
    parser.add_argument("--w7", choices=["auto", "on", "off"], default="auto",
                        help="also build and time int8 with 7-bit weights (auto: on AVX2 hosts "
                             "without VNNI, where they take a faster kernel)")
    parser.add_argument("--host-only", action="store_true",
                        help="skip the aarch64 and CUDA builds (timing runs on this host)")
    args = parser.parse_args(argv)
    if args.quick:
        args.calib, args.eval, args.rounds, args.per_round = 2, 1, 2, 2
    from tvm_compress.backend.schedules.hardware import cpu_name, has_avx2_int8, vnni_lanes
    from tvm_compress.backend.targets import host_cores, resolve_target

    args.w7 = args.w7 == "on" or (args.w7 == "auto" and has_avx2_int8(resolve_target("x86"))
                                  and not vnni_lanes(resolve_target("x86")))

    host = resolve_target("x86")
    isa = ("AVX-512 VNNI" if vnni_lanes(host) == 16 else "AVX2 without VNNI"
           if has_avx2_int8(host) else str(host.attrs.get("mcpu", "")))
    meta = {"machine": f"{cpu_name()} ({isa}), {os.cpu_count()} cores",
            "threads": host_cores(), "mode": "small (--quick)" if args.quick else "full",
            "cross_builds": not args.host_only,
            "rounds": args.rounds, "per_round": args.per_round,
            "load_before": round(os.getloadavg()[0], 2)}
    results = []
    stem = Path(args.out) if os.sep in args.out else RESULTS / args.out
    stem.parent.mkdir(parents=True, exist_ok=True)
    for entry in corpus.entries(args.models):
        start = time.perf_counter()
        print(f"== {entry.name}", flush=True)
        result = _run_isolated(entry, args)
        result["seconds"] = round(time.perf_counter() - start, 1)
        results.append(result)
        print(f"   {result.get('failed') or result.get('vs_onnxruntime')} "
              f"({result['seconds']} s)", flush=True)
        meta["load_after"] = round(os.getloadavg()[0], 2)
        out = {"meta": meta, "models": results}
        Path(f"{stem}.json").write_text(json.dumps(out, indent=1, default=str))
        Path(f"{stem}.md").write_text(markdown(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
