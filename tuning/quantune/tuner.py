"""Quantune (arXiv 2202.05048): an XGBoost model of accuracy guides the PTQ search.

Rows are (one-hot knobs + model descriptors) -> score, where the score is the objective's
(for "accuracy": accuracy minus the model's fp32 accuracy, so that models of different quality
share one scale). The model is first trained on the records of *other* models (the prior; the
paper's leave-one-model-out transfer), then the online loop predicts every untried
configuration, measures the best predicted, adds the result and retrains.

Two variants: ``"regression"`` (squared error, the paper's) and ``"rank"`` (``rank:pairwise``
with one query group per model: it learns the order of configurations within a model and so
ignores how accurate each model is overall).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from tvm_compress.errors import UserError
from tvm_compress.tuning.quantune.features import (
    DESCRIPTORS,
    descriptors_match,
    feature_matrix,
    feature_names,
)
from tvm_compress.tuning.quantune.space import Knobs, SearchSpace
from tvm_compress.tuning.records import Record, Result, baselines, read_records
from tvm_compress.tuning.tuner import Task, Tuner, register_tuner

VARIANTS = {"regression": "reg:squarederror", "rank": "rank:pairwise"}

# The zoo sweep's records (benchmarks/bench_quantune_sweep.py), shipped as the default prior.
SHIPPED_PRIOR = Path(__file__).resolve().parent / "prior" / "paper_space.jsonl"

# (features, scores, group) of one prior model
PriorGroup = tuple[np.ndarray, np.ndarray, str]


@register_tuner
class QuantuneTuner(Tuner):
    """XGBoost-guided search.

    Parameters
    ----------
    prior : records, or a records file path, optional
        Measured configurations of other models. Records of the model being tuned are left out
        (leave-one-model-out). A prior whose features do not match this version is dropped with
        a warning, and the search continues without it.
    variant : {"regression", "rank"}
    rounds : int
        Boosting rounds per (re)training (the paper uses about 200).
    initial : int
        Random configurations measured before the first model when there is no prior.
    own_weight : float
        Sample weight of the tuned model's own measurements relative to prior rows
        (regression only): they are few, and they are the ground truth for this model.
    """

    name = "quantune"

    def __init__(self, space: SearchSpace, task: Task | None = None, *, seed: int = 0,
                 prior: Iterable[Record] | str | Path | None = None,
                 variant: str = "regression", rounds: int = 200, initial: int = 2,
                 learning_rate: float = 0.1, max_depth: int = 6, own_weight: float = 4.0) -> None:
        super().__init__(space, task, seed=seed)
        if variant not in VARIANTS:
            raise UserError(f"unknown Quantune variant {variant!r}; choose one of "
                            f"{', '.join(VARIANTS)}")
        if rounds < 1 or initial < 1 or own_weight <= 0:
            raise UserError("Quantune needs rounds >= 1, initial >= 1 and own_weight > 0")
        self.variant, self.rounds, self.initial = variant, rounds, initial
        self.learning_rate, self.max_depth, self.own_weight = learning_rate, max_depth, own_weight
        self.descriptors = self._own_descriptors(prior is not None)
        records = read_records(prior) if isinstance(prior, str | Path) else list(prior or [])
        self.prior: list[PriorGroup] = self._prior_groups(records) if records else []
        self._booster: Any = None
        self._fitted_on = -1  # len(history) the booster was trained with

    # ------------------------------------------------------------------------------ prior
    def _own_descriptors(self, has_prior: bool) -> dict[str, float]:
        if descriptors_match(self.task.descriptors):
            return dict(self.task.descriptors)
        if has_prior:
            warnings.warn("Quantune: the tuned model has no model descriptors "
                          f"({', '.join(DESCRIPTORS)}); the prior cannot be matched to it and "
                          "is not used", stacklevel=3)
        return dict.fromkeys(DESCRIPTORS, 0.0)

    def _prior_groups(self, records: list[Record]) -> list[PriorGroup]:
        if not descriptors_match(self.task.descriptors):
            return []
        trials = [r for r in records if not r.is_baseline and r.model_id != self.task.model_id]
        bad = [r for r in trials if not descriptors_match(r.descriptors)]
        if bad:
            warnings.warn(f"Quantune: prior record of {bad[0].model} has model features "
                          f"{sorted(bad[0].descriptors)}, expected {list(DESCRIPTORS)}; "
                          "continuing without the prior", stacklevel=3)
            return []
        base = baselines(records)
        groups: dict[tuple[str, str, str], list[Record]] = {}
        for r in trials:
            groups.setdefault(r.identity[:3], []).append(r)
        out = []
        for ident, rows in groups.items():
            scored = self._score_prior(rows, base.get(ident))
            if scored is not None:
                out.append(scored)
        return out

    def _score_prior(self, rows: list[Record], baseline: Result | None) -> PriorGroup | None:
        name = rows[0].model
        if baseline is None and self.variant == "regression":
            warnings.warn(f"Quantune: prior model {name} has no fp32 record; its {len(rows)} "
                          "records are not used (regression scores are relative to fp32)",
                          stacklevel=4)
            return None
        latest = list({r.key: r for r in rows}.values())  # a re-measurement supersedes
        try:
            y = [self.task.objective.score(r.result, baseline) for r in latest]
        except UserError as exc:
            warnings.warn(f"Quantune: prior model {name} cannot be scored ({exc}); its records "
                          "are not used", stacklevel=4)
            return None
        x = feature_matrix([r.knobs for r in latest if r.knobs is not None], rows[0].descriptors)
        return x, np.asarray(y, dtype=np.float32), rows[0].model_id

    @property
    def prior_models(self) -> int:
        return len(self.prior)

    # ------------------------------------------------------------------------------ model
    def _training_set(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        own = list(self.history)
        xs = [g[0] for g in self.prior] + [feature_matrix(own, self.descriptors)]
        ys = [g[1] for g in self.prior] + [np.asarray([self.score(self.history[k]) for k in own],
                                                      dtype=np.float32)]
        ws = [np.ones(len(g[1]), np.float32) for g in self.prior] + \
            [np.full(len(own), self.own_weight, np.float32)]
        sizes = [len(y) for y in ys if len(y)]
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws), sizes

    def _fit(self) -> None:
        import xgboost as xgb

        x, y, w, sizes = self._training_set()
        if len(y) == 0:
            raise UserError("Quantune has nothing to learn from yet: give a prior or measure "
                            "some configurations first")
        params = {"objective": VARIANTS[self.variant], "eta": self.learning_rate,
                  "max_depth": self.max_depth, "seed": self.seed, "nthread": 1,
                  "verbosity": 0}
        if self.variant == "rank":
            dtrain = xgb.DMatrix(x, label=y, feature_names=feature_names())
            dtrain.set_group(sizes)
        else:
            dtrain = xgb.DMatrix(x, label=y, weight=w, feature_names=feature_names())
        self._booster = xgb.train(params, dtrain, num_boost_round=self.rounds)
        self._fitted_on = len(self.history)

    def predict(self, points: list[Knobs]) -> np.ndarray:
        """Predicted score of each point (trains first when results arrived since)."""
        import xgboost as xgb

        if self._fitted_on != len(self.history):
            self._fit()
        x = feature_matrix(points, self.descriptors)
        return self._booster.predict(xgb.DMatrix(x, feature_names=feature_names()))

    def _propose(self, n: int) -> list[Knobs]:
        untried = self.untried()
        if not self.prior and len(self.history) < self.initial:
            order = self.rng.permutation(len(untried))
            return [untried[i] for i in order[:n]]
        predicted = self.predict(untried)
        # ties go to the earlier point in enumeration order, so proposals are deterministic
        order = sorted(range(len(untried)), key=lambda i: (-float(predicted[i]), i))
        return [untried[i] for i in order[:n]]
