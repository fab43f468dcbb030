"""A model's input contract (name, shape, dtype per input) and sample sets that feed it.

A sample set is either one array ``(N, ...)`` for a single-input model or a dict with one array
``(N, ...)`` per input name; every function here accepts both and checks them against the specs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tvm_compress.errors import UserError

Samples = np.ndarray | Mapping[str, np.ndarray]  # one array, or one per input name


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


def as_specs(spec: InputSpec | Sequence[InputSpec]) -> tuple[InputSpec, ...]:
    return (spec,) if isinstance(spec, InputSpec) else tuple(spec)


def as_feed(data: Samples, specs: Sequence[InputSpec], what: str = "data") -> dict[str, np.ndarray]:
    """``data`` as {input name: array}, checked: every input present, same sample count."""
    if not isinstance(data, Mapping):
        if len(specs) != 1:
            raise UserError(f"the model has {len(specs)} inputs ({input_list(specs)}); give the "
                            f"{what} as one array per input name (np.savez(path, NAME=...))")
        return {specs[0].name: np.asarray(data)}
    missing = [s.name for s in specs if s.name not in data]
    if missing:
        raise UserError(f"{what} lacks input(s) {', '.join(missing)}; the model's inputs are "
                        f"{input_list(specs)} (one array per input name)")
    feed = {s.name: np.asarray(data[s.name]) for s in specs}
    counts = {len(a) for a in feed.values()}
    if len(counts) > 1:
        raise UserError(f"{what}: the inputs have different sample counts {sorted(counts)}; give "
                        "the same number of samples for every input")
    return feed


def input_list(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{s.name} {'x'.join(map(str, s.shape))}" for s in specs)


def num_samples(data: Samples) -> int:
    if isinstance(data, Mapping):
        return len(next(iter(data.values()))) if data else 0
    return len(data)


def take(data: Samples, start: int, stop: int | None = None) -> Samples:
    """Samples ``start:stop`` of every input."""
    if isinstance(data, Mapping):
        return {k: v[start:stop] for k, v in data.items()}
    return data[start:stop]


def check_samples(data: Samples, specs: Sequence[InputSpec], what: str) -> dict[str, np.ndarray]:
    """Per-sample shape and dtype of every input match the specs; the feed dict is returned."""
    feed = as_feed(data, specs, what)
    for spec in specs:
        arr = feed[spec.name]
        if arr.ndim == 0 or len(arr) == 0:
            raise UserError(f"{what} is empty: give at least one sample for input '{spec.name}'")
        if tuple(arr.shape[1:]) != tuple(spec.shape[1:]):
            raise UserError(f"{what} samples have shape {tuple(arr.shape[1:])} but the model "
                            f"input '{spec.name}' expects {tuple(spec.shape[1:])} per sample; "
                            "resize or preprocess the data (or import with a matching "
                            "--input-shape)")
        if str(arr.dtype) != spec.dtype:
            raise UserError(f"{what} samples have dtype {arr.dtype} but the model input "
                            f"'{spec.name}' expects {spec.dtype}; convert them with "
                            f".astype('{spec.dtype}')")
    return feed


def batches(feed: Mapping[str, np.ndarray], batch: int, *, pad: str = "zeros"
            ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Chunks of ``batch`` samples of every input; the last one padded (``zeros`` or ``repeat``
    of its last sample) and returned with its real sample count."""
    total = num_samples(feed)
    for start in range(0, total, batch):
        chunk, n = {}, 0
        for name, arr in feed.items():
            part = arr[start:start + batch]
            n = len(part)
            if n < batch:
                fill = (np.zeros((batch - n, *part.shape[1:]), part.dtype) if pad == "zeros"
                        else np.repeat(part[-1:], batch - n, axis=0))
                part = np.concatenate([part, fill])
            chunk[name] = np.ascontiguousarray(part)
        yield chunk, n


def random_feed(specs: Sequence[InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of inputs for timing and checks: standard normal floats, zeros otherwise."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        if np.dtype(spec.dtype).kind == "f":
            out[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
        else:
            out[spec.name] = np.zeros(spec.shape, spec.dtype)
    return out


def gather_outputs(chunks: Sequence[tuple[Sequence[np.ndarray], int]], batch: int
                   ) -> list[np.ndarray]:
    """Outputs of batch-sized runs (each with its real sample count) joined per output: along
    axis 0 (padded rows dropped) when it is the batch axis, else stacked per run (e.g. a
    sequence-first recognizer output)."""
    joined = []
    for i in range(len(chunks[0][0])):
        parts = [(outs[i], n) for outs, n in chunks]
        if all(p.ndim and p.shape[0] == batch for p, _ in parts):
            joined.append(np.concatenate([p[:n] for p, n in parts]))
        else:
            joined.append(np.stack([p for p, _ in parts]))
    return joined
