"""Quantization: QuantConfig, calibration (+ native kernels), qparams, PTQ, ONNX QDQ in and out."""
