"""``tvm-compress precrop``: crop a freshly initialized zoo architecture to a params / MACs budget.

Writes (with ``-o DIR``) ``plan.json`` (the CompressionPlan: kept channels per group),
``precrop.json`` (details: widths, densities, achieved params / MACs), ``cropped.pt`` (state_dict
of the cropped torch module, to train from
scratch) and ``cropped.onnx``; prints the per-layer channel counts before and after.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tvm_compress.errors import UserError

HELP = "PreCrop: crop a freshly initialized zoo model's channels to a params or MACs budget"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo:NAME architecture to initialize freshly "
                                 "(zoo:fmnist_resnet, zoo:mobilenet_v2, ...)")
    p.add_argument("--budget", required=True,
                   help="fraction of the dense model to keep: params=F or macs=F, F in (0, 1]")
    p.add_argument("--score", default="synflow",
                   help="scorer: synflow (default), snip, grasp, magnitude, random")
    p.add_argument("--allocation", default="score",
                   help="score (scorer densities, default), convex (maximize sum log p under "
                        "the budget) or uniform (one width factor, the baseline)")
    p.add_argument("--multiple", type=int, default=8, help="round channel counts up to a "
                                                           "multiple of this (default 8)")
    p.add_argument("--min-channels", type=int, default=8, help="minimum channels per group")
    p.add_argument("--iterations", type=int, default=20, help="SynFlow rounds (default 20)")
    p.add_argument("--seed", type=int, default=0, help="initialization / random scorer seed")
    p.add_argument("-o", "--output", help="directory for plan.json (the CompressionPlan), "
                                          "precrop.json (details), cropped.pt, cropped.onnx")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args: argparse.Namespace, con: Any) -> dict[str, Any]:
    from tvm_compress.tuning.precrop.crop import ALLOCATIONS, parse_budget
    from tvm_compress.tuning.precrop.scores import DATA_SCORERS, SCORERS

    budget = parse_budget(args.budget)
    if args.score not in SCORERS:
        raise UserError(f"unknown scorer --score {args.score!r}: use one of {', '.join(SCORERS)}")
    if args.allocation not in ALLOCATIONS:
        raise UserError(f"unknown --allocation {args.allocation!r}: use one of "
                        f"{', '.join(ALLOCATIONS)}")
    if args.multiple < 1 or args.min_channels < 1 or args.iterations < 1:
        raise UserError("--multiple, --min-channels and --iterations must be >= 1")

    import torch

    from tvm_compress.tuning.precrop.crop import fresh_model, precrop, scoring_data

    module, example, task = fresh_model(args.model, seed=args.seed)
    data = scoring_data(task, seed=args.seed) if args.score in DATA_SCORERS and \
        args.allocation == "score" else None
    what = args.score if args.allocation == "score" else f"{args.allocation} allocation"
    with con.step(f"PreCrop {args.model} to {budget} ({what})"):
        result = precrop(module, example, budget, scorer=args.score, allocation=args.allocation,
                         data=data, multiple=args.multiple, min_channels=args.min_channels,
                         seed=args.seed, iterations=args.iterations, name=args.model)
    plan = result.plan
    con.table(f"{args.model}: channels before -> after", ["layer", "kind", "in", "out",
                                                           "params", "density"],
              [[r["layer"], r["kind"], _arrow(r["in"], r["in_after"]),
                _arrow(r["out"], r["out_after"]), _arrow(r["params"], r["params_after"]),
                "-" if r["density"] is None else f"{r['density']:.3f}"] for r in plan.layers])
    frac = plan.achieved_fraction
    con.out.print(f"budget {budget}: params {plan.achieved['params']:,} / {plan.dense['params']:,}"
                  f" = {frac['params']:.3f}, MACs {plan.achieved['macs']:,} / "
                  f"{plan.dense['macs']:,} = {frac['macs']:.3f} (width scale {plan.alpha:.3f})")
    if plan.unplaced:
        con.err.print(f"[yellow]left unpruned (no channel group):[/yellow] "
                      f"{', '.join(plan.unplaced)}")
    files: dict[str, str] = {}
    if args.output:
        from tvm_compress.frontend.importers import export_onnx

        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        files["plan"] = str(plan.to_compression_plan(seed=args.seed).save(out / "plan.json"))
        files["precrop"] = str(out / "precrop.json")
        (out / "precrop.json").write_text(plan.to_json())
        files["state_dict"] = str(out / "cropped.pt")
        torch.save(result.module.state_dict(), out / "cropped.pt")
        with con.step(f"exporting {out / 'cropped.onnx'}"):
            files["onnx"] = str(export_onnx(result.module, example, out / "cropped.onnx"))
        con.out.print(f"wrote {', '.join(files.values())}")
    return {"model": args.model, "budget": str(budget), "scorer": plan.scorer,
            "allocation": plan.allocation, "alpha": plan.alpha, "dense": plan.dense,
            "achieved": plan.achieved, "achieved_fraction": frac, "crop": plan.crop,
            "layers": plan.layers, "unplaced": plan.unplaced, "files": files}


def _arrow(before: int, after: int) -> str:
    return f"{before:,}" if before == after else f"{before:,} -> {after:,}"
