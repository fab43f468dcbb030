"""Train the six Fashion-MNIST zoo models and ship their checkpoints.

    python benchmarks/train_zoo.py [--arch NAME ...] [--epochs N] [--threads 1]

Writes tvm_compress/zoo/checkpoints/fmnist_<arch>.pt (float32 state_dict),
tvm_compress/zoo/checkpoints/accuracy.json (merged: archs not trained this run keep their entry)
and benchmarks/results/zoo_training.md / .json (table of the current accuracy.json).

The CPU is shared with other jobs. Under oversubscription OpenMP threads that spin at barriers
made a 2-thread training step 4x slower than a 1-thread one here, so the default is one thread
with passive waiting; two archs lists can then train in two processes side by side.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the OpenMP runtime's start

import argparse
import json
import sys
from pathlib import Path

import torch

from tvm_compress.backend.schedules.hardware import cpu_name
from tvm_compress.zoo.fmnist import ARCHITECTURES, CHECKPOINT_DIR, checkpoint_path
from tvm_compress.zoo.train import train

RESULTS = Path(__file__).resolve().parent / "results"
ACCURACY_FILE = CHECKPOINT_DIR / "accuracy.json"
SEED = 0
# Per-architecture recipe. Depthwise-heavy nets get less weight decay (their few weights per
# channel are easily over-regularized); ResNet trains longer for its 92% goal.
RECIPES: dict[str, dict[str, float]] = {
    "resnet": {"epochs": 15, "lr": 0.1, "weight_decay": 5e-4},
    "mobilenet_v2": {"epochs": 12, "lr": 0.1, "weight_decay": 1e-4},
    "shufflenet_v2": {"epochs": 12, "lr": 0.1, "weight_decay": 1e-4},
    "squeezenet": {"epochs": 12, "lr": 0.1, "weight_decay": 5e-4},
    "googlenet": {"epochs": 12, "lr": 0.1, "weight_decay": 5e-4},
    "vgg": {"epochs": 12, "lr": 0.05, "weight_decay": 5e-4},
}


def train_one(arch: str, epochs: int | None) -> dict:
    """Train ``arch`` from a seeded initialization, save its checkpoint, return its entry."""
    recipe = dict(RECIPES[arch])
    if epochs is not None:
        recipe["epochs"] = epochs
    torch.manual_seed(SEED)
    model = ARCHITECTURES[arch]()
    print(f"== {arch}: {recipe}", flush=True)
    result = train(model, epochs=int(recipe["epochs"]), lr=recipe["lr"],
                   weight_decay=recipe["weight_decay"], seed=SEED)
    state = {k: v.detach().to(torch.float32) if v.is_floating_point() else v.detach()
             for k, v in model.state_dict().items()}
    path = checkpoint_path(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    entry = {"test_accuracy": result["test_accuracy"], "val_accuracy": result["val_accuracy"],
             "epochs": result["epochs"], "seconds": result["seconds"],
             "seconds_per_epoch": round(result["seconds"] / result["epochs"], 1),
             "params": sum(p.numel() for p in model.parameters()),
             "checkpoint_bytes": path.stat().st_size, "lr": recipe["lr"],
             "weight_decay": recipe["weight_decay"], "seed": SEED, "history": result["history"]}
    print(f"== {arch}: test {entry['test_accuracy']:.4f} val {entry['val_accuracy']:.4f} "
          f"in {entry['seconds']:.0f} s", flush=True)
    return entry


def write_markdown(accuracy: dict, path: Path) -> None:
    goal = {"resnet": 0.92}
    lines = ["# Fashion-MNIST zoo: training results", "",
             f"Trained by `benchmarks/train_zoo.py` on {cpu_name()} ({os.cpu_count()} cores), "
             f"torch {torch.__version__}, one thread per training process, two processes side "
             "by side, CPU shared with other jobs: times are wall clock and noisy (the same "
             "ResNet step of 128 images took 135 ms, about 58 s per epoch, on the idle "
             "machine with 2 threads). "
             "Test = official 10,000 images; val = 5,000 held-out training images; "
             "SGD + Nesterov, one-cycle schedule, crop+flip augmentation, seed 0.", "",
             "| model | params | epochs | s/epoch | train s | val acc | test acc | goal |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for arch in ARCHITECTURES:
        if arch not in accuracy:
            continue
        e = accuracy[arch]
        target = goal.get(arch, 0.90)
        verdict = "met" if e["test_accuracy"] >= target else "MISSED"
        lines.append(f"| {arch} | {e['params']:,} | {e['epochs']} | {e['seconds_per_epoch']:.0f} "
                     f"| {e['seconds']:.0f} | {e['val_accuracy']:.4f} | {e['test_accuracy']:.4f} "
                     f"| >= {target:.2f} {verdict} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=list(ARCHITECTURES),
                        default=list(ARCHITECTURES))
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true",
                        help="only rewrite the results files from accuracy.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for arch in [] if args.report else args.arch:
        entry = train_one(arch, args.epochs)
        # Re-read just before writing: another process may have trained other archs meanwhile.
        accuracy = json.loads(ACCURACY_FILE.read_text()) if ACCURACY_FILE.is_file() else {}
        accuracy[arch] = entry
        ordered = {a: accuracy[a] for a in ARCHITECTURES if a in accuracy}
        ACCURACY_FILE.write_text(json.dumps(ordered, indent=1) + "\n")  # after each: resumable
        write_results(ordered)
    if args.report:
        write_results(json.loads(ACCURACY_FILE.read_text()))
    return 0


def write_results(accuracy: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zoo_training.json").write_text(json.dumps(accuracy, indent=1) + "\n")
    write_markdown(accuracy, RESULTS / "zoo_training.md")


if __name__ == "__main__":
    sys.exit(main())
