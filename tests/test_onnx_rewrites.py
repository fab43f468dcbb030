"""ONNX rewrites of operators TVM cannot import (LSTM, DynamicQuantizeLSTM, ConvInteger): each
checked against ONNX Runtime running the original node (numeric) and for the op being gone
(structural); one of each also through TVM."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_compress.errors import UserError
from tvm_compress.frontend.onnx_rewrites import rewrite_unsupported_ops

SEQ, BATCH, INPUT, HIDDEN = 5, 2, 6, 4


def _run_ort(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the replaced nodes' weights are dropped; no unused warnings
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _model(nodes: list[onnx.NodeProto], inputs: list[tuple[str, int, list[int]]],
           outputs: list[str], inits: dict[str, np.ndarray], *, ms: bool = False
           ) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.INT32 if n == "acc" else TensorProto.FLOAT,
                                       None) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 14)] + ([helper.make_opsetid("com.microsoft", 1)] if ms
                                              else [])
    return helper.make_model(graph, opset_imports=opsets)


def _lstm_model(direction: str, *, peephole: bool = True, seq: int = SEQ, **attrs: object
                ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    inits = {"W": rng.standard_normal((dirs, 4 * HIDDEN, INPUT)),
             "R": rng.standard_normal((dirs, 4 * HIDDEN, HIDDEN)),
             "B": rng.standard_normal((dirs, 8 * HIDDEN))}
    if peephole:
        inits["P"] = rng.standard_normal((dirs, 3 * HIDDEN))
    inits = {k: v.astype("float32") for k, v in inits.items()}
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "", "h0", "c0", "P" if peephole else ""],
                            ["Y", "Y_h", "Y_c"], name="rnn/lstm", direction=direction,
                            hidden_size=HIDDEN, **attrs)
    state = [dirs, BATCH, HIDDEN]
    model = _model([node], [("X", TensorProto.FLOAT, [seq, BATCH, INPUT]),
                            ("h0", TensorProto.FLOAT, state), ("c0", TensorProto.FLOAT, state)],
                   ["Y", "Y_h", "Y_c"], inits)
    feed = {"X": rng.standard_normal((SEQ, BATCH, INPUT)),
            "h0": rng.standard_normal(state), "c0": rng.standard_normal(state)}
    return model, {k: v.astype("float32") for k, v in feed.items()}


def _op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("peephole", [False, True])
def test_lstm_unrolled_matches_onnxruntime(direction: str, peephole: bool) -> None:
    model, feed = _lstm_model(direction, peephole=peephole)
    rewritten, notes = rewrite_unsupported_ops(model)
    assert "LSTM" not in _op_types(rewritten)
    assert {"MatMul", "Sigmoid", "Tanh", "Mul"} <= _op_types(rewritten)
    assert len(notes) == 1 and "rnn/lstm" in notes[0] and f"{SEQ} time steps" in notes[0]
    assert {"W", "R", "B", "P"}.isdisjoint(i.name for i in rewritten.graph.initializer)
    for want, got in zip(_run_ort(model, feed), _run_ort(rewritten, feed), strict=True):
        assert want.shape == got.shape
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_untouched_model_is_returned_as_is() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", TensorProto.FLOAT, [2])],
                   ["y"], {})
    assert rewrite_unsupported_ops(model) == (model, [])


@pytest.mark.parametrize(("attrs", "seq", "message"), [
    ({"clip": 3.0}, SEQ, "clip"),
    ({"activations": ["Relu", "Tanh", "Tanh"]}, SEQ, "activations"),
    ({}, None, "not static"),
])
def test_lstm_outside_the_rewrite_names_the_node(attrs: dict, seq: int | None,
                                                 message: str) -> None:
    model, _ = _lstm_model("forward", seq=seq or "seq", **attrs)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=message) as err:
        rewrite_unsupported_ops(model)
    assert "LSTM node 'rnn/lstm'" in str(err.value) and "\n" not in str(err.value)


def test_lstm_partial_sequence_lens_is_refused() -> None:
    model, _ = _lstm_model("forward")
    model.graph.node[0].input[4] = "lens"
    model.graph.initializer.append(numpy_helper.from_array(np.array([SEQ, 2], np.int32), "lens"))
    with pytest.raises(UserError, match="sequence_lens"):
        rewrite_unsupported_ops(model)


# ONNX Runtime's u8 x s8 GEMM on AVX2 without VNNI (vpmaddubsw) saturates the int16 sum of two
# products: with full-range int8 weights its own results are not exact there. Weights within
# +-63 (7-bit) never saturate, so ORT is exact on every x86 host and can be the reference.
ORT_EXACT = 63


def _dq_lstm_model(batch: int = 1, wmax: int = ORT_EXACT
                   ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """com.microsoft DynamicQuantizeLSTM as ORT's quantize_dynamic writes it: W [dirs, in, 4h] and
    R [dirs, h, 4h] int8 (within +-wmax) with per-direction scales and zero points; zero initial
    state."""
    rng = np.random.default_rng(1)
    dirs = 2
    inits: dict[str, np.ndarray] = {
        "Wq": rng.integers(-wmax, wmax + 1, (dirs, INPUT, 4 * HIDDEN)).astype(np.int8),
        "Rq": rng.integers(-wmax, wmax + 1, (dirs, HIDDEN, 4 * HIDDEN)).astype(np.int8),
        "B": rng.standard_normal((dirs, 8 * HIDDEN)).astype("float32"),
        "h0": np.zeros((dirs, batch, HIDDEN), np.float32),
        "w_scale": np.array([0.01, 0.02], np.float32), "w_zp": np.zeros(dirs, np.int8),
        "r_scale": np.array([0.03, 0.015], np.float32), "r_zp": np.zeros(dirs, np.int8)}
    node = helper.make_node(
        "DynamicQuantizeLSTM", ["X", "Wq", "Rq", "B", "", "h0", "h0", "", "w_scale", "w_zp",
                                "r_scale", "r_zp"],
        ["Y", "Y_h", "Y_c"], name="lstm_quant", domain="com.microsoft",
        direction="bidirectional", hidden_size=HIDDEN)
    model = _model([node], [("X", TensorProto.FLOAT, [SEQ, batch, INPUT])], ["Y", "Y_h", "Y_c"],
                   inits, ms=True)
    return model, {"X": rng.standard_normal((SEQ, batch, INPUT)).astype("float32")}


@pytest.mark.parametrize("batch", [1, 2])
def test_dynamic_quantize_lstm_matches_onnxruntime(batch: int) -> None:
    model, feed = _dq_lstm_model(batch)
    rewritten, notes = rewrite_unsupported_ops(model)
    assert "DynamicQuantizeLSTM" not in _op_types(rewritten)
    assert "com.microsoft" not in {o.domain for o in rewritten.opset_import}
    assert len(notes) == 1 and "lstm_quant" in notes[0] and "MatMulInteger" in notes[0]
    # the weights stay 8-bit: integer products, as ORT computes them (no float32 copies)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("MatMulInteger") == 2 * SEQ  # 2 directions x (X once + H from step 2 on)
    assert not [i for i in rewritten.graph.initializer if i.data_type == TensorProto.FLOAT
                and list(i.dims) in ([INPUT, 4 * HIDDEN], [HIDDEN, 4 * HIDDEN])]
    # X and each step's H are quantized like ORT does at batch 1, so the results agree to float
    # rounding; at batch 2 ORT quantizes H per block of rows: quantization noise (|H| < 1)
    for want, got in zip(_run_ort(model, feed), _run_ort(rewritten, feed), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6 if batch == 1 else 1e-2)


def _exact_integer_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every MatMulInteger(a, b, a_zp, b_zp) computed as an int32 MatMul of the
    widened operands minus their zero points: the exact integer products, on any CPU."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = []
    for node in model.graph.node:
        if node.op_type != "MatMulInteger":
            nodes.append(node)
            continue
        wide = []
        for i, name in enumerate(node.input[:2]):
            cast = f"{node.output[0]}_in{i}"
            nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.INT32))
            if len(node.input) > 2 + i and node.input[2 + i]:
                zp = f"{cast}_zp"
                nodes.append(helper.make_node("Cast", [node.input[2 + i]], [zp],
                                              to=TensorProto.INT32))
                nodes.append(helper.make_node("Sub", [cast, zp], [f"{cast}_shifted"]))
                cast = f"{cast}_shifted"
            wide.append(cast)
        nodes.append(helper.make_node("MatMul", wide, list(node.output)))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_dynamic_quantize_lstm_full_range_weights_are_exact() -> None:
    """With full-range int8 weights (where ORT's AVX2 kernel may saturate) TVM computes the
    rewritten graph's exact integer products: it matches the same graph with int32 MatMuls."""
    model, feed = _dq_lstm_model(wmax=127)
    rewritten, _ = rewrite_unsupported_ops(_single_output(model, "Y"))
    want = _run_ort(_exact_integer_matmuls(rewritten), feed)[0]
    np.testing.assert_allclose(_tvm_run(rewritten, feed["X"]), want, atol=1e-5)


def _conv_integer_model(group: int = 1) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """DynamicQuantizeLinear -> ConvInteger (uint8 x uint8, as ddddocr's common_old.onnx) ->
    Cast -> Mul by the two scales."""
    rng = np.random.default_rng(2)
    cin, cout = 4, 6
    inits = {"w": rng.integers(0, 256, (cout, cin // group, 3, 3)).astype(np.uint8),
             "w_zp": np.array(128, np.uint8), "w_scale": np.array(0.02, np.float32)}
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"]),
        helper.make_node("ConvInteger", ["xq", "w", "xzp", "w_zp"], ["acc"], name="conv_int",
                         pads=[1, 1, 1, 1], strides=[2, 2], group=group),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "w_scale"], ["s"]),
        helper.make_node("Mul", ["accf", "s"], ["y"])]
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, cin, 9, 9])], ["y", "acc"], inits)
    return model, {"x": rng.standard_normal((1, cin, 9, 9)).astype("float32")}


