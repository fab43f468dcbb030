"""The search loop: baseline, propose, evaluate (cached + recorded), tell, stop.

Stop rules, checked before each proposal: the trial budget (trials replayed from the records
count, so a resumed search stops where the uninterrupted one would), the time budget (the
recorded measuring time of replayed trials counts too), the space running out, and, for the
objective "accuracy" with a tolerated drop, the first configuration within that drop.

Because tuners are seeded and deterministic given their results, rerunning an interrupted search
with the same arguments replays the recorded trials without measuring them again and then
continues exactly as the uninterrupted search would have.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvm_compress.errors import UserError
from tvm_compress.tuning.evaluator import Evaluator
from tvm_compress.tuning.quantune.space import Knobs, SearchSpace, config_key
from tvm_compress.tuning.records import Record, Result
from tvm_compress.tuning.tuner import Objective, Task, Tuner, make_tuner


@dataclass(frozen=True)
class Trial:
    """One evaluated configuration of a search, in order."""

    index: int
    knobs: Knobs
    result: Result
    replayed: bool  # taken from the records, not measured by this run


@dataclass
class SearchResult:
    """Everything a search found; :meth:`to_dict` is the CLI's ``--json`` payload."""

    tuner: str
    seed: int
    objective: Objective
    baseline: Result
    trials: list[Trial]
    best: Trial | None          # see best_trial
    stopped: str                # "target", "trials", "time" or "exhausted"
    mixed_layers: tuple[str, ...] = ()

    def drop(self, trial: Trial) -> float:
        """Accuracy drop of a trial versus fp32, in percentage points."""
        return self.objective.drop(trial.result, self.baseline)

    def _trial_dict(self, t: Trial) -> dict[str, Any]:
        config = t.knobs.config(self.mixed_layers)
        return {"index": t.index, "knobs": t.knobs.to_dict(), "label": t.knobs.key,
                "key": config_key(config), "result": t.result.to_dict(),
                "drop_pct": round(self.drop(t), 4),
                "feasible": self.objective.feasible(t.result, self.baseline),
                "replayed": t.replayed}

    def to_dict(self) -> dict[str, Any]:
        best = None
        if self.best is not None:
            best = {**self._trial_dict(self.best),
                    "config": self.best.knobs.config(self.mixed_layers).to_dict()}
        return {"tuner": self.tuner, "seed": self.seed,
                "objective": {"metric": self.objective.metric,
                              "max_drop_pct": self.objective.max_drop},
                "baseline": self.baseline.to_dict(), "stopped": self.stopped,
                "trials_total": len(self.trials),
                "trials_measured": sum(not t.replayed for t in self.trials),
                "best": best, "trials": [self._trial_dict(t) for t in self.trials]}


def run_search(tuner: Tuner, evaluator: Evaluator, *, trials: int,
               time_budget_s: float | None = None, batch: int = 1,
               on_trial: Callable[[Trial], None] | None = None) -> tuple[list[Trial], str]:
    """The bare loop over an already built tuner; returns the trials and the stop reason."""
    _check_budgets(trials, time_budget_s, batch)
    objective, baseline = tuner.task.objective, tuner.task.baseline
    done: list[Trial] = []
    spent, start = 0.0, time.monotonic()
    while True:
        if len(done) >= trials:
            return done, "trials"
        if time_budget_s is not None and spent + time.monotonic() - start >= time_budget_s:
            return done, "time"
        proposals = tuner.propose(min(batch, trials - len(done)))
        if not proposals:
            return done, "exhausted"
        results = []
        for knobs in proposals:
            replayed = evaluator.cached(knobs) is not None
            result = evaluator.evaluate(knobs)
            if replayed:  # the time it took when it was measured counts toward the budget
                spent += result.seconds
            trial = Trial(len(done), knobs, result, replayed)
            done.append(trial)
            results.append(result)
            if on_trial is not None:
                on_trial(trial)
        tuner.update(proposals, results)
        if objective.metric == "accuracy" and objective.max_drop is not None and any(
                objective.feasible(r, baseline) for r in results):
            return done, "target"


def _check_budgets(trials: int, time_budget_s: float | None, batch: int) -> None:
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise UserError(f"the trial budget must be at least 1 (got {trials!r}); pass --trials N")
    if time_budget_s is not None and not time_budget_s > 0:
        raise UserError(f"the time budget must be positive seconds, got {time_budget_s!r}")
    if batch < 1:
        raise UserError(f"the batch of proposals must be at least 1, got {batch}")


def best_trial(trials: Iterable[Trial], objective: Objective, baseline: Result) -> Trial | None:
    """The most accurate trial ("accuracy"), or the fastest / smallest one within the tolerated
    drop ("latency" / "size"); earliest among equals; None when there is none."""
    best: Trial | None = None
    for t in trials:
        if not objective.feasible(t.result, baseline) and objective.metric != "accuracy":
            continue
        if t.result.error is not None:
            continue
        if best is None or objective.score(t.result, baseline) > \
                objective.score(best.result, baseline):
            best = t
    return best


def search(evaluator: Evaluator, space: SearchSpace, *, tuner: str = "quantune", seed: int = 0,
           trials: int = 96, objective: str = "accuracy", max_drop: float | None = None,
           time_budget_s: float | None = None, prior: Iterable[Record] | str | Path | None = None,
           batch: int = 1, tuner_options: Mapping[str, Any] | None = None,
           on_trial: Callable[[Trial], None] | None = None) -> SearchResult:
    """Search a space of PTQ configurations for one model.

    Parameters
    ----------
    evaluator : Evaluator
        Measures (and records) configurations; its records make a rerun resume.
    space : SearchSpace
        E.g. ``SearchSpace.paper(calib_available=len(calib))``.
    tuner : str
        A registered tuner (``tuner_names()``): "quantune", "random", "grid", "genetic".
    trials : int
        Trial budget (>= 1), replayed trials included.
    objective : {"accuracy", "latency", "size"}
    max_drop : float, optional
        Tolerated accuracy drop versus fp32 in percentage points. With "accuracy" the search
        stops at the first configuration within it; "latency"/"size" require it.
    time_budget_s : float, optional
        Stop proposing once this much measuring time is spent.
    prior : records or records file, optional
        Quantune's prior (records of other models); an error with any other tuner.
    """
    obj = Objective(objective, max_drop)
    _check_budgets(trials, time_budget_s, batch)
    if objective == "latency" and not evaluator.measure_latency:
        raise UserError("objective 'latency' needs an evaluator that measures latency "
                        "(measure_latency=True)")
    options = dict(tuner_options or {})
    if prior is not None:
        if tuner != "quantune":
            raise UserError(f"a prior is only used by the quantune tuner, not {tuner!r}")
        options["prior"] = prior
    baseline = evaluator.baseline()
    task = Task(model_id=evaluator.model_id, descriptors=evaluator.descriptors, objective=obj,
                baseline=baseline)
    built = make_tuner(tuner, space, task, seed=seed, **options)
    done, stopped = run_search(built, evaluator, trials=trials, time_budget_s=time_budget_s,
                               batch=batch, on_trial=on_trial)
    return SearchResult(tuner=tuner, seed=seed, objective=obj, baseline=baseline, trials=done,
                        best=best_trial(done, obj, baseline), stopped=stopped,
                        mixed_layers=evaluator.mixed_layers)
