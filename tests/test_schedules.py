"""Default CPU schedules: scheduled builds equal PyTorch on small conv / dense / pool workloads."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import tvm
import tvm.relax.frontend.torch  # noqa: F401  (registers the frontend)
from torch import nn
from tvm import relax, tirx
from tvm.target.codegen import target_has_features

from tvm_compress.backend.schedules import default_schedule_pipeline
from tvm_compress.backend.schedules.constants import fold_constants_numpy, layout_transform_array
from tvm_compress.backend.schedules.conv2d import pick_tile
from tvm_compress.backend.schedules.depthwise import pixel_tile
from tvm_compress.backend.schedules.hardware import host_cpu, vector_lanes
from tvm_compress.backend.schedules.layout import PackChannels

# The AVX2 kernels (8 float lanes, the vpmaddubsw int8 micro-kernel), run here: any AVX2 host
# executes them, including AVX-512 ones, whose own default would pick 16 lanes / VNNI instead.
HOST = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2", "num-cores": 2})
_THIS_CPU = tvm.target.Target({"kind": "llvm", **host_cpu()})
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 4})


def _import(module: nn.Module,
            shape: tuple[int, ...]) -> tuple[tvm.IRModule, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    module = module.eval()
    x = torch.randn(*shape)
    for m in module.modules():  # non-trivial BatchNorm statistics, so folding is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        expected = module(x).numpy()
        mod = relax.frontend.torch.from_exported_program(torch.export.export(module, (x,)))
    return mod, x.numpy(), expected


def _run(mod: tvm.IRModule, x: np.ndarray, target: tvm.target.Target = HOST) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return (out if isinstance(out, tvm.runtime.Tensor) else out[0]).numpy()


def _kernels(mod: tvm.IRModule) -> dict[str, bool]:
    """PrimFunc name -> whether a schedule was applied."""
    return {gv.name_hint: bool(f.attrs.get("tirx.is_scheduled", False))
            for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
          dilation: int = 1, act: nn.Module | None = None) -> nn.Module:
    pad = dilation * (k - 1) // 2
    layers = [nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups),
              nn.BatchNorm2d(cout), act or nn.ReLU6()]
    return nn.Sequential(*layers)


CONV_CASES = {
    "3x3_s1": (_conv(16, 16, 3), (1, 16, 14, 14), "conv2d_nchwc"),
    "3x3_s2_odd_spatial": (_conv(16, 24, 3, stride=2), (1, 16, 15, 15), "conv2d_nchwc"),
    "1x1_7x7": (_conv(24, 32, 1), (1, 24, 7, 7), "conv2d_nchwc"),
    "stem_3ch_s2": (_conv(3, 16, 3, stride=2), (1, 3, 16, 16), "conv2d_nchwc"),
    "5x5": (_conv(8, 16, 5), (1, 8, 9, 9), "conv2d_nchwc"),
    "7x7_s2_stem": (_conv(3, 8, 7, stride=2), (1, 3, 20, 20), "conv2d_nchwc"),
    "dilated": (_conv(8, 8, 3, dilation=2), (1, 8, 11, 11), "conv2d_nchwc"),
    "depthwise_s1": (_conv(16, 16, 3, groups=16), (1, 16, 10, 10), "depthwise"),
    "depthwise_s2": (_conv(24, 24, 3, stride=2, groups=24), (1, 24, 13, 13), "depthwise"),
    "depthwise_5x5": (_conv(8, 8, 5, groups=8), (1, 8, 9, 9), "depthwise"),
    # rows of 19 and 38 pixels: tiles of several rows (pixel_tile)
    "depthwise_rows_of_19": (_conv(16, 16, 3, groups=16), (1, 16, 10, 19), "depthwise"),
    "depthwise_5x5_rows_of_38": (_conv(8, 8, 5, groups=8), (1, 8, 10, 38), "depthwise"),
    "grouped": (_conv(32, 16, 3, groups=2), (1, 32, 8, 8), "conv2d_nchwc"),
    "channels_not_multiple_of_8": (_conv(12, 20, 3), (1, 12, 9, 9), "conv2d"),
    "depthwise_12_channels": (_conv(12, 12, 3, groups=12), (1, 12, 8, 8), "conv2d"),
    "grouped_odd": (_conv(12, 12, 3, groups=3), (1, 12, 6, 6), "conv2d"),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_workloads_match_torch(case: str) -> None:
    module, shape, kernel = CONV_CASES[case]
    mod, x, expected = _import(module, shape)
    scheduled = default_schedule_pipeline(HOST)(mod)
    kernels = _kernels(scheduled)
    conv = [name for name in kernels if kernel in name]
    assert conv, f"no {kernel} kernel in {sorted(kernels)}"
    assert all(kernels.values()), f"unscheduled kernels: {kernels}"
    np.testing.assert_allclose(_run(scheduled, x), expected, rtol=1e-4, atol=1e-4)


class _Head(nn.Module):
    """Conv -> max/avg pool -> global pool -> linear (with N not a multiple of 8)."""

    def __init__(self, pool: str, classes: int) -> None:
        super().__init__()
        self.conv = _conv(8, 16, 3)
        self.pool = {"max": nn.MaxPool2d(3, 2, 1), "avg": nn.AvgPool2d(2, 2),
                     "none": nn.Identity()}[pool]
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.conv(x))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.mark.parametrize(("pool", "classes"), [("max", 10), ("avg", 24), ("none", 7)])
def test_pool_and_dense_match_torch(pool: str, classes: int) -> None:
    mod, x, expected = _import(_Head(pool, classes), (1, 8, 12, 12))
    scheduled = default_schedule_pipeline(HOST)(mod)
    assert all(_kernels(scheduled).values())
    assert any("matmul" in name for name in _kernels(scheduled))
    np.testing.assert_allclose(_run(scheduled, x), expected, rtol=1e-4, atol=1e-4)


def test_batch1_classifier_reads_whole_weight_rows_per_thread() -> None:
    # A GEMV: K is split into contiguous slabs of rows, one partial sum per slab and thread
    # (rfactor), then the partials are added and the epilogue applied (dense.schedule_gemv).
    mod, x, expected = _import(nn.Sequential(nn.Linear(512, 40), nn.ReLU()), (1, 512))
    scheduled = default_schedule_pipeline(HOST)(mod)
    kernel = next(f for gv, f in scheduled.functions_items()
                  if isinstance(f, tirx.PrimFunc) and "matmul" in gv.name_hint)
    text = kernel.script()
    assert "matmul_intermediate_rf" in text and "T.parallel(T.int64(4))" in text, text
    np.testing.assert_allclose(_run(scheduled, x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("shape", "cols"), [((1, 49, 64), 96), ((1, 6, 40), 37),
                                             ((1, 2, 24), 16), ((12, 1, 40), 48)])
def test_constant_weight_matmul_is_a_packed_panel_gemm(shape: tuple[int, int, int],
                                                       cols: int) -> None:
    # Token-major linear layers (ConvNeXt, attention, OCR heads): the weight repacked into
    # (panels, K, 2 registers) at compile time, columns past N (37 here) computed and dropped.
    # (12, 1, 40): an LSTM's input projection over 12 time steps, one row each, is 12 rows.
    depth = shape[-1]
    mod, x, expected = _import(nn.Sequential(nn.Linear(depth, cols), nn.ReLU()), shape)
    scheduled = default_schedule_pipeline(HOST)(mod)
    rules = {gv.name_hint: str(f.attrs.get("tvm_compress.rule")) for gv, f
             in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert "matmul_packed" in rules.values(), rules
    kernel = next(f for gv, f in scheduled.functions_items()
                  if isinstance(f, tirx.PrimFunc) and rules[gv.name_hint] == "matmul_packed")
    panels = -(-cols // 16)  # AVX2: two 8-lane registers wide
    panel = f"T.Buffer((T.int64({panels}), T.int64({depth}), T.int64(16))"
    assert panel in kernel.script(), kernel.script()[:600]
    np.testing.assert_allclose(_run(scheduled, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["max", "min", "sum", "mean"])
def test_whole_tensor_reduction_is_split_across_threads_and_lanes(op: str) -> None:
    # ONNX DynamicQuantizeLinear's min / max of a whole feature map: 2 threads x 8 lanes of
    # partial results (rfactor), then the partials; it ran as one serial scalar loop before.
    from conftest import relax_main

    x = np.random.default_rng(0).standard_normal((1, 48, 16, 64)).astype("float32")
    make = getattr(relax.op, op)
    mod = relax_main(relax.TensorType(x.shape, "float32"), lambda bb, v: make(v))
    scheduled = default_schedule_pipeline(HOST)(mod)
    text = next(f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)).script()
    assert "_rf = T.sblock_alloc_buffer((T.int64(16),))" in text, text[:800]
    assert "T.parallel(T.int64(2))" in text and "T.vectorized(T.int64(8))" in text, text[:800]
    # float32 partial sums in another order than NumPy's: bounded by the absolute sum
    scale = np.abs(x).sum(dtype=np.float64) / (x.size if op == "mean" else 1)
    np.testing.assert_allclose(_run(scheduled, x), getattr(np, op)(x.astype(np.float64)),
                               rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("two_levels", [True, False])
def test_long_mean_sums_in_two_levels(two_levels: bool, monkeypatch) -> None:
    # ReduceMean over a whole 160x160 map of mixed-sign values (PaddleOCR's detector's
    # squeeze-excite): one float32 accumulator per channel drifted by 1e-4 of the mean;
    # partial sums per row, then their sum, stay near float64
    from conftest import relax_main

    from tvm_compress.backend.schedules import generic

    if not two_levels:
        monkeypatch.setattr(generic, "_sum_in_two_levels", lambda *a, **k: False)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 16, 160, 160)) * 3 + rng.uniform(-6, 6, (1, 16, 1, 1))).astype(
        "float32")  # channel means far from 0: long partial sums lose low bits
    mod = relax_main(relax.TensorType(x.shape, "float32"),
                     lambda bb, v: relax.op.mean(v, axis=[2, 3], keepdims=True))
    scheduled = default_schedule_pipeline(HOST)(mod)
    text = next(f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)).script()
    assert ("_rf = T.sblock_alloc_buffer" in text) == two_levels
    error = np.abs(_run(scheduled, x) - x.astype(np.float64).mean(axis=(2, 3), keepdims=True))
    assert (error.max() < 6e-6) == two_levels, error.max()  # 2.6e-6 vs 1.3e-5 measured


def test_batched_dense_matches_torch() -> None:
    mod, x, expected = _import(nn.Sequential(nn.Linear(40, 24), nn.ReLU()), (3, 40))
    scheduled = default_schedule_pipeline(HOST)(mod)
    assert all(_kernels(scheduled).values())
    np.testing.assert_allclose(_run(scheduled, x), expected, rtol=1e-4, atol=1e-4)


class _TinyMobileNet(nn.Module):
    """Stem, an inverted residual block with a skip, a stride-2 block, pooling head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, 16, 3, stride=2)
        self.block = nn.Sequential(_conv(16, 48, 1), _conv(48, 48, 3, groups=48),
                                   nn.Conv2d(48, 16, 1), nn.BatchNorm2d(16))
        self.down = nn.Sequential(_conv(16, 32, 1), _conv(32, 32, 3, stride=2, groups=32),
                                  _conv(32, 24, 1, act=nn.ReLU()))
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = self.down(y + self.block(y))
        return self.fc(y.mean((2, 3)))


