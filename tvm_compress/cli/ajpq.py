"""``tvm-compress ajpq``: joint pruning + mixed-precision quantization by hierarchical RL."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "AJPQ: joint channel pruning + per-channel bit-widths by hierarchical DDPG, realized in TVM"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tvm_compress.cli.common import MODEL_HELP

    p.add_argument("model", help=MODEL_HELP + " (Fashion-MNIST models with torch weights)")
    p.add_argument("--budget", default="size=0.2",
                   help="size=F[,macs=F]: weight bytes (and MACs) as fractions of fp32")
    p.add_argument("--episodes", type=int, default=60, help="search episodes (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-samples", type=int, default=500, help="proxy reward images (val)")
    p.add_argument("--finetune-samples", type=int, default=10000,
                   help="train images for the short fine-tune (0: no fine-tune)")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--test-samples", type=int, default=2000, help="test images for accuracy")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip L1 prune-then-quantize and random search")
    p.add_argument("--repeat", type=int, default=30, help="timed runs (0: no latency)")
    p.add_argument("--target", default="x86", help="target preset (default x86)")
    p.add_argument("-o", "--output", help="directory for plans, episodes.jsonl, report, plot")
    from tvm_compress.cli.common import add_base_plan

    add_base_plan(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args: argparse.Namespace, con: Any) -> dict[str, Any]:
    from tvm_compress.errors import UserError
    from tvm_compress.tuning.ajpq.joint import parse_budget
    from tvm_compress.tuning.ajpq.run import AJPQSettings, run_ajpq

    parse_budget(args.budget)  # fail fast, before the import
    for flag in ("episodes", "val_samples", "test_samples"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    from tvm_compress import load

    with con.step(f"importing {args.model}"):
        model = load(args.model)
    if model.task != "fashion_mnist" or model.torch_module is None:
        raise UserError(f"ajpq needs a Fashion-MNIST model with torch weights (zoo:fmnist_*), "
                        f"got {args.model}: its reward is labelled accuracy and its fine-tune "
                        "needs gradients")
    module = model.torch_module
    if args.base_plan:
        module = _cropped_module(model, args.base_plan)
    settings = AJPQSettings(budget=args.budget, episodes=args.episodes, seed=args.seed,
                            val_samples=args.val_samples,
                            finetune_samples=args.finetune_samples,
                            finetune_epochs=args.finetune_epochs, test_samples=args.test_samples,
                            baselines=not args.no_baselines, latency_repeat=args.repeat,
                            target=args.target)
    name = args.model.removeprefix("zoo:")
    report = run_ajpq(module, settings, name=name,
                      out_dir=Path(args.output) if args.output else None,
                      progress=not args.json, log=lambda text: con.err.print(text)
                      if not args.json else None)
    rows = [["fp32", 1.0, 1.0, report["fp32"]["test_accuracy"], "-",
             (report["fp32"]["latency"] or {}).get("median_ms", "-")]]
    for method, e in report["methods"].items():
        rows.append([method, e["size_fraction"], e["macs_fraction"], e["test_accuracy"],
                     e["test_accuracy_before_finetune"],
                     e.get("latency", {}).get("median_ms", "-")])
    con.table(f"AJPQ {name} ({report['budget']})",
              ["method", "size/fp32", "MACs/fp32", "test acc (TVM)", "acc before FT", "ms"], rows)
    return report


def _cropped_module(model: Any, paths: list[str]) -> Any:
    """The torch module cropped by ``--base-plan`` crops (AJPQ then searches on top of them)."""
    import copy

    from tvm_compress.errors import UserError
    from tvm_compress.graph.torch_crop import crop_torch_module
    from tvm_compress.passes.crop_channels import crop_channels
    from tvm_compress.plan import CompressionPlan

    module, mod = copy.deepcopy(model.torch_module), model.mod
    for path in paths:
        plan = CompressionPlan.load(path)
        if plan.quantizes:
            raise UserError(f"--base-plan {path} quantizes; AJPQ builds on cropping plans only")
        crop = plan.crop_ids(mod)
        if crop:
            module = crop_torch_module(module, crop, mod=mod)
            mod = crop_channels(mod, crop)
    return module
