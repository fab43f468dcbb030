"""ZeroQ: data-free quantization from BatchNorm-distilled data, Pareto mixed precision."""
