"""``tvm-compress train zoo:NAME [--plan crop.json] -o DIR``: train a (cropped) zoo architecture.

PreCrop's step after cropping: the architecture is freshly initialized (seeded), cropped by the
plan's channel groups, and trained from scratch on Fashion-MNIST. Writes ``model.onnx`` (the
task recorded in its metadata, so later commands find the evaluation data), ``model.pt``
(state_dict) and ``train.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "train a zoo architecture (optionally cropped by a plan) from scratch, seeded"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo:NAME of a Fashion-MNIST architecture (zoo:fmnist_*)")
    p.add_argument("--plan", help="a cropping plan (precrop -o DIR writes plan.json)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (one-cycle SGD)")
    p.add_argument("--train-samples", type=int, default=0,
                   help="train on the first N training images (0: all 60,000)")
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="directory for model.onnx, model.pt")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args: argparse.Namespace, con: Any) -> dict[str, Any]:
    import torch

    from tvm_compress.data import fashion_mnist
    from tvm_compress.errors import UserError
    from tvm_compress.frontend.importers import export_onnx, from_torch
    from tvm_compress.graph.torch_crop import crop_torch_module
    from tvm_compress.plan import CompressionPlan
    from tvm_compress.tuning.precrop.crop import fresh_model
    from tvm_compress.zoo import FMNIST_ARCHS
    from tvm_compress.zoo.train import train

    name = args.model.removeprefix("zoo:")
    if name.removeprefix("fmnist_") not in FMNIST_ARCHS or not name.startswith("fmnist_"):
        raise UserError(f"train takes a Fashion-MNIST zoo architecture, not {args.model!r}; "
                        f"choose one of {', '.join('zoo:fmnist_' + a for a in FMNIST_ARCHS)}")
    for flag in ("epochs", "test_samples"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    module, example, _task = fresh_model("zoo:" + name, seed=args.seed)
    plan = CompressionPlan.load(args.plan) if args.plan else None
    if plan is not None:
        if plan.quantizes:
            raise UserError(f"{args.plan} quantizes; train takes a cropping plan (precrop / "
                            "ajpq crop) - quantize after training")
        dense = from_torch(module, example, name=name)
        crop = plan.crop_ids(dense.mod)
        module = crop_torch_module(module, crop, mod=dense.mod) if crop else module
    images, labels = fashion_mnist("train")
    if args.train_samples:
        images, labels = images[: args.train_samples], labels[: args.train_samples]
    with con.step(f"training {name} for {args.epochs} epochs on {len(images):,} images"):
        history = train(module, epochs=args.epochs, lr=args.lr, seed=args.seed,
                        progress=False, train_data=(images, labels),
                        eval_samples=args.test_samples)
    acc = history["test_accuracy"]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), out / "model.pt")
    # BatchNorm kept: ZeroQ distills from its statistics; our import folds it anyway
    onnx_path = export_onnx(module, example, out / "model.onnx", keep_batchnorm=True)
    _tag_task(onnx_path, "fashion_mnist", name)
    params = sum(p.numel() for p in module.parameters())
    report = {"model": args.model, "plan": args.plan, "epochs": args.epochs, "seed": args.seed,
              "train_samples": len(images), "test_accuracy": acc, "params": int(params),
              "history": history, "files": {"onnx": str(onnx_path), "state_dict":
                                            str(out / "model.pt")}}
    (out / "train.json").write_text(json.dumps(report, indent=1, default=str))
    con.out.print(f"{name}: test accuracy {acc:.4f} on {args.test_samples} images, "
                  f"{params:,} parameters; wrote {onnx_path}")
    return report


def _tag_task(path: Path, task: str, arch: str) -> None:
    """Record the task in the ONNX metadata (``tvm_compress.task``) for later commands."""
    import onnx

    model = onnx.load(str(path))
    for key, value in (("tvm_compress.task", task), ("tvm_compress.arch", arch)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
