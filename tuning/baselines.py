"""Baseline tuners Quantune is compared with: random, grid (fixed order) and a genetic algorithm.

All three run on the same evaluator and the same ask/tell interface as Quantune, and all are
seeded (grid ignores the seed: its order is the space's enumeration order).
"""

from __future__ import annotations

from dataclasses import replace

from tvm_compress.errors import UserError
from tvm_compress.tuning.quantune.space import KNOB_NAMES, Knobs, SearchSpace
from tvm_compress.tuning.tuner import Task, Tuner, register_tuner


@register_tuner
class RandomTuner(Tuner):
    """Untried points in one seeded random permutation of the space."""

    name = "random"

    def __init__(self, space: SearchSpace, task: Task | None = None, *, seed: int = 0) -> None:
        super().__init__(space, task, seed=seed)
        self._order = [space[i] for i in self.rng.permutation(len(space))]

    def _propose(self, n: int) -> list[Knobs]:
        picks = [k for k in self._order if k not in self.history and k not in self.pending]
        return picks[:n]


@register_tuner
class GridTuner(Tuner):
    """Untried points in the space's enumeration order."""

    name = "grid"

    def _propose(self, n: int) -> list[Knobs]:
        return self.untried()[:n]


@register_tuner
class GeneticTuner(Tuner):
    """A small steady-state genetic algorithm over the knobs.

    The population is the ``population`` best measured points. Each child takes every knob from
    one of two tournament-selected parents (uniform crossover) and then re-draws each knob with
    probability ``mutation``. Children already measured or pending are re-drawn; after
    ``population`` failed attempts a random untried point is used, so the search never stalls.
    Until ``population`` points are measured, proposals are random (the initial population).
    """

    name = "genetic"

    def __init__(self, space: SearchSpace, task: Task | None = None, *, seed: int = 0,
                 population: int = 8, mutation: float = 0.2, tournament: int = 2) -> None:
        super().__init__(space, task, seed=seed)
        if population < 2 or tournament < 1 or not 0.0 <= mutation <= 1.0:
            raise UserError(f"genetic tuner needs population >= 2, tournament >= 1 and mutation "
                            f"in [0, 1]; got {population}, {tournament}, {mutation}")
        self.population, self.mutation, self.tournament = population, mutation, tournament

    def _propose(self, n: int) -> list[Knobs]:
        picks: list[Knobs] = []
        for _ in range(n):
            taken = set(picks)
            child = self._child(taken) if len(self.history) >= self.population else None
            picks.append(child if child is not None else self._random(taken))
        return picks

    def _random(self, taken: set[Knobs]) -> Knobs:
        left = [k for k in self.untried() if k not in taken]
        return left[int(self.rng.integers(len(left)))]

    def _parents(self) -> list[Knobs]:
        ranked = sorted(self.history, key=lambda k: (-self.score(self.history[k]),
                                                     self.space.index(k)))
        return ranked[: self.population]

    def _select(self, parents: list[Knobs]) -> Knobs:
        # parents are sorted best first, so the smallest drawn index wins the tournament
        return parents[int(self.rng.integers(len(parents), size=self.tournament).min())]

    def _child(self, taken: set[Knobs]) -> Knobs | None:
        parents = self._parents()
        for _ in range(self.population):
            a, b = self._select(parents), self._select(parents)
            genes = {n: getattr(a if self.rng.random() < 0.5 else b, n) for n in KNOB_NAMES}
            for n in KNOB_NAMES:
                if self.rng.random() < self.mutation:
                    values = self.space.dims[n]
                    genes[n] = values[int(self.rng.integers(len(values)))]
            child = replace(a, **genes)
            if child not in self.history and child not in self.pending and child not in taken:
                return child
        return None
