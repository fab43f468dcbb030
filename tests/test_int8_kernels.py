"""int8 kernels of the default CPU schedules: exact against the unscheduled build.

Modules here have the form ``RealizeInteger`` emits: u8/s8 activations, s8 weights, int32
accumulators, bias and fixed-point requantization back to 8 bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import relax_main
from tvm import relax, tirx
from tvm.target.codegen import target_has_features

from tvm_compress.backend.build import InputSpec, build
from tvm_compress.backend.schedules import default_schedule_pipeline
from tvm_compress.backend.schedules.hardware import host_cpu
from tvm_compress.backend.schedules.int8 import pick_kind
from tvm_compress.backend.schedules.requantize import lower_requantize
from tvm_compress.passes.realize_integer import mantissa_bits, requantize_int32

# The AVX2 kernels (8 float lanes, the vpmaddubsw int8 micro-kernel), run here: any AVX2 host
# executes them, including AVX-512 ones, whose own default would pick 16 lanes / VNNI instead.
HOST = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2", "num-cores": 2})
_THIS_CPU = tvm.target.Target({"kind": "llvm", **host_cpu()})
needs_avx2 = pytest.mark.skipif(not target_has_features("avx2", _THIS_CPU),
                                reason="the int8 micro-kernel needs an AVX2 host")


def _conv_block(bb: relax.BlockBuilder, x: relax.Expr, weight: np.ndarray, *, stride: int,
                padding: int, groups: int, zero_point: int, requantize: bool,
                per_tensor: bool = False) -> relax.Expr:
    if zero_point:  # as RealizeInteger pads with the activation zero point
        x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, *(padding,) * 4], pad_value=zero_point))
        padding = 0
    acc = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), strides=stride, padding=padding,
                                     groups=groups, out_dtype="int32"))
    channels = weight.shape[0]
    bias = np.random.default_rng(1).integers(-5000, 5000, (1, channels, 1, 1))
    acc = bb.emit(relax.op.add(acc, relax.const(bias.astype("int32"))))
    if not requantize:
        return acc
    multiplier = np.random.default_rng(2).uniform(1e-4, 4e-3, 1 if per_tensor else channels)
    return requantize_int32(bb, acc, multiplier[0] if per_tensor else multiplier, 3, 0, 255,
                            "uint8", 4)


_module = relax_main


def _compare(mod: tvm.IRModule, x: np.ndarray) -> tvm.IRModule:
    """Assert the scheduled build equals the unscheduled one; return the scheduled module."""
    spec = InputSpec("x", x.shape, str(x.dtype))
    expected = build(mod, input_spec=spec, schedule="none").run(x)
    np.testing.assert_array_equal(build(mod, target=HOST, input_spec=spec).run(x), expected)
    return default_schedule_pipeline(HOST)(mod)


def _tensorized(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs that call the AVX2 dot product."""
    return [gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and "llvm.x86.avx2.pmadd" in f.script()]


def _weights(shape: tuple[int, ...], lo: int = -127, hi: int = 127, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi + 1, shape).astype("int8")


def _activations(shape: tuple[int, ...], dtype: str = "uint8", seed: int = 3) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(info.min, info.max + 1, shape).astype(dtype)


CONV_CASES = {  # cin, cout, size, kernel, stride, zero point of the padding
    "1x1": (24, 48, 7, 1, 1, 0),
    "3x3": (16, 16, 9, 3, 1, 0),
    "3x3_s2_zero_point_pad": (8, 16, 11, 3, 2, 114),
    "stem_3_channels": (3, 16, 12, 3, 2, 114),
    "12_channels_4_blocks": (12, 8, 6, 3, 1, 0),
}


