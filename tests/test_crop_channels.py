"""CropChannels: Before/Expected structure, numerics against the masked module and torch, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import tvm
from conftest import randomize_bn, relax_main
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from tvm import relax

from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import Model, export_onnx, from_onnx, from_torch
from tvm_compress.frontend.layers import LayerTable
from tvm_compress.graph.channel_groups import analyze, analyze_channel_groups, out_channels_after
from tvm_compress.graph.torch_crop import crop_torch_module
from tvm_compress.passes.crop_channels import CropChannels, crop_channels, zero_channels
from tvm_compress.zoo import fmnist
from tvm_compress.zoo.fmnist import channel_shuffle, conv_bn

X_SHAPE = (1, 2, 4, 4)


def _module(body, shape: tuple[int, ...] = X_SHAPE) -> tvm.IRModule:  # noqa: ANN001
    return relax_main(shape, body)


def _c(array: np.ndarray) -> relax.Expr:
    return relax.const(np.ascontiguousarray(array, dtype="float32"))


W1 = np.arange(6, dtype=np.float32).reshape(3, 2, 1, 1)
W2 = np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1) / 4
BN = [np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.2, 0.3]), np.array([0.0, 0.5, 1.0]),
      np.array([1.0, 1.5, 2.0])]  # gamma, beta, mean, var


def _conv_bn_relu_conv(w1: np.ndarray, bn: list[np.ndarray], w2: np.ndarray):  # noqa: ANN202
    def body(bb, x):  # noqa: ANN001, ANN202
        conv = bb.emit(relax.op.nn.conv2d(x, _c(w1)))
        norm = bb.emit(relax.op.nn.batch_norm(conv, *[_c(p) for p in bn], axis=1))
        act = bb.emit(relax.op.nn.relu(bb.emit(relax.TupleGetItem(norm, 0))))
        return relax.op.nn.conv2d(act, _c(w2))
    return body


def test_crop_structure_conv_bn_relu_conv():
    before = _module(_conv_bn_relu_conv(W1, BN, W2))
    groups = analyze_channel_groups(before)
    assert [(g.size, g.prunable) for g in groups] == [(2, False), (3, True), (2, False)]
    keep = [0, 2]
    expected = _module(_conv_bn_relu_conv(W1[keep], [p[keep] for p in BN], W2[:, keep]))
    tvm.ir.assert_structural_equal(CropChannels({1: [2, 0]})(before), expected,
                                   map_free_vars=True)


def test_crop_structure_depthwise_groups():
    dw = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1) + 1

    def graph(w1: np.ndarray, w_dw: np.ndarray, w2: np.ndarray):  # noqa: ANN202
        def body(bb, x):  # noqa: ANN001, ANN202
            a = bb.emit(relax.op.nn.conv2d(x, _c(w1)))
            d = bb.emit(relax.op.nn.conv2d(a, _c(w_dw), groups=w_dw.shape[0]))
            return relax.op.nn.conv2d(d, _c(w2))
        return body

    cropped = crop_channels(_module(graph(W1, dw, W2)), {1: [1]})
    tvm.ir.assert_structural_equal(cropped, _module(graph(W1[[1]], dw[[1]], W2[:, [1]])),
                                   map_free_vars=True)


def _plan_cases() -> list[tuple[object, str]]:
    return [({7: [0]}, "no channel group 7"), ({0: [0]}, "cannot be cropped.*model input"),
            ({1: []}, "keeps no channels"), ({1: [0, 0]}, "more than once"),
            ({1: [3]}, "out of range.*0..2"), ({1: [0.5]}, "non-integer"),
            ([1, 2], "must map group ids"), ({1: "01"}, "list of kept")]


@pytest.mark.parametrize(("plan", "message"), _plan_cases())
def test_invalid_plans_raise_user_error(plan, message):
    with pytest.raises(UserError, match=message):
        CropChannels(plan)(_module(_conv_bn_relu_conv(W1, BN, W2)))


def test_plan_that_empties_a_slice_is_rejected():
    def body(bb, x):  # noqa: ANN001, ANN202
        a = bb.emit(relax.op.nn.conv2d(x, _c(np.ones((4, 2, 1, 1)))))
        half = bb.emit(relax.op.strided_slice(a, axes=[1], begin=[0], end=[2]))
        return relax.op.nn.conv2d(half, _c(np.ones((3, 2, 1, 1))))

    with pytest.raises(UserError, match="empties tensor"):
        crop_channels(_module(body), {1: [2, 3]})
    assert crop_channels(_module(body), {1: [1, 3]})["main"].ret_ty.shape[1] == 3


# ---------------------------------------------------------------------------------- numerics

def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _torch_run(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def _random_plan(mod: tvm.IRModule, rng: np.random.Generator, low: float = 0.0
                 ) -> dict[int, list[int]]:
    """Random kept channels for every prunable group (at least ``low`` of them kept)."""
    analysis = analyze(mod)
    for _ in range(100):
        plan = {}
        for g in analysis.groups:
            if g.prunable:
                k = int(rng.integers(max(1, int(np.ceil(low * g.size))), g.size + 1))
                plan[g.id] = sorted(rng.choice(g.size, k, replace=False).tolist())
        try:
            analysis.kept_mask(plan)
            return plan
        except UserError:  # emptied a channel slice: draw again
            continue
    raise AssertionError("no valid random plan in 100 draws")


def _check_crop(module: nn.Module, x: np.ndarray, seed: int, *, masked: bool = True,
                low: float = 0.0, model: Model | None = None) -> dict[int, list[int]]:
    model = model or from_torch(module, torch.from_numpy(x))
    plan = _random_plan(model.mod, np.random.default_rng(seed), low)
    cropped = crop_channels(model.mod, plan)
    assert relax.analysis.check_well_formed(cropped)
    table = LayerTable.from_module(cropped)
    assert table.names == model.layers.names
    expected = out_channels_after(analyze_channel_groups(model.mod), plan)
    assert {layer.name: layer.out_channels for layer in table} == expected
    got = _run(cropped, x)
    if masked:
        np.testing.assert_allclose(got, _run(zero_channels(model.mod, plan), x),
                                   rtol=1e-5, atol=1e-5)
    torch_cropped = crop_torch_module(module, plan, mod=model.mod)
    np.testing.assert_allclose(_torch_run(torch_cropped, x), got, rtol=1e-5, atol=1e-5)
    assert _torch_run(module, x).shape == got.shape
    return plan


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_cnn_crop_equals_masked_and_torch(tiny_cnn, tiny_input, seed):
    plan = _check_crop(tiny_cnn, tiny_input, seed)
    assert plan and all(len(k) <= 16 for k in plan.values())
    cropped = crop_torch_module(tiny_cnn, plan, mod=from_torch(tiny_cnn, tiny_input).mod)
    kept = len(plan[1])
    assert (cropped.stem[0].out_channels, cropped.dw[0].groups, cropped.dw[1].num_features,
            cropped.pw[0].in_channels, cropped.head.in_features) == (kept,) * 5
    assert tiny_cnn.stem[0].out_channels == 16  # the original is untouched


def test_onnx_import_with_folded_bn_crops_like_torch(tiny_cnn, tiny_input, tmp_path):
    model = from_onnx(export_onnx(tiny_cnn, tiny_input, tmp_path / "tiny.onnx"))
    assert not any("batch_norm" in m.kind for g in analyze_channel_groups(model.mod)
                   for m in g.members)
    plan = {1: [0, 3, 5, 9]}
    torch_cropped = crop_torch_module(tiny_cnn, plan, mod=model.mod)
    # The BNs are folded in the ONNX graph; the torch BNs next to the convs are cropped too.
    assert torch_cropped.stem[1].num_features == torch_cropped.pw[1].num_features == 4
    np.testing.assert_allclose(_torch_run(torch_cropped, tiny_input),
                               _run(crop_channels(model.mod, plan), tiny_input),
                               rtol=1e-4, atol=1e-4)


def test_crop_torch_module_rejects_modules_that_do_not_match(tiny_cnn, tiny_input):
    mod = from_torch(tiny_cnn, tiny_input).mod
    with pytest.raises(UserError, match="'stem.0' is not a Conv2d"):
        crop_torch_module(nn.Sequential(nn.Linear(3, 3)), {1: [0]}, mod=mod)
    other = copy.deepcopy(tiny_cnn)
    other.dw[1].running_var.add_(1.0)
    with pytest.raises(UserError, match="'dw.1' does not hold the values"):
        crop_torch_module(other, {1: [0]}, mod=mod)


@pytest.mark.slow
def test_mobilenet_v2_imagenet_crop(mobilenet_v2_model, mobilenet_v2_torch, imagenet_photos):
    x = np.asarray(imagenet_photos[0][:1], dtype="float32")
    plan = _random_plan(mobilenet_v2_model.mod, np.random.default_rng(0), low=0.5)
    assert len(plan) == 25
    cropped = crop_channels(mobilenet_v2_model.mod, plan)
    assert LayerTable.from_module(cropped).total_params < 0.8 * \
        mobilenet_v2_model.layers.total_params
    got = _run(cropped, x)
    np.testing.assert_allclose(got, _run(zero_channels(mobilenet_v2_model.mod, plan), x),
                               rtol=1e-5, atol=1e-5)
    torch_cropped = crop_torch_module(mobilenet_v2_torch, plan, mod=mobilenet_v2_model.mod)
    np.testing.assert_allclose(_torch_run(torch_cropped, x), got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(fmnist.ARCHITECTURES))
def test_fmnist_zoo_groups_and_random_crop(arch):
    torch.manual_seed(0)
    module = randomize_bn(fmnist.ARCHITECTURES[arch](), 1)
    x = np.random.default_rng(1).standard_normal((1, 1, 28, 28)).astype("float32")
    model = from_torch(module, torch.from_numpy(x))
    groups = analyze_channel_groups(model.mod)
    assert groups[0].reason == "model input" and groups[-1].reason == "model output"
    assert all(g.prunable and g.zero_preserving for g in groups[1:-1])
    # Every conv / linear layer produces the channels of exactly one group.
    assert sorted(n for g in groups for n in g.producers) == sorted(model.layers.names)
    assert analyze_channel_groups(model.mod) == groups  # deterministic
    plan = _check_crop(module, x, seed=3, masked=False, model=model)
    assert set(plan) == {g.id for g in groups[1:-1]}


# --------------------------------------------------------------- property: random small CNNs

class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class Branches(nn.Module):
    def __init__(self, c: int, a: int, b: int) -> None:
        super().__init__()
        self.left, self.right = conv_bn(c, a, kernel=1), conv_bn(c, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.left(x), self.right(x)), dim=1)


class SplitShuffle(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.half = c // 2
        self.branch = conv_bn(c - self.half, c - self.half, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((x[:, :self.half], self.branch(x[:, self.half:])), dim=1)
        return channel_shuffle(out)


def _block(kind: str, c: int, a: int, b: int) -> tuple[nn.Module, int]:
    """One block on ``c`` channels and its output width (``a``, ``b``: widths to use)."""
    if kind == "conv":
        return conv_bn(c, a), a
    if kind == "depthwise":
        return conv_bn(c, c, groups=c), c
    if kind == "grouped":
        return conv_bn(c, a, groups=2), a
    if kind == "residual":
        return Residual(c), c
    if kind == "concat":
        return Branches(c, a, b), a + b
    return SplitShuffle(c), c


class RandomCNN(nn.Module):
    """Stem, then blocks from ``spec`` (all widths even), then pool or flatten -> linear."""

    def __init__(self, spec: list[tuple[str, int, int]], flatten: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 6)]
        c = 6
        for kind, a, b in spec:
            block, c = _block(kind, c, a, b)
            layers.append(block)
        self.features = nn.Sequential(*layers)
        self.flatten = flatten
        self.classifier = nn.Linear(c * 16 if flatten else c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.flatten(1) if self.flatten else x.mean((2, 3)))


BLOCKS = st.tuples(st.sampled_from(["conv", "depthwise", "grouped", "residual", "concat",
                                    "shuffle"]), st.sampled_from([2, 4, 6]),
                   st.sampled_from([2, 4]))


@settings(max_examples=15, deadline=None)
@given(spec=st.lists(BLOCKS, min_size=1, max_size=3), flatten=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_cnn_crop_matches_masked_and_torch(spec, flatten, seed):
    torch.manual_seed(seed)
    module = randomize_bn(RandomCNN(spec, flatten), seed)
    x = np.random.default_rng(seed).standard_normal((1, 3, 4, 4)).astype("float32")
    _check_crop(module, x, seed)