def test_small_cnn_matches_torch_and_stays_packed() -> None:
    mod, x, expected = _import(_TinyMobileNet(), (1, 3, 32, 32))
    scheduled = default_schedule_pipeline(HOST)(mod)
    kernels = _kernels(scheduled)
    assert all(kernels.values()), kernels
    # Only the network input is packed and only the pooled features unpacked: the blocked
    # layout flows through every conv, BN, activation and the residual add.
    assert sum("layout_transform" in name for name in kernels) <= 2
    np.testing.assert_allclose(_run(scheduled, x), expected, rtol=1e-4, atol=1e-4)


def test_onnx_import_matches_torch_and_stays_packed(tmp_path) -> None:
    # The ONNX importer emits Clip (ReLU6) as call_tir(maximum/minimum): still fused and packed.
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    torch.manual_seed(0)
    model, x = _TinyMobileNet().eval(), torch.randn(1, 3, 32, 32)
    torch.onnx.export(model, (x,), str(tmp_path / "tiny.onnx"), dynamo=False)
    mod = from_onnx(onnx.load(str(tmp_path / "tiny.onnx")), keep_params_in_input=False)
    scheduled = default_schedule_pipeline(HOST)(mod)
    kernels = _kernels(scheduled)
    assert all(kernels.values()), kernels
    assert sum("layout_transform" in name for name in kernels) <= 2
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run(scheduled, x.numpy()), expected, rtol=1e-4, atol=1e-4)


