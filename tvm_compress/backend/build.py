"""Build a Relax module for a target preset and run it on the local Relax VM."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from tvm_compress.backend.targets import export_compiler, is_host_runnable, resolve_target
from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import Model


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Latency:
    """Latency statistics in milliseconds over ``repeat`` timed runs after warm-up."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeat: int

    def as_dict(self) -> dict[str, float]:
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms,
                "repeat": self.repeat}


def latency_stats(seconds: list[float]) -> Latency:
    ms = sorted(1000.0 * s for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return Latency(statistics.median(ms), pick(0.1), pick(0.9), len(ms))


class CompiledModel:
    """A compiled executable plus its input contract; runs on the host VM when the target allows."""

    def __init__(self, executable: Any, target: tvm.target.Target, spec: InputSpec) -> None:
        self.executable = executable
        self.target = target
        self.spec = spec
        self._vm: relax.VirtualMachine | None = None
        self.tuned_functions = 0
        # the build report (backend.report.KernelInfo per PrimFunc); None when not known
        # (GPU targets, schedule="none")
        self.kernels: list | None = None

    @property
    def vm(self) -> relax.VirtualMachine:
        if self._vm is None:
            if not is_host_runnable(self.target):
                raise UserError(f"this model was built for {self.target.kind.name} "
                                f"{self.target.attrs.get('mtriple', '')}; it cannot run on this "
                                "host: export it and run it on the device (or through --rpc)")
            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return self._vm

    def check_input(self, x: np.ndarray) -> np.ndarray:
        if tuple(x.shape) != self.spec.shape:
            raise UserError(f"input '{self.spec.name}' has shape {tuple(x.shape)} but the model "
                            f"expects {self.spec.shape}; resize the data or re-import the model "
                            "with a matching shape/batch")
        if str(x.dtype) != self.spec.dtype:
            raise UserError(f"input '{self.spec.name}' has dtype {x.dtype} but the model expects "
                            f"{self.spec.dtype}; convert it with .astype('{self.spec.dtype}')")
        return np.ascontiguousarray(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        """One forward pass; ``x`` must match the model's input shape and dtype exactly."""
        out = self.vm["main"](tvm.runtime.tensor(self.check_input(x)))
        return out.numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Outputs for any number of samples, run in batches of the model's batch size."""
        batch = self.spec.shape[0]
        outputs = []
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            n = len(chunk)
            if n < batch:  # pad the last batch; the padded rows are dropped
                pad = np.zeros((batch - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outputs.append(self.run(chunk)[:n])
        return np.concatenate(outputs)

    def latency(self, x: np.ndarray | None = None, *, repeat: int = 30,
                warmup: int = 3) -> Latency:
        """Median latency of ``main`` on the host after ``warmup`` runs."""
        if x is None:
            x = np.random.default_rng(0).standard_normal(self.spec.shape).astype(self.spec.dtype)
        arg = tvm.runtime.tensor(self.check_input(x))
        for _ in range(warmup):
            self.vm["main"](arg)
        timer = self.vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat)
        return latency_stats(list(timer(arg).results))

    def export(self, path: str | Path, **kwargs: Any) -> Path:
        """Write the compiled library (``.so``), cross-compiled for aarch64 targets; kwargs go to
        ``export_library``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fcompile = export_compiler(self.target)
        if fcompile is not None:
            kwargs.setdefault("fcompile", fcompile)
        self.executable.export_library(str(path), **kwargs)
        return path


SCHEDULES = ("default", "none")


def build(model: Model | tvm.IRModule, *, target: str | dict[str, Any] = "x86",
          input_spec: InputSpec | None = None, schedule: str = "default",
          database: str | Path | bool | None = None, pack_weights: bool = True) -> CompiledModel:
    """Compile a model for a target preset.

    Parameters
    ----------
    model : Model or IRModule
        An IRModule needs ``input_spec`` (its single input's name, shape, dtype).
    target : str or dict
        A preset name (``tvm_compress.backend.targets.preset_names()``) or a TVM target dict.
    schedule : {"default", "none"}
        ``"default"``: our untuned CPU schedules (``tvm_compress.backend.schedules``) on CPU
        targets;
        GPU targets get TVM's dlight defaults. ``"none"``: TVM's plain pipeline (the baseline).
    database : path, bool or None
        Meta-schedule tuning databases for ``schedule="default"`` on CPU targets. None: the
        ones found for the target (``tvm-compress tune``'s cache, then the databases shipped
        with the package; ``tuning_ms.database_dirs``); a path: that database only; False:
        none (untuned default schedules). Functions not in a database keep the default schedule.
    pack_weights : bool
        CPU targets: store sub-8-bit integer weights bit-packed in the artifact and unpack them
        inside the graph (``passes.pack_constants``; exact, about 1 ns per weight per call).
    """
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    tgt = resolve_target(target)
    if isinstance(model, Model):
        mod = model.mod
        spec = InputSpec(model.input_name, model.input_shape, model.input_dtype)
    else:
        if input_spec is None:
            raise UserError("build(IRModule) needs input_spec=InputSpec(name, shape, dtype)")
        mod, spec = model, input_spec
    if schedule == "default" and tgt.kind.name == "llvm":
        from tvm_compress.backend.databases import count_tuned, databases_for
        from tvm_compress.backend.report import kernel_infos
        from tvm_compress.backend.schedules import default_schedule_pipeline

        mod = default_schedule_pipeline(tgt, databases_for(tgt, database))(mod)
        tuned = count_tuned(mod)
        kernels = kernel_infos(mod)
    else:
        tuned, kernels = 0, None
    if pack_weights and tgt.kind.name == "llvm":
        from tvm_compress.passes.pack_constants import PackConstants

        mod = PackConstants()(mod)
    executable = tvm.compile(mod, target=tgt)
    compiled = CompiledModel(executable, tgt, spec)
    compiled.tuned_functions = tuned  # functions scheduled from a tuning database
    compiled.kernels = kernels
    return compiled
