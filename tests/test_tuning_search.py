"""Search loop stop rules and objectives, tuner registry and the baseline tuners."""

from __future__ import annotations

import json
import time

import pytest

from tvm_compress.errors import UserError
from tvm_compress.quant.config import QuantConfig
from tvm_compress.tuning.quantune.space import Knobs, SearchSpace
from tvm_compress.tuning.records import Result
from tvm_compress.tuning.search import search
from tvm_compress.tuning.synthetic import SyntheticEvaluator
from tvm_compress.tuning.tuner import (
    Objective,
    Task,
    Tuner,
    make_tuner,
    register_tuner,
    tuner_names,
)

SPACE = SearchSpace.paper()
BASELINES = ("random", "grid", "genetic")


def test_registry_lists_names_and_rejects_duplicates() -> None:
    assert set(tuner_names()) >= {"quantune", "random", "grid", "genetic"}
    with pytest.raises(UserError, match="unknown tuner 'bayes'; valid names: genetic, grid"):
        make_tuner("bayes", SPACE)

    class Again(Tuner):
        name = "random"

        def _propose(self, n: int) -> list[Knobs]:
            return []

    with pytest.raises(ValueError, match="already registered"):
        register_tuner(Again)
    with pytest.raises(UserError, match="bad options for tuner 'grid'"):
        make_tuner("grid", SPACE, population=3)


@pytest.mark.parametrize("name", BASELINES)
def test_tuners_are_seeded_and_never_repeat(name: str) -> None:
    ev = SyntheticEvaluator("squeezenet")
    task = Task(ev.model_id, ev.descriptors, Objective(), ev.baseline())

    def run(seed: int) -> list[Knobs]:
        tuner = make_tuner(name, SPACE, task, seed=seed)
        seen: list[Knobs] = []
        while picks := tuner.propose(7):
            tuner.update(picks, [ev.evaluate(k) for k in picks])
            seen.extend(picks)
        return seen

    first = run(1)
    assert len(first) == 96 and len(set(first)) == 96
    assert run(1) == first
    if name == "grid":
        assert first == list(SPACE)
    else:
        assert run(2) != first


def test_genetic_exploits_what_it_measured() -> None:
    """After its random initial population, children come from good parents: over the next
    generations the genetic tuner measures better configs than random does."""
    ev = SyntheticEvaluator("mobilenet_v2")
    base = ev.baseline()
    task = Task(ev.model_id, ev.descriptors, Objective(), base)

    def mean_accuracy_of_trials_9_to_32(name: str, seed: int) -> float:
        tuner = make_tuner(name, SPACE, task, seed=seed)
        accs = []
        for _ in range(32):
            (k,) = tuner.propose(1)
            r = ev.evaluate(k)
            tuner.update([k], [r])
            accs.append(r.accuracy)
        return sum(accs[8:]) / 24

    genetic = [mean_accuracy_of_trials_9_to_32("genetic", s) for s in range(4)]
    rand = [mean_accuracy_of_trials_9_to_32("random", s) for s in range(4)]
    assert sum(genetic) > sum(rand)


def test_budgets_are_checked() -> None:
    ev = SyntheticEvaluator("vgg")
    with pytest.raises(UserError, match="trial budget must be at least 1"):
        search(ev, SPACE, tuner="grid", trials=0)
    with pytest.raises(UserError, match="time budget must be positive"):
        search(ev, SPACE, tuner="grid", trials=3, time_budget_s=0)
    with pytest.raises(UserError, match="prior is only used by the quantune tuner"):
        search(ev, SPACE, tuner="grid", trials=3, prior=[])


def test_trial_budget_and_exhaustion() -> None:
    sub = SPACE.restrict(clipping=("kl",), granularity=("per_channel",), precision=("int8",))
    res = search(SyntheticEvaluator("vgg"), SPACE, tuner="random", trials=5)
    assert res.stopped == "trials" and len(res.trials) == 5
    res = search(SyntheticEvaluator("vgg"), sub, tuner="grid", trials=50)
    assert res.stopped == "exhausted" and [t.knobs for t in res.trials] == list(sub)
    assert res.best is not None
    assert res.best.result.accuracy == max(t.result.accuracy for t in res.trials)


def test_tolerated_drop_stops_at_the_first_config_within_it() -> None:
    ev = SyntheticEvaluator("googlenet")
    res = search(ev, SPACE, tuner="grid", trials=96, max_drop=0.5)
    assert res.stopped == "target"
    last = res.trials[-1]
    assert res.drop(last) <= 0.5
    assert all(res.drop(t) > 0.5 for t in res.trials[:-1])
    assert res.best == last
    payload = json.loads(json.dumps(res.to_dict()))
    assert payload["best"]["feasible"] and payload["best"]["config"]["calib_samples"] == 1000
    assert payload["stopped"] == "target" and payload["trials_total"] == len(res.trials)


def test_time_budget_stops_the_search() -> None:
    class Slow(SyntheticEvaluator):
        def measure(self, knobs: Knobs, config: QuantConfig) -> Result:
            time.sleep(0.05)
            return super().measure(knobs, config)

    res = search(Slow("vgg"), SPACE, tuner="grid", trials=96, time_budget_s=0.01)
    assert res.stopped == "time" and len(res.trials) == 1


@pytest.mark.parametrize("metric", ["latency", "size"])
def test_latency_and_size_objectives_respect_the_drop(metric: str) -> None:
    ev = SyntheticEvaluator("resnet", measure_latency=True)
    space = SearchSpace.extended()
    res = search(ev, space, tuner="grid", trials=400, objective=metric, max_drop=0.5)
    assert res.stopped == "exhausted" and len(res.trials) == len(space)
    feasible = [t for t in res.trials if res.drop(t) <= 0.5]
    value = (lambda t: t.result.latency_ms) if metric == "latency" else \
        (lambda t: t.result.weight_bytes)
    assert res.best is not None and res.drop(res.best) <= 0.5
    assert value(res.best) == min(value(t) for t in feasible)
    # the unconstrained minimum is cheaper than what the drop allows here
    assert min(value(t) for t in res.trials) < value(res.best)


def test_objective_errors() -> None:
    with pytest.raises(UserError, match="needs a tolerated accuracy drop"):
        Objective("latency")
    with pytest.raises(UserError, match="unknown objective"):
        Objective("energy", 1.0)
    with pytest.raises(UserError, match=">= 0"):
        Objective("accuracy", -1.0)
    with pytest.raises(UserError, match="measure_latency=True"):
        search(SyntheticEvaluator("vgg"), SPACE, objective="latency", max_drop=1.0, trials=2)
