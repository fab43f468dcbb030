"""ONNX preparation (frontend.prepare): external data, pinned shapes, folding, opset, ORT check."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tvm_compress.backend.build import build
from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import from_onnx
from tvm_compress.frontend.inputs import InputSpec
from tvm_compress.frontend.ort_check import compare_with_original
from tvm_compress.frontend.prepare import prepare_onnx

RNG = np.random.default_rng(0)


def _conv_model(dims: list, *, weight: np.ndarray | None = None, opset: int = 17
                ) -> onnx.ModelProto:
    """x (dims) -> Conv 3->4 3x3 pad 1 -> Relu -> y."""
    w = weight if weight is not None else RNG.standard_normal((4, 3, 3, 3)).astype("float32")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ort(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


# ---------------------------------------------------------------------------- external data


def test_external_data_is_read_and_noted(tmp_path):
    model = _conv_model([1, 3, 8, 8])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    assert (tmp_path / "model.onnx.data").stat().st_size >= 4 * 3 * 3 * 3 * 4
    imported = from_onnx(path)
    assert any("model.onnx.data" in n for n in imported.notes)
    x = RNG.standard_normal((1, 3, 8, 8)).astype("float32")
    want = _ort(onnx.load(str(path)), {"x": x})[0]
    np.testing.assert_allclose(build(imported).run(x), want, atol=1e-5)


def test_missing_external_data_file_is_named(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_conv_model([1, 3, 8, 8]), str(path), save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(UserError, match=r"external file 'weights.bin', which is missing"):
        prepare_onnx(path)


def test_truncated_file_is_a_user_error(tmp_path):
    data = _conv_model([1, 3, 8, 8]).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or not ONNX"):
        prepare_onnx(path)


def test_file_cut_at_a_message_boundary_is_a_user_error():
    model = _conv_model([1, 3, 8, 8])
    del model.graph.initializer[:]  # what a file cut before its weights parses to
    with pytest.raises(UserError, match=r"Conv node 'conv' reads 'w', which the file does not "
                                        "define: it is truncated or broken"):
        prepare_onnx(model)
    model = _conv_model([1, 3, 8, 8])
    del model.graph.node[1:]
    with pytest.raises(UserError, match="graph output 'y' is not computed by any node"):
        prepare_onnx(model)


def test_nan_weight_is_named():
    w = np.ones((4, 3, 3, 3), "float32")
    w[0, 0, 0, 0] = np.nan
    with pytest.raises(UserError, match=r"weight 'w' \(used by Conv node 'conv'\) has 1 NaN/Inf"):
        prepare_onnx(_conv_model([1, 3, 8, 8], weight=w))


# --------------------------------------------------------------------------------- shapes


def test_input_shapes_pin_dynamic_dims_and_batch():
    prepared = prepare_onnx(_conv_model(["N", 3, "H", "W"]), batch=2,
                            input_shapes={"x": (2, 3, 16, 24)})
    assert prepared.inputs[0].shape == (2, 3, 16, 24)
    assert prepared.notes[0] == "input 'x' Nx3xHxW pinned to 2x3x16x24 (--input-shape)"
    assert prepared.notes[1].startswith("prepared model checked against the original")
    dims = [d.dim_value for d in prepared.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 16, 24]
    # The unnamed form is the only input; the batch alone pins only a dynamic first dim.
    assert prepare_onnx(_conv_model([1, 3, "H", "W"]),
                        input_shapes={None: (1, 3, 5, 7)}).inputs[0].shape == (1, 3, 5, 7)
    batched = prepare_onnx(_conv_model(["N", 3, 8, 8]), batch=4)
    assert batched.inputs[0].shape == (4, 3, 8, 8)
    assert "dynamic batch set by --batch 4" in batched.notes[0]


@pytest.mark.parametrize("shapes, message", [
    (None, r"dynamic dimension 2 \('H'\).*--input-shape x:1x3x<H>x<W>"),
    ({"y": (1, 3, 8, 8)}, r"has no input 'y'; its inputs are: x 1x3xHxW"),
    ({"x": (1, 3, 8)}, r"has rank 3 but input 'x' is 1x3xHxW \(rank 4\); give 4 dimensions"),
    ({"x": (1, 4, 8, 8)}, r"dimension 1 fixed to 3 in the model"),
    ({"x": (1, 3, 0, 8)}, "every dimension must be positive"),
])
def test_bad_input_shapes(shapes, message):
    with pytest.raises(UserError, match=message):
        prepare_onnx(_conv_model([1, 3, "H", "W"]), input_shapes=shapes)


def test_unnamed_shape_on_a_two_input_model_lists_the_inputs():
    with pytest.raises(UserError, match=r"has 2 inputs \(a 1x4, b 1x4\); name the input"):
        prepare_onnx(_two_in_two_out(), input_shapes={None: (1, 4)})


# ------------------------------------------------------------------ folding, opset, rewrites


class _ShapeReshape(torch.nn.Module):
    """TorchScript-style shape arithmetic: flatten through x.shape, and 'same' padding computed
    from the spatial size (the two patterns TVM's importer rejects with dynamic shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        pad_h, pad_w = (h + 1) % 2 + 1, (w + 1) % 2 + 1
        x = torch.nn.functional.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2,
                                        pad_h - pad_h // 2])
        y = self.conv(x)
        return y.reshape(y.shape[0], -1)


@pytest.fixture(scope="module")
def shape_arith_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("shape") / "shape_arith.onnx"
    torch.manual_seed(0)
    torch.onnx.export(_ShapeReshape().eval(), (torch.randn(1, 3, 16, 20),), str(path),
                      input_names=["input"], output_names=["output"], dynamo=False,
                      dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}})
    return path


