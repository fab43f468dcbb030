"""Meta-schedule tuning of the blocked CPU kernels, and the tuning databases builds reuse.

Tuning starts from the module our default pipeline schedules (``schedules.lower_passes``:
NCHW[x]c layouts, legalized, fused), so a tuned PrimFunc is structurally the same workload the
build meets and replaces our hand schedule for exactly that function. Only float32
convolution / depthwise / matmul functions are tuned: the int8 kernels are tensorized with our
own AVX2 intrinsics (``schedules.int8_intrin``), which meta-schedule's search does not know.

Databases are JSON database directories (``database_workload.json``,
``database_tuning_record.json``) kept per target key (``target_key``):

* ``$TVM_COMPRESS_TUNING_DIR/<key>`` (default ``~/.cache/tvm-compress/tuning/<key>``): what
  ``tvm-compress tune`` writes unless ``--db`` names another directory;
* ``tvm_compress/backend/tuned/<key>``: databases shipped with the package (reference target
  ``x86-avx2``, key ``llvm-core-avx2``; any other x86 target with AVX2 and without AVX-512 uses
  it too, because the kernels' workloads and code are the same there).

A tuning run keeps every measured candidate in ``<db>/raw`` (appended as measured, so a second
run resumes from the best ones) and writes to ``<db>`` itself only the workloads whose best
tuned schedule beat our default schedule when both were timed the same way, so a shipped or
cached database never makes a build slower than the default schedules.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm.ir.utils
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import meta_schedule as ms

from tvm_compress.backend.databases import (  # noqa: F401 (re-exported)
    REFERENCE_KEY,
    SHIPPED_DIR,
    TUNED_ATTR,
    _finish,
    _is_avx2_x86,
    _workload,
    apply_databases,
    count_tuned,
    database_dirs,
    databases_for,
    open_database,
    param_shapes,
    random_args,
    target_key,
    user_db_root,
    without_tensor_intrinsics,
)
from tvm_compress.errors import UserError

_FP32_KERNELS = ("conv2d_nchwc", "depthwise_nchwc")


# ------------------------------------------------------------------------------- databases
























@contextmanager
def quiet_meta_schedule_logs() -> Iterator[None]:
    """Around meta-schedule's logger setup: per-task details to ``<raw>/logs``, only warnings
    to the console, and on stderr (stdout stays clean for ``--json``).

    meta-schedule sizes its console handler by the logger's level on every call (then resets
    the level to DEBUG), and re-lists the logger's handlers by name: unnamed ones (pytest's
    capture handlers, copied there by an earlier call) would break it, so they are set aside.
    """
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_logger.setLevel(logging.WARNING)
    unnamed = [h for h in ms_logger.handlers if h.get_name() is None]
    for h in unnamed:
        ms_logger.removeHandler(h)
    try:
        yield
    finally:
        for h in unnamed:
            ms_logger.addHandler(h)
        for handler in ms_logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)


# ----------------------------------------------------------------------------------- tasks


@dataclass
class TaskInfo:
    """One tuning task: a fused PrimFunc the model runs ``weight`` times."""

    name: str
    weight: int
    flops: float
    default_us: float | None = None
    tuned_us: float | None = None
    trials: int = 0
    kept: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def tuning_module(model: Any, target: tvm.target.Target) -> tvm.IRModule:
    """The module our default pipeline would schedule (fused, legalized, blocked layouts)."""
    from tvm_compress.backend.schedules import lower_passes
    from tvm_compress.frontend.importers import Model

    mod = model.mod if isinstance(model, Model) else model
    with target:
        return tvm.transform.Sequential(lower_passes(target))(mod)


def _is_fp32_kernel(func: tirx.PrimFunc) -> bool:
    from tvm_compress.backend.schedules.blocks import child_blocks
    from tvm_compress.backend.schedules.compute import KERNEL_ATTR
    from tvm_compress.backend.schedules.dense import find_matmul

    sch = s_tir.Schedule(func)
    kinds = {str(sch.get(b).annotations.get(KERNEL_ATTR, "")) for b in child_blocks(sch)}
    floats = all(str(p.ty.dtype) == "float32" for p in func.params)
    if not floats:
        return False
    if kinds & set(_FP32_KERNELS):
        return True
    try:
        return find_matmul(sch) is not None
    except (RuntimeError, ValueError, IndexError):
        return False


def select_tasks(mod: tvm.IRModule, target: tvm.target.Target, *,
                 top: int | None = None) -> list[ms.ExtractedTask]:
    """The float32 kernel tasks of ``mod``, heaviest (flops x uses) first, at most ``top``."""
    tasks = ms.relax_integration.extract_tasks(mod, target)
    chosen = [t for t in tasks if _is_fp32_kernel(t.dispatched[0]["main"])]
    chosen.sort(key=lambda t: -_flops(t.dispatched[0]) * t.weight)
    return chosen[:top] if top else chosen


def _flops(mod: tvm.IRModule) -> float:
    try:
        return float(s_tir.analysis.estimate_tir_flops(mod))
    except (RuntimeError, ValueError):
        return 0.0


# ------------------------------------------------------------------------------- building


def build_without_intrinsics(mod: tvm.IRModule, target: tvm.target.Target,
                             _params: Any = None) -> Any:
    """meta-schedule builder function that skips ``import tvm.s_tir.tensor_intrin``.

    The stock ``default_build`` imports every registered tensor intrinsic in each fresh worker
    (25-90 s here), longer than the builder's timeout, so every candidate would fail.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def make_builder(timeout_sec: float = 60.0, f_export: Any = None) -> ms.builder.LocalBuilder:
    kwargs = {"f_export": f_export} if f_export is not None else {}
    return ms.builder.LocalBuilder(max_workers=1, timeout_sec=timeout_sec,
                                   f_build=build_without_intrinsics, **kwargs)