@pytest.mark.parametrize("group", [1, 2])
def test_conv_integer_matches_onnxruntime_exactly(group: int) -> None:
    model, feed = _conv_integer_model(group)
    rewritten, notes = rewrite_unsupported_ops(model)
    assert "ConvInteger" not in _op_types(rewritten) and "Conv" in _op_types(rewritten)
    assert notes == ["1 ConvInteger node(s) rewritten as float Conv on zero-point-shifted "
                     "integers, cast back to int32 (exact for sums < 2**24)"]
    want_y, want_acc = _run_ort(model, feed)
    got_y, got_acc = _run_ort(rewritten, feed)
    assert got_acc.dtype == np.int32
    np.testing.assert_array_equal(got_acc, want_acc)
    np.testing.assert_array_equal(got_y, want_y)


def _tvm_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from tvm_compress.backend.build import build
    from tvm_compress.frontend.importers import from_onnx

    return build(from_onnx(model), target="x86").run(x)


def _single_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    keep = [o for o in model.graph.output if o.name == name]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    return model


def _tvm_rejects(model: onnx.ModelProto, op: str) -> None:
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    with pytest.raises(tvm.error.OpNotImplemented, match=op):
        from_onnx(model)


def test_rewritten_ops_import_into_tvm() -> None:
    """TVM's importer rejects the original nodes; the rewritten graphs import, build and match
    ORT on the original."""
    lstm, feed = _dq_lstm_model()
    lstm = _single_output(lstm, "Y")
    _tvm_rejects(lstm, "DynamicQuantizeLSTM")
    rewritten, _ = rewrite_unsupported_ops(lstm)
    np.testing.assert_allclose(_tvm_run(rewritten, feed["X"]), _run_ort(lstm, feed)[0],
                               atol=0.05)  # uint8 rounding of X/H may differ by one step

    conv, feed = _conv_integer_model()
    conv = _single_output(conv, "y")
    _tvm_rejects(conv, "ConvInteger")
    rewritten, _ = rewrite_unsupported_ops(conv)
    want = _run_ort(conv, feed)[0]
    np.testing.assert_allclose(_tvm_run(rewritten, feed["x"]), want,
                               atol=1e-5 * float(np.abs(want).max()))


