"""int8 depthwise conv2d, computed exactly in fp32 arithmetic on the converted input.

Integer SIMD on AVX2 has no depthwise-friendly multiply-add: widening each u8 tap to int32 and
multiplying costs three instructions per 8 products where fp32 needs one FMA, which made int8
depthwise layers 2-3x slower than fp32 ones. Every product and partial sum of a u8/s8
depthwise convolution is an integer far below 2**24 (3x3: at most 9 * 255 * 128), so fp32
arithmetic on them is exact. The kernel converts each input tap to fp32 as it loads it (the
padding is a bounds check, as in the fp32 kernel), runs the fp32 depthwise loop nest with FMAs,
and converts the sums back to int32 for the requantization.

Staging a converted, padded fp32 plane per channel block first (until session 11) writes and
reads four bytes per input element where the conversion in the loop reads one: on MobileNetV2's
3x3 layers (AVX2 host, kernels alone) the in-loop conversion is 5-30% faster on the strided and
7x7 layers and equal on the others. 5x5 layers convert each input up to 25 times in the loop;
those with 100+ output pixels per plane stage the plane (``depthwise.STAGE_TAPS``). Built
alone MobileNetV2's int8 kernels still run at 1.3-1.6x the fp32 ones: per tile they add the
u8 -> fp32 conversions and the 32-bit fixed-point requantization epilogue (instruction counts:
``benchmarks/bench_depthwise_int8.py``, ``docs/status.md``).
"""

from __future__ import annotations

import numpy as np
from tvm import relax, s_tir, te, tirx

from tvm_compress.backend.schedules.compute import KERNEL_ATTR, out_size
from tvm_compress.backend.schedules.depthwise import schedule_depthwise_nchwc

DEPTHWISE_NCHWC_INT8 = "depthwise_nchwc_int8"
_EXACT_LIMIT = 2**24  # integers up to here are exact in fp32


def exact_in_fp32(data_dtype: str, weight: np.ndarray, taps: int) -> bool:
    """Whether every partial sum of the convolution stays an exact fp32 integer."""
    largest = 255 if data_dtype == "uint8" else 128
    return taps * largest * int(np.abs(weight.astype(np.int64)).max()) < _EXACT_LIMIT


def depthwise_nchwc_int8(data: te.Tensor, kernel: te.Tensor, *, strides: tuple[int, int],
                         padding: tuple[int, int, int, int],
                         dilation: tuple[int, int], pad_value: int = 0) -> te.Tensor:
    """Depthwise conv2d, data u8/s8 NCHW[b]c, kernel fp32 (integer-valued) OIHW1i[b]o -> int32;
    the padding holds ``pad_value`` (the activation zero point)."""
    n, chunks, height, width, block = (int(d) for d in data.shape)
    kh, kw = int(kernel.shape[2]), int(kernel.shape[3])
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    oh = out_size(height, top + bottom, kh, sh, dh)
    ow = out_size(width, left + right, kw, sw, dw)

    def convert(b, c, y, x, ci):
        inside = tirx.all(y >= top, y < top + height, x >= left, x < left + width)
        value = data[b, c, tirx.max(y - top, 0), tirx.max(x - left, 0), ci].astype("float32")
        return tirx.if_then_else(inside, value, tirx.const(float(pad_value), "float32"))

    staged = te.compute((n, chunks, height + top + bottom, width + left + right, block),
                        convert, name="data_f32")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    acc = te.compute(
        (n, chunks, oh, ow, block),
        lambda b, c, y, x, ci: te.sum(
            staged[b, c, y * sh + ry * dh, x * sw + rx * dw, ci] * kernel[c, 0, ry, rx, 0, ci],
            axis=[ry, rx]),
        name="depthwise_conv2d_NCHWc_int8", attrs={KERNEL_ATTR: DEPTHWISE_NCHWC_INT8})
    return te.compute(acc.shape, lambda *i: acc[i].astype("int32"), name="depthwise_int32")


def legalize_depthwise_int8(bb: relax.BlockBuilder, call: relax.Call, weight: np.ndarray,
                            options: dict) -> relax.Expr | None:
    """The fp32-arithmetic kernel for a packed u8/s8 depthwise conv2d, or None if not exact."""
    data_dtype = str(call.args[0].ty.dtype)
    taps = int(weight.shape[2]) * int(weight.shape[3])
    if options["out_dtype"] != "int32" or not exact_in_fp32(data_dtype, weight, taps):
        return None
    return bb.call_te(depthwise_nchwc_int8, call.args[0],
                      relax.const(weight.astype(np.float32), "float32"),
                      strides=options["strides"], padding=options["padding"],
                      dilation=options["dilation"], pad_value=options.get("pad_value", 0),
                      primfunc_name_hint="depthwise_conv2d_int8")


def schedule_depthwise_nchwc_int8(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, *,
                                  lanes: int, registers: int, cores: int) -> None:
    """The fp32 depthwise schedule, the conversion inlined into the taps, with the integer
    requantization epilogue."""
    schedule_depthwise_nchwc(sch, block, lanes=lanes, registers=registers, cores=cores,
                             requantize=True)