@needs_avx2
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_int8_conv_exact(case: str, dtype: str) -> None:
    cin, cout, size, k, stride, zp = CONV_CASES[case]
    weight = _weights((cout, cin, k, k))
    mod = _module(relax.TensorType((1, cin, size, size), dtype), lambda bb, x: _conv_block(
        bb, x, weight, stride=stride, padding=k // 2, groups=1, zero_point=zp, requantize=True))
    scheduled = _compare(mod, _activations((1, cin, size, size), dtype))
    assert _tensorized(scheduled)
    # a zero-point padding (zp != 0) is the kernel's own, not an nn.pad kernel before it
    assert not [gv for gv in scheduled.functions if gv.name_hint.startswith("pad")]


def _kernels_using(mod: tvm.IRModule, intrinsic: str) -> list[str]:
    return [name for name in _tensorized(mod) if intrinsic in mod[name].script()]


@needs_avx2
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_saturation_large_u8_times_large_s8_is_exact(dtype: str) -> None:
    # Every pair sum of vpmaddubsw on the raw operands would be 2 * 255 * 127 > 32767.
    info = np.iinfo(dtype)
    weight = np.full((16, 16, 1, 1), 127, "int8")
    weight[8:] = -128
    x = np.full((1, 16, 4, 4), info.max, dtype)
    x[..., 0] = info.min
    mod = _module(relax.TensorType(x.shape, dtype), lambda bb, v: _conv_block(
        bb, v, weight, stride=1, padding=0, groups=1, zero_point=0, requantize=False))
    scheduled = _compare(mod, x)
    assert _tensorized(scheduled) and not _kernels_using(scheduled, "pmadd.ub.sw")


@needs_avx2
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_pair_safe_weights_use_the_u8_kernel(dtype: str) -> None:
    weight = _weights((16, 16, 3, 3), -64, 64)  # 7-bit weights: no pair can saturate
    x = _activations((1, 16, 6, 6), dtype)
    mod = _module(relax.TensorType(x.shape, dtype), lambda bb, v: _conv_block(
        bb, v, weight, stride=1, padding=1, groups=1, zero_point=0, requantize=True))
    assert _kernels_using(_compare(mod, x), "pmadd.ub.sw")


@needs_avx2
def test_per_tensor_multiplier_with_per_channel_bias() -> None:
    weight = _weights((16, 8, 1, 1))
    x = _activations((1, 8, 6, 6))
    mod = _module(relax.TensorType(x.shape, "uint8"), lambda bb, v: _conv_block(
        bb, v, weight, stride=1, padding=0, groups=1, zero_point=0, requantize=True,
        per_tensor=True))
    assert _tensorized(_compare(mod, x))


def _depthwise_kernels(size: tuple[int, int], taps: int, stride: int,
                       zero_point: int) -> list[tirx.PrimFunc]:
    """The scheduled depthwise kernels of a 16-channel int8 depthwise layer, after checking the
    build equals the unscheduled one; each must come from the int8 depthwise rule."""
    weight = _weights((16, 1, taps, taps))
    x = _activations((1, 16, *size))
    mod = _module(relax.TensorType(x.shape, "uint8"), lambda bb, v: _conv_block(
        bb, v, weight, stride=stride, padding=taps // 2, groups=16, zero_point=zero_point,
        requantize=True))
    scheduled = _compare(mod, x)
    kernels = [f for gv, f in scheduled.functions_items()
               if isinstance(f, tirx.PrimFunc) and "depthwise" in gv.name_hint]
    assert kernels and all(str(f.attrs.get("tvm_compress.rule")) == "depthwise_nchwc_int8"
                           for f in kernels)
    return kernels


@needs_avx2
@pytest.mark.parametrize(("stride", "zero_point"), [(1, 0), (2, 0), (1, 77)])
def test_int8_depthwise_exact(stride: int, zero_point: int) -> None:
    kernels = _depthwise_kernels((10, 10), 3, stride, zero_point)
    # the u8 -> fp32 conversion is inlined into the taps: no staged fp32 copy of the input
    assert all("data_f32" not in f.script() for f in kernels)


@needs_avx2
@pytest.mark.parametrize(("size", "stride", "zero_point", "staged"),
                         [((20, 19), 1, 0, True), ((20, 19), 1, 77, True),
                          ((16, 15), 2, 77, False)])
def test_int8_depthwise_5x5_short_rows_exact(size: tuple[int, int], stride: int,
                                             zero_point: int, staged: bool) -> None:
    """5x5 taps on rows of 19 or 8 pixels (no divisor tile of 5-8): the tile spans several
    rows; with 25 taps and 100+ output pixels per plane (20 x 19, not 8 x 8) the input is
    converted once into an fp32 copy instead of at every tap."""
    kernels = _depthwise_kernels(size, 5, stride, zero_point)
    assert ["data_f32" in f.script() for f in kernels] == [staged] * len(kernels)


@needs_avx2
def test_int8_dense_exact() -> None:
    weight = _weights((64, 40))
    x = _activations((1, 64))

    def body(bb: relax.BlockBuilder, v: relax.Expr) -> relax.Expr:
        acc = bb.emit(relax.op.matmul(v, relax.const(weight), out_dtype="int32"))
        return relax.op.multiply(bb.emit(relax.op.astype(acc, "float32")),
                                 relax.const(np.float32(0.01)))

    _compare(_module(relax.TensorType(x.shape, "uint8"), body), x)


def test_pick_kind() -> None:
    def kind(*quad: int) -> str:
        return pick_kind(np.array(quad, "int8").reshape(1, 1, 1, 1, 1, 1, 4))

    assert kind(100, 28, -128, 0) == "direct"  # pair sums 128 and -128 fit int16 for any u8
    assert kind(100, 29, 0, 0) == "int16"
    assert kind(0, 0, -128, -1) == "int16"


def _int64_ops(mod: tvm.IRModule) -> int:
    """int64 bindings left in ``main`` once ``lower_requantize`` ran (and dead code is gone)."""
    lowered = relax.transform.DeadCodeElimination()(lower_requantize(mod))
    return sum(1 for line in lowered["main"].script(show_meta=False).splitlines()
               if 'dtype="int64"' in line)


def test_requantize_lowering_is_exact_for_extreme_accumulators() -> None:
    info = np.iinfo("int32")
    acc = np.random.default_rng(4).integers(info.min // 2, info.max // 2, (1, 16, 4, 4))
    acc[0, :, 0, 0] = [info.min, info.max, 0, -1, 1, *range(11)]
    acc = acc.astype("int32")
    multiplier = np.geomspace(1e-9, 0.9, 16)  # shifts from 61 down to 31 (not lowered)

    def body(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        return requantize_int32(bb, x, multiplier, -7, -128, 127, "int8", 4)

    mod = _module(relax.TensorType(acc.shape, "int32"), body)
    multiplier[-1] = 1e-3
    lowered = _module(relax.TensorType(acc.shape, "int32"), body)
    assert _int64_ops(mod) > 0  # a shift below 32: left as it is
    assert _int64_ops(lowered) == 0
    for module in (mod, lowered):
        _compare(module, acc)


@needs_avx2
@pytest.mark.parametrize("groups", [16, 1])
def test_multipliers_of_a_half_and_more_and_zero_are_lowered_exactly(groups: int) -> None:
    """Real multipliers >= 1/2 have shifts below 32: the accumulator, bounded by the conv's
    weights, is shifted left first (``requantize._pre_shift``). Channels with all-zero weights
    (multiplier 0) give their constant at any shift. Both in the 32-bit form, exactly."""
    weight = _weights((16, 16 // groups, 3, 3), lo=-40, hi=40)
    weight[5] = 0
    multiplier = np.geomspace(2e-4, 0.1, 16)
    multiplier[[0, 1, 2, 3]] = [0.5, 0.97, 1.5, 3.0]
    multiplier[5] = 0.0
    x = _activations((1, 16, 9, 9))

    def body(bb: relax.BlockBuilder, v: relax.Expr) -> relax.Expr:
        acc = bb.emit(relax.op.nn.conv2d(v, relax.const(weight), padding=1, groups=groups,
                                         out_dtype="int32"))
        return requantize_int32(bb, acc, multiplier, 9, 0, 255, "uint8", 4)

    mod = _module(relax.TensorType(x.shape, "uint8"), body)
    assert _int64_ops(mod) == 0
    scheduled = _compare(mod, x)
    kernels = {gv.name_hint: f for gv, f in scheduled.functions_items()
               if isinstance(f, tirx.PrimFunc) and "conv2d" in gv.name_hint}
    assert kernels and all(f.attrs.get("tirx.is_scheduled", False) for f in kernels.values())
    assert all("int64" not in name and "right_shift" not in name for name in kernels)


def short_mantissa_module(depthwise: bool, dtype: str = "uint8"
                          ) -> tuple[tvm.IRModule, np.ndarray]:
    """A 3x3 depthwise or a 1x1 conv of 4 input channels, requantized with the short mantissas
    ``RealizeInteger`` gives such small accumulators, and an input that reaches their bound:
    weights of +-127, plateaus of the dtype's extremes, biases of +-10**5."""
    channels, k = (16, 3) if depthwise else (4, 1)
    weight = _weights((16, 1 if depthwise else channels, k, k), seed=5)
    weight[0], weight[1] = 127, -127
    bias = np.random.default_rng(6).integers(-10**5, 10**5, 16)
    info = np.iinfo(dtype)
    x = _activations((1, channels, 12, 12), dtype)
    x[..., :5, :5], x[..., 6:, 6:] = info.max, info.min
    bound = np.abs(weight.astype(np.int64)).sum(axis=(1, 2, 3)) * max(-info.min, info.max) \
        + np.abs(bias)
    multiplier = np.geomspace(2e-5, 3e-2, 16)

    def body(bb: relax.BlockBuilder, v: relax.Expr) -> relax.Expr:
        acc = bb.emit(relax.op.nn.conv2d(v, relax.const(weight), padding=k // 2,
                                         groups=channels if depthwise else 1,
                                         out_dtype="int32"))
        acc = bb.emit(relax.op.add(acc, relax.const(bias.reshape(1, 16, 1, 1).astype("int32"))))
        return requantize_int32(bb, acc, multiplier, 3, 0, 255, "uint8", 4, acc_bound=bound)

    assert np.all(mantissa_bits(multiplier, bound) < 31)
    return _module(relax.TensorType(x.shape, dtype), body), x


@needs_avx2
@pytest.mark.parametrize("depthwise", [True, False])
def test_short_mantissas_are_requantized_in_int32_exactly(depthwise: bool) -> None:
    """Short mantissas take the all-int32 form (``requantize._low_form``): no 64-bit value in
    the graph or in the scheduled kernels, and the same integers as the int64 chain."""
    mod, x = short_mantissa_module(depthwise)
    assert _int64_ops(mod) == 0
    scheduled = _compare(mod, x)
    kernels = [f.script() for gv, f in scheduled.functions_items()
               if isinstance(f, tirx.PrimFunc) and "conv2d" in gv.name_hint]
    assert kernels and all("int64(32)" not in k and "high" not in k for k in kernels)


def test_integer_add_requantization_is_exact() -> None:
    # RealizeInteger's residual add: (a - za) * ma + (b - zb) * mb, rounded, shifted by 24
    shape = (1, 8, 5, 5)

    def term(bb: relax.BlockBuilder, x: relax.Expr, zero: int, mult: int) -> relax.Expr:
        wide = bb.emit(relax.op.astype(x, "int64"))
        centered = bb.emit(relax.op.subtract(wide, relax.const(zero, "int64")))
        return bb.emit(relax.op.multiply(centered, relax.const(mult, "int64")))

    bb = relax.BlockBuilder()
    a, b = relax.Var("a", relax.TensorType(shape, "uint8")), relax.Var("b", relax.TensorType(
        shape, "uint8"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            total = bb.emit(relax.op.add(term(bb, a, 118, 10377827), term(bb, b, 3, 25198324)))
            y = bb.emit(relax.op.add(total, relax.const(1 << 23, "int64")))
            y = bb.emit(relax.op.right_shift(y, relax.const(24, "int64")))
            y = bb.emit(relax.op.clip(bb.emit(relax.op.add(y, relax.const(120, "int64"))),
                                      0, 255))
            out = bb.emit_output(relax.op.astype(y, "uint8"))
        bb.emit_func_output(out)
    mod = bb.get()
    assert _int64_ops(mod) == 0
    inputs = [_activations(shape, seed=5), _activations(shape, seed=6)]
    expected = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())["main"](
        *map(tvm.runtime.tensor, inputs)).numpy()
    scheduled = default_schedule_pipeline(HOST)(mod)
    got = relax.VirtualMachine(tvm.compile(scheduled, HOST), tvm.cpu())["main"](
        *map(tvm.runtime.tensor, inputs)).numpy()
    np.testing.assert_array_equal(got, expected)
