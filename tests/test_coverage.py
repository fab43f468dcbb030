"""Schedule coverage: every kernel of every zoo model and of the coverage models (ConvTranspose,
odd channel counts, grouped / depthwise / dilated convs, Resize, softmax, LayerNorm, concat and
slice chains, a 640x640 input) is scheduled by a rule or a database, never left as naive loops;
the build report names the rule; the rewrites behind it are exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
from coverage_models import MODELS, make
from torch import nn
from tvm import relax, s_tir, te

from tvm_compress.backend.report import kernel_infos, unscheduled
from tvm_compress.backend.schedules import default_schedule_pipeline, lower_passes
from tvm_compress.backend.schedules.conv_transpose import conv_transpose_to_conv
from tvm_compress.backend.schedules.generic import schedule_fallback_func
from tvm_compress.backend.schedules.hardware import host_cpu, vector_lanes
from tvm_compress.backend.schedules.layout import PackChannels

HOST = tvm.target.Target({"kind": "llvm", **host_cpu(),
                          "num-cores": 2})
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                            "mattr": ["+neon"]})


def _ops(mod: tvm.IRModule) -> list[relax.Call]:
    calls: list[relax.Call] = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call)
        and isinstance(e.op, tvm.ir.Op) else None)
    return calls


def _single_op(x_shape: tuple[int, ...], make_call) -> tvm.IRModule:  # noqa: ANN001
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(make_call(x))
        bb.emit_func_output(out)
    return bb.get()


# ---------------------------------------------------------------------- conv2d_transpose rewrite

# (cin, cout, kernel, stride, padding, output_padding, groups, height, width)
TRANSPOSE_CASES = [(4, 6, 2, 2, 0, 0, 1, 5, 6), (4, 6, 4, 2, 1, 0, 1, 5, 5),
                   (4, 6, 3, 2, 1, 1, 1, 5, 7), (6, 6, 2, 2, 0, 0, 3, 4, 4),
                   (4, 4, 3, 3, 0, 2, 2, 3, 4), (4, 8, 3, 1, 1, 0, 1, 5, 5),
                   (5, 3, 5, 2, 2, 1, 1, 4, 3), (4, 4, 3, 2, 0, 0, 4, 3, 3)]


def _transpose_module(cin, cout, k, s, p, op, g, h, w):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(cin, cout, k, s, p, op, groups=g, bias=False).eval()
    weight = relax.const(layer.weight.detach().numpy())
    mod = _single_op((1, cin, h, w), lambda x: relax.op.nn.conv2d_transpose(
        x, weight, strides=s, padding=p, output_padding=op, groups=g))
    return layer, mod


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=str)
def test_conv_transpose_rewrite_matches_torch(case: tuple[int, ...]) -> None:
    layer, mod = _transpose_module(*case)
    rewritten = conv_transpose_to_conv(mod)
    assert not any(c.op.name == "relax.nn.conv2d_transpose" for c in _ops(rewritten))
    x = torch.randn(1, case[0], case[7], case[8])
    vm = relax.VirtualMachine(tvm.compile(rewritten, HOST), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_allclose(got, layer(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_conv_transpose_rewrite_structure() -> None:
    # k4 s2 p1 (DCGAN / U-Net upsampling): 2x2 taps per phase, 4 phases as output channels
    _, mod = _transpose_module(8, 6, 4, 2, 1, 0, 1, 5, 5)
    calls = _ops(conv_transpose_to_conv(mod))
    names = [c.op.name.removeprefix("relax.") for c in calls]
    assert names == ["nn.conv2d", "reshape", "permute_dims", "reshape", "strided_slice"]
    conv = calls[0]
    assert [int(d) for d in conv.args[1].ty.shape] == [6 * 4, 8, 2, 2]
    assert [int(p) for p in conv.attrs.padding] == [1, 1, 1, 1]
    assert [int(d) for d in calls[-1].ty.shape] == [1, 6, 10, 10]


def test_conv_transpose_left_alone_when_dilated() -> None:
    weight = relax.const(np.ones((4, 4, 3, 3), "float32"))
    mod = _single_op((1, 4, 5, 5), lambda x: relax.op.nn.conv2d_transpose(
        x, weight, strides=2, dilation=2))
    tvm.ir.assert_structural_equal(conv_transpose_to_conv(mod), mod)


# ------------------------------------------------------------------------- channel padding


def test_pack_channels_pads_odd_channel_counts() -> None:
    rng = np.random.default_rng(0)
    w1 = relax.const(rng.standard_normal((20, 12, 3, 3)).astype("float32"))
    w2 = relax.const(rng.standard_normal((20, 1, 5, 5)).astype("float32"))

    def body(x: relax.Expr) -> relax.Expr:
        y = relax.op.nn.relu(relax.op.nn.conv2d(x, w1, padding=1))
        return relax.op.nn.conv2d(y, w2, padding=2, groups=20)

    mod = _single_op((1, 12, 8, 8), body)
    packed = tvm.transform.Sequential([PackChannels(lanes=8),
                                       relax.transform.DeadCodeElimination()])(mod)
    calls = _ops(packed)
    convs = [c for c in calls if c.op.name == "relax.nn.conv2d"]
    assert [c.attrs.out_layout for c in convs] == ["NCHW8c", "NCHW8c"]
    # 20 output channels padded to 24; the depthwise conv is 24 groups on the padded tensor
    assert [int(d) for d in convs[0].ty.shape] == [1, 3, 8, 8, 8]
    assert int(convs[1].attrs.groups) == 24
    # the padded tensor flows packed through the ReLU and is cropped once, at the end
    assert [c.op.name for c in calls].count("relax.strided_slice") == 1
    assert any(c.op.name == "relax.nn.relu" and len(c.ty.shape) == 5 for c in calls)


def test_divide_by_a_padded_tensor_is_not_packed() -> None:
    # padding channels are zero: dividing by them would put inf/nan where conv weights are 0
    w = relax.const(np.ones((12, 12, 1, 1), "float32"))
    mod = _single_op((1, 12, 4, 4), lambda x: relax.op.divide(
        x, relax.op.nn.conv2d(x, w)))
    packed = tvm.transform.Sequential([PackChannels(lanes=8),
                                       relax.transform.DeadCodeElimination()])(mod)
    divide = [c for c in _ops(packed) if c.op.name == "relax.divide"]
    assert len(divide[0].ty.shape) == 4


# -------------------------------------------------------------------------------- coverage

def generic_convs(mod: tvm.IRModule, lanes: int) -> list[str]:
    """Conv kernels left to a generic schedule although their output has at least ``lanes / 2``
    channels. Convs with fewer (1-4 channel heads, squeeze-excite reductions on AVX-512) stay
    NCHW on purpose: padding them to a whole vector would multiply their work by 4-16."""
    found = []
    for k in kernel_infos(mod):
        if "conv2d" not in k.name or k.kind in ("kernel", "tuned"):
            continue
        out = mod[k.name].params[-1].ty.shape
        if len(out) != 4 or 2 * int(out[1]) >= lanes:
            found.append(k.name)
    return found


TORCH_ONLY = {"attention"}  # TVM's ONNX importer cannot import its Reshape chain (issue 15)


def _import(name: str, tmp_path) -> tuple:  # noqa: ANN001
    from tvm_compress.frontend.importers import export_onnx, from_onnx, from_torch

    module, x = make(name)
    if name in TORCH_ONLY:
        return from_torch(module, x, name=name), x, None
    path = export_onnx(module, x, tmp_path / f"{name}.onnx")
    return from_onnx(path, name=name), x, path


def _reference(module: nn.Module, x: torch.Tensor, path) -> np.ndarray:  # noqa: ANN001
    if path is None:
        with torch.no_grad():
            return module(x).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_coverage_models_are_scheduled_and_exact(name: str, tmp_path) -> None:
    from tvm_compress.backend.build import build

    model, x, path = _import(name, tmp_path)
    for target in (HOST, AVX2, AARCH64):
        mod = default_schedule_pipeline(target)(model.mod)
        assert not unscheduled(kernel_infos(mod)), (vector_lanes(target), kernel_infos(mod))
        assert not any("conv2d_transpose" in gv.name_hint for gv in mod.get_global_vars())
        assert not generic_convs(mod, vector_lanes(target)), vector_lanes(target)
    compiled = build(model, target=HOST, database=False)
    assert not unscheduled(compiled.kernels)
    expected = _reference(make(name)[0], x, path)
    np.testing.assert_allclose(compiled.run(x.numpy()), expected, rtol=1e-4, atol=1e-4)


def _zoo_names() -> list[str]:
    from tvm_compress.zoo import ZOO

    return sorted(ZOO)


@pytest.mark.parametrize("name", _zoo_names())
def test_zoo_models_are_fully_scheduled(name: str) -> None:
    from tvm_compress.zoo import load_zoo

    model = load_zoo(name)
    for target in (HOST, AVX2, AVX512):
        infos = kernel_infos(default_schedule_pipeline(target)(model.mod))
        assert infos and not unscheduled(infos), (vector_lanes(target), unscheduled(infos))
        # every conv of the zoo takes a blocked kernel, whatever the SIMD width
        generic = [k.name for k in infos if "conv2d" in k.name and k.kind != "kernel"]
        assert not generic, (vector_lanes(target), generic)


# The real-model corpus (benchmarks/corpus.py) at its small test shapes: its public-wheel files
# and one export of each architecture in the default run (about two minutes here, mostly ONNX
# import); the other exports and the 800x608 PicoDet are marked slow.
CORPUS_FAST = {"ddddocr_common", "ddddocr_common_old", "ddddocr_common_det", "nudenet_320n",
               "resnet50_ts", "mobilenet_v3_large_ts", "efficientnet_b0_ts", "shufflenet_v2_ts",
               "convnext_ts", "unet_ts"}


def _corpus_entries() -> list:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import corpus

    return [pytest.param(e, id=e.name,
                         marks=[] if e.name in CORPUS_FAST else [pytest.mark.slow])
            for e in corpus.entries()]


@pytest.mark.parametrize("entry", _corpus_entries())
def test_corpus_models_are_fully_scheduled(entry) -> None:  # noqa: ANN001
    import corpus

    import tvm_compress as tc

    model = tc.load(str(corpus.fetch(entry)), input_shapes=entry.small_shapes)
    mod = default_schedule_pipeline(HOST)(model.mod)
    assert not unscheduled(kernel_infos(mod)), unscheduled(kernel_infos(mod))
    assert not generic_convs(mod, vector_lanes(HOST))


def test_report_marks_unscheduled_kernels() -> None:
    module, x = make("conv_zoo")
    from tvm_compress.frontend.importers import from_torch

    lowered = tvm.transform.Sequential(lower_passes(HOST))(from_torch(module, x).mod)
    infos = kernel_infos(lowered)  # legalized and fused, no rule applied yet
    assert infos and len(unscheduled(infos)) == len(infos)
    scheduled = kernel_infos(default_schedule_pipeline(HOST)(from_torch(module, x).mod))
    assert not unscheduled(scheduled)
    assert {k.kind for k in scheduled} <= {"kernel", "generic"}


def test_kernel_flops_count_multiply_adds() -> None:
    w = relax.const(np.ones((16, 16, 3, 3), "float32"))
    mod = _single_op((1, 16, 8, 8), lambda x: relax.op.nn.conv2d(x, w, padding=1))
    conv = [k for k in kernel_infos(default_schedule_pipeline(AVX2)(mod))
            if k.rule == "conv2d_nchwc"]
    assert len(conv) == 1 and conv[0].flops == 2 * 16 * 16 * 9 * 64


def test_fallback_schedules_several_reductions_exactly() -> None:
    a = te.placeholder((64, 96), "float32", name="a")
    k1, k2 = te.reduce_axis((0, 96), "k1"), te.reduce_axis((0, 96), "k2")
    total = te.compute((64,), lambda i: te.sum(a[i, k1], axis=k1), name="total")
    peak = te.compute((64,), lambda i: te.max(a[i, k2], axis=k2), name="peak")
    out = te.compute((64, 96), lambda i, j: a[i, j] * total[i] - peak[i], name="out")
    func = te.create_prim_func([a, out]).with_attr("global_symbol", "main")
    sch = s_tir.Schedule(func)
    assert schedule_fallback_func(sch, lanes=8, cores=2)
    script = sch.mod.script()
    assert "T.parallel" in script and "T.vectorized" in script
    data = np.random.default_rng(0).standard_normal((64, 96)).astype("float32")
    results = []
    for f in (sch.mod["main"], func):
        res = tvm.runtime.tensor(np.zeros((64, 96), "float32"))
        tvm.compile(tvm.IRModule({"main": f}), HOST)["main"](tvm.runtime.tensor(data), res)
        results.append(res.numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- CLI report


def test_compile_report_lists_every_kernel_with_its_rule(capsys, tmp_path) -> None:
    from tvm_compress.cli.main import main
    from tvm_compress.frontend.importers import export_onnx

    module, x = make("textdet_head")
    onnx_path = export_onnx(module, x, tmp_path / "det.onnx")
    argv = ["compile", str(onnx_path), "-o", str(tmp_path / "det.so"), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unscheduled_kernels"] == [] and out["kernels"]
    assert all(k["rule"] != "unscheduled" for k in out["kernels"])
    assert sum(out["schedule_rules"].values()) == len(out["kernels"])
    assert main([*argv, "--profile", "--profile-runs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    timed = [k for k in out["kernels"] if "share" in k]
    assert timed and abs(sum(k["share"] for k in timed) - 1.0) < 1e-6
    assert out["peak"]["gflops"] > 0
    assert all(k["gflops"] >= 0 and k["pct_peak"] >= 0 for k in timed)
    assert main(argv[:-1] + ["--report"]) == 0
    printed = capsys.readouterr().out
    assert "conv2d_nchwc" in printed and "rule" in printed


def test_gemv_columns_not_a_multiple_of_the_register_stay_vectorized() -> None:
    # 1000 classes on AVX-512 (16 lanes): 8-lane vectors, not scalar columns
    w = relax.const(np.ones((64, 1000), "float32"))
    mod = _single_op((1, 64), lambda x: relax.op.matmul(x, w))
    scheduled = default_schedule_pipeline(AVX512)(mod)
    matmul = [f for gv, f in scheduled.functions_items() if "matmul" in gv.name_hint]
    assert len(matmul) == 1 and "T.vectorized(T.int64(8))" in matmul[0].script()


@pytest.mark.parametrize("target", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_unet_upsampling_and_skip_concat_stay_packed(target: tvm.target.Target, tmp_path) -> None:
    # The transposed convs' phase interleaving and the skip concats move whole channel blocks:
    # only the input is packed and the 1-channel side branch (Resize) unpacked. Before: 8.
    model, _, _ = _import("unet", tmp_path)
    names = [gv.name_hint for gv in default_schedule_pipeline(target)(model.mod).get_global_vars()]
    assert sum("layout_transform" in n for n in names) <= 3, sorted(names)
    assert sum("concatenate" in n for n in names) == 2


def test_resize_of_a_packed_tensor_stays_packed() -> None:
    w = relax.const(np.ones((8, 8, 1, 1), "float32"))
    mod = _single_op((1, 8, 6, 6), lambda x: relax.op.image.resize2d(
        relax.op.nn.conv2d(x, w), (12, 12), method="nearest_neighbor"))
    packed = tvm.transform.Sequential([PackChannels(lanes=8),
                                       relax.transform.DeadCodeElimination()])(mod)
    resize = [c for c in _ops(packed) if c.op.name == "relax.image.resize2d"]
    assert [c.attrs.layout for c in resize] == ["NCHW8c"]


def test_conv_transpose_pads_output_channels_to_the_block() -> None:
    # 6 output channels, block 8: phases padded to 8 channels, the padding cropped at the end
    from tvm_compress.backend.schedules.conv_transpose import ConvTransposeToConv

    layer, mod = _transpose_module(8, 6, 4, 2, 1, 0, 1, 5, 5)
    rewritten = ConvTransposeToConv(block=8)(mod)
    calls = _ops(rewritten)
    assert [int(d) for d in calls[0].args[1].ty.shape] == [8 * 4, 8, 2, 2]
    assert [int(d) for d in calls[-1].ty.shape] == [1, 6, 10, 10]
    x = torch.randn(1, 8, 5, 5)
    vm = relax.VirtualMachine(tvm.compile(rewritten, HOST), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_allclose(got, layer(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_profile_of_a_cross_target_is_refused_before_compiling(capsys, tmp_path) -> None:
    from tvm_compress.cli.main import main

    out = tmp_path / "m.so"
    assert main(["compile", "zoo:fmnist_vgg", "--target", "aarch64", "-o", str(out),
                 "--profile"]) == 2
    assert "--profile runs the model on this host" in capsys.readouterr().err
    assert not out.exists()


def test_bundle_compile_json_has_the_kernel_report(capsys, tmp_path) -> None:
    from tvm_compress.cli.main import main

    assert main(["compile", "zoo:fmnist_vgg", "-o", str(tmp_path / "bundle"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kernels"] and out["unscheduled_kernels"] == []
