"""ONNX Runtime's own int8 model (``quantize_static``, QDQ format) as the int8 baseline."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def ort_quantize_static(onnx_model: Any, calib: np.ndarray, *, per_channel: bool = True) -> Any:
    """Quantize an fp32 ONNX model with ONNX Runtime's static QDQ quantizer (u8 activations,
    s8 weights, min/max calibration on ``calib``), returning the quantized ModelProto."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = onnx_model.graph.input[0].name
    dim0 = onnx_model.graph.input[0].type.tensor_type.shape.dim[0]
    batch = dim0.dim_value if dim0.HasField("dim_value") and dim0.dim_value > 0 else 1
    if len(calib) < batch:  # a static batch larger than the calibration set: repeat it
        calib = np.concatenate([calib] * -(-batch // len(calib)))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:  # batches of the model's static batch size
            self.items = iter(calib[i:i + batch] for i in range(0, len(calib) - batch + 1,
                                                                batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else {input_name: item}

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(onnx_model, str(src))
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=per_channel)
        return onnx.load(str(out))
