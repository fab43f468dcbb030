"""Frontends: numerics against the source framework, stable names, and clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tvm_compress.backend.build import build
from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import export_onnx, from_onnx, from_torch
from tvm_compress.frontend.layers import LayerTable, restore_layer_names


def test_torch_import_matches_torch(tiny_cnn, tiny_input):
    model = from_torch(tiny_cnn, tiny_input, name="tiny")
    out = build(model).run(tiny_input)
    expected = tiny_cnn(torch.from_numpy(tiny_input)).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert model.layers.names == ["stem.0", "dw.0", "pw.0", "head"]
    assert [x.kind for x in model.layers] == ["conv", "depthwise", "conv", "linear"]


def test_onnx_import_matches_torch_and_names(tiny_cnn, tiny_input, tmp_path):
    path = export_onnx(tiny_cnn, tiny_input, tmp_path / "tiny.onnx")
    model = from_onnx(path)
    out = build(model).run(tiny_input)
    expected = tiny_cnn(torch.from_numpy(tiny_input)).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert model.layers.names == from_torch(tiny_cnn, tiny_input).layers.names
    # A ModelProto works as well as a path.
    assert from_onnx(onnx.load(str(path))).layers.names == model.layers.names


def test_layer_table_macs_and_params(tiny_cnn, tiny_input):
    table = from_torch(tiny_cnn, tiny_input).layers
    stem, dw, pw, head = table
    assert stem.macs == 16 * 16 * 16 * 3 * 9 and stem.params == 16 * 3 * 9
    assert dw.macs == 16 * 16 * 16 * 9 and dw.groups == 16
    assert pw.macs == 16 * 16 * 16 * 16
    assert head.macs == 16 * 10 and head.params == 16 * 10 + 10  # bias counted
    assert table.total_macs == sum(x.macs for x in table)


def test_mobilenet_v2_names_identical_across_frontends(mobilenet_v2_model, mobilenet_v2_onnx_path):
    onnx_model = from_onnx(mobilenet_v2_onnx_path)
    torch_names = mobilenet_v2_model.layers.names
    assert torch_names == onnx_model.layers.names
    assert len(torch_names) == 53 and torch_names[0] == "features.0.0"
    assert torch_names[-1] == "classifier.1"
    table = mobilenet_v2_model.layers
    assert (table.count("conv"), table.count("depthwise"), table.count("linear")) == (35, 17, 1)
    assert table.total_macs == 300_774_272  # the published ~300M MACs of MobileNetV2 1.0


def test_mobilenet_v2_tvm_vs_torch_vs_onnxruntime(mobilenet_v2_model, mobilenet_v2_torch,
                                                 mobilenet_v2_onnx_path, imagenet_photos):
    import onnxruntime as ort

    images, labels = imagenet_photos
    compiled = build(mobilenet_v2_model)
    tvm_logits = compiled.predict(images)
    with torch.inference_mode():
        torch_logits = mobilenet_v2_torch(torch.from_numpy(images)).numpy()
    session = ort.InferenceSession(str(mobilenet_v2_onnx_path),
                                   providers=["CPUExecutionProvider"])
    ort_logits = np.concatenate([session.run(None, {"input": images[i:i + 1]})[0]
                                 for i in range(len(images))])
    assert np.max(np.abs(tvm_logits - torch_logits)) <= 1e-4
    assert np.max(np.abs(tvm_logits - ort_logits)) <= 1e-4
    for logits in (tvm_logits, torch_logits, ort_logits):
        assert int(np.sum(np.argmax(logits, 1) == labels)) == 18


def test_layer_names_survive_mutators_and_are_restored_after_tvm_rewrites(tiny_cnn, tiny_input):
    from tvm import relax

    model = from_torch(tiny_cnn, tiny_input)
    # C++ mutators (FoldConstant, BindParams, ...) keep variable names.
    assert LayerTable.from_module(relax.transform.FoldConstant()(model.mod)).names == \
        model.layers.names
    # Pattern-rewrite passes drop them; restore_layer_names puts them back by position.
    folded = relax.transform.FoldConstant()(relax.transform.FoldBatchnormToConv2D()(model.mod))
    assert LayerTable.from_module(folded).names != model.layers.names
    restored = restore_layer_names(model.mod, folded)
    assert LayerTable.from_module(restored).names == model.layers.names
    np.testing.assert_allclose(build(model.with_mod(restored)).run(tiny_input),
                               build(model).run(tiny_input), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="changed the layers"):
        restore_layer_names(model.mod, from_torch(tiny_cnn.stem, tiny_input).mod)


# ------------------------------------------------------------------------------------ bad input


def _tiny_onnx(op: str = "Relu", batch_dim: int | str = 1, width: int | str = 4) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 4, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node(op, ["x"], ["y"], name="my_node")
    graph = helper.make_graph([node], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_missing_file():
    with pytest.raises(UserError, match="not found"):
        from_onnx("/nonexistent/model.onnx")


def test_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a protobuf at all " * 10)
    with pytest.raises(UserError, match="not a valid ONNX model"):
        from_onnx(bad)


def test_unsupported_operator_names_op_and_node():
    with pytest.raises(UserError, match=r"operator QLinearConv \(node 'my_node'\)"):
        from_onnx(_tiny_onnx("QLinearConv"))


def test_dynamic_batch_is_pinned_and_reported():
    model = from_onnx(_tiny_onnx(batch_dim="N"), batch=2)
    assert model.input_shape == (2, 3, 4, 4)
    assert any("dynamic batch" in note and "pinned to 2" in note for note in model.notes)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype("float32")
    np.testing.assert_array_equal(build(model).run(x), np.maximum(x, 0))


def test_dynamic_spatial_dim_is_an_error():
    with pytest.raises(UserError, match="dynamic dimension 3"):
        from_onnx(_tiny_onnx(width="W"))


def test_input_shape_and_dtype_mismatch():
    compiled = build(from_onnx(_tiny_onnx()))
    with pytest.raises(UserError, match=r"shape \(1, 3, 8, 8\).*expects \(1, 3, 4, 4\)"):
        compiled.run(np.zeros((1, 3, 8, 8), "float32"))
    with pytest.raises(UserError, match="dtype float64"):
        compiled.run(np.zeros((1, 3, 4, 4), "float64"))
