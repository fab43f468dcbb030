"""Default (untuned) CPU schedules for CNN operators: conv2d (regular, grouped, depthwise) in
channel-blocked layouts, fp32 and (AVX2) exact int8 with fused requantization, dense/matmul,
pooling and element-wise functions.

Entry point: :func:`default_schedule_pipeline`.
"""

from tvm_compress.backend.schedules.pipeline import default_schedule_pipeline, lower_passes

__all__ = ["default_schedule_pipeline", "lower_passes"]
