"""frontend.casts: the ONNX importer's float -> integer Cast chain as one conversion."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import relax_op_names
from onnx import TensorProto, helper

from tvm_compress.backend.build import build
from tvm_compress.frontend.importers import from_onnx

_NUMPY = {TensorProto.INT32: np.int32, TensorProto.INT16: np.int16, TensorProto.INT8: np.int8,
          TensorProto.UINT8: np.uint8, TensorProto.UINT16: np.uint16}


def _cast_model(to: int) -> object:
    """y = float(Cast(round(x * 1.5), to)): what ONNX Runtime's dynamic quantization does with
    a ConvInteger's output."""
    nodes = [helper.make_node("Mul", ["x", "k"], ["m"]),
             helper.make_node("Round", ["m"], ["r"]),
             helper.make_node("Cast", ["r"], ["c"], to=to),
             helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        nodes, "cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor("k", TensorProto.FLOAT, [], [1.5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("to", list(_NUMPY))
def test_float_to_integer_cast_is_one_conversion(to: int) -> None:
    import onnxruntime as ort

    onnx_model = _cast_model(to)
    model = from_onnx(onnx_model, name="cast")
    ops = relax_op_names(model.mod)
    # structural: no sanitizing (isfinite / where) or int64 wrap-around (floor_mod) left
    assert not ops & {"relax.isfinite", "relax.where", "relax.floor_mod",
                      "relax.bitwise_and"}, ops
    assert "relax.astype" in ops
    # numeric: values across and beyond the 8- and 16-bit ranges (which wrap), negatives,
    # halves (Round is half to even)
    x = np.random.default_rng(0).uniform(-30000, 30000, (1, 4, 8, 8)).astype("float32")
    x[0, 0, 0, :4] = [0.5, 1.5, -0.5, -2.5]
    out = build(model).run(x)
    wrapped = np.round(x * np.float32(1.5)).astype(np.int32).astype(_NUMPY[to])
    np.testing.assert_array_equal(out, wrapped.astype(np.float32))
    session = ort.InferenceSession(onnx_model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(out, session.run(None, {"x": x})[0])

