"""``tvm-compress zeroq``: data-free quantization (ZeroQ), optionally mixed precision for a budget.

Distills calibration inputs from the model's BatchNorm statistics, quantizes W8A8 on them, or -
with ``--size-budget`` / ``--avg-bits`` - picks per-layer weight bits on the sensitivity Pareto
frontier and realizes that mixed-precision model with integer kernels. Reports accuracy /
agreement on the zoo model's own data when it has some (evaluation only: nothing is calibrated on
it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HELP = "data-free quantization (ZeroQ): distilled calibration, Pareto mixed precision"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tvm_compress.cli.common import add_base_plan, add_common
    from tvm_compress.quant.config import CALIBRATIONS

    add_common(p, target=True)
    add_base_plan(p)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--size-budget", help="mixed precision: weight+bias bytes, e.g. 2.5MB")
    budget.add_argument("--avg-bits", type=float, help="mixed precision: average weight bits")
    p.add_argument("--abits", type=int, default=8, help="activation bits (default 8)")
    p.add_argument("--calibration", default="percentile", choices=CALIBRATIONS,
                   help="activation ranges from the distilled inputs (default percentile: on "
                        "MobileNetV2 it agrees better with fp32 than min/max, see "
                        "benchmarks/results/zeroq.md)")
    p.add_argument("--samples", type=int, default=32, help="distilled inputs (default 32)")
    p.add_argument("--iterations", type=int, default=500, help="distillation steps (default 500)")
    p.add_argument("--lr", type=float, default=0.5, help="distillation Adam lr (default 0.5)")
    p.add_argument("--label-weight", type=float, default=1.0,
                   help="cross-entropy to random classes in the distillation loss (0: the paper's "
                        "BN-only loss; default 1, see tvm_compress.tuning.zeroq.distill.distill)")
    p.add_argument("--input-range", default="auto",
                   help="keep distilled inputs within LOW,HIGH (model input units), 'auto' (the "
                        "normalized pixel range of zoo models, none otherwise) or 'none' (the "
                        "paper); default auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for distillation and sensitivity (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sens-samples", type=int, default=8,
                   help="distilled inputs used for the sensitivity KL (default 8)")
    p.add_argument("--limit", type=int, default=1000,
                   help="evaluate on the first N samples of the zoo test data (0: no evaluation)")
    p.add_argument("-o", "--output", help="directory for config.json, plan.json, frontier.png, "
                                          "model.so")


def run(args: argparse.Namespace, con: Any) -> dict[str, Any]:
    from tvm_compress.backend.build import build
    from tvm_compress.backend.targets import resolve_target
    from tvm_compress.cli.common import load_model
    from tvm_compress.errors import UserError
    from tvm_compress.plan import CompressionPlan, Provenance
    from tvm_compress.quant.config import QuantConfig, QuantSpec
    from tvm_compress.quant.quantize import quantize
    from tvm_compress.tuning.zeroq.distill import distill, torch_module_of
    from tvm_compress.tuning.zeroq.mixed import parse_size, plan_mixed, plot_frontier, sensitivity

    size_budget = parse_size(args.size_budget) if args.size_budget else None
    if args.avg_bits is not None and not 2 <= args.avg_bits <= 8:
        raise UserError(f"--avg-bits must be between 2 and 8, got {args.avg_bits}")
    if args.samples < 1 or args.sens_samples < 1:
        raise UserError("--samples and --sens-samples must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    input_range = parse_input_range(args.input_range)
    target = resolve_target(args.target)
    base = QuantConfig(activation=QuantSpec(args.abits, "asymmetric"),
                       calibration=args.calibration, calib_samples=args.samples)
    times: dict[str, float] = {}
    start = time.perf_counter()
    with con.step(f"importing {args.model}"):
        model = load_model(args)
    module = torch_module_of(model)
    t = time.perf_counter()
    distilled = distill(model, batch=args.samples, iterations=args.iterations, lr=args.lr,
                        seed=args.seed, label_weight=args.label_weight, input_range=input_range,
                        threads=args.threads, progress=not args.json)
    times["distill_s"] = time.perf_counter() - t
    result: dict[str, Any] = {"model": model.name, "target": args.target,
                              "distillation": {**distilled.settings,
                                               "initial_loss": distilled.initial_loss,
                                               "final_loss": distilled.final_loss}}
    config, plan = base, None
    if size_budget is not None or args.avg_bits is not None:
        t = time.perf_counter()
        sens = sensitivity(model, module, distilled.images[: args.sens_samples],
                           threads=args.threads, progress=not args.json)
        times["sensitivity_s"] = time.perf_counter() - t
        t = time.perf_counter()
        plan = plan_mixed(model, module, sens, size_budget=size_budget, avg_bits=args.avg_bits)
        config = plan.config(base)
        times["frontier_s"] = time.perf_counter() - t
        result["mixed"] = {k: v for k, v in plan.to_dict().items() if k != "sensitivities"}
    t = time.perf_counter()
    with con.step(f"quantizing on distilled data ({config.short()})"):
        qmodel = quantize(model, config, distilled.images.astype(model.input_dtype),
                          progress=not args.json)
    with con.step(f"compiling for {args.target}"):
        compiled = build(qmodel.model, target=target)
    times["quantize_build_s"] = time.perf_counter() - t
    times["pipeline_s"] = time.perf_counter() - start
    result.update(config=config.to_dict(), fp32_layers=qmodel.fp32_layers,
                  weight_bytes={"fp32": qmodel.fp32_weight_bytes, "quantized": qmodel.weight_bytes},
                  seconds=times)
    if args.limit and model.task:
        result["evaluation"] = _evaluate(model, compiled, args, con)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config.to_json())
        compiled.export(out / "model.so")
        CompressionPlan(quant=config, provenance=Provenance(
            "zeroq", model=args.model, budget=getattr(args, "size_budget", None),
            seed=getattr(args, "seed", None), base=tuple(args.base_plan or ()),
            metrics={k: result.get(k) for k in ("weight_bytes", "evaluation")}
        )).save(out / "plan.json")
        if plan is not None:
            (out / "mixed.json").write_text(json.dumps(plan.to_dict(), indent=1, default=str))
            result["frontier_png"] = str(plot_frontier(plan, out / "frontier.png",
                                                            title=f"ZeroQ {model.name}"))
        result["output"] = str(out)
    _print(con, result)
    return result


def parse_input_range(text: str) -> str | tuple[float, float] | None:
    """``--input-range``: "auto", "none", or "LOW,HIGH" (a UserError names the fix)."""
    from tvm_compress.errors import UserError

    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--input-range {text!r}: give LOW,HIGH (e.g. -1,1), auto or "
                        "none") from None
    return low, high  # distill() rejects LOW >= HIGH


def _evaluate(model: Any, compiled: Any, args: argparse.Namespace, con: Any) -> dict[str, Any]:
    from tvm_compress.backend.build import build
    from tvm_compress.runtime.evaluation import task_data
    from tvm_compress.runtime.metrics import accuracy, top1_agreement

    images, labels = task_data(model.task, "test")
    images = images[: args.limit]
    labels = None if labels is None else labels[: args.limit]
    with con.step(f"evaluating fp32 and quantized on {len(images)} test samples"):
        ref = build(model, target=args.target).predict(images)
        got = compiled.predict(images)
    out: dict[str, Any] = {"samples": len(images), "agreement": top1_agreement(got, ref)}
    if labels is not None:
        out.update(fp32_accuracy=accuracy(ref, labels), accuracy=accuracy(got, labels))
    return out


def _print(con: Any, r: dict[str, Any]) -> None:
    rows = [["distillation loss", f"{r['distillation']['initial_loss']:.4g} -> "
                                  f"{r['distillation']['final_loss']:.4g}"],
            ["weight bytes", f"{r['weight_bytes']['fp32']:,} -> "
                             f"{r['weight_bytes']['quantized']:,}"]]
    if "mixed" in r:
        rows.append(["average weight bits", f"{r['mixed']['average_weight_bits']:.2f}"])
    for key, value in r.get("evaluation", {}).items():
        rows.append([key, value])
    rows += [[k, f"{v:.1f}"] for k, v in r["seconds"].items()]
    con.table(f"ZeroQ {r['model']}", ["metric", "value"], rows)
