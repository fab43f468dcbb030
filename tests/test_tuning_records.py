"""Tuning records: append, strict reading, evaluator cache and resume of an interrupted search."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tvm_compress.errors import UserError
from tvm_compress.quant.config import QuantConfig
from tvm_compress.tuning.quantune.space import Knobs, SearchSpace, config_key
from tvm_compress.tuning.records import RecordsFile, Result, read_records
from tvm_compress.tuning.search import search
from tvm_compress.tuning.synthetic import SyntheticEvaluator

SPACE = SearchSpace.paper()


class Killed(RuntimeError):
    pass


class KilledAfter(SyntheticEvaluator):
    """Dies (like a killed process) when asked to measure its (k+1)-th new trial."""

    def __init__(self, name: str, k: int, **kwargs: object) -> None:
        super().__init__(name, **kwargs)
        self.k = k

    def measure(self, knobs: Knobs, config: QuantConfig) -> Result:
        if self.measured >= self.k:
            raise Killed(f"killed after {self.k} trials")
        return super().measure(knobs, config)


def _essence(path: Path) -> list[tuple[str, str, dict]]:
    """Records without their timings (which differ between runs)."""
    out = []
    for r in read_records(path):
        out.append((r.model_id, r.key, {**r.result.to_dict(), "seconds": None}))
    return out


def _filled(path: Path, n: int = 3) -> SyntheticEvaluator:
    ev = SyntheticEvaluator("resnet", records=path)
    ev.baseline()
    for k in list(SPACE)[:n]:
        ev.evaluate(k)
    return ev


def test_records_append_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    ev = _filled(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["format"] for line in lines)
    records = read_records(path)
    assert records == ev.records.records
    assert records[0].is_baseline and records[0].knobs is None
    assert records[1].knobs == SPACE[0]
    assert records[1].key == config_key(SPACE[0].config(("first", "last")))
    # a second evaluator on the same file measures nothing again
    again = SyntheticEvaluator("resnet", records=path)
    assert [again.evaluate(k) for k in list(SPACE)[:3]] == [r.result for r in records[1:]]
    assert again.baseline() == records[0].result
    assert again.measured == 0 and len(read_records(path)) == 4


def test_records_are_per_model_and_data(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    _filled(path)
    other_model = SyntheticEvaluator("vgg", records=path)
    other_data = SyntheticEvaluator("resnet", seed=1, records=path)
    for ev in (other_model, other_data):
        ev.evaluate(SPACE[0])
        assert ev.measured == 1
    assert len(read_records(path)) == 6


def test_latency_request_remeasures_records_without_latency(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    _filled(path, n=1)
    ev = SyntheticEvaluator("resnet", records=path, measure_latency=True)
    assert ev.cached(SPACE[0]) is None
    assert ev.evaluate(SPACE[0]).latency_ms is not None and ev.measured == 1
    # the newer record supersedes the older one for every later reader
    assert SyntheticEvaluator("resnet", records=path, measure_latency=True).cached(SPACE[0])


@pytest.mark.parametrize("bad, why", [
    ('{"format": "tvm-compress/tuning-rec', "not valid JSON"),
    ('{"some": "other tool"}', "not a tvm-compress tuning record"),
    ('[1, 2, 3]', "not a tvm-compress tuning record"),
])
def test_corrupt_or_foreign_line_names_the_line(tmp_path: Path, bad: str, why: str) -> None:
    path = tmp_path / "r.jsonl"
    _filled(path, n=2)
    lines = path.read_text().splitlines()
    lines.insert(2, bad)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"r\.jsonl:3: {why}"):
        read_records(path)
    with pytest.raises(UserError, match=r"r\.jsonl:3:"):
        SyntheticEvaluator("resnet", records=path)


def test_wrong_version_or_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    _filled(path, n=1)
    first, second = path.read_text().splitlines()
    d = json.loads(second)
    path.write_text(first + "\n" + json.dumps({**d, "version": 99}) + "\n")
    with pytest.raises(UserError, match=r":2: record version 99"):
        read_records(path)
    del d["knobs"]
    path.write_text(first + "\n" + json.dumps(d) + "\n")
    with pytest.raises(UserError, match=r":2: record lacks \['knobs'\]"):
        read_records(path)
    d["knobs"] = {**SPACE[0].to_dict(), "scheme": "sym"}
    path.write_text(first + "\n" + json.dumps(d) + "\n")
    with pytest.raises(UserError, match=r":2: malformed record: unknown scheme"):
        read_records(path)


def test_missing_file_and_torn_tail(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    path = tmp_path / "r.jsonl"
    _filled(path, n=1)
    # killed right before the newline: the record is whole and the next one starts a new line
    path.write_text(path.read_text().rstrip("\n"))
    ev = SyntheticEvaluator("resnet", records=path)
    ev.evaluate(SPACE[1])
    assert len(read_records(path)) == 3


@pytest.mark.parametrize("tuner", ["quantune", "genetic", "random"])
def test_killed_search_resumes_to_the_same_records(tmp_path: Path, tuner: str) -> None:
    options = {"tuner_options": {"rounds": 20}} if tuner == "quantune" else {}
    full = tmp_path / "full.jsonl"
    search(SyntheticEvaluator("mobilenet_v2", records=full), SPACE, tuner=tuner, seed=3,
           trials=12, **options)
    part = tmp_path / "part.jsonl"
    with pytest.raises(Killed):
        search(KilledAfter("mobilenet_v2", 5, records=part), SPACE, tuner=tuner, seed=3,
               trials=12, **options)
    assert len(read_records(part)) == 1 + 5
    resumed_ev = SyntheticEvaluator("mobilenet_v2", records=part)
    resumed = search(resumed_ev, SPACE, tuner=tuner, seed=3, trials=12, **options)
    assert resumed_ev.measured == 12 - 5
    assert [t.replayed for t in resumed.trials] == [True] * 5 + [False] * 7
    assert _essence(part) == _essence(full)
    # and a third run measures nothing
    third = SyntheticEvaluator("mobilenet_v2", records=part)
    search(third, SPACE, tuner=tuner, seed=3, trials=12, **options)
    assert third.measured == 0 and _essence(part) == _essence(full)


def test_failed_config_is_recorded_with_its_reason(tmp_path: Path) -> None:
    class Rejecting(SyntheticEvaluator):
        def measure(self, knobs: Knobs, config: QuantConfig) -> Result:
            if knobs.scheme == "power_of_two":
                raise UserError("power-of-two scales are not supported for this layer")
            return super().measure(knobs, config)

    path = tmp_path / "r.jsonl"
    ev = Rejecting("vgg", records=path)
    knobs = replace(SPACE[0], scheme="power_of_two")
    result = ev.evaluate(knobs)
    assert result.accuracy == 0.0 and "power-of-two" in (result.error or "")
    assert read_records(path)[-1].result.error == result.error


def test_in_memory_records() -> None:
    store = RecordsFile(None)
    ev = SyntheticEvaluator("vgg", records=store)
    ev.evaluate(SPACE[5])
    assert len(store) == 1 and store.path is None
