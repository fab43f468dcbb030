"""Meta-schedule tuning measured on a remote device through TVM RPC (server or tracker).

Candidates are compiled here - cross-compiled to a shared library for aarch64 targets, since a
device running the bundle's C++ server has no compiler - then uploaded, loaded and timed on the
device. One RPC session serves the whole search. If the device goes away, the remaining
candidates of the search are marked failed at once (no reconnect storm), the candidates already
measured stay in the raw database, and :func:`tvm_compress.backend.tuning_ms.tune` raises one clear
:class:`UserError` at the end; running the same command again resumes from those records.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

from tvm_compress.backend.databases import param_shapes, random_args
from tvm_compress.backend.targets import AARCH64_CXX, export_compiler
from tvm_compress.errors import UserError
from tvm_compress.runtime.remote import RemoteSpec, _first_line, connect


def _export(mod: Any, cross: bool) -> str:
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="tvm-compress-ms-"), "candidate.so")
    mod.export_library(path, fcompile=cc.cross_compiler(AARCH64_CXX) if cross else None)
    return path


def export_shared(mod: Any) -> str:
    """meta-schedule export function: a shared library for the host's architecture."""
    return _export(mod, cross=False)


def export_aarch64(mod: Any) -> str:
    """meta-schedule export function: a shared library cross-compiled for aarch64."""
    return _export(mod, cross=True)


def builder_export(target: tvm.target.Target) -> Any:
    """The export function of meta-schedule's builder for candidates of ``target``."""
    return export_aarch64 if export_compiler(target) is not None else export_shared


class RemoteSession:
    """One RPC session, opened on first use; remembers the first failure."""

    def __init__(self, spec: RemoteSpec) -> None:
        self.spec = spec
        self._session: Any = None
        self.failure: str | None = None
        self.measured = 0
        self._uploads = 0

    def _get(self) -> Any:
        if self._session is None:
            self._session = connect(self.spec)
        return self._session

    def time_library(self, path: str, arg_shapes: list[tuple[str, tuple[int, ...]]], *,
                     number: int, repeat: int, min_repeat_ms: int) -> list[float]:
        """Seconds per call of ``main`` of the library at ``path`` (``repeat`` results)."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        try:
            session = self._get()
            self._uploads += 1
            name = f"ms_{os.getpid()}_{self._uploads}.so"
            session.upload(path, target=name)
            rmod = session.load_module(name)
            dev = session.cpu()
            args = random_args(arg_shapes, dev)
            timer = rmod.time_evaluator("main", dev, number=number, repeat=repeat,
                                        min_repeat_ms=min_repeat_ms)
            secs = [float(s) for s in timer(*args).results]
        except UserError as exc:
            self.failure = str(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - any RPC failure ends the remote search
            self.failure = _first_line(exc)
            raise
        self.measured += 1
        return secs


@tvm.ir.utils.derived_object
class RemoteRunner(ms.runner.PyRunner):
    """meta-schedule runner that times each built candidate on the remote device."""

    def __init__(self, session: RemoteSession, *, number: int = 3, repeat: int = 3,
                 min_repeat_ms: int = 40) -> None:
        super().__init__()
        self.session = session
        self.number, self.repeat, self.min_repeat_ms = number, repeat, min_repeat_ms

    def run(self, runner_inputs: list[Any]) -> list[Any]:
        futures = []
        for inp in runner_inputs:
            shapes = [(str(a.dtype), tuple(int(d) for d in a.shape)) for a in inp.args_info]
            try:
                secs = self.session.time_library(str(inp.artifact_path), shapes,
                                                 number=self.number, repeat=self.repeat,
                                                 min_repeat_ms=self.min_repeat_ms)
                futures.append(LocalRunnerFuture(res=secs))
            except Exception as exc:  # noqa: BLE001 - reported to meta-schedule as a failed run
                futures.append(LocalRunnerFuture(error_message=f"remote run failed: {exc}"))
        return futures


def remote_timer(session: RemoteSession, target: tvm.target.Target):  # noqa: ANN201
    """``timer(func) -> microseconds``: best of 7 remote timings of a PrimFunc."""
    from tvm.driver import build as tvm_build

    def timer(func: Any) -> float:
        lib = tvm_build(tvm.IRModule({"main": func}), target=target)
        with tempfile.TemporaryDirectory(prefix="tvm-compress-ms-") as tmp:
            path = Path(tmp) / "timed.so"
            lib.export_library(str(path), fcompile=export_compiler(target))
            secs = session.time_library(str(path), param_shapes(func), number=5, repeat=7,
                                        min_repeat_ms=20)
        return 1e6 * min(secs)

    return timer


def raise_if_failed(session: RemoteSession | None, raw_path: Path, started: float,
                    cause: BaseException | None = None) -> None:
    """One UserError saying what was kept, if the remote device failed during the search."""
    if session is None or session.failure is None:
        return
    raise UserError(f"the {session.spec.describe()} failed during tuning ({session.failure}); "
                    f"{session.measured} candidate(s) measured in "
                    f"{time.perf_counter() - started:.0f} s are kept in {raw_path}; restart the "
                    "server and run the same command to resume") from cause
