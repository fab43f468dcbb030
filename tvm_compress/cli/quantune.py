"""`tvm-compress quantune MODEL`: search post-training quantization configurations (Quantune).

Measures configurations of the paper's 96-point space (or the extended one) on the real integer
build, guided by an XGBoost model trained on the shipped records of the zoo sweep (the prior),
and writes into ``-o DIR``: ``records.jsonl`` (every trial, appended as it finishes),
``search.json`` (the search), ``best_config.json`` (the best QuantConfig), ``model.so`` (the best
configuration compiled for the target) and ``best_vs_trials.png``. Rerunning the same command
resumes: recorded trials are replayed, not measured again.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tvm_compress.errors import UserError

HELP = "search PTQ configurations with Quantune (XGBoost) or a baseline tuner; resumable"

OBJECTIVES = ("accuracy", "latency", "size")
TUNERS = ("quantune", "random", "grid", "genetic")
ZOO_VAL_DEFAULT = 500   # validation images per trial on zoo data (--limit 0: all)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tvm_compress.cli.common import add_base_plan, add_common

    add_common(p, target=True)
    add_base_plan(p)
    p.set_defaults(batch=0)
    p.add_argument("--calib", default="auto", help="calibration .npz ('images'); default: the zoo "
                                                   "model's calibration split")
    p.add_argument("--val", default="auto",
                   help="validation .npz ('images', 'labels'); default: the zoo model's "
                        "validation split (Fashion-MNIST) or real-photo crops (ImageNet)")
    p.add_argument("--limit", type=int, default=ZOO_VAL_DEFAULT,
                   help=f"validate on the first N images (default {ZOO_VAL_DEFAULT}; 0: all)")
    p.add_argument("--agreement", action="store_true",
                   help="score top-1 agreement with the fp32 model instead of accuracy "
                        "(for validation data without labels)")
    p.add_argument("--trials", type=int, default=20, help="trial budget (default 20)")
    p.add_argument("--max-drop", type=float, default=None,
                   help="tolerated accuracy drop vs fp32 in points: 'accuracy' stops at the first "
                        "config within it; required by 'latency' and 'size'")
    p.add_argument("--objective", default="accuracy",
                   help="accuracy (default), latency or size (fastest / smallest within "
                        "--max-drop)")
    p.add_argument("--tuner", default="quantune", help="quantune (default), random, grid, genetic")
    p.add_argument("--prior", default="shipped",
                   help="Quantune prior records: 'shipped' (the zoo sweep, default), 'none', or a "
                        "records .jsonl")
    p.add_argument("--space", default="paper", help="paper (96 configs, default) or extended")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop proposing after this much measuring time")
    p.add_argument("--records", default=None, help="records file (default DIR/records.jsonl)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs per trial for 'latency'")
    p.add_argument("-o", "--output", required=True, help="output directory")


def _check_args(args: argparse.Namespace) -> Path | None:
    """Cheap checks before anything is loaded; returns the prior path (None: no prior)."""
    from tvm_compress.tuning.quantune.space import SPACES
    from tvm_compress.tuning.quantune.tuner import SHIPPED_PRIOR
    from tvm_compress.tuning.tuner import Objective

    if args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    Objective(args.objective, args.max_drop)  # validates the objective and the drop
    if args.tuner not in TUNERS:
        raise UserError(f"unknown --tuner {args.tuner!r}; choose one of {', '.join(TUNERS)}")
    if args.space not in SPACES:
        raise UserError(f"unknown --space {args.space!r}; choose one of {', '.join(SPACES)}")
    if args.limit < 0 or args.batch < 0:
        raise UserError("--limit and --batch must be >= 0")
    if args.time_budget is not None and not args.time_budget > 0:
        raise UserError(f"--time-budget must be positive seconds, got {args.time_budget}")
    if args.tuner != "quantune" or args.prior == "none":
        return None
    prior = SHIPPED_PRIOR if args.prior == "shipped" else Path(args.prior)
    if not prior.is_file():
        raise UserError(f"prior records file {prior} does not exist; give a records .jsonl "
                        "written by a search, 'shipped' or 'none'")
    return prior


def _data(args: argparse.Namespace, model: Any) -> tuple[Any, Any, Any, str]:
    """Calibration images, validation images and labels, and a description of the data."""
    from tvm_compress.cli.common import npz_images
    from tvm_compress.data import fashion_mnist, real_photos

    task = model.task
    if args.calib == "auto":
        if task == "fashion_mnist":
            calib, _ = fashion_mnist("calib")
        elif task == "imagenet":
            calib = real_photos("calib", n=32)
        else:
            raise UserError(f"{args.model} is not a zoo model: pass --calib FILE.npz")
    else:
        calib, _ = npz_images(args.calib, "calibration", model.input_dtype)
    if args.val == "auto":
        if task == "fashion_mnist":
            images, labels = fashion_mnist("val")
            what = "Fashion-MNIST validation split"
        elif task == "imagenet":
            images, labels = real_photos("eval", n=args.limit or 64), None
            what = "real-photo crops (top-1 agreement with fp32)"
        else:
            raise UserError(f"{args.model} is not a zoo model: pass --val FILE.npz")
    else:
        images, labels = npz_images(args.val, "validation", model.input_dtype)
        what = args.val
    if labels is None and not (args.val == "auto" or args.agreement):
        raise UserError(f"validation data {args.val} has no 'labels' but the search scores "
                        "accuracy: add labels to the .npz, or pass --agreement to score agreement "
                        "with the fp32 model")
    if args.agreement:
        labels = None
    if args.limit:
        images = images[: args.limit]
        labels = None if labels is None else labels[: args.limit]
    for arr, name in ((calib, "calibration"), (images, "validation")):
        if tuple(arr.shape[1:]) != tuple(model.input_shape[1:]):
            raise UserError(f"{name} samples have shape {tuple(arr.shape[1:])} but the model "
                            f"expects {tuple(model.input_shape[1:])}; resize or preprocess them")
    return calib, images, labels, what


def run(args: argparse.Namespace, con: Any) -> dict[str, Any]:
    import json
    import warnings

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tvm_compress import load
    from tvm_compress.backend.build import build
    from tvm_compress.frontend.loader import apply_base_plans, parse_input_shapes
    from tvm_compress.plan import CompressionPlan, Provenance
    from tvm_compress.quant.quantize import quantize
    from tvm_compress.tuning.evaluator import QuantEvaluator
    from tvm_compress.tuning.quantune.space import make_space
    from tvm_compress.tuning.records import RecordsFile
    from tvm_compress.tuning.search import search

    prior = _check_args(args)
    out = Path(args.output)
    records_path = Path(args.records) if args.records else out / "records.jsonl"
    records = RecordsFile(records_path)  # a corrupt file fails here, naming the line
    batch = args.batch or (50 if args.model.startswith("zoo:fmnist") else 1)
    with con.step(f"importing {args.model}"):
        shapes = parse_input_shapes(args.input_shape or [])
        model = apply_base_plans(load(args.model, batch=batch, input_shapes=shapes),
                                 args.base_plan or [])
    calib, images, labels, what = _data(args, model)
    evaluator = QuantEvaluator(model, calib=calib, images=images, labels=labels,
                               target=args.target, records=records,
                               measure_latency=args.objective == "latency",
                               latency_repeat=args.repeat)
    space = make_space(args.space, calib_available=len(calib))
    with con.step(f"measuring the fp32 model on {len(images)} images ({what})"):
        baseline = evaluator.baseline()
    metric = "accuracy" if labels is not None else "agreement"
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), console=con.err, transient=False)
    best = {"acc": None}
    bar = progress.add_task(f"{args.tuner} search", total=args.trials,
                            info=f"fp32 {metric} {baseline.accuracy:.4f}")

    def on_trial(trial: Any) -> None:
        if trial.result.error is None and (best["acc"] is None
                                           or trial.result.accuracy > best["acc"]):
            best["acc"] = trial.result.accuracy
        shown = "-" if best["acc"] is None else f"{best['acc']:.4f}"
        progress.update(bar, advance=1, info=f"best {metric} {shown} (fp32 "
                        f"{baseline.accuracy:.4f}) last {trial.knobs.key}"
                        + (" (replayed)" if trial.replayed else ""))

    with warnings.catch_warnings(record=True) as caught, progress:
        warnings.simplefilter("always")
        result = search(evaluator, space, tuner=args.tuner, seed=args.seed, trials=args.trials,
                        objective=args.objective, max_drop=args.max_drop,
                        time_budget_s=args.time_budget, prior=prior, on_trial=on_trial)
    notes = [str(w.message) for w in caught if "Quantune" in str(w.message)]
    for note in notes:
        con.err.print(f"[yellow]warning[/yellow] {note}")
    payload = result.to_dict()
    payload.update({"model": model.name, "metric": metric, "data": what,
                    "validation_images": len(images), "calibration_images": len(calib),
                    "records": str(records_path), "prior": str(prior) if prior else None,
                    "warnings": notes, "output": str(out)})
    out.mkdir(parents=True, exist_ok=True)
    if result.best is not None:
        config = result.best.knobs.config(evaluator.mixed_layers)
        config_file, library = out / "best_config.json", out / "model.so"
        stamp = out / ".model.so.key"  # which config, model, data and target model.so is
        key = f"{evaluator.model_id}/{evaluator.context}/{args.target}/{config.to_json()}"
        if not (library.is_file() and stamp.is_file() and stamp.read_text() == key):
            with con.step(f"compiling the best configuration ({result.best.knobs.key})"):
                qmodel = quantize(evaluator.folded_model(), config, calib, progress=False)
                build(qmodel.model, target=args.target).export(library)
            stamp.write_text(key)
        config_file.write_text(config.to_json())
        plan = CompressionPlan(quant=config, provenance=Provenance(
            "quantune", model=args.model, seed=getattr(args, "seed", None),
            base=tuple(args.base_plan or ()),
            metrics={"best": payload.get("best"), "trials": len(payload.get("trials") or [])}))
        payload["files"] = {"config": str(out / "best_config.json"),
                            "model": str(out / "model.so"),
                            "plan": str(plan.save(out / "plan.json"))}
    (out / "search.json").write_text(json.dumps(payload, indent=1))
    payload["plot"] = _plot(result, out / "best_vs_trials.png", metric)
    _print(con, payload, result)
    return payload


def _plot(result: Any, path: Path, metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best, curve = None, []
    for t in result.trials:
        if t.result.error is None:
            best = t.result.accuracy if best is None else max(best, t.result.accuracy)
        curve.append(float("nan") if best is None else 100 * best)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(curve) + 1), curve, marker="o", label=f"{result.tuner} (best so far)")
    ax.axhline(100 * result.baseline.accuracy, color="k", ls="--", lw=1, label="fp32")
    ax.set_xlabel("trials")
    ax.set_ylabel(f"best {metric} (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _print(con: Any, payload: dict[str, Any], result: Any) -> None:
    best = payload["best"]
    rows = [["tuner", f"{payload['tuner']} (seed {payload['seed']})"],
            ["trials", f"{payload['trials_total']} ({payload['trials_measured']} measured, "
                       f"the rest replayed from {payload['records']})"],
            ["stopped by", payload["stopped"]],
            [f"fp32 {payload['metric']}", f"{result.baseline.accuracy:.4f}"]]
    if best is not None:
        rows += [["best configuration", best["label"]],
                 [f"best {payload['metric']}", f"{best['result']['accuracy']:.4f} "
                                               f"(drop {best['drop_pct']:+.2f} points)"],
                 ["found at trial", best["index"] + 1],
                 ["weight bytes", best["result"].get("weight_bytes", "-")],
                 ["written", f"{payload['output']}/best_config.json, model.so"]]
    con.table(f"Quantune search: {payload['model']}", ["what", "result"], rows)
