"""``tvm-compress`` command line: one subcommand per job, ``--json`` for machine-readable output.

Errors caused by input print one line ``error: ...`` on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tvm_compress.cli.common import (
    MODEL_HELP,
    Console,
    _emit_json,
    _print_bench,
    add_common,
    add_quantize_args,
    auto_weight_bits,
    load_model,
    model_io,
    npz_samples,
    quant_config,
    reference_outputs,
    report_internal_failure,
    split_holdout,
)
from tvm_compress.cli.report import add_report_args, check_profile_target, kernel_report
from tvm_compress.errors import UserError

# PyTorch's OpenMP workers spin while waiting by default; on a machine whose cores are shared
# (CI, other jobs) that made eager MobileNetV2 10x slower in `bench`/`demo`. Must be set before
# torch is first imported, which the commands do lazily.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")











# ------------------------------------------------------------------------------------- commands


def cmd_inspect(args: argparse.Namespace, con: Console) -> dict[str, Any]:
    from tvm_compress.quant.quantize import folded_weight_bytes
    from tvm_compress.zoo import ZOO

    if args.list:
        rows = [[f"zoo:{e.name}", e.task, "x".join(map(str, e.sample_shape)), e.description]
                for e in ZOO.values()]
        con.table("model zoo", ["name", "task", "input", "description"], rows)
        return {"zoo": {e.name: {"task": e.task, "input": list(e.sample_shape),
                                 "description": e.description} for e in ZOO.values()}}
    if not args.model:
        raise UserError("inspect needs a MODEL (" + MODEL_HELP + ") or --list")
    with con.step(f"importing {args.model}"):
        model = load_model(args)
    layers = model.layers
    for spec in model.inputs:
        con.out.print(f"[bold]{model.name}[/bold]: input {spec.name} {list(spec.shape)} "
                      f"{spec.dtype}")
    if len(model.outputs) > 1:
        con.out.print(f"{len(model.outputs)} outputs: {', '.join(model.outputs)}")
    for note in model.notes:
        con.err.print(f"[yellow]note:[/yellow] {note}")
    con.table("layers", ["layer", "kind", "in", "out", "kernel", "groups", "MACs", "params"],
              [[x.name, x.kind, x.in_channels, x.out_channels, "x".join(map(str, x.kernel)),
                x.groups, x.macs, x.params] for x in layers])
    wbytes = folded_weight_bytes(model)
    con.out.print(f"{len(layers)} layers ({layers.count('conv')} conv, "
                  f"{layers.count('depthwise')} depthwise, {layers.count('grouped')} grouped, "
                  f"{layers.count('linear')} linear); {layers.total_macs:,} MACs; "
                  f"{layers.total_params:,} layer params; {wbytes:,} weight bytes")
    return {"model": model.name, **model_io(model),
            "layers": json.loads(layers.to_json()), "total_macs": layers.total_macs,
            "total_params": layers.total_params, "weight_bytes": wbytes, "notes": model.notes}


def cmd_compile(args: argparse.Namespace, con: Console) -> dict[str, Any]:
    from tvm_compress.backend.build import build
    from tvm_compress.backend.targets import resolve_target
    from tvm_compress.quant.quantize import folded_weight_bytes

    target = resolve_target(args.target)
    check_profile_target(args, target)
    if not args.output.endswith(".so"):  # a directory: deployment bundle (runtime.deploy)
        from tvm_compress.runtime.deploy import compile_command

        return compile_command(args, con, target,
                               report=lambda compiled: kernel_report(args, con, compiled))
    with con.step(f"importing {args.model}"):
        model = load_model(args)
    extra: dict[str, Any] = {"weight_bytes": folded_weight_bytes(model)}
    if args.int8:
        from tvm_compress.runtime.deploy import quantize_default

        model, extra = quantize_default(model, con, target)
    with con.step(f"compiling for {args.target}"):
        compiled = build(model, target=target)
    out = Path(args.output)
    with con.step(f"writing {out}"):
        compiled.export(out)  # cross-compiled for aarch64 targets
    meta = {"model": model.name, "target": args.target, "library": str(out), **model_io(model),
            **extra, "library_bytes": out.stat().st_size}
    meta_path = out.with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2))
    meta.update(kernel_report(args, con, compiled))
    con.out.print(f"wrote {out} ({meta['library_bytes']:,} bytes) and {meta_path}")
    return meta


def _eval_data(args: argparse.Namespace, model: Any) -> tuple[Any, np.ndarray | None]:
    from tvm_compress.frontend.inputs import check_samples, take
    from tvm_compress.runtime.evaluation import task_data

    if args.data:
        images, labels = npz_samples(args.data, "data", model)
    elif model.task is None:
        raise UserError(f"{args.model} has no built-in evaluation data; pass --data FILE.npz "
                        "(one array per input name, or 'images'; 'labels' optional)")
    else:
        images, labels = task_data(model.task, args.split)
        check_samples(images, model.inputs, "data")
    if args.limit:
        images = take(images, 0, args.limit)
        labels = None if labels is None else labels[: args.limit]
    return images, labels




def cmd_eval(args: argparse.Namespace, con: Console) -> dict[str, Any]:
    from tvm_compress.backend.build import build
    from tvm_compress.quant.quantize import folded_weight_bytes
    from tvm_compress.runtime.evaluation import evaluate

    with con.step(f"importing {args.model} (batch {args.batch})"):
        model = load_model(args)
    images, labels = _eval_data(args, model)
    with con.step(f"compiling for {args.target}"):
        compiled = build(model, target=args.target)
    with con.step(f"evaluating {len(images)} samples"):
        ref_name, reference = reference_outputs(model, images)
        report = evaluate(compiled, images, labels=labels, reference=reference,
                          weight_bytes=folded_weight_bytes(model), latency_repeat=args.repeat)
    report.pop("logits")
    report.update(model=model.name, target=args.target, reference=ref_name)
    for entry, name in zip(report.get("outputs", []), model.outputs, strict=False):
        entry["name"] = name
    rows = [[k, v] for k, v in report.items() if not isinstance(v, dict)]
    if "latency" in report:
        rows.append([f"latency median ms (batch {args.batch})", report["latency"]["median_ms"]])
    con.table(f"evaluation of {model.name}", ["metric", "value"], rows)
    return report


def cmd_bench(args: argparse.Namespace, con: Console) -> dict[str, Any]:
    from tvm_compress.backend.build import build
    from tvm_compress.runtime.bench import benchmark
    from tvm_compress.runtime.remote import bench_command, parse_remote

    remote = parse_remote(args.rpc, args.tracker, args.key)
    if remote is not None:  # TVM on the device only: ORT / PyTorch do not run there
        return bench_command(args, con, remote)
    with con.step(f"importing {args.model}"):
        model = load_model(args)
    with con.step(f"compiling for {args.target}"):
        compiled = build(model, target=args.target)
    # kernels first: ONNX Runtime's and PyTorch's thread pools keep spinning after their runs
    report = kernel_report(args, con, compiled, profile=True)
    with con.step(f"benchmarking TVM ({args.target}), ONNX Runtime, PyTorch"):
        result = benchmark(model, target=args.target, repeat=args.repeat, compiled=compiled)
    _print_bench(con, result)
    result.update(report)
    return result








def _write_plan(out: Path, config: Any, method: str, args: argparse.Namespace,
                metrics: dict[str, Any]) -> Path:
    from tvm_compress.plan import CompressionPlan, Provenance

    keep = {k: v for k, v in metrics.items() if k in ("weight_bytes", "fp32_weight_bytes",
                                                      "evaluation", "fp32_layers")}
    plan = CompressionPlan(quant=config, provenance=Provenance(
        method, model=args.model, base=tuple(getattr(args, "base_plan", None) or ()),
        metrics=keep))
    return plan.save(out / "plan.json")


def cmd_quantize(args: argparse.Namespace, con: Console) -> dict[str, Any]:
    from tvm_compress.backend.build import build
    from tvm_compress.backend.targets import resolve_target
    from tvm_compress.frontend.inputs import num_samples, take
    from tvm_compress.quant.config import at_target_bits
    from tvm_compress.quant.quantize import quantize
    from tvm_compress.runtime.evaluation import evaluate, task_data

    auto_bits = auto_weight_bits(args)  # None unless --wbits auto
    config = quant_config(args, weight_bits=auto_bits)
    with con.step(f"importing {args.model}"):
        model = load_model(args)
    if auto_bits == 7:  # the layers whose kernel gains nothing from 7 bits keep 8 (or fp32)
        config = at_target_bits(config, resolve_target(args.target), model.layers,
                                mod=model.mod)
    if args.calib == "auto":
        if model.task is None:
            raise UserError(f"{args.model} has no built-in calibration data; pass --calib "
                            "FILE.npz (one array per input name, or 'images') or --calib "
                            "distilled")
        calib, _ = task_data(model.task, "calib")
    elif args.calib == "distilled":  # ZeroQ: data-free, from the model's BatchNorm statistics
        from tvm_compress.tuning.zeroq.distill import distill

        calib = distill(model, batch=config.calib_samples, progress=not args.json).images
    else:
        calib, _ = npz_samples(args.calib, "calibration", model)
    holdout = None
    if args.val:
        images, labels = npz_samples(args.val, "validation", model)
    elif model.task is not None:
        images, labels = task_data(model.task, "test")
    elif args.calib != "distilled":  # images without labels: hold some out of the calibration
        calib, images, holdout = split_holdout(calib, config.calib_samples)
        labels = None
    else:
        raise UserError(f"{args.model} has no built-in evaluation data; pass --val FILE.npz")
    if args.limit:
        images, labels = take(images, 0, args.limit), None if labels is None else \
            labels[: args.limit]
    with con.step(f"compiling fp32 for {args.target}"):
        fp32 = build(model, target=args.target)
    with con.step(f"evaluating fp32 on {num_samples(images)} samples"):
        ref = evaluate(fp32, images, labels=labels, latency_repeat=args.repeat)

    def attempt(cfg: Any) -> tuple[Any, Any, dict[str, Any]]:
        with con.step(f"quantizing ({cfg.short()})"):
            q = quantize(model, cfg, calib, progress=not args.json)
        with con.step(f"compiling int8 for {args.target}"):
            lib = build(q.model, target=args.target)
        with con.step(f"evaluating int8 on {num_samples(images)} samples"):
            rep = evaluate(lib, images, labels=labels, reference=ref["logits"],
                           latency_repeat=args.repeat)
        return q, lib, rep

    qmodel, int8, got = attempt(config)
    choice = None
    if auto_bits == 7:  # AVX2 without VNNI: 7 bits unless they cost accuracy
        choice = {"auto": True, "tried": {7: _accuracy_key(got)}}
        if not _seven_bits_keep_accuracy(ref, got):
            con.err.print("[yellow]note:[/yellow] 7-bit weights lost accuracy; trying 8 bits")
            config8 = quant_config(args, weight_bits=8)
            q8, lib8, got8 = attempt(config8)
            choice["tried"][8] = _accuracy_key(got8)
            if _metric(got8)[1] > _metric(got)[1] + _BITS_TOLERANCE:
                qmodel, int8, got, config = q8, lib8, got8, config8
        choice["chosen"] = config.weight.bits
        choice["eight_bit_layers"] = sorted(n for n, o in config.overrides if o.weight_bits == 8)
        depthwise = {layer.name for layer in model.layers if layer.kind == "depthwise"}
        choice["float_depthwise_layers"] = sorted(n for n, o in config.overrides
                                                  if o.fp32 and n in depthwise)
    result = {"model": model.name, "config": config.to_dict(), "fp32_layers": qmodel.fp32_layers,
              "fp32": {k: v for k, v in ref.items() if k != "logits"},
              "quantized": {k: v for k, v in got.items() if k != "logits"},
              "weight_bytes": {"fp32": qmodel.fp32_weight_bytes, "quantized": qmodel.weight_bytes}}
    if choice:
        result["weight_bits_choice"] = choice
    if holdout:
        result["evaluation"] = holdout
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config.to_json())
        _write_plan(out, config, "quantize", args, result)
        int8.export(out / "model.so")
        result["output"] = str(out)
    _print_quant(con, result)
    return result


# --wbits auto on AVX2 without VNNI: the 7-bit build stays when its labelled accuracy is within
# this of fp32's (or, without labels, its top-1 agreement with fp32 is at least 1 - this); else
# the 8-bit build is made too and wins when it is more accurate by more than this.
_BITS_TOLERANCE = 0.01


def _metric(report: dict[str, Any]) -> tuple[str, float]:
    """The accuracy measure the bits are judged by: labelled accuracy, else agreement."""
    key = "accuracy" if "accuracy" in report else "agreement"
    return key, float(report[key])


def _accuracy_key(report: dict[str, Any]) -> dict[str, float]:
    key, value = _metric(report)
    return {key: value, "sqnr_db": float(report["sqnr_db"])}


def _seven_bits_keep_accuracy(ref: dict[str, Any], got: dict[str, Any]) -> bool:
    if "accuracy" in got:
        return got["accuracy"] >= ref["accuracy"] - _BITS_TOLERANCE
    return got["agreement"] >= 1.0 - _BITS_TOLERANCE


def _print_quant(con: Console, r: dict[str, Any]) -> None:
    rows = []
    for key, label in (("accuracy", "accuracy"), ("agreement", "top-1 agreement with fp32"),
                       ("sqnr_db", "SQNR dB vs fp32")):
        rows.append([label, r["fp32"].get(key, 1.0 if key == "agreement" else "-"),
                     r["quantized"].get(key, "-")])
    rows.append(["weight bytes", r["weight_bytes"]["fp32"], r["weight_bytes"]["quantized"]])
    if "latency" in r["quantized"]:
        rows.append(["latency ms", r["fp32"]["latency"]["median_ms"],
                     r["quantized"]["latency"]["median_ms"]])
    con.table(f"{r['model']}: fp32 vs quantized", ["metric", "fp32", "quantized"], rows)
    if "evaluation" in r:
        con.err.print(f"[yellow]note:[/yellow] {r['evaluation']}")
    if r["fp32_layers"]:
        con.err.print(f"[yellow]kept in fp32:[/yellow] {', '.join(r['fp32_layers'])}")
    choice = r.get("weight_bits_choice")
    if choice:
        tried = ", ".join(f"{bits} bits: {', '.join(f'{k} {v:.3g}' for k, v in m.items())}"
                          for bits, m in choice["tried"].items())
        kept = choice.get("eight_bit_layers", [])
        extra = (f", {len(kept)} depthwise layer(s) at 8 (as fast, more accurate)"
                 if choice["chosen"] == 7 and kept else "")
        floats = choice.get("float_depthwise_layers", [])
        if choice["chosen"] == 7 and floats:
            extra += (f", {len(floats)} depthwise layer(s) fp32 (they feed a float activation; "
                      "faster than int8 without VNNI)")
        con.err.print(f"weight bits: {choice['chosen']}{extra} (--wbits auto on a target with "
                      f"AVX2 and no VNNI; {tried})")


def cmd_demo(args: argparse.Namespace, con: Console) -> dict[str, Any]:
    from tvm_compress.cli.demo import run_demo

    return run_demo(con, model_ref=args.model, repeat=args.repeat)


# ------------------------------------------------------------------------------------- parser






# Commands that live in their own module ``tvm_compress.cli.<name>``: each module defines ``HELP``
# (one line), ``add_arguments(parser)`` and ``run(args, con) -> dict`` and keeps heavy imports
# inside ``run`` so that ``--help`` stays fast. Add a command by adding its name here.
PLUGIN_COMMANDS: tuple[str, ...] = ("ajpq", "quantune", "precrop", "tune", "zeroq", "train",
                                     "compress")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvm-compress", description="Compress CNNs inside Apache TVM and measure them.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable[..., dict[str, Any]], str]] = {
        "inspect": (cmd_inspect, "show the LayerTable (layers, MACs, params) of a model"),
        "compile": (cmd_compile, "compile a model for a target and write the library"),
        "eval": (cmd_eval, "accuracy / fidelity / size / latency of the compiled model"),
        "bench": (cmd_bench, "latency of TVM vs ONNX Runtime vs PyTorch in one run"),
        "quantize": (cmd_quantize, "post-training quantization to integer kernels, measured"),
        "demo": (cmd_demo, "the showcase: a zoo model end to end, no arguments needed"),
    }
    for name, (func, text) in commands.items():
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        if name == "inspect":
            p.add_argument("model", nargs="?", help=MODEL_HELP)
            p.add_argument("--list", action="store_true", help="list the zoo models")
            add_common(p, model=False)
        elif name == "demo":
            p.add_argument("--model", default="zoo:mobilenet_v2", help=MODEL_HELP)
            p.add_argument("--repeat", type=int, default=20, help="timed runs per runtime")
            p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        else:
            add_common(p, target=True)
        if name == "compile":
            p.add_argument("-o", "--output", required=True,
                           help="FILE.so: the library alone; DIR: a deployment bundle (library, "
                                "C++ runner, TVM runtime, README; CUDA: library, source, PTX)")
            p.add_argument("--int8", action="store_true",
                           help="quantize to int8 first (default config, calibrated on the zoo "
                                "model's calibration split)")
            add_report_args(p)
        if name == "eval":
            p.add_argument("--data", help=".npz with 'images' (and 'labels'); default: the zoo "
                                          "model's own test data")
            p.add_argument("--split", default="test", help="zoo data split (default test)")
            p.add_argument("--limit", type=int, default=0, help="evaluate only the first N")
            p.add_argument("--repeat", type=int, default=20, help="timed runs (0: no latency)")
        if name == "quantize":
            add_quantize_args(p)
        if name == "bench":
            p.add_argument("--repeat", type=int, default=50, help="timed runs per runtime")
            add_report_args(p, profile_default=True)
            from tvm_compress.runtime.remote import add_remote_args

            add_remote_args(p)
    for name in PLUGIN_COMMANDS:
        module = importlib.import_module(f"tvm_compress.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.set_defaults(func=module.run)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    con = Console(getattr(args, "json", False))
    try:
        result = args.func(args, con)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug on our side or TVM's: log it, one line here
        print(report_internal_failure(args, con, exc, argv), file=sys.stderr)
        return 1
    if args.json:
        _emit_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
