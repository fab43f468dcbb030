"""Calibration statistics reused across configs; packed sub-8-bit weights in the artifact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvm_compress.errors import UserError
from tvm_compress.frontend import from_torch
from tvm_compress.qconfig import QuantConfig, QuantSpec
from tvm_compress.quantize import collect_calibration, quantize


@pytest.fixture
def tiny_model(tiny_cnn, tiny_input):  # noqa: ANN001, ANN201
    return from_torch(tiny_cnn, torch.from_numpy(tiny_input))


@pytest.fixture
def calib() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((6, 3, 16, 16)).astype("float32")


def _params(q):  # noqa: ANN001, ANN202
    return {k: (float(np.asarray(v.scale).ravel()[0]), int(np.asarray(v.zero_point).ravel()[0]))
            for k, v in q.act_params.items()}


def test_reused_stats_give_the_same_quantization(tiny_model, calib):  # noqa: ANN001
    stats = collect_calibration(tiny_model, QuantConfig(calib_samples=4), calib, progress=False)
    for method, scheme in (("kl", "asymmetric"), ("mse", "symmetric"),
                           ("percentile", "asymmetric")):
        config = QuantConfig(activation=QuantSpec(8, scheme), calibration=method,
                             calib_samples=4, percentile=99.0)
        fresh = quantize(tiny_model, config, calib, realize=False, progress=False)
        reused = quantize(tiny_model, config, calib, realize=False, progress=False, stats=stats)
        assert _params(reused) == _params(fresh), (method, scheme)
    assert len({str(v) for v in _params(reused).values()}) > 1


def test_reused_stats_are_checked(tiny_model, calib):  # noqa: ANN001
    minmax = collect_calibration(tiny_model, QuantConfig(calib_samples=4), calib,
                                 histograms=False, progress=False)
    with pytest.raises(UserError, match="histograms"):
        quantize(tiny_model, QuantConfig(calibration="kl", calib_samples=4), calib,
                 progress=False, stats=minmax)
    with pytest.raises(UserError, match="samples"):
        quantize(tiny_model, QuantConfig(calib_samples=3), calib, progress=False, stats=minmax)
