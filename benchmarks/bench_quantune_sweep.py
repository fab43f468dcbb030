"""Quantune ground truth: every configuration of the paper's 96-point space, measured for real.

Each configuration is quantized, realized as an integer module, compiled for x86 (our default
schedules) and measured by :class:`tvm_compress.tuning.evaluator.QuantEvaluator`:

* the six Fashion-MNIST zoo models: top-1 accuracy on the first ``--val`` images of the
  validation split (default 500; the accuracy step is 0.2 point), calibration sizes
  1 / 100 / 1000 from the 1,000-image calibration split;
* ``zoo:mobilenet_v2`` (ImageNet weights): top-1 *agreement* with the fp32 model on ``--photos``
  unlabelled crops of real photos (default 64), calibration sizes 1 / 3 / 32 from 32 crops of other
  photos; with ``--mobilenet-calib`` the space is restricted to those calibration sizes.

Records are appended (flush + fsync) to ``tvm_compress/tuning/quantune/prior/paper_space.jsonl`` as
each
trial finishes, so the sweep runs in chunks: kill it, rerun it, it resumes where it stopped. That
file ships with the package as Quantune's prior. Calibration statistics are collected once per
(calibration size, fp32 layers) and shared by the 16 configurations of the group.

    .venv/bin/python benchmarks/bench_quantune_sweep.py            # everything (resumes)
    .venv/bin/python benchmarks/bench_quantune_sweep.py --models fmnist_vgg --limit 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRIOR = ROOT / "tuning" / "quantune" / "prior" / "paper_space.jsonl"
# cheapest builds first, so the sweep completes whole models early
FMNIST = ("fmnist_resnet", "fmnist_vgg", "fmnist_squeezenet", "fmnist_mobilenet_v2",
          "fmnist_shufflenet_v2", "fmnist_googlenet")
MODELS = FMNIST + ("mobilenet_v2",)


def evaluator_for(name: str, records: Path, *, val: int, photos: int):  # noqa: ANN201
    """The QuantEvaluator and space of one zoo model, with the sweep's data subsets."""
    from tvm_compress import load
    from tvm_compress.data import fashion_mnist, real_photos
    from tvm_compress.tuning.evaluator import QuantEvaluator
    from tvm_compress.tuning.quantune.space import SearchSpace

    # batched imports: 10 VM calls per evaluation instead of 500
    model = load(f"zoo:{name}", batch=50 if name.startswith("fmnist_") else 16)
    if name.startswith("fmnist_"):
        images, labels = fashion_mnist("val")
        calib, _ = fashion_mnist("calib")
        images, labels = images[:val], labels[:val]
    else:
        calib = real_photos("calib", n=32)
        images, labels = real_photos("eval", n=photos), None
    ev = QuantEvaluator(model, calib=calib, images=images, labels=labels, records=records)
    return ev, SearchSpace.paper(calib_available=len(calib))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--records", type=Path, default=PRIOR)
    p.add_argument("--val", type=int, default=500, help="Fashion-MNIST validation images")
    p.add_argument("--photos", type=int, default=64, help="MobileNetV2 evaluation crops")
    p.add_argument("--mobilenet-calib", type=int, nargs="+", default=None,
                   help="restrict MobileNetV2 to these calibration sizes (of 1, 3, 32)")
    p.add_argument("--limit", type=int, default=None, help="measure at most this many new trials")
    args = p.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    measured = 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), console=Console(stderr=True))
    progress.start()
    for name in args.models:
        t0 = time.time()
        ev, space = evaluator_for(name, args.records, val=args.val, photos=args.photos)
        if name == "mobilenet_v2" and args.mobilenet_calib:
            space = space.restrict(calib_samples=tuple(args.mobilenet_calib))
        base = ev.baseline()
        todo = [k for k in space if ev.cached(k) is None]
        bar = progress.add_task(name, total=len(space), completed=len(space) - len(todo),
                                info="")
        best = max((ev.cached(k).accuracy for k in space if ev.cached(k) is not None),
                   default=float("nan"))
        for knobs in todo:
            if args.limit is not None and measured >= args.limit:
                break
            res = ev.evaluate(knobs)
            measured += 1
            best = max(best, res.accuracy) if best == best else res.accuracy
            progress.update(bar, advance=1, info=f"fp32 {base.accuracy:.4f} best {best:.4f} "
                            f"last {res.seconds:.1f}s load {os.getloadavg()[0]:.1f}")
        print(f"{name}: fp32 {base.accuracy:.4f}, best {best:.4f}, {ev.measured} measured in "
              f"{time.time() - t0:.0f} s, load {os.getloadavg()}", flush=True)
        if args.limit is not None and measured >= args.limit:
            break
    progress.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
