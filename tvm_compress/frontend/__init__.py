"""Frontends: ONNX preparation, importers (ONNX, torch) and the LayerTable."""
