"""The ask/tell tuner interface, the objective it maximizes, and the tuner registry.

A tuner proposes points of a :class:`SearchSpace` (``propose(n)``) and is told what they measured
(``update(knobs, results)``). It maximizes one scalar, :meth:`Task.score`, so the same tuner
serves the objectives "accuracy" (the accuracy, relative to fp32) and "latency"/"size" (smaller is
better among configurations within the tolerated accuracy drop). Every tuner is seeded: the
same seed and the same results give the same proposals.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tvm_compress.errors import UserError
from tvm_compress.tuning.quantune.space import Knobs, SearchSpace
from tvm_compress.tuning.records import Result

METRICS = ("accuracy", "latency", "size")
_FAILED_SCORE = -1e6


@dataclass(frozen=True)
class Objective:
    """What a search optimizes.

    Parameters
    ----------
    metric : {"accuracy", "latency", "size"}
        "accuracy": maximize validation accuracy. "latency" / "size": minimize median latency /
        weight bytes among configurations whose accuracy drop is within ``max_drop``.
    max_drop : float, optional
        Tolerated accuracy drop versus fp32, in percentage points (0.5 = half a point).
        Required for "latency" and "size".
    """

    metric: str = "accuracy"
    max_drop: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise UserError(f"unknown objective {self.metric!r}; choose one of "
                            f"{', '.join(METRICS)}")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise UserError(f"the tolerated accuracy drop must be >= 0 percentage points, got "
                            f"{self.max_drop}")
        if self.metric != "accuracy" and self.max_drop is None:
            raise UserError(f"objective {self.metric!r} needs a tolerated accuracy drop "
                            "(max_drop / --max-drop), else the smallest model wins at any accuracy")

    def drop(self, result: Result, baseline: Result) -> float:
        """Accuracy lost versus fp32, in percentage points."""
        return 100.0 * (baseline.accuracy - result.accuracy)

    def feasible(self, result: Result, baseline: Result | None) -> bool:
        """No error, and within the tolerated drop when there is one."""
        if result.error is not None:
            return False
        if self.max_drop is None or baseline is None:
            return True
        return self.drop(result, baseline) <= self.max_drop + 1e-9

    def value(self, result: Result) -> float:
        """The minimized quantity of "latency" / "size"."""
        value = result.latency_ms if self.metric == "latency" else result.weight_bytes
        if value is None:
            need = "latency (measure_latency=True)" if self.metric == "latency" else "weight bytes"
            raise UserError(f"objective {self.metric!r} needs results with {need}")
        return float(value)

    def score(self, result: Result, baseline: Result | None = None) -> float:
        """Larger is better. Accuracy scores are relative to fp32 so that models compare."""
        if result.error is not None:
            return _FAILED_SCORE
        if self.metric == "accuracy":
            return result.accuracy - (baseline.accuracy if baseline is not None else 0.0)
        if not self.feasible(result, baseline):
            # below every feasible score, still ordered by accuracy
            return -100.0 - (self.drop(result, baseline) if baseline is not None else 0.0)
        base = self.value(baseline) if baseline is not None else 1.0
        return -self.value(result) / max(base, 1e-12)


@dataclass(frozen=True)
class Task:
    """What a tuner knows about the problem: the model, the objective and the fp32 result."""

    model_id: str = ""
    descriptors: Mapping[str, float] = field(default_factory=dict)
    objective: Objective = field(default_factory=Objective)
    baseline: Result | None = None

    def score(self, result: Result) -> float:
        return self.objective.score(result, self.baseline)


class Tuner(ABC):
    """Ask/tell search over a :class:`SearchSpace`.

    Subclasses set ``name`` and implement :meth:`_propose`, returning up to ``n`` distinct points
    that are neither measured nor pending.
    """

    name: ClassVar[str] = ""

    def __init__(self, space: SearchSpace, task: Task | None = None, *, seed: int = 0) -> None:
        if len(space) == 0:
            raise UserError("the search space is empty")
        self.space = space
        self.task = task or Task()
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.history: dict[Knobs, Result] = {}   # in the order results arrived
        self.pending: dict[Knobs, None] = {}

    def propose(self, n: int = 1) -> list[Knobs]:
        """Up to ``n`` untried points (fewer, possibly none, when the space is exhausted)."""
        if n < 1:
            raise UserError(f"propose(n) needs n >= 1, got {n}")
        left = len(self.untried())
        picks = self._propose(min(n, left)) if left else []
        for k in picks:
            self.pending[k] = None
        return picks

    def update(self, knobs: Sequence[Knobs], results: Sequence[Result]) -> None:
        """Tell the tuner what ``knobs`` measured (also points it did not propose)."""
        if len(knobs) != len(results):
            raise UserError(f"update got {len(knobs)} configs but {len(results)} results")
        for k, r in zip(knobs, results, strict=True):
            if k not in self.space:
                raise UserError(f"configuration {k.key} is not in this tuner's search space")
            self.pending.pop(k, None)
            self.history[k] = r
        self._update(list(knobs), list(results))

    def untried(self) -> list[Knobs]:
        """Points neither measured nor pending, in enumeration order."""
        return [k for k in self.space if k not in self.history and k not in self.pending]

    def score(self, result: Result) -> float:
        return self.task.score(result)

    def best(self) -> tuple[Knobs, Result] | None:
        """The best measured point so far (earliest among equals)."""
        if not self.history:
            return None
        return max(self.history.items(), key=lambda kv: self.score(kv[1]))

    @abstractmethod
    def _propose(self, n: int) -> list[Knobs]:
        """Up to ``n`` distinct untried points; ``n`` never exceeds ``len(self.untried())``."""

    def _update(self, knobs: list[Knobs], results: list[Result]) -> None:  # noqa: B027
        """Hook for tuners that learn from results (``history`` is already updated)."""


# --------------------------------------------------------------------------------- registry

_TUNERS: dict[str, type[Tuner]] = {}
_BUILTIN_MODULES = ("tvm_compress.tuning.baselines", "tvm_compress.tuning.quantune.tuner")


def register_tuner(cls: type[Tuner]) -> type[Tuner]:
    """Class decorator adding a tuner under ``cls.name``; a second tuner of that name raises."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name to register under")
    if cls.name in _TUNERS and _TUNERS[cls.name] is not cls:
        raise ValueError(f"a tuner named {cls.name!r} is already registered "
                         f"({_TUNERS[cls.name].__module__}.{_TUNERS[cls.name].__name__})")
    _TUNERS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def tuner_names() -> list[str]:
    """Names of the registered tuners."""
    _load_builtin()
    return sorted(_TUNERS)


def make_tuner(name: str, space: SearchSpace, task: Task | None = None, *, seed: int = 0,
               **options: Any) -> Tuner:
    """Construct a registered tuner by name (UserError listing the names if unknown)."""
    _load_builtin()
    if name not in _TUNERS:
        raise UserError(f"unknown tuner {name!r}; valid names: {', '.join(sorted(_TUNERS))}")
    try:
        return _TUNERS[name](space, task, seed=seed, **options)
    except TypeError as exc:
        raise UserError(f"bad options for tuner {name!r}: {exc}") from None

