"""Quantization points of a channel split (ShuffleNetV2's ``x.chunk(2)``, exported by the
TorchScript exporter as two Slices of one tensor): each slice gets its own point, so the conv
fed by the second slice quantizes (its int32 bias needs its input's scale)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tvm_compress.frontend.importers import export_onnx, from_onnx
from tvm_compress.graph.qgraph import analyze
from tvm_compress.passes.fold_batch_norm import FoldBatchNorm
from tvm_compress.quant.config import QuantConfig
from tvm_compress.quant.quantize import quantize


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.stem(x)).chunk(2, dim=1)
        return self.head(torch.cat((torch.relu(self.branch(b)), a), 1))


def test_both_slices_of_a_split_get_their_own_point(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    model = from_onnx(export_onnx(Split().eval(), x, tmp_path / "split.onnx"))
    graph = analyze(FoldBatchNorm()(model.mod), QuantConfig())
    slices = [p for p in graph.points.values() if ">strided_slice" in p.name]
    assert len(slices) == 2 and len({p.name for p in slices}) == 2
    assert len({id(p.var) for p in graph.points.values()}) == len(graph.points)

    calib = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype("float32")
    quantized = quantize(model, QuantConfig(calib_samples=4), calib, progress=False)
    assert quantized.fp32_layers == []
    assert {s.layer.name for s in quantized.graph.layers} == {"stem", "branch", "head"}
