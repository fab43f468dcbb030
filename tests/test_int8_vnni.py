"""int8 convolutions on VNNI targets: ``vpdpbusd`` in the assembly, exact against the
unscheduled build (bit for bit), for every 8-bit weight (no saturating step on this path)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from conftest import relax_main
from test_int8_kernels import _activations, _conv_block, _weights, short_mantissa_module
from tvm import relax, tirx
from tvm.target.codegen import target_has_features

from tvm_compress.backend.build import InputSpec, build
from tvm_compress.backend.report import kernel_infos, unscheduled
from tvm_compress.backend.schedules import default_schedule_pipeline
from tvm_compress.backend.schedules.hardware import (
    has_avx2_int8,
    has_int8_kernel,
    host_cpu,
    vnni_lanes,
)
from tvm_compress.backend.targets import resolve_target

VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
_THIS_CPU = tvm.target.Target({"kind": "llvm", **host_cpu()})
needs_vnni = pytest.mark.skipif(not target_has_features("avx512vnni", _THIS_CPU),
                                reason="running vpdpbusd kernels needs an AVX512-VNNI host")


def _assembly(compiled) -> str:  # noqa: ANN001
    def walk(mod):  # noqa: ANN001, ANN202
        return [mod, *(m for sub in mod.imports for m in walk(sub))]

    return "\n".join(m.inspect_source("asm") for m in walk(compiled.executable.mod)
                     if m.kind == "llvm")


def _check(mod: tvm.IRModule, x: np.ndarray, target: tvm.target.Target = VNNI
           ) -> tuple[str, tvm.IRModule]:
    """Assert the VNNI build equals the unscheduled one; its assembly and scheduled module."""
    spec = InputSpec("x", x.shape, str(x.dtype))
    expected = build(mod, input_spec=spec, schedule="none").run(x)
    compiled = build(mod, target=target, input_spec=spec)
    np.testing.assert_array_equal(compiled.run(x), expected)
    return _assembly(compiled), default_schedule_pipeline(target)(mod)


def _rules(mod: tvm.IRModule) -> dict[str, str]:
    return {gv.name_hint: str(f.attrs.get("tvm_compress.rule", "")) for gv, f in
            mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _conv_module(weight: np.ndarray, dtype: str, size: int, *, stride: int = 1, zp: int = 0,
                 requantize: bool = True) -> tvm.IRModule:
    cin, k = weight.shape[1], weight.shape[2]
    return relax_main(relax.TensorType((1, cin, size, size), dtype), lambda bb, x: _conv_block(
        bb, x, weight, stride=stride, padding=k // 2, groups=1, zero_point=zp,
        requantize=requantize))


def test_vnni_targets() -> None:
    assert vnni_lanes(VNNI) == 16 and has_int8_kernel(VNNI) and not has_avx2_int8(VNNI)
    alderlake = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"})
    assert vnni_lanes(alderlake) == 8
    for name in ("x86-avx2", "x86-avx512"):
        assert vnni_lanes(resolve_target(name)) == 0
    assert vnni_lanes(resolve_target("x86-vnni")) == 16


@needs_vnni
def test_host_preset_uses_vnni() -> None:
    assert vnni_lanes(resolve_target("x86")) == 16


CONV_CASES = {  # cin, cout, size, kernel, stride, zero point of the padding
    "1x1": (32, 48, 7, 1, 1, 0),
    "3x3": (16, 16, 9, 3, 1, 0),
    "3x3_s2_zero_point_pad": (16, 32, 11, 3, 2, 114),
    "stem_3_channels": (3, 16, 12, 3, 2, 114),
    "24_channels_8_lane_blocks": (16, 24, 8, 1, 1, 0),
    "from_24_channels": (24, 32, 6, 3, 1, 0),
}


@needs_vnni
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_vnni_conv_exact(case: str, dtype: str) -> None:
    cin, cout, size, k, stride, zp = CONV_CASES[case]
    mod = _conv_module(_weights((cout, cin, k, k)), dtype, size, stride=stride, zp=zp)
    asm, scheduled = _check(mod, _activations((1, cin, size, size), dtype))
    assert "vpdpbusd" in asm
    # 16-lane blocks on zmm registers; 24 channels in 8-lane blocks on ymm
    register = "ymm" if cout % 16 else "zmm"
    assert any("vpdpbusd" in line and register in line for line in asm.splitlines())
    assert "conv2d_nchwc_u8s8" in _rules(scheduled).values()


@needs_vnni
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_vnni_extreme_operands_exact(dtype: str) -> None:
    # 4 x 255 x -128 per step and large sums: the s16 step of vpmaddubsw would saturate here
    info = np.iinfo(dtype)
    weight = np.full((32, 64, 3, 3), 127, "int8")
    weight[16:] = -128
    x = np.full((1, 64, 5, 5), info.max, dtype)
    x[..., 0] = info.min
    asm, _ = _check(_conv_module(weight, dtype, 5, requantize=False), x)
    assert "vpdpbusd" in asm


@needs_vnni
def test_vnni_8bit_weights_need_no_int16_path() -> None:
    weight = _weights((16, 16, 1, 1))
    asm, scheduled = _check(_conv_module(weight, "uint8", 6), _activations((1, 16, 6, 6)))
    assert "vpmaddubsw" not in asm and "vpmaddwd" not in asm.split("requantize")[0]
    assert not any("int16" in scheduled[name].script() for name, rule in
                   _rules(scheduled).items() if rule == "conv2d_nchwc_u8s8")


@needs_vnni
def test_two_int8_layers_share_the_blocked_layout() -> None:
    w1, w2 = _weights((32, 16, 1, 1)), _weights((32, 32, 3, 3), seed=1)
    x = _activations((1, 16, 8, 8))

    def body(bb: relax.BlockBuilder, v: relax.Expr) -> relax.Expr:
        y = bb.emit(_conv_block(bb, v, w1, stride=1, padding=0, groups=1, zero_point=0,
                                requantize=True))
        return _conv_block(bb, y, w2, stride=1, padding=1, groups=1, zero_point=3,
                           requantize=True)

    _, scheduled = _check(relax_main(relax.TensorType(x.shape, "uint8"), body), x)
    layout = [name for name in _rules(scheduled) if "layout_transform" in name]
    assert len(layout) == 2, layout  # into the first conv and out of the last, none between


@needs_vnni
@pytest.mark.parametrize("tables", [True, False])
@pytest.mark.parametrize("channels", [32, 24])  # 24: zero-padded to 32 between the layers
def test_float_hardswish_island_between_int8_layers_stays_packed(
        channels: int, tables: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """dequantize -> hardswish -> quantize (MobileNetV3, PaddleOCR) between two int8 convs:
    the island is computed on the packed tensor and fused into the first conv's epilogue, as a
    256-entry table (``lookup.py``) or, with tables off, as float arithmetic."""
    from tvm_compress.backend.schedules import lookup

    if not tables:
        monkeypatch.setattr(lookup, "MIN_OPS", 10**6)  # no island qualifies for a table
    w1, w2 = _weights((channels, 16, 1, 1)), _weights((32, channels, 3, 3), seed=1)
    x = _activations((1, 16, 8, 8))

    def body(bb: relax.BlockBuilder, v: relax.Expr) -> relax.Expr:
        y = bb.emit(_conv_block(bb, v, w1, stride=1, padding=0, groups=1, zero_point=0,
                                requantize=True))
        f = bb.emit(relax.op.dequantize(y, relax.const(0.05, "float32"),
                                        relax.const(3, "int8"), axis=-1))
        six = relax.const(6.0, "float32")
        gate = bb.emit(relax.op.clip(relax.op.add(f, relax.const(3.0, "float32")), 0, 6))
        h = bb.emit(relax.op.divide(relax.op.multiply(f, gate), six))
        q = bb.emit(relax.op.quantize(h, relax.const(0.04, "float32"),
                                      relax.const(7, "int8"), out_dtype="uint8", axis=-1))
        return _conv_block(bb, q, w2, stride=1, padding=1, groups=1, zero_point=7,
                           requantize=True)

    _, scheduled = _check(relax_main(relax.TensorType(x.shape, "uint8"), body), x)
    names = list(_rules(scheduled))
    assert len([n for n in names if "layout_transform" in n]) == 2, names
    if tables:
        assert any("conv2d" in n and "lookup" in n for n in names), names
        assert not any("dequantize" in n or "divide" in n for n in names), names
    else:
        assert any("conv2d" in n and "dequantize" in n
                   and "quantize" in n.split("dequantize")[-1] for n in names), names


@needs_vnni
def test_residual_add_leaving_to_float_keeps_the_conv_kernel() -> None:
    # The last block before a float head: int8 conv -> requantize -> dequantize + dequantized
    # skip -> ReLU. The skip's dequantize lands in front of the conv in the fused function;
    # it is inlined into the epilogue, and the conv keeps its int8 kernel (it fell to TVM's
    # generic reduction schedule: ResNet-50 int8 lost 3.4 ms on its last block).
    w1, w2 = _weights((32, 16, 1, 1)), _weights((32, 32, 1, 1), seed=1)
    x = _activations((1, 16, 7, 7))

    def body(bb: relax.BlockBuilder, v: relax.Expr) -> relax.Expr:
        first = bb.emit(_conv_block(bb, v, w1, stride=1, padding=0, groups=1, zero_point=0,
                                    requantize=True))
        skip = bb.emit(relax.op.dequantize(first, relax.const(0.02, "float32"),
                                           relax.const(0, "int8"), axis=-1))  # emitted first
        y = bb.emit(_conv_block(bb, first, w2, stride=1, padding=0, groups=1, zero_point=0,
                                requantize=True))
        main = bb.emit(relax.op.dequantize(y, relax.const(0.05, "float32"),
                                           relax.const(3, "int8"), axis=-1))
        return relax.op.nn.relu(relax.op.add(main, skip))

    mod = relax_main(relax.TensorType(x.shape, "uint8"), body)
    spec = InputSpec("x", x.shape, "uint8")
    np.testing.assert_allclose(build(mod, target=VNNI, input_spec=spec).run(x),
                               build(mod, input_spec=spec, schedule="none").run(x),
                               rtol=0, atol=1e-6)
    rules = _rules(default_schedule_pipeline(VNNI)(mod))
    assert {r for n, r in rules.items() if "conv2d" in n} == {"conv2d_nchwc_u8s8"}, rules


VBMI = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})
needs_vbmi = pytest.mark.skipif(not target_has_features("avx512vbmi", _THIS_CPU),
                                reason="running vpermb needs an AVX512-VBMI host")

DEPTHWISE_CASES = {  # channels, size, kernel, stride, zero point of the padding
    "3x3": (32, 10, 3, 1, 0),
    "3x3_row_bands": (16, 28, 3, 1, 0),  # quads staged per band of 7 output rows
    "5x5_prime_height": (16, 11, 5, 1, 0),
    "3x3_s2": (16, 11, 3, 2, 0),
    "5x5_zero_point_pad": (32, 9, 5, 1, 77),
    "5x5_s2": (16, 12, 5, 2, 0),
    "24_channels_8_lane_blocks": (24, 8, 3, 1, 5),
    # maps of fewer rows than the window: the sum runs over the map's rows (rows_weight)
    "5x5_2_rows": (16, (2, 24), 5, 1, 0),
    "5x5_3_rows_zero_point_pad": (24, (3, 20), 5, 1, 77),
    "3x3_2_rows_s2": (16, (2, 12), 3, 2, 5),
    "5x5_1_row": (32, (1, 16), 5, 1, 0),
}


def _depthwise_module(channels: int, size: int | tuple[int, int], k: int, stride: int, zp: int,
                      dtype: str) -> tvm.IRModule:
    weight = _weights((channels, 1, k, k))
    return relax_main(relax.TensorType((1, channels, *_hw(size)), dtype), lambda bb, x:
                      _conv_block(bb, x, weight, stride=stride, padding=k // 2, groups=channels,
                                  zero_point=zp, requantize=True))


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return size if isinstance(size, tuple) else (size, size)


@needs_vnni
@pytest.mark.parametrize("case", list(DEPTHWISE_CASES))
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_vnni_depthwise_exact(case: str, dtype: str) -> None:
    channels, size, k, stride, zp = DEPTHWISE_CASES[case]
    x = _activations((1, channels, *_hw(size)), dtype)
    asm, scheduled = _check(_depthwise_module(channels, size, k, stride, zp, dtype), x)
    assert "vpdpbusd" in asm
    rules = _rules(scheduled)
    # one kernel: staging, convolution and the requantization epilogue
    assert [name for name, rule in rules.items() if rule == "depthwise_nchwc_vnni"] == [
        name for name in rules if "depthwise" in name] and any(
        "depthwise" in name and "requantize" in name for name in rules)
    # the zero-point padding is the kernel's own (fold_zero_point_pads): no pad kernel
    assert not any(name.startswith("pad") for name in rules), rules


@needs_vnni
@pytest.mark.parametrize("depthwise", [True, False])
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_vnni_short_mantissas_exact(depthwise: bool, dtype: str) -> None:
    """The all-int32 requantization of short mantissas in the VNNI kernels' epilogues: one
    32-bit multiply (``vpmulld``) per 16 outputs, no 64-bit product (``vpmuldq``)."""
    mod, x = short_mantissa_module(depthwise, dtype)
    asm, scheduled = _check(mod, x)
    assert "vpdpbusd" in asm and "vpmulld" in asm and "vpmuldq" not in asm
    kernel = "depthwise_nchwc_vnni" if depthwise else "conv2d_nchwc_u8s8"
    assert kernel in _rules(scheduled).values()


@needs_vbmi
@pytest.mark.parametrize("case", list(DEPTHWISE_CASES))
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_vnni_depthwise_vbmi_exact(case: str, dtype: str) -> None:
    """With VBMI the quads are permuted in registers (one vpermb before each vpdpbusd), not
    staged; without it (the cascadelake target above) they are staged per band of rows."""
    channels, size, k, stride, zp = DEPTHWISE_CASES[case]
    x = _activations((1, channels, *_hw(size)), dtype)
    mod = _depthwise_module(channels, size, k, stride, zp, dtype)
    asm, scheduled = _check(mod, x, VBMI)
    assert "vpdpbusd" in asm and "vpermb" in asm
    kernel = next(f.script() for gv, f in scheduled.functions_items() if "depthwise" in
                  gv.name_hint and isinstance(f, tirx.PrimFunc))
    assert "permvar" in kernel and "data_quads" not in kernel
    staged = next(f.script() for gv, f in default_schedule_pipeline(VNNI)(mod).functions_items()
                  if "depthwise" in gv.name_hint and isinstance(f, tirx.PrimFunc))
    assert "data_quads" in staged and "permvar" not in staged


def _host_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":")[1].split()) for line in info
                         if line.startswith("flags")), set())
    except OSError:
        return set()


ALDERLAKE = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake", "num-cores": 2})


@pytest.mark.parametrize("depthwise", [False, True])
def test_avx_vnni_ymm_kernels(depthwise: bool) -> None:
    # AVX-VNNI without AVX-512: 8-lane blocks and the VEX-encoded vpdpbusd
    if depthwise:
        mod = _depthwise_module(16, 8, 3, 1, 0, "int8")
    else:
        mod = _conv_module(_weights((16, 16, 3, 3)), "int8", 8)
    x = _activations((1, 16, 8, 8), "int8")
    spec = InputSpec("x", x.shape, "int8")
    compiled = build(mod, target=ALDERLAKE, input_spec=spec)
    assert re.search(r"\{vex\}\s+vpdpbusd", _assembly(compiled))
    if "avx_vnni" in _host_flags():
        expected = build(mod, input_spec=spec, schedule="none").run(x)
        np.testing.assert_array_equal(compiled.run(x), expected)


@pytest.mark.parametrize(("height", "stride"), [(2, 1), (3, 1), (2, 2), (5, 1)])
def test_short_map_depthwise_sums_over_its_rows(height: int, stride: int) -> None:
    from tvm_compress.backend.schedules.depthwise_vnni import rows_weight

    mod = _depthwise_module(16, (height, 12), 5, stride, 9, "int8")
    scheduled = default_schedule_pipeline(VNNI)(mod)
    func = next(f for gv, f in scheduled.functions_items() if "depthwise" in gv.name_hint)
    weight = func.params[1].ty.shape
    if height >= 5:  # as many rows as the window: the window's rows, padding rows included
        assert len(weight) == 5
        return
    oh = (height + 4 - 5) // stride + 1
    assert [int(d) for d in weight[1:3]] == [oh, height]  # (O/b, OH, H, G, b, 4)
    # the padding rows' share moves to the start: pad_u8 times their taps' sums
    packed = np.arange(1, 1 + 5 * 2 * 16 * 4).reshape(1, 5, 2, 16, 4).astype(np.int8)
    taps = np.arange(5 * 16).reshape(1, 5, 16)
    rows, start = rows_weight(packed, np.full((1, 16), 7, np.int32), height=2, stride=1,
                              top=2, bottom=2, pad_u8=10, taps=taps)
    # output row 0 reads window rows 2, 3 (input rows 0, 1); rows 0, 1, 4 are padding
    np.testing.assert_array_equal(rows[0, 0, 0], packed[0, 2])
    np.testing.assert_array_equal(rows[0, 0, 1], packed[0, 3])
    np.testing.assert_array_equal(start[0, 0], 7 + 10 * (taps[0, 0] + taps[0, 1] + taps[0, 4]))
    np.testing.assert_array_equal(rows[0, 1, 0], packed[0, 1])  # row 1: window rows 1, 2


def test_depthwise_band_rows() -> None:
    from tvm_compress.backend.schedules.depthwise_vnni import band_rows

    assert band_rows(28, 28, 3, 1, 64) == 7  # 9 input rows x 28 x 64 B = 16 KiB
    assert band_rows(14, 14, 3, 1, 64) == 14  # the whole plane fits
    assert band_rows(11, 56, 5, 1, 128) == 11  # prime height: whole plane, never 1 row
    assert band_rows(112, 112, 3, 1, 64) == 2  # none fits: the narrowest band, not 817 KiB
    assert band_rows(28, 28, 3, 2, 64) == 4  # stride 2: 9 input rows for 4 output rows


@needs_vnni
@pytest.mark.parametrize(("rows", "k", "n"),
                         [(1, 1280, 1000), (3, 96, 64), (1, 64, 40), (5, 64, 37)])
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_vnni_dense_exact(rows: int, k: int, n: int, dtype: str) -> None:
    weight = _weights((k, n))  # (K, N), as the frontends fold dense weights
    x = _activations((rows, k), dtype)

    def body(bb: relax.BlockBuilder, v: relax.Expr) -> relax.Expr:
        acc = bb.emit(relax.op.matmul(v, relax.const(weight), out_dtype="int32"))
        return relax.op.multiply(bb.emit(relax.op.astype(acc, "float32")),
                                 relax.const(np.float32(0.01)))

    asm, scheduled = _check(relax_main(relax.TensorType(x.shape, dtype), body), x)
    assert "vpdpbusd" in asm
    assert list(_rules(scheduled).values()) == ["matmul_vnni"]  # epilogue fused


@needs_vnni
def test_vnni_dense_on_token_major_rows_exact() -> None:
    # (1, M, K) activations (ConvNeXt, attention): the kernel on the flattened rows.
    weight = _weights((96, 48))
    x = _activations((1, 49, 96), "uint8")

    def body(bb: relax.BlockBuilder, v: relax.Expr) -> relax.Expr:
        acc = bb.emit(relax.op.matmul(v, relax.const(weight), out_dtype="int32"))
        return relax.op.multiply(bb.emit(relax.op.astype(acc, "float32")),
                                 relax.const(np.float32(0.01)))

    asm, scheduled = _check(relax_main(relax.TensorType(x.shape, "uint8"), body), x)
    assert "vpdpbusd" in asm
    assert "matmul_vnni" in _rules(scheduled).values()


MATMUL_INTEGER_CASES = [("uint8", 119, 128), ("int8", 0, 0), ("int8", 3, 77)]


def _matmul_integer(weight_dtype: str, weight_zp: int, data_zp: int | None, rows: int = 5
                    ) -> tuple[tvm.IRModule, np.ndarray, np.ndarray]:
    """ONNX MatMulInteger as imported: int32 x int32 matmul of the widened operands minus their
    zero points; (module, input, exact result). ``data_zp`` None: a zero point computed at run
    time (as DynamicQuantizeLinear's; here the input's minimum)."""
    info = np.iinfo(weight_dtype)
    weight = np.random.default_rng(4).integers(info.min, info.max + 1, (64, 40)).astype(
        weight_dtype)
    x = _activations((rows, 64), "uint8")

    def body(bb: relax.BlockBuilder, v: relax.Expr) -> relax.Expr:
        data = bb.emit(relax.op.astype(v, "int32"))
        if data_zp is None:
            zp = bb.emit(relax.op.astype(bb.emit(relax.op.min(v)), "int32"))
            data = bb.emit(relax.op.subtract(data, zp))
        elif data_zp:
            zp = bb.emit(relax.op.astype(relax.const(np.uint8(data_zp)), "int32"))
            data = bb.emit(relax.op.subtract(data, zp))
        w = bb.emit(relax.op.subtract(
            relax.op.astype(relax.const(weight), "int32"),
            relax.op.astype(relax.const(np.array(weight_zp, weight_dtype)), "int32")))
        return relax.op.matmul(data, w, out_dtype="int32")

    mod = relax_main(relax.TensorType(x.shape, "uint8"), body)
    shift = int(x.min()) if data_zp is None else data_zp
    return mod, x, (x.astype(np.int64) - shift) @ (weight.astype(np.int64) - weight_zp)


@needs_vnni
@pytest.mark.parametrize(("weight_dtype", "weight_zp", "data_zp"), MATMUL_INTEGER_CASES)
def test_matmul_integer_runs_as_an_8bit_matmul(weight_dtype: str, weight_zp: int,
                                               data_zp: int) -> None:
    # u8 weights minus 119 span [-119, 136]: shifted by 9 into int8.
    mod, x, expected = _matmul_integer(weight_dtype, weight_zp, data_zp)
    asm, scheduled = _check(mod, x)
    np.testing.assert_array_equal(build(mod, target=VNNI, input_spec=InputSpec(
        "x", x.shape, "uint8")).run(x), expected)
    assert "vpdpbusd" in asm and "matmul_vnni" in _rules(scheduled).values()


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize(("weight_dtype", "weight_zp", "data_zp"),
                         [*MATMUL_INTEGER_CASES, ("int8", 0, None)])
def test_matmul_integer_without_vnni_is_scheduled(weight_dtype: str, weight_zp: int,
                                                  data_zp: int | None, rows: int) -> None:
    # AVX2: with a zero point known only at run time, the narrowed 8-bit matmul keeps its
    # zero-point x column-sum term as a block in front of the matmul; the matmul rule inlines
    # it into the epilogue (was unscheduled)
    mod, x, expected = _matmul_integer(weight_dtype, weight_zp, data_zp, rows)
    avx2 = resolve_target("x86-avx2")
    scheduled = default_schedule_pipeline(avx2)(mod)
    assert "matmul_avx2" in _rules(scheduled).values()
    assert not unscheduled(kernel_infos(scheduled))
    np.testing.assert_array_equal(build(mod, target=avx2, input_spec=InputSpec(
        "x", x.shape, "uint8")).run(x), expected)


@pytest.mark.parametrize(("rows", "k", "n"),
                         [(1, 1280, 1000), (3, 96, 64), (5, 64, 37), (32, 512, 8210), (4, 66, 24)])
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("bits", [8, 7])
def test_avx2_dense_exact(rows: int, k: int, n: int, dtype: str, bits: int) -> None:
    # Without VNNI: 8-bit weights take vpmaddwd on an int16 copy of the input, 7-bit ones
    # (pair-safe) vpmaddubsw; both bit-exact. K = 66 is not a multiple of 4: int16 either way.
    # The generic int32 schedule took 40 ms on the (32, 512) x 8210 classifier (fp32: 5 ms).
    weight = _weights((k, n))
    if bits == 7:
        weight = (weight // 2).astype(np.int8)
    x = _activations((rows, k), dtype)

    def body(bb: relax.BlockBuilder, v: relax.Expr) -> relax.Expr:
        acc = bb.emit(relax.op.matmul(v, relax.const(weight), out_dtype="int32"))
        return relax.op.multiply(bb.emit(relax.op.astype(acc, "float32")),
                                 relax.const(np.float32(0.01)))

    asm, scheduled = _check(relax_main(relax.TensorType(x.shape, dtype), body), x,
                            resolve_target("x86-avx2"))
    assert "matmul_avx2" in _rules(scheduled).values()
    assert "vpmaddwd" in asm
    assert ("vpmaddubsw" in asm) == (bits == 7 and k % 4 == 0)


def test_dense_on_avx512_without_vnni_keeps_the_generic_path() -> None:
    # 512-bit registers: the 8-column AVX2 steps do not apply, and there is no vpdpbusd
    weight = _weights((64, 32))

    def body(bb: relax.BlockBuilder, v: relax.Expr) -> relax.Expr:
        return relax.op.matmul(v, relax.const(weight), out_dtype="int32")

    mod = relax_main(relax.TensorType((1, 64), "uint8"), body)
    rules = _rules(default_schedule_pipeline(resolve_target("x86-avx512"))(mod))
    assert not {"matmul_vnni", "matmul_avx2"} & set(rules.values())
    assert "matmul" in rules.values()


GROUPED_CASES = {  # cin, cout, groups, kernel, stride
    "2_groups_16_in_32_out": (32, 64, 2, 3, 1),
    "4_groups_8_in_8_out_strided": (32, 32, 4, 3, 2),
    "1x1_8_groups": (64, 128, 8, 1, 1),
}


@pytest.mark.parametrize("case", list(GROUPED_CASES))
@pytest.mark.parametrize("target", [pytest.param("vnni", marks=needs_vnni), "avx2"])
def test_grouped_int8_conv_exact(case: str, target: str) -> None:
    cin, cout, groups, k, stride = GROUPED_CASES[case]
    weight = _weights((cout, cin // groups, k, k))
    x = _activations((1, cin, 9, 9), "int8")
    mod = relax_main(relax.TensorType(x.shape, "int8"), lambda bb, v: _conv_block(
        bb, v, weight, stride=stride, padding=k // 2, groups=groups, zero_point=0,
        requantize=True))
    asm, scheduled = _check(mod, x, VNNI if target == "vnni" else resolve_target("x86-avx2"))
    assert "conv2d_nchwc_u8s8" in _rules(scheduled).values()
    assert ("vpdpbusd" if target == "vnni" else "vpmaddwd") in asm
