"""Quantune: XGBoost-guided search over post-training quantization configurations."""