def test_int8_conv_softmax_layer_norm_match_unscheduled_build() -> None:
    # Not packed (int8) or not ours (softmax, layer norm): scheduled by the generic and dlight
    # rules, and the results must not change.
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 10, 10), "int8"))
    v = relax.Var("v", relax.TensorType((4, 64), "float32"))
    weight = relax.const(rng.integers(-8, 8, (16, 16, 3, 3)).astype("int8"))
    dense = relax.const(rng.standard_normal((32, 64)).astype("float32"))
    gamma, beta = relax.const(np.ones(32, "float32")), relax.const(np.zeros(32, "float32"))
    with bb.function("main", [x, v]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, weight, padding=1, out_dtype="int32"))
            y = bb.emit(relax.op.nn.softmax(relax.op.astype(y, "float32") * relax.const(
                0.01, "float32"), axis=1))
            z = bb.emit(relax.op.matmul(v, relax.op.permute_dims(dense)))
            z = bb.emit(relax.op.nn.layer_norm(z, gamma, beta, axes=[-1]))
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    mod = bb.get()
    scheduled = default_schedule_pipeline(HOST)(mod)
    assert all(_kernels(scheduled).values()), _kernels(scheduled)
    inputs = [tvm.runtime.tensor(rng.integers(-8, 8, (1, 16, 10, 10)).astype("int8")),
              tvm.runtime.tensor(rng.standard_normal((4, 64)).astype("float32"))]
    ours = relax.VirtualMachine(tvm.compile(scheduled, HOST), tvm.cpu())["main"](*inputs)
    plain = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())["main"](*inputs)
    for a, b in zip(ours, plain, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_pack_channels_rewrites_conv_and_elementwise() -> None:
    conv_bn = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                            nn.ReLU6())
    mod, _, _ = _import(conv_bn, (1, 16, 8, 8))
    packed = tvm.transform.Sequential([
        relax.transform.FoldBatchnormToConv2D(), PackChannels(lanes=8),
        relax.transform.DeadCodeElimination(), fold_constants_numpy])(mod)
    ops = []
    relax.analysis.post_order_visit(
        packed["main"], lambda e: ops.append(e) if isinstance(e, relax.Call) else None)
    convs = [c for c in ops if c.op.name == "relax.nn.conv2d"]
    assert [c.attrs.data_layout for c in convs] == ["NCHW8c"]
    assert [c.attrs.kernel_layout for c in convs] == ["OIHW8i8o"]
    # weight and bias are folded: only the input and the output are transformed at run time
    assert sum(c.op.name == "relax.layout_transform" for c in ops) == 2
    assert all(len(c.ty.shape) == 5 for c in ops if c.op.name in ("relax.add", "relax.clip"))


