"""The six Fashion-MNIST zoo CNNs: structure, shipped checkpoints, and both TVM import paths."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import nn

from tvm_compress.data import fashion_mnist
from tvm_compress.errors import UserError
from tvm_compress.zoo import fmnist
from tvm_compress.zoo.train import evaluate_accuracy

ARCHS = list(fmnist.ARCHITECTURES)
# Checkpoints are trained on this 2-core machine (~1 h each) and land one by one; the tests check
# every checkpoint that ships, and that the accuracy record matches exactly those.
SHIPPED = [a for a in ARCHS if fmnist.checkpoint_path(a).is_file()]


def test_the_six_architectures() -> None:
    assert ARCHS == ["resnet", "mobilenet_v2", "shufflenet_v2", "squeezenet", "googlenet", "vgg"]


@pytest.mark.parametrize("arch", ARCHS)
def test_structure(arch: str) -> None:
    torch.manual_seed(0)
    model = fmnist.ARCHITECTURES[arch]().eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert convs and len(convs) == len(bns)
    assert all(c.bias is None for c in convs)
    # Widths are multiples of 8 so that cropping and int8 kernels keep aligned channel counts.
    assert all(c.out_channels % 8 == 0 for c in convs)
    # Each conv's output feeds a BN of the same width: check registration order pairs them.
    ordered = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    for conv, bn in zip(ordered[::2], ordered[1::2], strict=True):
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert conv.out_channels == bn.num_features
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_unknown_arch_and_missing_checkpoint(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    with pytest.raises(UserError, match="resnet, mobilenet_v2"):
        fmnist.checkpoint_path("alexnet")
    monkeypatch.setattr(fmnist, "CHECKPOINT_DIR", tmp_path)
    with pytest.raises(UserError, match="benchmarks/train_zoo.py --arch vgg"):
        fmnist.load_pretrained("vgg")


@pytest.fixture(scope="module")
def test_head() -> tuple[np.ndarray, np.ndarray]:
    images, labels = fashion_mnist("test")
    return images[:2000], labels[:2000]


@pytest.mark.parametrize("arch", SHIPPED)
def test_checkpoint_accuracy(arch: str, test_head) -> None:  # noqa: ANN001
    path = fmnist.checkpoint_path(arch)
    assert path.is_file() and path.stat().st_size < 5 * 2**20
    model = fmnist.load_pretrained(arch)
    assert not model.training
    assert evaluate_accuracy(model, *test_head) >= 0.89


def test_accuracy_file_records_every_checkpoint() -> None:
    recorded = json.loads((fmnist.CHECKPOINT_DIR / "accuracy.json").read_text())
    assert SHIPPED and set(recorded) == set(SHIPPED)
    # a sanity floor; the goals (>= 90%, ResNet >= 92%) are reported against the record
    assert all(recorded[a]["test_accuracy"] >= 0.89 for a in SHIPPED)


def _run_relax(mod, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    import tvm
    from tvm import relax

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    # from_exported_program returns a one-element tuple, from_onnx the tensor itself.
    return (out[0] if isinstance(out, Sequence) else out).numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_tvm_import_paths_match_torch(arch: str, tmp_path) -> None:  # noqa: ANN001
    import onnx
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.torch import from_exported_program

    # trained weights where shipped; the import numerics do not depend on training
    model = fmnist.load_pretrained(arch) if arch in SHIPPED else \
        fmnist.ARCHITECTURES[arch]().eval()
    x = fashion_mnist("calib")[0][:2]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    exported = torch.export.export(model, (torch.from_numpy(x),))
    got = _run_relax(from_exported_program(exported), x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False)
    got = _run_relax(from_onnx(onnx.load(path), keep_params_in_input=False), x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(fmnist.conv_bn(1, 8, stride=2), fmnist.conv_bn(8, 16, stride=2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def test_train_is_seeded_and_learns() -> None:
    from tvm_compress.zoo.train import train

    subset = tuple(a[:4096] for a in fashion_mnist("train"))
    runs = []
    for _ in range(2):
        model = _tiny()
        result = train(model, epochs=1, lr=0.05, seed=1, progress=False, train_data=subset)
        runs.append((model.state_dict(), result))
    (first, result), (second, _) = runs
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert result["epochs"] == 1 and len(result["history"]) == 1
    assert result["val_accuracy"] > 0.5 and result["test_accuracy"] > 0.5  # chance is 0.1
    with pytest.raises(UserError, match="epochs >= 1"):
        train(_tiny(), epochs=0, lr=0.1)
