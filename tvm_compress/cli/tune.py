"""``tvm-compress tune``: meta-schedule tuning of a model's float32 CPU kernels into a database.

Later ``compile``/``bench``/``eval``/``demo`` runs for the same target pick the database up
automatically (``tvm_compress.backend.tuning_ms``); ``--db DIR`` writes elsewhere (then pass the
directory to ``compiler.build(..., database=DIR)``). ``--rpc HOST:PORT`` or ``--tracker HOST:PORT
--key KEY`` measure the candidates on a remote device (``tvm_compress.runtime.remote_tune``).
"""

from __future__ import annotations

import argparse
from typing import Any

HELP = "tune the model's CPU kernels with meta-schedule; builds reuse the database"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tvm_compress.cli.common import add_common

    add_common(p, target=True)
    p.add_argument("--trials", type=int, default=256,
                   help="measured candidates in total, shared among the tasks (default 256)")
    p.add_argument("--top", type=int, default=0,
                   help="tune only the K heaviest kernel tasks (default: all)")
    p.add_argument("--db", help="database directory (default: the per-target cache, "
                                "$TVM_COMPRESS_TUNING_DIR or ~/.cache/tvm-compress/tuning/KEY)")
    p.add_argument("--population", type=int, default=128,
                   help="evolutionary search population per round (default 128)")
    from tvm_compress.runtime.remote import add_remote_args

    add_remote_args(p, records=False)
    p.add_argument("--keep-all", action="store_true",
                   help="store each task's best tuned schedule even when the default "
                        "schedule is faster")


def run(args: argparse.Namespace, con: Any) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tvm_compress.backend.targets import resolve_target
    from tvm_compress.backend.tuning_ms import tune
    from tvm_compress.cli.common import load_model
    from tvm_compress.errors import UserError
    from tvm_compress.runtime.remote import parse_remote

    if args.trials < 1:
        raise UserError(f"--trials must be at least 1 (got {args.trials})")
    if args.top < 0:
        raise UserError(f"--top must be 0 (all tasks) or positive (got {args.top})")
    if args.population < 2:
        raise UserError(f"--population must be at least 2 (got {args.population})")
    remote = parse_remote(args.rpc, args.tracker, args.key)
    target = resolve_target(args.target)
    with con.step(f"importing {args.model}"):
        model = load_model(args)
    progress = Progress(TextColumn("tuning"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.description}"), console=con.err,
                        disable=args.json)
    with progress:
        bar = progress.add_task("", total=args.trials)

        def report(done: int, total: int, note: str) -> None:
            progress.update(bar, completed=min(done, total), description=note)

        result = tune(model, target, trials=args.trials, db_dir=args.db, top=args.top or None,
                      population=args.population, report=report, keep_all=args.keep_all,
                      remote=remote)
    rows = [[t.name, t.weight, t.trials, t.default_us,
             t.tuned_us if t.tuned_us is not None else "-", "yes" if t.kept else "no"]
            for t in result.tasks]
    con.table(f"{model.name} on {result.target_key}: {result.trials} trials",
              ["task", "uses", "trials", "default us", "tuned us", "stored"], rows)
    con.out.print(f"database {result.database}: {sum(t.kept for t in result.tasks)} of "
                  f"{len(result.tasks)} kernels stored ({result.seconds:.0f} s)")
    out = result.as_dict()
    out["model"] = model.name
    out["measured_on"] = remote.describe() if remote else "this machine"
    return out
