"""The shipped Quantune prior (the zoo sweep's records): it parses, it is a real measurement, and
Quantune trained on it beats random search on a held-out model (replayed ground truth)."""

from __future__ import annotations

import numpy as np
import pytest

from tvm_compress.tuning.quantune.space import SearchSpace
from tvm_compress.tuning.quantune.tuner import SHIPPED_PRIOR
from tvm_compress.tuning.records import read_records
from tvm_compress.tuning.replay import ReplayEvaluator, group_records
from tvm_compress.tuning.search import search


@pytest.fixture(scope="module")
def shipped():
    records = read_records(SHIPPED_PRIOR)
    groups = group_records(records)
    space = SearchSpace.paper(calib_available=1000)
    complete = [m for m, recs in groups.items()
                if m.startswith("zoo:fmnist") and ReplayEvaluator(recs).covers(space)]
    return records, groups, space, complete


def test_shipped_prior_is_a_real_sweep(shipped) -> None:
    records, groups, space, complete = shipped
    assert complete, "the shipped prior must hold at least one fully swept zoo model"
    for model in complete:
        ev = ReplayEvaluator(groups[model])
        accs = np.array([ev.truth(k).accuracy for k in space])
        base = ev.baseline().accuracy
        assert 0.85 < base < 0.97  # the zoo models are ~92% on Fashion-MNIST
        # quantization matters: the 96 configurations do not all measure the same
        assert accs.max() - accs.min() > 0.02
        assert all(r.knobs is None or r.result.seconds > 0 for r in groups[model])


def test_replay_refuses_unmeasured_configs(shipped) -> None:
    _, groups, _, _ = shipped
    ext = SearchSpace.extended(calib_available=1000).restrict(clipping=("mse",))
    ev = ReplayEvaluator(next(iter(groups.values())))
    with pytest.raises(LookupError):
        ev.evaluate(ext[0])  # MSE clipping is outside the paper space: never measured


def _trials_to_best(trials, best: float) -> int:
    """1-based trial at which the exhaustive best was first reached (97: not within the trials)."""
    return next((i + 1 for i, t in enumerate(trials) if t.result.accuracy >= best - 1e-9), 97)


def test_quantune_with_shipped_prior_beats_random_on_held_out_model(shipped) -> None:
    records, groups, space, complete = shipped
    held = complete[0]
    truth = ReplayEvaluator(groups[held])
    best = max(truth.truth(k).accuracy for k in space)
    prior = [r for r in records if r.model != held]
    assert any(r.knobs is not None for r in prior), "the prior must hold other models"

    # the measure: trials until the search first reaches the exhaustive best
    q = search(ReplayEvaluator(groups[held]), space, tuner="quantune", trials=12, prior=prior,
               tuner_options={"rounds": 60})
    rand = [search(ReplayEvaluator(groups[held]), space, tuner="random", seed=s, trials=96)
            for s in range(10)]
    q_trials = _trials_to_best(q.trials, best)
    r_trials = float(np.mean([_trials_to_best(r.trials, best) for r in rand]))
    assert q_trials < r_trials, (q_trials, r_trials)
