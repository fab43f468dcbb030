"""benchmarks/bench_corpus.py: agreement with fp32 of our int8 and ONNX Runtime's, side by side."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import corpus  # noqa: E402
from bench_corpus import _outputs, _quality, _quality_cell, accuracy_summary  # noqa: E402


def _entry(outputs: str) -> corpus.CorpusEntry:
    return next(e for e in corpus.entries(None) if e.outputs == outputs)


def test_quality_scores_a_noisier_candidate_lower() -> None:
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((6, 10)).astype("float32")}

    def reference(feed: dict) -> list[np.ndarray]:
        return [feed["x"] * 3.0]

    def noisy(scale: float):  # noqa: ANN202
        def run(feed: dict) -> list[np.ndarray]:
            return [feed["x"] * 3.0 + scale * rng.standard_normal(feed["x"].shape)]
        return run

    entry = _entry("classes")
    ref = _outputs(reference, data)
    close = _quality(entry.outputs, ref, _outputs(noisy(0.01), data))
    far = _quality(entry.outputs, ref, _outputs(noisy(1.0), data))
    assert close["samples"] == 6 and len(close["sqnr_db"]) == 1
    assert close["sqnr_db"][0] > far["sqnr_db"][0] + 20
    assert close["top1_agreement"] == 1.0
    same = _quality(entry.outputs, ref, _outputs(reference, data))
    assert same["top1_agreement"] == 1.0 and same["sqnr_db"][0] > 100


def test_accuracy_summary_counts_models_with_both_builds() -> None:
    def model(name: str, ours: float, ort: float | None, top1: tuple | None = None) -> dict:
        q = {"sqnr_db": [ours, ours + 5]}
        r = {"name": name, "quantize": {"vs_fp32": q}}
        if ort is not None:
            r["ort_int8_vs_fp32"] = {"sqnr_db": [ort]}
        if top1:
            q["top1_agreement"] = top1[0]
            r["ort_int8_vs_fp32"]["top1_agreement"] = top1[1]
        return r

    results = [model("a", 20.0, 10.0, (1.0, 0.5)), model("b", 10.0, 30.0),
               model("c", 40.0, None)]
    [_, line] = accuracy_summary(results)
    assert "over the 2 models" in line
    assert "TVM int8 15.0 dB, ONNX Runtime int8 20.0 dB" in line
    assert "the higher on 1 of 2" in line
    assert "Top-1 agreement over the 1 classifiers: TVM int8 1.00, ONNX Runtime int8 0.50" in line
    assert accuracy_summary([model("c", 40.0, None)]) == []
    assert _quality_cell({"sqnr_db": [7.25, 3.0], "top1_agreement": 0.5}) == \
        "top-1 0.50, SQNR 3.0 dB"
    assert _quality_cell({}) == "-"
