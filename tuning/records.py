"""Tuning records: one JSON object per line, appended (flush + fsync) as each trial finishes.

A record says which model (name and weight fingerprint), on which data (``context``: a
fingerprint of the calibration and validation sets) and target, which configuration (its knobs,
its full QuantConfig and the config key) and what was measured. The fp32 baseline of a model is
a record with key ``"fp32"`` and no knobs. Records of many models may share one file; that is how
a Quantune prior is collected.

Reading is strict: a line that is not JSON, not a tuning record, of another format version, or
missing a field raises :class:`UserError` naming the file and line. Nothing is skipped silently;
a later record with the same identity supersedes an earlier one (a re-measurement).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tvm_compress.errors import UserError
from tvm_compress.quant.config import QuantConfig
from tvm_compress.tuning.quantune.space import Knobs

RECORD_FORMAT = "tvm-compress/tuning-record"
RECORD_VERSION = 1
BASELINE_KEY = "fp32"


@dataclass(frozen=True)
class Result:
    """What one trial measured. ``accuracy`` is a fraction in [0, 1]."""

    accuracy: float
    weight_bytes: int | None = None
    latency_ms: float | None = None
    seconds: float = 0.0          # wall time the measurement took
    error: str | None = None      # a config the core rejected: accuracy 0, reason kept

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Result:
        names = {f.name for f in fields(cls)}
        if "accuracy" not in d or set(d) - names:
            raise ValueError(f"result needs 'accuracy' and only {sorted(names)}, got {sorted(d)}")
        return cls(**d)


@dataclass(frozen=True)
class Record:
    """One line of a records file."""

    model: str                       # display name, e.g. "zoo:fmnist_resnet"
    model_id: str                    # fingerprint of the weights and graph
    context: str                     # fingerprint of the calibration + validation data
    target: str
    key: str                         # config key, or "fp32" for the baseline
    result: Result
    descriptors: dict[str, float] = field(default_factory=dict)
    knobs: Knobs | None = None
    config: QuantConfig | None = None

    @property
    def identity(self) -> tuple[str, str, str, str]:
        """What the evaluator caches on: (model, data, target, config)."""
        return (self.model_id, self.context, self.target, self.key)

    @property
    def is_baseline(self) -> bool:
        return self.key == BASELINE_KEY

    def to_json(self) -> str:
        d: dict[str, Any] = {"format": RECORD_FORMAT, "version": RECORD_VERSION,
                             "model": self.model, "model_id": self.model_id,
                             "context": self.context, "target": self.target, "key": self.key,
                             "knobs": self.knobs.to_dict() if self.knobs else None,
                             "config": self.config.to_dict() if self.config else None,
                             "descriptors": self.descriptors, "result": self.result.to_dict()}
        return json.dumps(d, sort_keys=True)


_REQUIRED = ("model", "model_id", "context", "target", "key", "result", "descriptors", "knobs",
             "config")


def parse_record(line: str) -> Record:
    """One record from its JSON line; ValueError says what is wrong."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg}; a run killed mid-write leaves such a "
                         "line: delete it to resume)") from None
    if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT:
        raise ValueError(f"not a tvm-compress tuning record (no \"format\": "
                         f"\"{RECORD_FORMAT}\"); give a records file written by tvm-compress")
    if d.get("version") != RECORD_VERSION:
        raise ValueError(f"record version {d.get('version')!r} is not supported (this "
                         f"tvm-compress reads version {RECORD_VERSION})")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ValueError(f"record lacks {missing}")
    try:
        knobs = Knobs.from_dict(d["knobs"]) if d["knobs"] is not None else None
        config = QuantConfig.from_dict(d["config"]) if d["config"] is not None else None
        result = Result.from_dict(d["result"])
        descriptors = dict(d["descriptors"])
    except (UserError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed record: {exc}") from None
    if (knobs is None) != (d["key"] == BASELINE_KEY):
        raise ValueError("a record has knobs exactly when it is not the fp32 baseline")
    return Record(model=str(d["model"]), model_id=str(d["model_id"]), context=str(d["context"]),
                  target=str(d["target"]), key=str(d["key"]), result=result,
                  descriptors=descriptors, knobs=knobs, config=config)


def read_records(path: str | Path) -> list[Record]:
    """Every record of a JSON-lines file, in file order (blank lines allowed).

    Raises UserError naming the file and line of the first bad line, and when the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"records file {path} does not exist; give the file a search wrote")
    return list(_iter_records(path))


def _iter_records(path: Path) -> Iterator[Record]:
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield parse_record(line)
            except ValueError as exc:
                raise UserError(f"{path}:{lineno}: {exc}") from None


class RecordsFile:
    """An append-only records file; ``path=None`` keeps records in memory only."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[Record] = []
        if self.path is not None and self.path.exists():
            self.records = read_records(self.path)

    def _ends_mid_line(self) -> bool:
        # A record cut just before its newline still parses; the next append must not glue onto it.
        assert self.path is not None
        with self.path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def append(self, record: Record) -> None:
        """Add a record; on disk it is written, flushed and fsynced before this returns."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lead = "\n" if self.path.exists() and self._ends_mid_line() else ""
            with self.path.open("a", encoding="utf-8") as f:
                f.write(lead + record.to_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.records.append(record)

    def latest(self) -> dict[tuple[str, str, str, str], Record]:
        """The newest record of every identity."""
        return {r.identity: r for r in self.records}

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def baselines(records: Iterable[Record]) -> dict[tuple[str, str, str], Result]:
    """The fp32 result of every (model_id, context, target) that has one."""
    return {(r.model_id, r.context, r.target): r.result for r in records if r.is_baseline}
