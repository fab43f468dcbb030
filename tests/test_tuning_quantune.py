"""Quantune: XGBoost-guided search with a prior from other models beats the baselines.

The evaluator is synthetic: accuracy is a known function of the knobs and the model
descriptors (``tvm_compress.tuning.synthetic``), with a unique best configuration per model.
The prior is the full record set of the *other* synthetic models (leave-one-model-out).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tvm_compress.errors import UserError
from tvm_compress.tuning.quantune.space import SearchSpace
from tvm_compress.tuning.quantune.tuner import QuantuneTuner
from tvm_compress.tuning.records import Record, read_records
from tvm_compress.tuning.search import search
from tvm_compress.tuning.synthetic import SYNTHETIC_MODELS, SyntheticEvaluator
from tvm_compress.tuning.tuner import Objective, Task, make_tuner

SPACE = SearchSpace.paper()


@pytest.fixture(scope="module")
def sweep() -> dict[str, list[Record]]:
    """Every configuration of every synthetic model, measured (as a zoo sweep would)."""
    out = {}
    for name in SYNTHETIC_MODELS:
        ev = SyntheticEvaluator(name)
        ev.baseline()
        for k in SPACE:
            ev.evaluate(k)
        out[name] = list(ev.records)
    return out


def _prior(sweep: dict[str, list[Record]], leave_out: str) -> list[Record]:
    return [r for name, rows in sweep.items() if name != leave_out for r in rows]


def _trials_to_best(name: str, tuner: str, seed: int, **options: object) -> int:
    ev = SyntheticEvaluator(name)
    best = max(ev.true_accuracy(k) for k in SPACE)
    task = Task(ev.model_id, ev.descriptors, Objective(), ev.baseline())
    t = make_tuner(tuner, SPACE, task, seed=seed, **options)
    for i in range(1, len(SPACE) + 1):
        (k,) = t.propose(1)
        r = ev.evaluate(k)
        t.update([k], [r])
        if r.accuracy >= best:
            return i
    raise AssertionError("the best configuration was never measured")


@pytest.mark.parametrize("target", ["mobilenet_v2", "vgg"])
def test_quantune_with_prior_finds_the_best_config_in_fewer_trials(
        sweep: dict[str, list[Record]], target: str) -> None:
    prior = _prior(sweep, target)
    seeds = range(3)
    quantune = [_trials_to_best(target, "quantune", s, prior=prior) for s in seeds]
    rank = [_trials_to_best(target, "quantune", s, prior=prior, variant="rank", rounds=100)
            for s in seeds]
    random = [_trials_to_best(target, "random", s) for s in range(10)]
    genetic = [_trials_to_best(target, "genetic", s) for s in range(10)]
    assert np.mean(quantune) * 4 < np.mean(random)
    assert np.mean(quantune) < np.mean(genetic)
    assert np.mean(rank) * 4 < np.mean(random)
    assert max(quantune) <= 10


def test_quantune_without_prior_still_beats_random() -> None:
    cold = [_trials_to_best("shufflenet_v2", "quantune", s, rounds=50) for s in range(3)]
    random = [_trials_to_best("shufflenet_v2", "random", s) for s in range(10)]
    assert np.mean(cold) * 2 < np.mean(random)


def test_prior_leaves_out_the_tuned_model_and_reads_files(
        sweep: dict[str, list[Record]], tmp_path: Path) -> None:
    ev = SyntheticEvaluator("resnet")
    task = Task(ev.model_id, ev.descriptors, Objective(), ev.baseline())
    everything = [r for rows in sweep.values() for r in rows]
    assert QuantuneTuner(SPACE, task, prior=everything).prior_models == 5
    assert QuantuneTuner(SPACE, task, prior=sweep["resnet"]).prior_models == 0
    path = tmp_path / "prior.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in _prior(sweep, "resnet")))
    from_file = QuantuneTuner(SPACE, task, prior=str(path), rounds=20)
    in_memory = QuantuneTuner(SPACE, task, prior=read_records(path), rounds=20)
    assert from_file.prior_models == 5
    assert from_file.propose(3) == in_memory.propose(3)
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(UserError, match=r"prior\.jsonl:486: not valid JSON"):
        QuantuneTuner(SPACE, task, prior=path)


def test_mismatched_prior_warns_and_continues_without_it(
        sweep: dict[str, list[Record]]) -> None:
    ev = SyntheticEvaluator("googlenet")
    task = Task(ev.model_id, ev.descriptors, Objective(), ev.baseline())
    foreign = [Record(**{**r.__dict__, "descriptors": {"layers": 3.0}})
               for r in _prior(sweep, "googlenet")]
    with pytest.warns(UserWarning, match="continuing without the prior"):
        tuner = QuantuneTuner(SPACE, task, prior=foreign, seed=4, rounds=20)
    assert tuner.prior_models == 0
    plain = QuantuneTuner(SPACE, task, seed=4, rounds=20)
    assert tuner.propose(2) == plain.propose(2)
    no_baseline = [r for r in _prior(sweep, "googlenet") if not r.is_baseline]
    with pytest.warns(UserWarning, match="has no fp32 record"):
        assert QuantuneTuner(SPACE, task, prior=no_baseline).prior_models == 0
    with pytest.warns(UserWarning, match="no model descriptors"):
        QuantuneTuner(SPACE, Task(), prior=_prior(sweep, "googlenet"))


def test_search_with_prior_stops_early_within_the_drop(sweep: dict[str, list[Record]]) -> None:
    ev = SyntheticEvaluator("squeezenet")
    res = search(ev, SPACE, tuner="quantune", trials=96, max_drop=0.1,
                 prior=_prior(sweep, "squeezenet"))
    assert res.stopped == "target"
    assert len(res.trials) <= 3 and res.drop(res.best) <= 0.1
    grid = search(SyntheticEvaluator("squeezenet"), SPACE, tuner="grid", trials=96,
                  max_drop=0.1)
    assert len(grid.trials) > 3 * len(res.trials)


def test_bad_options() -> None:
    with pytest.raises(UserError, match="unknown Quantune variant"):
        QuantuneTuner(SPACE, variant="lambdamart")
    with pytest.raises(UserError, match="rounds >= 1"):
        QuantuneTuner(SPACE, rounds=0)
    with pytest.raises(UserError, match="nothing to learn from"):
        QuantuneTuner(SPACE).predict(list(SPACE)[:2])