def test_layout_transform_array_matches_tvm() -> None:
    index_map = tirx.IndexMap.from_func(lambda n, c, h, w: (n, c // 8, h, w, c % 8),
                                        index_dtype="int64")
    array = np.random.default_rng(0).standard_normal((1, 12, 3, 2)).astype("float32")
    ours = layout_transform_array(array, index_map)
    assert ours.shape == (1, 2, 3, 2, 8)
    expected = np.zeros_like(ours)
    for c in range(12):
        expected[:, c // 8, :, :, c % 8] = array[:, c]
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("registers", [16, 32])
def test_conv_tile_fits_registers(registers: int) -> None:
    for oc_chunks, height, width in [(18, 56, 56), (160, 7, 7), (3, 112, 112), (1, 5, 3)]:
        tile = pick_tile(oc_chunks, height, width, registers)
        # accumulators + weight vectors + one broadcast register must not spill
        assert tile.accumulators + tile.oc + 1 <= registers
        assert oc_chunks % tile.oc == 0 and width % tile.x == 0 and height % tile.y == 0
        # enough independent FMA chains to hide the FMA latency on MobileNetV2's shapes
        assert tile.accumulators >= 7 or (height, width) == (5, 3)


@pytest.mark.parametrize("integer", [False, True])
def test_depthwise_tile_spans_rows_when_a_row_allows_few_pixels(integer: bool) -> None:
    # MobileNetV2's rows (112 ... 7) keep a one-row tile of 7 or 8 pixels
    for height, width in [(112, 112), (56, 56), (28, 28), (14, 14), (7, 7)]:
        assert pixel_tile(height, width, 16, integer=integer)[0] == 1
    # rows of 38 = 2 x 19 and of 19 pixels: several rows, within the accumulator limit
    for height, width in [(50, 38), (25, 19), (100, 76), (13, 10), (1, 19)]:
        rows, columns = pixel_tile(height, width, 16, integer=integer)
        assert height % rows == 0 and width % columns == 0
        assert rows * columns <= (12 if integer else 10)
        if columns <= (4 if integer else 3) and height % 2 == 0:
            assert rows >= 2, (height, width, rows, columns)
    assert pixel_tile(50, 38, 16, integer=integer) == (5, 2)
    assert pixel_tile(100, 76, 16, integer=integer) == ((2, 4) if integer else (1, 4))
    assert pixel_tile(1, 19, 16, integer=integer) == (1, 1)


def test_stem_tile_counts_reused_window_broadcasts() -> None:
    # 3x3 stride-2 stem, 3 unblocked input channels: LLVM keeps one broadcast per pixel live
    # from one window column to the next, so the 2 x 14 tile (28 accumulators) would spill
    plain = pick_tile(2, 112, 112, 32)
    overlap = pick_tile(2, 112, 112, 32, window_overlap=True)
    assert plain.accumulators == 28
    assert overlap.accumulators + overlap.oc + 1 + (overlap.x - 1) <= 32
    assert 8 <= overlap.accumulators <= 14
    # the scheduled stem uses it; a 1x1 conv on blocked input does not
    module = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU6(), nn.Conv2d(32, 32, 1))
    mod, _, _ = _import(module, (1, 3, 224, 224))
    scheduled = default_schedule_pipeline(AVX512)(mod)
    scripts = {gv.name_hint: f.script() for gv, f in scheduled.functions_items()
               if isinstance(f, tirx.PrimFunc) and "conv2d" in gv.name_hint}
    stem = [s for s in scripts.values() if "T.int64(3), T.int64(3), T.int64(3), T.int64(1)" in s]
    assert len(stem) == 1 and f"T.unroll(T.int64({overlap.x}))" in stem[0]
    assert f"T.unroll(T.int64({overlap.x}))" not in "".join(
        s for s in scripts.values() if s is not stem[0])


def test_non_cpu_target_is_a_user_error() -> None:
    from tvm_compress.errors import UserError

    with pytest.raises(UserError, match="not a CPU target"):
        default_schedule_pipeline(tvm.target.Target({"kind": "cuda", "arch": "sm_80"}))


def test_vector_width_follows_target() -> None:
    assert vector_lanes(HOST) in (4, 8, 16)
    assert vector_lanes(AARCH64) == 4
    assert vector_lanes(AVX512) == 16


def test_int8_kernel_targets() -> None:
    from tvm_compress.backend.schedules.hardware import has_int8_kernel, has_sdot
    from tvm_compress.backend.targets import resolve_target

    dotprod = resolve_target("aarch64-dotprod")
    assert has_sdot(dotprod) and has_int8_kernel(dotprod)
    assert not has_sdot(AARCH64) and not has_int8_kernel(AARCH64)  # plain NEON: no int8 kernel
    assert not has_sdot(AVX512)


# The stem's output (16 channels, 16x16) in the target's channel block.
@pytest.mark.parametrize(("target", "stem_out"), [(AARCH64, "(1, 4, 16, 16, 4)"),
                                                  (AVX512, "(1, 1, 16, 16, 16)")])
def test_other_isas_compile(target: tvm.target.Target, stem_out: str, tmp_path) -> None:
    mod, _, _ = _import(_TinyMobileNet(), (1, 3, 32, 32))
    scheduled = default_schedule_pipeline(target)(mod)
    assert all(_kernels(scheduled).values())
    assert f"R.Tensor({stem_out}" in scheduled["main"].script(show_meta=False)
    executable = tvm.compile(scheduled, target)
    if target is AARCH64 and shutil.which("aarch64-linux-gnu-g++"):
        path = tmp_path / "tiny.so"
        executable.export_library(
            str(path), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
        assert path.stat().st_size > 0


def _llvm_assembly(executable) -> str:  # noqa: ANN001
    def walk(mod):  # noqa: ANN001, ANN202
        return [mod, *(m for sub in mod.imports for m in walk(sub))]

    return "\n".join(m.inspect_source("asm") for m in walk(executable.mod) if m.kind == "llvm")


def _kernel_bodies(asm: str, marker: str) -> dict[str, str]:
    """Assembly of each function whose name holds ``marker`` (split at the ELF symbol labels)."""
    bodies, name = {}, None
    for line in asm.splitlines():
        if line.endswith(":") and not line.startswith((".", "\t", " ")):
            name = line[:-1] if marker in line else None
            if name:
                bodies[name] = ""
        elif name:
            bodies[name] += line + "\n"
    return bodies


def test_aarch64_convs_are_neon_fma_on_whole_vectors() -> None:
    # qemu timings say nothing about a phone, so the check is the code: every conv and
    # depthwise kernel's inner loop multiplies-adds 4 lanes at a time (fmla vN.4s).
    mod, _, _ = _import(_TinyMobileNet(), (1, 3, 32, 32))
    asm = _llvm_assembly(tvm.compile(default_schedule_pipeline(AARCH64)(mod), AARCH64))
    # The loops live in each kernel's parallel body ("<kernel>_compute_"), not its FFI wrapper.
    convs = {n: b for n, b in _kernel_bodies(asm, "conv2d").items() if n.endswith("_compute_")}
    assert len(convs) >= 7, list(convs)  # 5 convs, 2 depthwise
    for name, body in convs.items():
        vector_fma = [ln for ln in body.splitlines() if "fmla\tv" in ln and ".4s" in ln]
        assert len(vector_fma) >= 4, (name, body[:2000])


@pytest.mark.skipif(not target_has_features("avx2", _THIS_CPU), reason="needs an AVX2 host")
@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride"),
                         [(16, 16, 8, 3, 1), (8, 24, 9, 1, 2)])
def test_avx2_int8_microkernel_is_exact(cin: int, cout: int, size: int, kernel: int,
                                        stride: int) -> None:
    from tvm import s_tir, te

    from tvm_compress.backend.schedules.blocks import find_kernel
    from tvm_compress.backend.schedules.int8 import (
        CONV_NCHWC_U8S8,
        conv2d_nchwc_u8s8,
        schedule_conv2d_nchwc_u8s8,
    )

    pad = (kernel - 1) // 2
    data = te.placeholder((1, cin // 8, size, size, 8), "uint8", name="data")
    weight = te.placeholder((cout // 8, cin // 8, kernel, kernel, 2, 8, 4), "int8", name="w")
    conv = conv2d_nchwc_u8s8(data, weight, strides=(stride, stride), padding=(pad,) * 4)
    func = te.create_prim_func([data, weight, conv]).with_attr("global_symbol", "main")
    sch = s_tir.Schedule(func)
    schedule_conv2d_nchwc_u8s8(sch, find_kernel(sch, CONV_NCHWC_U8S8), registers=16, cores=2)
    assert "pmadd" in sch.mod.script()  # the AVX2 intrinsic was tensorized in
    rng = np.random.default_rng(0)
    # 7-bit activations: vpmaddubsw's int16 pair sums cannot saturate
    args = [rng.integers(0, 128, [int(d) for d in data.shape]).astype("uint8"),
            rng.integers(-128, 128, [int(d) for d in weight.shape]).astype("int8")]
    outs = []
    for mod in (sch.mod["main"], func):
        out = tvm.runtime.tensor(np.zeros([int(d) for d in conv.shape], "int32"))
        tvm.compile(mod, HOST)["main"](*map(tvm.runtime.tensor, args), out)
        outs.append(out.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def test_kernel_call_times_sees_every_kernel_call(tiny_cnn: nn.Module,
                                                  tiny_input: np.ndarray) -> None:
    from tvm_compress.backend.build import build
    from tvm_compress.frontend.importers import from_torch
    from tvm_compress.runtime.bench import kernel_call_times

    compiled = build(from_torch(tiny_cnn, tiny_input), target="x86")
    calls = kernel_call_times(compiled.vm, tvm.runtime.tensor(tiny_input), runs=3)
    convs = {name: t for name, t in calls.items() if "conv2d" in name}
    assert convs, sorted(calls)
    assert all(t.ndim == 1 and len(t) >= 1 and (t > 0).all() for t in calls.values())
    # instrumentation is removed afterwards: plain calls still work and give the same output
    out = compiled.vm["main"](tvm.runtime.tensor(tiny_input))
    np.testing.assert_allclose(out.numpy(), compiled.run(tiny_input), rtol=1e-6)


def _elementwise_kernel(shape: tuple[int, ...]) -> tuple[tirx.PrimFunc, np.ndarray, np.ndarray]:
    from conftest import relax_main

    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    mod = relax_main(relax.TensorType(shape, "float32"),
                     lambda bb, v: relax.op.sigmoid(relax.op.add(v, relax.const(np.float32(1)))))
    scheduled = default_schedule_pipeline(HOST)(mod)
    kernel = next(f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc))
    expected = 1 / (1 + np.exp(-(x + 1)))
    return kernel, _run(scheduled, x), expected


@pytest.mark.parametrize(("shape", "parallel"), [((1, 512), False), ((1, 2048), False),
                                                 ((1, 64, 32, 32), True)])
def test_small_kernels_run_on_one_core(shape: tuple[int, ...], parallel: bool) -> None:
    # An LSTM step's gates (512-2048 elements): waking the second core costs more than the
    # work (rules.SERIAL_ITERATIONS); a 64-channel feature map is still split across cores.
    kernel, out, expected = _elementwise_kernel(shape)
    text = kernel.script()
    assert ("T.parallel" in text) == parallel, text[:800]
    assert "T.vectorized(T.int64(8))" in text, text[:800]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_iterations_counts_every_block_with_its_reduction() -> None:
    from tvm import te

    from tvm_compress.backend.schedules.rules import iterations

    a = te.placeholder((4, 8), "float32", name="a")
    b = te.placeholder((8, 16), "float32", name="b")
    k = te.reduce_axis((0, 8), "k")
    mm = te.compute((4, 16), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="mm")
    out = te.compute((4, 16), lambda i, j: mm[i, j] + 1, name="out")
    assert iterations(te.create_prim_func([a, b, out])) == 4 * 16 * 8 + 4 * 16
