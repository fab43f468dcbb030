"""The prepared ONNX model against the original, both under ONNX Runtime (frontend.prepare)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tvm_compress.errors import UserError
from tvm_compress.frontend.inputs import InputSpec, random_feed

if TYPE_CHECKING:
    import onnx

# Relative to the output's scale (max |output| or 1): folding and opset conversion are exact up to
# float reassociation, so anything larger is a bug in the preparation, not noise.
CHECK_TOLERANCE = 1e-4


def _fmt(dims: Sequence[object]) -> str:
    return "x".join(str(d) for d in dims)


def _ort_run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 4  # errors come back as exceptions
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feed)]


def _ort_reason(exc: Exception) -> str:
    """ONNX Runtime's message without its prefixes: 'Concat node '/m/Concat': ... 7 and 8'."""
    text = (str(exc).strip().splitlines() or [""])[0]
    found = re.search(r"running (\w+) node\. Name:'([^']*)' Status Message: "
                      r"(?:\S+:\d+ \w+ )?(.*)", text)
    if found:
        text = f"{found.group(1)} node '{found.group(2)}': {found.group(3)}"
    return text[:240]


def compare_with_original(original: onnx.ModelProto, prepared: onnx.ModelProto,
                          specs: Sequence[InputSpec], where: str) -> str:
    """Run both under ONNX Runtime on the same random inputs; the note with the max |diff|.

    The original failing to run is the user's problem (a file ORT rejects, or pinned shapes the
    model cannot take); the prepared one failing or differing is ours (RuntimeError).
    """
    feed = random_feed(specs)
    try:
        want = _ort_run(original, feed)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        shapes = ", ".join(f"{s.name}:{_fmt(s.shape)}" for s in specs)
        raise UserError(f"{where}: ONNX Runtime cannot run the model with inputs {shapes} "
                        f"({_ort_reason(exc)}); check --input-shape / --batch or the file"
                        ) from None
    got = _ort_run(prepared, feed)
    if len(got) != len(want):
        raise RuntimeError(f"preparation changed the number of outputs ({len(want)} -> "
                           f"{len(got)})")
    worst, worst_rel = 0.0, 0.0
    for a, b in zip(want, got, strict=True):
        if a.shape != b.shape:
            raise RuntimeError(f"preparation changed an output shape {a.shape} -> {b.shape}")
        if a.size == 0 or a.dtype.kind not in "fc":
            if not np.array_equal(a, b):
                raise RuntimeError("preparation changed an integer output")
            continue
        diff = float(np.max(np.abs(a.astype(np.float64) - b)))
        scale = max(1.0, float(np.max(np.abs(a))))
        worst, worst_rel = max(worst, diff), max(worst_rel, diff / scale)
    if not worst_rel <= CHECK_TOLERANCE:
        raise RuntimeError(f"the prepared model differs from the original under ONNX Runtime "
                           f"by {worst:.3g} (relative {worst_rel:.3g})")
    return (f"prepared model checked against the original under ONNX Runtime: max |diff| "
            f"{worst:.3g} over {len(want)} output(s)")
