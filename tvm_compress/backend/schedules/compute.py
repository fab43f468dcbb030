"""TE computes for channel-blocked (NCHW[x]c) convolutions and the legalization that uses them.

TVM 0.27's conv2d legalization handles only 4-D layouts. The computes here carry a block
annotation (``KERNEL_ATTR``) that names the kernel, so the schedule rules find their block after
fusion without guessing from the loop structure.
"""

from __future__ import annotations

import re
from typing import Any

import tvm
from tvm import relax, te, topi

KERNEL_ATTR = "tvm_compress.kernel"
CONV_NCHWC = "conv2d_nchwc"
DEPTHWISE_NCHWC = "depthwise_nchwc"

_BLOCKED = re.compile(r"^NCHW(\d+)c$")
_BLOCKED_KERNEL = re.compile(r"^OIHW(\d+)i(\d+)o$")


def pad_nchwc(data: te.Tensor, padding: tuple[int, int, int, int],
              pad_value: int | float = 0) -> te.Tensor:
    """Pad the H and W axes of an NCHW[x]c tensor by (top, left, bottom, right) with
    ``pad_value`` (an integer conv's activation zero point, else 0)."""
    top, left, bottom, right = padding
    if not any(padding):
        return data
    return topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0],
                       pad_value=pad_value, name="data_pad")


def out_size(size: int, pad: int, kernel: int, stride: int, dilation: int) -> int:
    """Output extent of a convolution along one axis (``pad`` = both sides together)."""
    return (size + pad - (kernel - 1) * dilation - 1) // stride + 1


def conv2d_nchwc(data: te.Tensor, kernel: te.Tensor, *, strides: tuple[int, int],
                 padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int,
                 out_dtype: str) -> te.Tensor:
    """Regular or grouped conv2d, data NCHW[ib]c, kernel OIHW[ib]i[ob]o, output NCHW[ob]c.

    For grouped convolutions every group must hold whole channel blocks on both sides.
    """
    n, _, height, width, ib = (int(d) for d in data.shape)
    oc_chunks, ic_group_chunks, kh, kw, _, ob = (int(d) for d in kernel.shape)
    (sh, sw), (dh, dw) = strides, dilation
    oh = out_size(height, padding[0] + padding[2], kh, sh, dh)
    ow = out_size(width, padding[1] + padding[3], kw, sw, dw)
    oc_group_chunks = oc_chunks // groups
    padded = pad_nchwc(data, padding)
    ico = te.reduce_axis((0, ic_group_chunks), name="ico")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    ici = te.reduce_axis((0, ib), name="ici")

    def body(b, oc, y, x, oi):
        ic_chunk = oc // oc_group_chunks * ic_group_chunks + ico if groups > 1 else ico
        value = padded[b, ic_chunk, y * sh + ry * dh, x * sw + rx * dw, ici]
        return te.sum(value.astype(out_dtype) * kernel[oc, ico, ry, rx, ici, oi].astype(out_dtype),
                      axis=[ico, ry, rx, ici])

    return te.compute((n, oc_chunks, oh, ow, ob), body, name="conv2d_NCHWc",
                      attrs={KERNEL_ATTR: CONV_NCHWC})


def depthwise_nchwc(data: te.Tensor, kernel: te.Tensor, *, strides: tuple[int, int],
                    padding: tuple[int, int, int, int], dilation: tuple[int, int],
                    out_dtype: str) -> te.Tensor:
    """Depthwise conv2d (multiplier 1), data NCHW[b]c, kernel OIHW1i[b]o, output NCHW[b]c."""
    n, chunks, height, width, block = (int(d) for d in data.shape)
    kh, kw = int(kernel.shape[2]), int(kernel.shape[3])
    (sh, sw), (dh, dw) = strides, dilation
    oh = out_size(height, padding[0] + padding[2], kh, sh, dh)
    ow = out_size(width, padding[1] + padding[3], kw, sw, dw)
    padded = pad_nchwc(data, padding)
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def body(b, c, y, x, ci):
        value = padded[b, c, y * sh + ry * dh, x * sw + rx * dw, ci]
        return te.sum(value.astype(out_dtype) * kernel[c, 0, ry, rx, 0, ci].astype(out_dtype),
                      axis=[ry, rx])

    return te.compute((n, chunks, oh, ow, block), body, name="depthwise_conv2d_NCHWc",
                      attrs={KERNEL_ATTR: DEPTHWISE_NCHWC})


def tvm_legalization(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``call`` legalized as TVM does it (for the overrides here that do not apply)."""
    return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def blocked_conv_options(call: relax.Call) -> dict | None:
    """Strides, padding (top, left, bottom, right), dilation and out_dtype of an NCHW[x]c
    conv2d, or None when its layouts are not blocked."""
    attrs = call.attrs
    if not (_BLOCKED.match(attrs.data_layout) and _BLOCKED_KERNEL.match(attrs.kernel_layout)
            and _BLOCKED.match(attrs.out_layout)):
        return None
    padding = _ints(attrs.padding)
    if len(padding) == 2:
        padding = padding + padding
    return {"strides": _ints(attrs.strides), "padding": padding,
            "dilation": _ints(attrs.dilation),
            "out_dtype": str(attrs.out_dtype or call.args[0].ty.dtype)}


def legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call, int8_legalizer: Any = None
                    ) -> relax.Expr:
    """Legalize ``relax.nn.conv2d``: NCHW[x]c layouts here, every other layout as TVM does.

    ``int8_legalizer(bb, call, options)`` (``schedules.int8``, which builds on this module's
    computes) gets 8-bit blocked convs first; it returns None for those it does not tensorize.
    """
    attrs = call.attrs
    kernel_match = _BLOCKED_KERNEL.match(attrs.kernel_layout)
    options = blocked_conv_options(call)
    if options is None or kernel_match is None:
        return tvm_legalization(bb, call)
    groups = int(attrs.groups)
    data_ty = call.args[0].ty
    channels = int(data_ty.shape[1]) * int(data_ty.shape[4])
    if int8_legalizer is not None and str(data_ty.dtype) in ("uint8", "int8"):
        tensorized = int8_legalizer(bb, call, options)
        if tensorized is not None:
            return tensorized
    out_ty = call.ty
    out_channels = int(out_ty.shape[1]) * int(out_ty.shape[4])
    # channel multiplier 1 only: a multiplier-m depthwise conv is a grouped conv here
    if groups > 1 and groups == channels == out_channels and int(kernel_match.group(1)) == 1:
        return bb.call_te(depthwise_nchwc, call.args[0], call.args[1], **options,
                          primfunc_name_hint="depthwise_conv2d_nchwc")
    return bb.call_te(conv2d_nchwc, call.args[0], call.args[1], groups=groups, **options,
                      primfunc_name_hint="conv2d_nchwc")
