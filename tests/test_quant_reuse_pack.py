"""Calibration statistics reused across configs; packed sub-8-bit weights in the artifact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import from_torch
from tvm_compress.passes.pack_constants import UNPACK_ATTR, PackConstants, pack_bits, unpack_bits
from tvm_compress.quant.config import QuantConfig, QuantSpec
from tvm_compress.quant.quantize import collect_calibration, quantize


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
    for method, scheme in (("kl", "asymmetric"), ("mse", "symmetric")):
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


# --------------------------------------------------------------------------- PackConstants


def _constants(mod) -> list[np.ndarray]:  # noqa: ANN001
    import tvm
    from tvm import relax

    found = []

    def visit(expr) -> None:  # noqa: ANN001
        if isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, tvm.runtime.Tensor):
            found.append(expr.value.numpy())

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


@given(bits=st.integers(1, 7), size=st.integers(1, 300), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_pack_bits_round_trip(bits, size, seed):  # noqa: ANN001
    lo = -(1 << (bits - 1))
    values = np.random.default_rng(seed).integers(lo, lo + (1 << bits), size).astype(np.int8)
    packed = pack_bits(values, bits, lo)
    assert packed.dtype == np.uint8 and packed.size == -(-size * bits // 8) + 1
    assert np.array_equal(unpack_bits(packed, bits, lo, values.shape, "int8"), values)


def _weight_module(weight: np.ndarray):  # noqa: ANN202
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, weight.shape[1], 6, 6), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, relax.const(weight, str(weight.dtype)),
                                                    padding=1, out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()


def test_pack_constants_structure():
    from tvm_compress.graph.dataflow import bindings

    rng = np.random.default_rng(0)
    w3 = rng.integers(-4, 4, (8, 4, 3, 3)).astype(np.int8)  # 3 bits, crosses byte borders
    packed = PackConstants()(_weight_module(w3))
    consts = _constants(packed)
    assert [(c.dtype, c.size) for c in consts] == [(np.uint8, -(-w3.size * 3 // 8) + 1)]
    calls = [b.value for b in bindings(packed["main"]) if "call_tir" in str(b.value.op)]
    assert len(calls) == 1 and int(packed[calls[0].args[0]].attrs[UNPACK_ATTR]) == 3
    assert np.array_equal(unpack_bits(consts[0], 3, -4, w3.shape, "int8"), w3)
    w8 = rng.integers(-128, 128, (8, 4, 3, 3)).astype(np.int8)  # full 8-bit range: unchanged
    assert [c.dtype for c in _constants(PackConstants()(_weight_module(w8)))] == [np.int8]
    small = rng.integers(-2, 2, (2, 4, 3, 3)).astype(np.int8)  # below min_elements: unchanged
    assert [c.dtype for c in _constants(PackConstants()(_weight_module(small)))] == [np.int8]


def test_pack_constants_unpacks_a_shared_weight_once():
    # An unrolled LSTM uses one weight at every step: one unpack per run, not one per step
    from tvm import relax

    from tvm_compress.graph.dataflow import bindings

    w3 = np.random.default_rng(1).integers(-4, 4, (8, 4, 3, 3)).astype(np.int8)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = [bb.emit(relax.op.nn.conv2d(x, relax.const(w3), padding=1, out_dtype="int32"))
                    for _ in range(3)]
            out = bb.emit_output(relax.op.add(relax.op.add(outs[0], outs[1]), outs[2]))
        bb.emit_func_output(out)
    packed = PackConstants()(bb.get())
    calls = [b.value for b in bindings(packed["main"]) if "call_tir" in str(b.value.op)]
    assert len(calls) == 1 and len(_constants(packed)) == 1
    convs = [b.value for b in bindings(packed["main"]) if "conv2d" in str(b.value.op)]
    assert len(convs) == 3 and all(c.args[1].same_as(convs[0].args[1]) for c in convs)


def test_seven_bit_weights_stay_bytes_by_default():
    # 7 bits save an eighth of the bytes for about 1 ns per weight per call: not by default
    w7 = np.random.default_rng(2).integers(-64, 64, (8, 4, 3, 3)).astype(np.int8)
    assert [c.dtype for c in _constants(PackConstants()(_weight_module(w7)))] == [np.int8]
    assert [c.dtype for c in _constants(PackConstants(max_bits=7)(_weight_module(w7)))] == \
        [np.uint8]


def test_packed_build_is_exact_and_stores_packed_weights(tiny_model, calib):  # noqa: ANN001
    from tvm_compress.backend.build import build
    from tvm_compress.backend.schedules import default_schedule_pipeline
    from tvm_compress.backend.targets import resolve_target

    config = QuantConfig(weight=QuantSpec(4, "symmetric", "per_channel"), calib_samples=4)
    q = quantize(tiny_model, config, calib, progress=False)
    x = calib[:3]
    plain = build(q.model, pack_weights=False).predict(x)
    packed = build(q.model).predict(x)
    assert np.array_equal(plain, packed)
    target = resolve_target("x86")
    with target:
        lowered = default_schedule_pipeline(target)(q.model.mod)
    pre, post = _constants(lowered), _constants(PackConstants()(lowered))
    pre_bytes, post_bytes = {c.tobytes() for c in pre}, {c.tobytes() for c in post}
    # the weights PackConstants replaced, and the bit streams that replace them (other
    # constants, e.g. a VNNI depthwise kernel's byte-permutation table, are left alone)
    replaced = [c for c in pre if c.tobytes() not in post_bytes]
    packed = [c for c in post if c.dtype == np.uint8 and c.tobytes() not in pre_bytes]
    assert packed, "no packed constant"
    before = sum(c.nbytes for c in replaced)
    after = sum(c.nbytes for c in packed)
    assert after < before / 1.9  # 4-bit codes: about half of int8, an eighth of float32


# --------------------------------------------------------------------------- bias correction


def test_bias_correction_removes_the_weight_error_mean(tiny_model, calib):  # noqa: ANN001
    from tvm_compress.backend.build import InputSpec, build
    from tvm_compress.graph.qgraph import analyze
    from tvm_compress.passes.fold_batch_norm import FoldBatchNorm
    from tvm_compress.passes.insert_qdq import weight_params
    from tvm_compress.quant.bias_correction import bias_shift, correct_biases, layer_input_means

    config = QuantConfig(weight=QuantSpec(3, "symmetric", "per_tensor"), calib_samples=6)
    folded = FoldBatchNorm()(tiny_model.mod)
    graph = analyze(folded, config)
    spec = InputSpec(tiny_model.input_name, tiny_model.input_shape, tiny_model.input_dtype)
    means = layer_input_means(folded, graph, calib, spec)
    assert set(means) == {s.layer.name for s in graph.layers}
    weights = {s.layer.name: weight_params(s, config) for s in graph.layers}
    # structure: only the biases change, by exactly the computed shift
    corrected = correct_biases(folded, graph, weights, means)
    new_graph = analyze(corrected, config)
    for old, new in zip(graph.layers, new_graph.layers, strict=True):
        assert old.layer.name == new.layer.name
        if old.bias_var is None:
            continue
        shift = bias_shift(old, weights[old.layer.name], means[old.layer.name])
        assert np.any(shift != 0)
    # numerics: on held-out inputs the 3-bit model's output mean error shrinks
    held_out = np.random.default_rng(7).standard_normal((16, 3, 16, 16)).astype("float32")
    ref = build(tiny_model.with_mod(folded)).predict(held_out)
    errors = []
    stats = collect_calibration(tiny_model, config, calib, histograms=False, progress=False)
    for bc in (False, True):
        q = quantize(tiny_model, config, calib, progress=False, realize=False, stats=stats,
                     bias_correction=bc)
        errors.append(np.abs((build(tiny_model.with_mod(q.simulated)).predict(held_out)
                              - ref).mean(axis=0)).mean())
    assert errors[1] < errors[0], errors
