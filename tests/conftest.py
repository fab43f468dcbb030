"""Shared fixtures: a tiny CNN for fast checks and the real MobileNetV2 (imported once)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

# pytest-xdist runs one worker per core; each TVM thread pool would otherwise take every core too,
# and TVM's workers spin while they wait: oversubscribed, the suite ran about 2x slower. Each
# worker gets its share (tests that check the default pool run it in a clean subprocess).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "TVM_NUM_THREADS" not in os.environ:
    os.environ["TVM_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))


def relax_main(x_type: object, body) -> object:  # noqa: ANN001
    """A one-input Relax ``main``: ``body(bb, x)`` emits bindings and returns the output expr.

    ``x_type`` is a ``relax.TensorType`` or a float32 shape.
    """
    import tvm  # noqa: F401  (imported late: conftest is loaded before every test file)
    from tvm import relax

    if not isinstance(x_type, relax.TensorType):
        x_type = relax.TensorType(tuple(x_type), "float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", x_type)
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def relax_op_names(mod: object) -> set[str]:
    """Names of the Relax operators ``mod``'s ``main`` calls."""
    import tvm
    from tvm import relax

    names: set[str] = set()

    def visit(expr) -> None:  # noqa: ANN001
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.add(str(expr.op.name))

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


class TinyCNN(nn.Module):
    """conv-bn-relu, depthwise, a residual add, global pool, linear: every layer kind we name."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
                                nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        return self.head(x.mean((2, 3)))


def randomize_bn(module: nn.Module, seed: int) -> nn.Module:
    """Random (seeded) BatchNorm statistics and affine parameters, so BN folding is exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return module.eval()


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyCNN(), 0)


@pytest.fixture
def tiny_input() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype("float32")


@pytest.fixture(scope="session")
def mobilenet_v2_torch() -> nn.Module:
    from tvm_compress.zoo.mobilenet_v2 import mobilenet_v2_imagenet

    return mobilenet_v2_imagenet()


@pytest.fixture(scope="session")
def mobilenet_v2_model(mobilenet_v2_torch):  # noqa: ANN001, ANN201
    from tvm_compress.frontend.importers import from_torch

    return from_torch(mobilenet_v2_torch, torch.zeros(1, 3, 224, 224), name="mobilenet_v2",
                      task="imagenet")


@pytest.fixture(scope="session")
def mobilenet_v2_onnx_path(mobilenet_v2_torch, tmp_path_factory):  # noqa: ANN001, ANN201
    from tvm_compress.frontend.importers import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "mobilenet_v2.onnx"
    return export_onnx(mobilenet_v2_torch, torch.zeros(1, 3, 224, 224), path)


@pytest.fixture(scope="session")
def imagenet_photos():  # noqa: ANN201
    from tvm_compress.data import imagenet_photos

    return imagenet_photos()
