"""Build a Relax module for a target preset and run it on the local Relax VM."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from tvm_compress.backend.targets import export_compiler, is_host_runnable, resolve_target
from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import Model
from tvm_compress.frontend.inputs import (
    InputSpec,
    Samples,
    as_feed,
    as_specs,
    batches,
    gather_outputs,
    random_feed,
)

__all__ = ["CompiledModel", "InputSpec", "Latency", "build", "latency_stats"]


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
    """A compiled executable plus its input contract; runs on the host VM when the target allows.

    ``spec`` is the model's input (or inputs, in ``main``'s order; ``self.spec`` is the first).
    """

    def __init__(self, executable: Any, target: tvm.target.Target,
                 spec: InputSpec | Sequence[InputSpec]) -> None:
        self.executable = executable
        self.target = target
        self.specs = as_specs(spec)
        self.spec = self.specs[0]
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

    def check_input(self, x: np.ndarray, spec: InputSpec | None = None) -> np.ndarray:
        spec = spec or self.spec
        if tuple(x.shape) != spec.shape:
            raise UserError(f"input '{spec.name}' has shape {tuple(x.shape)} but the model "
                            f"expects {spec.shape}; resize the data or re-import the model "
                            "with a matching shape/batch")
        if str(x.dtype) != spec.dtype:
            raise UserError(f"input '{spec.name}' has dtype {x.dtype} but the model expects "
                            f"{spec.dtype}; convert it with .astype('{spec.dtype}')")
        return np.ascontiguousarray(x)

    def _args(self, xs: tuple[Any, ...]) -> list[Any]:
        """VM arguments from arrays in input order, or from one {input name: array} dict."""
        if len(xs) == 1 and isinstance(xs[0], Mapping):
            feed = as_feed(xs[0], self.specs, "inputs")
            xs = tuple(feed[s.name] for s in self.specs)
        if len(xs) != len(self.specs):
            raise UserError(f"the model takes {len(self.specs)} input(s) "
                            f"({', '.join(s.name for s in self.specs)}); got {len(xs)}")
        return [tvm.runtime.tensor(self.check_input(np.asarray(x), s))
                for x, s in zip(xs, self.specs, strict=True)]

    def run_outputs(self, *xs: Any) -> list[np.ndarray]:
        """One forward pass: every output, in order (arrays in input order or one dict)."""
        return _flatten(self.vm["main"](*self._args(xs)))

    def run(self, *xs: Any) -> np.ndarray | list[np.ndarray]:
        """One forward pass; inputs must match the model's shapes and dtypes exactly. The output,
        or the list of outputs of a model with several."""
        outs = self.run_outputs(*xs)
        return outs[0] if len(outs) == 1 else outs

    def predict_outputs(self, data: Samples) -> list[np.ndarray]:
        """Every output for any number of samples (one array, or one per input name), run in
        batches of the model's batch size (the last one padded, its padded rows dropped)."""
        batch = self.spec.shape[0]
        chunks = [(self.run_outputs(chunk), n)
                  for chunk, n in batches(as_feed(data, self.specs), batch)]
        return gather_outputs(chunks, batch)

    def predict(self, data: Samples) -> np.ndarray | list[np.ndarray]:
        """:meth:`predict_outputs`; the single output of a one-output model as an array."""
        outs = self.predict_outputs(data)
        return outs[0] if len(outs) == 1 else outs

    def latency(self, x: Any = None, *, repeat: int = 30, warmup: int = 3) -> Latency:
        """Median latency of ``main`` on the host after ``warmup`` runs (``x``: one array, a
        {input name: array} dict, or None for random inputs)."""
        args = self._args((random_feed(self.specs) if x is None else x,))
        for _ in range(warmup):
            self.vm["main"](*args)
        timer = self.vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat)
        return latency_stats(list(timer(*args).results))

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


def _flatten(out: Any) -> list[np.ndarray]:
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    return [a for item in out for a in _flatten(item)]


def build(model: Model | tvm.IRModule, *, target: str | dict[str, Any] = "x86",
          input_spec: InputSpec | Sequence[InputSpec] | None = None, schedule: str = "default",
          database: str | Path | bool | None = None, pack_weights: bool = True) -> CompiledModel:
    """Compile a model for a target preset.

    Parameters
    ----------
    model : Model or IRModule
        An IRModule needs ``input_spec`` (its input's name, shape, dtype; a sequence for
        several inputs).
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
        CPU targets: store 2-6-bit integer weights bit-packed in the artifact and unpack them
        inside the graph (``passes.pack_constants``; exact, about 1 ns per weight per call).
    """
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    tgt = resolve_target(target)
    if isinstance(model, Model):
        mod = model.mod
        spec = model.inputs
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
