"""Replay: an evaluator that answers from ground-truth records instead of measuring.

The zoo sweep measured every configuration of the paper's space for real; replaying those
records lets tuners be compared on the true accuracies (leave-one-model-out, many seeds) without
compiling anything. Asking for a configuration that was not measured raises LookupError (never a
guess, and never recorded as a failed trial).
"""

from __future__ import annotations

from collections.abc import Iterable

from tvm_compress.errors import UserError
from tvm_compress.quant.config import QuantConfig
from tvm_compress.tuning.evaluator import Evaluator
from tvm_compress.tuning.quantune.space import Knobs, SearchSpace
from tvm_compress.tuning.records import Record, Result


def group_records(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records by model name (the newest record of each identity), in file order."""
    latest: dict[tuple[str, str, str, str], Record] = {}
    for r in records:
        latest[r.identity] = r
    out: dict[str, list[Record]] = {}
    for r in latest.values():
        out.setdefault(r.model, []).append(r)
    return out


class ReplayEvaluator(Evaluator):
    """Results of one model taken from its records (one model, data and target).

    Parameters
    ----------
    records : records of one model, its fp32 baseline included
    """

    def __init__(self, records: Iterable[Record]) -> None:
        records = list(records)
        idents = {r.identity[:3] for r in records}
        if len(idents) != 1:
            raise UserError(f"replay needs the records of exactly one model/data/target, got "
                            f"{len(idents)}")
        self._by_knobs = {r.knobs: r.result for r in records if r.knobs is not None}
        base = [r.result for r in records if r.is_baseline]
        if not base:
            raise UserError(f"replay of {records[0].model}: the records have no fp32 baseline")
        self._baseline = base[-1]
        mixed = next((r.config for r in records
                      if r.knobs is not None and r.knobs.precision == "mixed"), None)
        mixed_layers = tuple(name for name, _ in mixed.overrides) if mixed is not None else ()
        first = records[0]
        super().__init__(model=first.model, model_id=first.model_id, context=first.context,
                         target=first.target, descriptors=first.descriptors,
                         mixed_layers=mixed_layers, records=None)

    def covers(self, space: SearchSpace) -> bool:
        """Every point of ``space`` has a record."""
        return all(k in self._by_knobs for k in space)

    def truth(self, knobs: Knobs) -> Result:
        if knobs not in self._by_knobs:  # not UserError: evaluate() would record a failed trial
            raise LookupError(f"replay of {self.model}: configuration {knobs.key} was never "
                            "measured; sweep it first (benchmarks/bench_quantune_sweep.py)")
        return self._by_knobs[knobs]

    def measure(self, knobs: Knobs, config: QuantConfig) -> Result:
        return self.truth(knobs)

    def measure_baseline(self) -> Result:
        return self._baseline