def make_runner(timeout_sec: float = 60.0) -> ms.runner.LocalRunner:
    config = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=40,
                                       enable_cpu_cache_flush=False)
    return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=config)


# ------------------------------------------------------------------------------- measuring






def time_func(func: tirx.PrimFunc, target: tvm.target.Target, *, repeat: int = 7) -> float:
    """Best-of-``repeat`` time of one call, in microseconds (random inputs)."""
    from tvm.driver import build as tvm_build

    lib = tvm_build(tvm.IRModule({"main": func}), target=target)
    args = random_args(param_shapes(func))
    timer = lib.time_evaluator("main", tvm.cpu(), number=5, repeat=repeat, min_repeat_ms=20)
    return 1e6 * min(timer(*args).results)


def _local_timer(target: tvm.target.Target) -> Callable[[tirx.PrimFunc], float]:
    """Microseconds per call of a PrimFunc built for ``target``, timed on this machine."""
    return lambda func: time_func(func, target)


def default_scheduled(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    from tvm_compress.backend.schedules.rules import schedule_func

    with target:
        scheduled = schedule_func(func, target)
    return scheduled if scheduled is not None else func


# --------------------------------------------------------------------------------- tuning


@tvm.ir.utils.derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Reports each measured batch (trials so far, best time per task) to ``report``."""

    def __init__(self, total: int, report: Callable[[int, int, str], None]) -> None:
        super().__init__()
        self.total, self.done, self.report = total, 0, report
        self.best: dict[int, float] = {}

    def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any,
              builder_results: Any, runner_results: Any) -> None:
        self.done += len(measure_candidates)
        for res in runner_results:
            if res.error_msg is None and res.run_secs:
                secs = float(np.mean([float(s) for s in res.run_secs]))
                self.best[task_id] = min(self.best.get(task_id, float("inf")), secs)
        best = self.best.get(task_id)
        note = f"task {task_id}: best {1e6 * best:.0f} us" if best else f"task {task_id}"
        self.report(self.done, self.total, note)


@dataclass
class TuneResult:
    database: str
    target_key: str
    trials: int
    seconds: float
    tasks: list[TaskInfo]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kept"] = sum(t.kept for t in self.tasks)
        return out


def tune(model: Any, target: tvm.target.Target, *, trials: int, db_dir: str | Path | None = None,
         top: int | None = None, trials_per_iter: int = 16,
         report: Callable[[int, int, str], None] | None = None, seed: int = 0,
         population: int = 256, raw_dir: str | Path | None = None,
         keep_all: bool = False, remote: Any = None) -> TuneResult:
    """Tune the float32 kernels of ``model`` for ``target`` and update its database.

    Parameters
    ----------
    model : frontend.Model or IRModule
    target : tvm.target.Target
        An ``llvm`` target.
    trials : int
        Measured candidates in total, shared among tasks by meta-schedule's gradient scheduler.
    db_dir : path, optional
        Database directory (default ``user_db_root() / target_key(target)``).
    top : int, optional
        Tune only the ``top`` heaviest kernel tasks.
    population : int
        Evolutionary search population per round (meta-schedule's default 512 takes minutes per
        round on two shared cores; small models and tests use less).
    raw_dir : path, optional
        Where every measured candidate goes (default ``<db_dir>/raw``); a later run resumes the
        search from the best ones there.
    keep_all : bool
        Store each task's best tuned schedule even when our default schedule is faster.
    report : callable(done, total, note), optional
        Progress callback after each measured batch.
    remote : remote.RemoteSpec, optional
        Measure candidates (and the final default-vs-tuned comparison) on this RPC server or
        tracker device instead of this machine (``tvm_compress.runtime.remote_tune``).
    """
    if target.kind.name != "llvm":
        raise UserError(f"tune: target {target.kind.name!r} is not a CPU target; meta-schedule "
                        "tuning here covers llvm targets (x86-avx2, x86, aarch64 ...)")
    if trials < 1:
        raise UserError(f"--trials must be at least 1 (got {trials})")
    start = time.perf_counter()
    db_path = Path(db_dir) if db_dir else user_db_root() / target_key(target)
    raw_path = Path(raw_dir) if raw_dir else db_path / "raw"
    mod = tuning_module(model, target)
    tasks = select_tasks(mod, target, top=top)
    if not tasks:
        raise UserError("tune: the model has no float32 convolution or matmul to tune")
    from tvm_compress.backend.schedules.hardware import is_aarch64

    with quiet_meta_schedule_logs(), without_tensor_intrinsics():
        if is_aarch64(target):  # meta-schedule's ARM rules name the NEON / dot-product ones
            importlib.import_module("tvm.s_tir.tensor_intrin.arm_cpu")
        elif target.kind.name == "llvm":  # its x86 rules name VNNI / AVX-512 ones where present
            importlib.import_module("tvm.s_tir.tensor_intrin.x86")
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, str(raw_path), num_threads=1, seed=seed, strategy=_strategy(population))
    raw = open_database(raw_path, create=True)
    callbacks = ms.measure_callback.MeasureCallback.create("default")
    if report is not None:
        callbacks = [*callbacks, _Progress(trials, report)]
    per_iter = max(1, min(trials_per_iter, trials))
    builder, runner, timer, session = make_builder(), make_runner(), None, None
    if remote is not None:
        from tvm_compress.runtime import remote_tune as rt

        session = rt.RemoteSession(remote)
        builder = make_builder(f_export=rt.builder_export(target))
        runner, timer = rt.RemoteRunner(session), rt.remote_timer(session, target)
    ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(raw_path),
                       max_trials_global=trials, num_trials_per_iter=per_iter,
                       builder=builder, runner=runner, database=raw,
                       measure_callbacks=callbacks, task_scheduler="gradient")
    if session is not None:
        rt.raise_if_failed(session, raw_path, start)
    try:
        infos = keep_winners(tasks, raw, db_path, target, keep_all=keep_all, timer=timer)
    except Exception as exc:
        if session is not None:
            rt.raise_if_failed(session, raw_path, start, cause=exc)
        raise
    counts = _trial_counts(raw)
    for info, task in zip(infos, tasks, strict=True):
        info.trials = counts.get(_workload_hash(raw, task), 0)
    summary = TuneResult(str(db_path), target_key(target), trials,
                         time.perf_counter() - start, infos)
    (db_path / "tuning_summary.json").write_text(json.dumps(summary.as_dict(), indent=1))
    return summary


def _strategy(population: int) -> ms.search_strategy.EvolutionarySearch:
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, max(8, population // 4)),
        genetic_num_iters=2 if population < 128 else 4)


def _workload_hash(db: ms.database.Database, task: ms.ExtractedTask) -> str:
    return str(tvm_ffi.structural_hash(task.dispatched[0]))


def _trial_counts(db: ms.database.Database) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in db.get_all_tuning_records():
        key = str(tvm_ffi.structural_hash(rec.workload.mod))
        counts[key] = counts.get(key, 0) + 1
    return counts


def keep_winners(tasks: list[ms.ExtractedTask], raw: ms.database.Database, db_path: Path,
                 target: tvm.target.Target, *, keep_all: bool = False,
                 timer: Callable[[tirx.PrimFunc], float] | None = None) -> list[TaskInfo]:
    """Time each task's best tuned and default schedule (``timer``: microseconds, default this
    machine); put the tuned ones that win into the database at ``db_path`` (replacing older
    entries of the same workload)."""
    timer = timer or _local_timer(target)
    infos: list[TaskInfo] = []
    winners: list[ms.database.TuningRecord] = []
    for task in tasks:
        workload = task.dispatched[0]
        func = workload["main"]
        info = TaskInfo(task.task_name, int(task.weight), _flops(workload))
        info.default_us = timer(default_scheduled(func, target))
        if raw.has_workload(workload):
            top = raw.get_top_k(raw.commit_workload(workload), 1)
            if top:
                sch = raw.query_schedule(workload, target, "main")
                if sch is not None:
                    info.tuned_us = timer(_finish(sch, target))
                    if keep_all or info.tuned_us < info.default_us:
                        info.kept = True
                        winners.append(top[0])
        infos.append(info)
    _write_database(db_path, winners, target)
    return infos


def recheck_database(db_path: Path, target: tvm.target.Target, *,
                     timer: Callable[[tirx.PrimFunc], float] | None = None) -> list[TaskInfo]:
    """Re-time every record of the database at ``db_path`` against today's default schedule of
    its workload and drop the records that no longer win (after the default schedules changed).

    Returns one TaskInfo per record (``kept``: it still wins). The database is rewritten only
    when something is dropped.
    """
    timer = timer or _local_timer(target)
    db = open_database(db_path)
    infos, keep = [], []
    for rec in db.get_all_tuning_records():
        mod = rec.workload.mod
        info = TaskInfo(f"workload {int(tvm_ffi.structural_hash(mod)):x}"[:17], 1, _flops(mod))
        info.default_us = timer(default_scheduled(mod["main"], target))
        info.tuned_us = timer(_finish(db.query_schedule(mod, target, "main"), target))
        info.kept = info.tuned_us < info.default_us
        if info.kept:
            keep.append(rec)
        infos.append(info)
    if len(keep) < len(infos):
        _write_database(db_path, keep, target, merge=False)
    return infos


def _write_database(db_path: Path, winners: list[ms.database.TuningRecord],
                    target: tvm.target.Target, *, merge: bool = True) -> None:
    """Merge ``winners`` into the database at ``db_path`` (one record per workload); with
    ``merge=False`` they replace its records."""
    old: dict[int, ms.database.TuningRecord] = {}
    if merge and (db_path / "database_workload.json").is_file():
        for rec in open_database(db_path).get_all_tuning_records():
            old[int(tvm_ffi.structural_hash(rec.workload.mod))] = rec
    for rec in winners:
        old[int(tvm_ffi.structural_hash(rec.workload.mod))] = rec
    for name in ("database_workload.json", "database_tuning_record.json"):
        (db_path / name).unlink(missing_ok=True)
    db = open_database(db_path, create=True)
    for rec in old.values():
        workload = db.commit_workload(rec.workload.mod)
        db.commit_tuning_record(ms.database.TuningRecord(
            rec.trace, workload, rec.run_secs, target, rec.args_info))