def _pad_conv_model(pads: list[int], *, value: float | None = None, consumers: int = 1,
                    conv_pads: list[int] | None = None, opset: int = 14
                    ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> Pad -> Conv 3x3 (stride 2, ``conv_pads``) [-> also Relu when ``consumers`` == 2]."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype("float32"),
             "b": rng.standard_normal(4).astype("float32"),
             "pads": np.array(pads, np.int64)}
    pad_inputs = ["x", "pads"]
    if value is not None:
        inits["value"] = np.array(value, np.float32)
        pad_inputs.append("value")
    conv_attrs = {"strides": [2, 2]} | ({"pads": conv_pads} if conv_pads else {})
    nodes = [helper.make_node("Pad", pad_inputs, ["padded"], name="same_pad", mode="constant"),
             helper.make_node("Conv", ["padded", "w", "b"], ["y"], name="conv", **conv_attrs)]
    outputs = ["y"]
    if consumers == 2:
        nodes.append(helper.make_node("Relu", ["padded"], ["r"], name="relu"))
        outputs.append("r")
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, 3, 9, 10])], outputs, inits)
    model.opset_import[0].version = opset
    return model, {"x": rng.standard_normal((1, 3, 9, 10)).astype("float32")}


@pytest.mark.parametrize(("pads", "conv_pads"), [
    ([0, 0, 0, 0, 0, 0, 1, 1], None),            # TensorFlow "same", stride 2: bottom / right
    ([0, 0, 1, 2, 0, 0, 1, 0], [1, 0, 0, 1]),    # added to the Conv's own pads
])
def test_zero_pad_folds_into_conv(pads: list[int], conv_pads: list[int] | None) -> None:
    """Structural: the Pad is gone and the Conv pads by the sum; numeric: ORT gives the same."""
    from tvm_compress.frontend.onnx_rewrites import fold_pads_into_convs

    model, feed = _pad_conv_model(pads, conv_pads=conv_pads)
    folded, notes = fold_pads_into_convs(model)
    assert _op_types(folded) == {"Conv"} and notes == [
        "1 zero Pad node(s) folded into the padding of the Conv each feeds"]
    conv = folded.graph.node[0]
    assert conv.input[0] == "x"
    old = conv_pads or [0, 0, 0, 0]
    want = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
    assert list(helper.get_attribute_value(conv.attribute[-1])) == want
    assert "pads" not in {i.name for i in folded.graph.initializer}
    np.testing.assert_allclose(_run_ort(folded, feed)[0], _run_ort(model, feed)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("pads", "kwargs"), [
    ([0, 0, 1, 1, 0, 0, 1, 1], {"value": 1.0}),         # pads with a non-zero value
    ([0, 1, 0, 0, 0, 0, 0, 0], {}),                     # pads the channel axis
    ([0, 0, -1, 0, 0, 0, 0, 0], {}),                    # a negative pad crops
    ([0, 0, 1, 1, 0, 0, 1, 1], {"consumers": 2}),       # the padded tensor is read elsewhere
])
def test_pad_that_cannot_fold_is_kept(pads: list[int], kwargs: dict) -> None:
    from tvm_compress.frontend.onnx_rewrites import fold_pads_into_convs

    model, _ = _pad_conv_model(pads, **kwargs)
    folded, notes = fold_pads_into_convs(model)
    assert folded is model and notes == []
