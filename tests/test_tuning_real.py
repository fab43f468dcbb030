"""The real evaluator end to end: quantize, build, measure on Fashion-MNIST, record, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tvm_compress.data import fashion_mnist
from tvm_compress.frontend.importers import Model, from_torch
from tvm_compress.tuning.evaluator import QuantEvaluator
from tvm_compress.tuning.quantune.space import SearchSpace, config_key
from tvm_compress.tuning.records import read_records
from tvm_compress.tuning.search import search


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.head = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).flatten(1))


@pytest.fixture(scope="module")
def trained() -> SmallNet:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x, y = fashion_mnist("train")
    x, y = torch.from_numpy(x[:512]), torch.from_numpy(y[:512])
    net = SmallNet()
    opt = torch.optim.Adam(net.parameters(), 5e-3)
    for _ in range(2):
        for i in range(0, 512, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return net.eval()


def _evaluator(net: SmallNet, records: Path) -> QuantEvaluator:
    model: Model = from_torch(net, torch.zeros(50, 1, 28, 28), name="smallnet")
    images, labels = fashion_mnist("val")
    calib, _ = fashion_mnist("calib")
    # TVM's plain schedules: this test is about measuring and recording; the int8 kernels'
    # parity with the simulated model is tested with the schedules
    return QuantEvaluator(model, calib=calib[:100], images=images[:300], labels=labels[:300],
                          records=records, schedule="none")


def test_real_search_measures_records_and_resumes(trained: SmallNet, tmp_path: Path) -> None:
    space = SearchSpace.paper(calib_available=100).restrict(
        calib_samples=(100,), scheme=("asymmetric",), clipping=("minmax",),
        granularity=("per_channel",))
    assert len(space) == 2  # int8, and mixed (first and last layer kept fp32)
    path = tmp_path / "records.jsonl"
    ev = _evaluator(trained, path)
    assert ev.mixed_layers == ("stem.0", "head")
    res = search(ev, space, tuner="grid", trials=5)
    assert res.stopped == "exhausted" and ev.measured == 2
    base = res.baseline
    int8, mixed = (t.result for t in res.trials)
    assert base.accuracy > 0.5  # briefly trained, but trained
    assert abs(int8.accuracy - base.accuracy) <= 0.03
    assert int8.weight_bytes * 3 < base.weight_bytes
    # the fp32 head dominates this net's weights
    assert int8.weight_bytes < mixed.weight_bytes < base.weight_bytes
    assert [r.key for r in read_records(path)] == ["fp32"] + [
        config_key(ev.config(k)) for k in space]
    # a fresh import of the same weights has the same fingerprint: everything is replayed
    again = _evaluator(trained, path)
    assert again.model_id == ev.model_id and again.context == ev.context
    res2 = search(again, space, tuner="grid", trials=5)
    assert again.measured == 0 and all(t.replayed for t in res2.trials)
    assert [t.result for t in res2.trials] == [t.result for t in res.trials]
    assert np.isclose(res2.baseline.accuracy, base.accuracy)