def test_shape_subgraphs_are_folded_and_checked_against_ort(shape_arith_onnx):
    original = onnx.load(str(shape_arith_onnx))
    assert any(n.op_type == "Shape" for n in original.graph.node)
    prepared = prepare_onnx(shape_arith_onnx, input_shapes={"input": (1, 3, 16, 20)})
    ops = {n.op_type for n in prepared.model.graph.node}
    assert "Shape" not in ops and "Gather" not in ops and "Conv" in ops
    folded = next(n for n in prepared.notes if n.startswith("onnxslim"))
    assert "Shape" in folded and "removed" in folded
    assert prepared.notes[-1].startswith("prepared model checked against the original under "
                                         "ONNX Runtime: max |diff| 0 over 1 output(s)")
    model = from_onnx(shape_arith_onnx, input_shapes={"input": (1, 3, 16, 20)})
    x = RNG.standard_normal((1, 3, 16, 20)).astype("float32")
    np.testing.assert_allclose(build(model).run(x), _ort(original, {"input": x})[0], atol=1e-5)
    assert model.layers.names == ["conv"]


def test_batchnorm_survives_preparation(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    path = tmp_path / "bn.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], dynamic_axes={"input": {0: "N"}})
    prepared = prepare_onnx(path)
    assert [n.op_type for n in prepared.model.graph.node] == ["Conv", "BatchNormalization"]


def _slice1_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Slice", ["x"], ["y"], name="crop", axes=[2, 3], starts=[1, 2],
                            ends=[7, 6])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 9)])


def test_old_opset_whose_attributes_became_inputs_is_converted():
    model = _slice1_model()
    prepared = prepare_onnx(model)
    assert prepared.notes[0] == ("opset 9 converted to 13 (Slice is converted from opset 13 on "
                                 "in TVM's importer)")
    assert "max |diff| 0" in prepared.notes[-1]
    x = RNG.standard_normal((1, 3, 8, 8)).astype("float32")
    np.testing.assert_array_equal(build(from_onnx(model)).run(x), x[:, :, 1:7, 2:6])


def test_type_only_schema_changes_are_not_converted():
    # Relu-6 and Conv-1 differ from TVM's oldest converters (13, 11) only in types.
    prepared = prepare_onnx(_conv_model([1, 3, 8, 8], opset=9))
    assert not any("opset" in n for n in prepared.notes)


def test_rewrite_notes_are_kept_and_a_wrong_rewrite_is_caught(monkeypatch):
    from tvm_compress.frontend import onnx_rewrites

    def good(model):
        return model, ["rewrote nothing, said so"]

    monkeypatch.setattr(onnx_rewrites, "rewrite_unsupported_ops", good)
    assert "rewrote nothing, said so" in prepare_onnx(_conv_model([1, 3, 8, 8])).notes

    def wrong(model):
        model = onnx.ModelProto.FromString(model.SerializeToString())
        next(n for n in model.graph.node if n.op_type == "Relu").op_type = "Sigmoid"
        return model, ["Relu rewritten"]

    monkeypatch.setattr(onnx_rewrites, "rewrite_unsupported_ops", wrong)
    with pytest.raises(RuntimeError, match="differs from the original under ONNX Runtime"):
        prepare_onnx(_conv_model([1, 3, 8, 8]))


def test_unsupported_op_names_op_and_node():
    model = _conv_model([1, 3, 8, 8])
    model.graph.node[1].op_type = "NotAnOnnxOp"
    model.graph.node[1].domain = "custom"
    with pytest.raises(UserError, match=r"operator NotAnOnnxOp \(node 'relu'\) is not supported"):
        prepare_onnx(model)


def test_compare_with_original_rejects_shapes_the_model_cannot_take():
    specs = (InputSpec("x", (1, 5, 8, 8), "float32"),)
    with pytest.raises(UserError, match="ONNX Runtime cannot run the model with inputs x:1x5x8x8"):
        compare_with_original(_conv_model([1, "C", 8, 8]), _conv_model([1, 3, 8, 8]),
                                   specs, "m.onnx")


# ----------------------------------------------------------------- several inputs and outputs


def _two_in_two_out() -> onnx.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(RNG.standard_normal((4, 3)).astype("float32"), "w")
    nodes = [helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "w"], ["out_mm"], name="fc"),
             helper.make_node("Mul", ["a", "b"], ["out_mul"], name="mul")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out_mm",
                                                                                  "out_mul")]
    return helper.make_model(helper.make_graph(nodes, "g", [a, b], outs, [w]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_two_inputs_two_outputs_import_and_run():
    model = _two_in_two_out()
    imported = from_onnx(model)
    assert [s.name for s in imported.inputs] == ["a", "b"]
    assert imported.outputs == ("out_mm", "out_mul")
    feed = {k: RNG.standard_normal((3, 4)).astype("float32") for k in ("a", "b")}
    got = build(imported).predict(feed)
    want = [np.concatenate(x) for x in zip(*[_ort(model, {k: v[i:i + 1] for k, v in feed.items()})
                                             for i in range(3)], strict=True)]
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)
