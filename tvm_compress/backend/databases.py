"""Tuning databases that builds reuse: where they live, and applying their schedules to a module.

Databases are JSON database directories (``database_workload.json``,
``database_tuning_record.json``) kept per target key (``target_key``):

* ``$TVM_COMPRESS_TUNING_DIR/<key>`` (default ``~/.cache/tvm-compress/tuning/<key>``): what
  ``tvm-compress tune`` writes unless ``--db`` names another directory;
* ``tvm_compress/backend/tuned/<key>``: databases shipped with the package (reference target
  ``x86-avx2``, key ``llvm-core-avx2``; any other x86 target with AVX2 and without AVX-512 uses
  it too, because the kernels' workloads and code are the same there).

The search that fills them is :mod:`tvm_compress.backend.tuning_ms`. Also here: the seeded
random arguments kernels are timed with, locally or over RPC.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir import meta_schedule as ms

from tvm_compress.errors import UserError

SHIPPED_DIR = Path(__file__).parent / "tuned"
REFERENCE_KEY = "llvm-core-avx2"
TUNED_ATTR = "tvm_compress.tuned"


def target_key(target: tvm.target.Target) -> str:
    """A directory name for ``target``: kind, triple, CPU and extra features (not cores)."""
    attrs = target.attrs
    parts = [target.kind.name]
    for name in ("mtriple", "mcpu"):
        value = str(attrs.get(name, "") or "")
        if value:
            parts.append(value)
    mattr = attrs.get("mattr", None)
    if mattr:
        parts.extend(sorted(str(a).lstrip("+") for a in mattr))
    return "-".join(p.replace("/", "_").replace(" ", "_") for p in parts)


def user_db_root() -> Path:
    """Root of the per-target databases ``tvm-compress tune`` writes by default."""
    env = os.environ.get("TVM_COMPRESS_TUNING_DIR")
    return Path(env) if env else Path.home() / ".cache" / "tvm-compress" / "tuning"


def _is_avx2_x86(target: tvm.target.Target) -> bool:
    from tvm_compress.backend.schedules.hardware import is_aarch64, vector_bits

    return target.kind.name == "llvm" and not is_aarch64(target) and vector_bits(target) == 256


def database_dirs(target: tvm.target.Target) -> list[Path]:
    """Existing databases a build for ``target`` uses, most specific first."""
    key = target_key(target)
    candidates = [user_db_root() / key, SHIPPED_DIR / key]
    if _is_avx2_x86(target):
        candidates += [user_db_root() / REFERENCE_KEY, SHIPPED_DIR / REFERENCE_KEY]
    seen: list[Path] = []
    for path in candidates:
        if path not in seen and (path / "database_workload.json").is_file():
            seen.append(path)
    return seen


def open_database(path: str | Path, *, create: bool = False) -> ms.database.JSONDatabase:
    """The JSON database in directory ``path`` (``create`` makes an empty one)."""
    path = Path(path)
    workload, records = path / "database_workload.json", path / "database_tuning_record.json"
    if not create and not workload.is_file():
        raise UserError(f"{path} is not a tuning database (no database_workload.json); run "
                        "`tvm-compress tune MODEL --db DIR` to create one")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(workload), path_tuning_record=str(records),
                                    allow_missing=create)


def databases_for(target: tvm.target.Target,
                  database: str | Path | bool | None = None) -> list[ms.database.Database]:
    """The databases a build uses: ``database_dirs(target)`` for None, none for False, else
    the one at path ``database``."""
    if database is False:
        return []
    if database is None or database is True:
        return [open_database(p) for p in database_dirs(target)]
    return [open_database(database)]


def count_tuned(mod: tvm.IRModule) -> int:
    """How many PrimFuncs of ``mod`` carry a schedule from a tuning database."""
    return sum(1 for _, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and bool(f.attrs.get(TUNED_ATTR, False)))


def apply_databases(mod: tvm.IRModule, target: tvm.target.Target,
                    databases: list[ms.database.Database]) -> tuple[tvm.IRModule, int]:
    """Replace each unscheduled PrimFunc found in a database by its tuned schedule.

    Returns the new module and how many functions were replaced; the rest stay unscheduled for
    the default schedule rules.
    """
    if not databases:
        return mod, 0
    mod = tvm.IRModule(mod.functions, mod.attrs)
    applied = 0
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        workload = _workload(func)
        for db in databases:
            sch = db.query_schedule(workload, target, "main")
            if sch is not None:
                scheduled = _finish(sch, target)
                if "global_symbol" not in (func.attrs or {}):
                    scheduled = scheduled.without_attr("global_symbol")
                mod[gv] = (scheduled.with_attr("tirx.is_scheduled", True)
                           .with_attr(TUNED_ATTR, True))
                applied += 1
                break
    return mod, applied


def _workload(func: tirx.PrimFunc) -> tvm.IRModule:
    """``func`` as meta-schedule stores workloads (named main, ``noalias``)."""
    if "global_symbol" not in (func.attrs or {}):
        func = func.with_attr("global_symbol", "main")
    return tvm.IRModule({"main": func.with_attr("tirx.noalias", True)})


def _finish(sch: s_tir.Schedule, target: tvm.target.Target) -> tirx.PrimFunc:
    """Run the postprocessors that turn meta-schedule annotations into loops."""
    with target, without_tensor_intrinsics():
        for post in (ms.postproc.RewriteParallelVectorizeUnroll(),
                     ms.postproc.RewriteReductionBlock()):
            ctx = ms.TuneContext(mod=sch.mod, target=target)
            post._initialize_with_tune_context(ctx)
            post.apply(sch)
    return sch.mod["main"]


@contextmanager
def without_tensor_intrinsics() -> Iterator[None]:
    """Skip ``import tvm.s_tir.tensor_intrin`` inside ``TuneContext(...)``.

    That import registers every tensor intrinsic TVM has (CUDA, Hexagon, ARM, x86 ...) and takes
    25-90 s on the shared 2-core machine; the float32 search on AVX2 uses none of them. A stub
    module stands in while the block runs and is removed afterwards, so a later real import
    still works. Nothing happens when the intrinsics are already imported.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    stub = types.ModuleType(name)
    # submodules stay importable one by one (e.g. the ARM intrinsics an aarch64 search needs)
    stub.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
    sys.modules[name] = stub
    try:
        yield
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]


def param_shapes(func: tirx.PrimFunc) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of each buffer parameter of ``func``."""
    return [(str(p.ty.dtype), tuple(int(d) for d in p.ty.shape)) for p in func.params]


def random_args(shapes: list[tuple[str, tuple[int, ...]]], dev: Any = None
                ) -> list[tvm.runtime.Tensor]:
    """Seeded random tensors of those (dtype, shape)s on ``dev`` (default: this CPU)."""
    rng = np.random.default_rng(0)
    args = []
    for dtype, shape in shapes:
        if dtype.startswith("float"):
            data = rng.standard_normal(shape).astype(dtype)
        else:
            data = rng.integers(-8, 8, size=shape).astype(dtype)
        args.append(tvm.runtime.tensor(data, dev) if dev is not None else tvm.runtime.tensor(data))
    return args
