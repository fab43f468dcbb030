"""Tune the zoo models' float32 kernels on the reference target and update the shipped database.

Usage: ``.venv/bin/python benchmarks/tune_shipped.py [--recheck] [--trials N] [--top K]
[MODEL ...]``

``--recheck`` first re-times every shipped schedule against today's default schedules and drops
the ones that no longer win (run it whenever the default schedules change); ``--recheck
--no-tune`` only does that.

Writes ``tvm_compress/backend/tuned/llvm-core-avx2`` (package data: only the schedules that beat our
default ones when timed here) and keeps every measured candidate in ``benchmarks/tuning_raw``
(not committed) so that a second run resumes from the best candidates so far. One process, one
builder and one runner worker: the machine's two cores are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tvm_compress import load
from tvm_compress.backend.targets import resolve_target
from tvm_compress.backend.tuning_ms import REFERENCE_KEY, SHIPPED_DIR, recheck_database, tune

HERE = Path(__file__).parent
RAW = HERE / "tuning_raw" / REFERENCE_KEY
LOG = HERE / "results" / "tuning_shipped.jsonl"
MODELS = ["mobilenet_v2", "fmnist_resnet", "fmnist_mobilenet_v2", "fmnist_shufflenet_v2",
          "fmnist_squeezenet", "fmnist_googlenet", "fmnist_vgg"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--trials", type=int, default=320, help="trials for mobilenet_v2")
    parser.add_argument("--small-trials", type=int, default=64, help="trials per fmnist model")
    parser.add_argument("--top", type=int, default=12, help="heaviest kernel tasks per model")
    parser.add_argument("--population", type=int, default=128)
    parser.add_argument("--recheck", action="store_true",
                        help="first drop shipped schedules that lose to today's defaults")
    parser.add_argument("--no-tune", action="store_true", help="with --recheck: only recheck")
    args = parser.parse_args()
    target = resolve_target("x86-avx2")
    if args.recheck:
        start = time.time()
        infos = recheck_database(SHIPPED_DIR / REFERENCE_KEY, target)
        record = {"recheck": True, "seconds": time.time() - start, "load": os.getloadavg(),
                  "tasks": [vars(i) for i in infos]}
        LOG.parent.mkdir(parents=True, exist_ok=True)
        with LOG.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        for i in infos:
            print(f"[recheck] {i.name}: default {i.default_us:.1f} us, shipped {i.tuned_us:.1f} us"
                  f" -> {'kept' if i.kept else 'dropped'}", flush=True)
        if args.no_tune:
            return
    for name in args.models:
        model = load(f"zoo:{name}")
        trials = args.trials if name == "mobilenet_v2" else args.small_trials
        start = time.time()

        def report(done: int, total: int, note: str, name: str = name) -> None:
            print(f"[{name}] {done}/{total} trials, {note}", flush=True)

        result = tune(model, target, trials=trials, top=args.top,
                      db_dir=SHIPPED_DIR / REFERENCE_KEY, raw_dir=RAW,
                      population=args.population, report=report)
        (SHIPPED_DIR / REFERENCE_KEY / "tuning_summary.json").unlink(missing_ok=True)
        record = {"model": name, "trials": trials, "top": args.top, "seconds": time.time() - start,
                  "load": os.getloadavg(), "tasks": result.as_dict()["tasks"]}
        LOG.parent.mkdir(parents=True, exist_ok=True)
        with LOG.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        kept = sum(t.kept for t in result.tasks)
        print(f"[{name}] done: {kept}/{len(result.tasks)} tuned kernels beat the default",
              flush=True)


if __name__ == "__main__":
    main()
