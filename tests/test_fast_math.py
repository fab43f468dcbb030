"""fast_math: float32 transcendental ops as vectorizable arithmetic (structure and accuracy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax, te, tirx

from tvm_compress.backend.schedules import default_schedule_pipeline, fast_math

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2", "num-cores": 2})
_erf = np.vectorize(math.erf)


def _gelu(v: np.ndarray) -> np.ndarray:
    return 0.5 * v * (1 + _erf(v / math.sqrt(2)))


def _run_scalar(fn, xs: np.ndarray) -> np.ndarray:  # noqa: ANN001
    x = te.placeholder((len(xs),), "float32", name="x")
    y = te.compute(x.shape, lambda i: fn(x[i]), name="y")
    lib = tvm.compile(te.create_prim_func([x, y]), HOST)
    out = tvm.runtime.tensor(np.zeros(len(xs), "float32"))
    lib(tvm.runtime.tensor(xs.astype("float32")), out)
    return out.numpy().astype(np.float64)


def test_exp_relative_error_and_saturation() -> None:
    xs = np.linspace(-87, 88, 100_001).astype("float32")
    ref = np.exp(xs.astype(np.float64))
    assert np.max(np.abs(_run_scalar(fast_math.exp, xs) - ref) / ref) < 3e-7
    lo, hi, zero = _run_scalar(fast_math.exp, np.array([-1e4, 1e4, 0.0]))
    assert 0 < lo < 2e-38 and np.isfinite(hi) and hi > 1e38 and zero == 1.0


@pytest.mark.parametrize(("name", "reference", "tolerance"), [
    ("sigmoid", lambda v: 1 / (1 + np.exp(-v)), 1e-7),
    ("tanh", np.tanh, 1e-7),
    ("erf", _erf, 5e-7),
    ("gelu", _gelu, 5e-7),
    ("gelu_tanh", lambda v: 0.5 * v * (1 + np.tanh(0.7978845608028654 * (v + 0.044715 * v**3))),
     6e-7),
    ("silu", lambda v: v / (1 + np.exp(-v)), 1e-6),
])
def test_absolute_error(name: str, reference, tolerance: float) -> None:  # noqa: ANN001
    xs = np.concatenate([np.linspace(-30, 30, 60_001), np.linspace(-1e-3, 1e-3, 201)])
    got = _run_scalar(getattr(fast_math, name), xs.astype("float32"))
    ref = reference(xs.astype("float32").astype(np.float64))
    assert np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))) < tolerance


def test_erf_is_accurate_relative_to_its_value_near_zero() -> None:
    xs = np.linspace(-0.01, 0.01, 2001)
    xs = xs[xs != 0]
    got = _run_scalar(fast_math.erf, xs.astype("float32"))
    ref = _erf(xs.astype("float32").astype(np.float64))
    assert np.max(np.abs(got - ref) / np.abs(ref)) < 1e-6


def _module(dtype: str) -> tvm.IRModule:
    # An LSTM-like cell (transcendental ops nested two deep, as in real models; LLVM's compile
    # time grows steeply with deeper nests), GELU, erf, SiLU, exp, and a softmax.
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 64, 5), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            cell = bb.emit(relax.op.multiply(relax.op.sigmoid(x), relax.op.tanh(x)))
            h = bb.emit(relax.op.multiply(relax.op.sigmoid(x), relax.op.tanh(cell)))
            g = bb.emit(relax.op.add(relax.op.add(relax.op.nn.gelu(x), relax.op.erf(x)),
                                     relax.op.add(relax.op.nn.silu(x), relax.op.exp(x))))
            out = bb.emit_output(relax.Tuple([relax.op.nn.softmax(h, axis=1), g]))
        bb.emit_func_output(out)
    return bb.get()


def _reference(v: np.ndarray) -> list[np.ndarray]:
    sig = 1 / (1 + np.exp(-v))
    h = sig * np.tanh(sig * np.tanh(v))
    e = np.exp(h - h.max(axis=1, keepdims=True))
    return [e / e.sum(axis=1, keepdims=True), _gelu(v) + _erf(v) + v * sig + np.exp(v)]


def test_pipeline_leaves_no_transcendental_call_and_matches_numpy() -> None:
    scheduled = default_schedule_pipeline(HOST)(_module("float32"))
    scripts = [f.script() for _, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]
    for name in ("T.exp(", "T.sigmoid(", "T.tanh(", "T.erf("):
        assert not any(name in s for s in scripts), name
    x = np.random.default_rng(0).standard_normal((2, 64, 5)).astype("float32") * 3
    vm = relax.VirtualMachine(tvm.compile(scheduled, HOST), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x))
    for ours, ref in zip(got, _reference(x.astype(np.float64)), strict=True):
        np.testing.assert_allclose(ours.numpy(), ref, rtol=2e-5, atol=1e-6)


def test_other_dtypes_keep_tvms_legalization() -> None:
    scheduled = default_schedule_pipeline(HOST)(_module("float64"))
    scripts = [f.script() for _, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert any("T.exp(" in s for s in scripts)
