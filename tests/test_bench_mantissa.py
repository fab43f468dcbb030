"""benchmarks/bench_mantissa.py: which requantizations have short mantissas, and the flag that
turns them off."""

from __future__ import annotations

import sys
from pathlib import Path

from test_quant_passes import _module, _qdq_block

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_mantissa import short_layers  # noqa: E402

from tvm_compress.passes.realize_integer import RealizeInteger  # noqa: E402


def test_short_layers_counts_the_short_requantizations() -> None:
    # a 1x1 conv of 2 input channels: accumulators far below 2**31, short mantissas by default
    simulated = _module(_qdq_block)
    assert short_layers(RealizeInteger()(simulated)) == (1, 1)
    assert short_layers(RealizeInteger(short_mantissas=False)(simulated)) == (0, 1)
