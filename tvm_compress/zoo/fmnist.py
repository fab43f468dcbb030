"""Six small Fashion-MNIST CNNs (1x28x28 -> 10 logits), one per family of the Quantune paper.

ResNet, MobileNetV2, ShuffleNetV2, SqueezeNet, GoogLeNet and VGG, scaled down so an epoch trains
in about a minute on two cores. Shared rules, because later stages depend on them:

* every conv is ``bias=False`` and followed by a ``BatchNorm2d`` (ZeroQ reads BN statistics; BN
  folding and channel cropping expect the pair);
* all layers are named submodules, so torch parameter names give stable layer names;
* widths are multiples of 8 (int8 kernels and cropping round to 8);
* only ops that both ``torch.export`` -> Relax and ONNX -> Relax import: global pooling with
  ``mean((2, 3))``, channel shuffle with reshape/transpose, no adaptive pooling to sizes > 1.

Trained weights ship in ``checkpoints/fmnist_<arch>.pt`` (``benchmarks/train_zoo.py`` makes them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tvm_compress.zoo.mobilenet_v2 import MobileNetV2

NUM_CLASSES = 10
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
            relu: bool = True) -> nn.Sequential:
    """conv (no bias) -> BN [-> ReLU], as indices 0, 1, 2 of one Sequential."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


class GlobalPoolClassifier(nn.Module):
    """Backbone ``features`` -> global average pool -> ``classifier``."""

    def __init__(self, features: nn.Module, width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, NUM_CLASSES))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


# ---- ResNet: basic blocks -------------------------------------------------------------------

class BasicBlock(nn.Module):
    """Two 3x3 conv-BN; a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride=stride)
        self.conv2 = conv_bn(cout, cout, relu=False)
        self.shortcut = (conv_bn(cin, cout, kernel=1, stride=stride, relu=False)
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


def resnet() -> nn.Module:
    """ResNet-10-style: stem 16, stages 16/32/64 (28, 14, 7 px) of basic blocks."""
    blocks: list[nn.Module] = [conv_bn(1, 16)]
    cin = 16
    for cout, stride, repeats in ((16, 1, 1), (32, 2, 2), (64, 2, 1)):
        for i in range(repeats):
            blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
    return GlobalPoolClassifier(nn.Sequential(*blocks), cin)


# ---- MobileNetV2: the ImageNet layout, narrowed -------------------------------------------------

def mobilenet_v2() -> nn.Module:
    """MobileNetV2 (inverted residuals, linear bottlenecks, ReLU6) at 14 px, then 7 px."""
    settings = [(1, 16, 1, 1), (4, 24, 2, 1), (4, 32, 3, 2), (4, 64, 2, 1)]
    model = MobileNetV2(num_classes=NUM_CLASSES, in_channels=1, first_stride=2,
                        settings=settings, last_channels=128, dropout=0.1)
    # The ImageNet class uses in-place ReLU6; plain ReLU6 keeps BN outputs intact for
    # forward hooks (calibration, ZeroQ) and is what both exporters see anyway.
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, nn.ReLU6())
    return model


# ---- ShuffleNetV2: split, shuffle, concat -------------------------------------------------------

def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups (reshape -> transpose -> reshape)."""
    _, c, h, w = x.shape
    # -1 for the batch keeps an ONNX export with a dynamic batch axis valid.
    return x.reshape(-1, groups, c // groups, h, w).transpose(1, 2).reshape(-1, c, h, w)


class ShuffleUnit(nn.Module):
    """Same shape: split channels, transform one half. Else both branches see the whole input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.split = stride == 1 and cin == cout
        half = self.half = cout // 2
        if not self.split:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, stride=stride, groups=cin, relu=False),
                                         conv_bn(cin, half, kernel=1))
        branch_in = half if self.split else cin
        self.branch2 = nn.Sequential(conv_bn(branch_in, half, kernel=1),
                                     conv_bn(half, half, stride=stride, groups=half, relu=False),
                                     conv_bn(half, half, kernel=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split:
            # Constant slice bounds: x.chunk exports to ONNX as a shape-dependent Slice
            # that Relax imports with unknown shapes.
            out = torch.cat((x[:, :self.half], self.branch2(x[:, self.half:])), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out)


def shufflenet_v2() -> nn.Module:
    """ShuffleNetV2: stem 24, stages 48/96/192 (14, 7, 7 px) of 2/3/2 units, 1x1 to 256."""
    layers: list[nn.Module] = [conv_bn(1, 24)]
    cin = 24
    for cout, stride, repeats in ((48, 2, 2), (96, 2, 3), (192, 1, 2)):
        for i in range(repeats):
            layers.append(ShuffleUnit(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers.append(conv_bn(cin, 256, kernel=1))
    return GlobalPoolClassifier(nn.Sequential(*layers), 256, dropout=0.1)


# ---- SqueezeNet: fire modules -------------------------------------------------------------------

class Fire(nn.Module):
    """1x1 squeeze, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = conv_bn(cin, squeeze, kernel=1)
        self.expand1x1 = conv_bn(squeeze, expand, kernel=1)
        self.expand3x3 = conv_bn(squeeze, expand, kernel=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat((self.expand1x1(x), self.expand3x3(x)), dim=1)


def squeezenet() -> nn.Module:
    """SqueezeNet: stem 32, fire modules at 14 and 7 px, 1x1 conv head."""
    features = nn.Sequential(
        conv_bn(1, 32), nn.MaxPool2d(2),
        Fire(32, 16, 32), Fire(64, 16, 32), Fire(64, 24, 48), nn.MaxPool2d(2),
        Fire(96, 24, 48), Fire(96, 32, 64), Fire(128, 32, 64),
        conv_bn(128, 128, kernel=1))
    return GlobalPoolClassifier(features, 128, dropout=0.1)


# ---- GoogLeNet: inception blocks ----------------------------------------------------------------

class Inception(nn.Module):
    """Concat of 1x1, 1x1->3x3, 1x1->3x3->3x3 (a 5x5 as two 3x3) and 3x3 max-pool->1x1."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int) -> None:
        super().__init__()
        self.branch1 = conv_bn(cin, c1, kernel=1)
        self.branch2 = nn.Sequential(conv_bn(cin, c3r, kernel=1), conv_bn(c3r, c3))
        self.branch3 = nn.Sequential(conv_bn(cin, c5r, kernel=1), conv_bn(c5r, c5),
                                     conv_bn(c5, c5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                     conv_bn(cin, pool, kernel=1))
        self.channels = c1 + c3 + c5 + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)),
                         dim=1)


def googlenet() -> nn.Module:
    """GoogLeNet: stem 32 -> max-pool, one inception block at 14 px, two at 7 px."""
    a = Inception(32, 16, 16, 24, 8, 16, 8)
    b = Inception(a.channels, 32, 32, 48, 8, 16, 16)
    c = Inception(b.channels, 48, 32, 64, 16, 24, 24)
    features = nn.Sequential(conv_bn(1, 32), nn.MaxPool2d(2), a, nn.MaxPool2d(2), b, c)
    return GlobalPoolClassifier(features, c.channels, dropout=0.1)


# ---- VGG with BN: conv stacks, flatten -> fully connected ---------------------------------------

class VGG(nn.Module):
    """Three stages of two 3x3 conv-BN-ReLU and a max-pool (28 -> 3 px), flatten, two FC layers."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for width in widths:
            layers += [conv_bn(cin, width), conv_bn(width, width), nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin * 3 * 3, hidden), nn.ReLU(),
                                        nn.Dropout(0.3), nn.Linear(hidden, NUM_CLASSES))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet": resnet,
    "mobilenet_v2": mobilenet_v2,
    "shufflenet_v2": shufflenet_v2,
    "squeezenet": squeezenet,
    "googlenet": googlenet,
    "vgg": VGG,
}


def _check_arch(arch: str) -> None:
    from tvm_compress.errors import UserError

    if arch not in ARCHITECTURES:
        raise UserError(f"unknown Fashion-MNIST architecture {arch!r}: use one of "
                        f"{', '.join(ARCHITECTURES)}")


def checkpoint_path(arch: str) -> Path:
    """Where the trained float32 state_dict of ``arch`` lives inside the package."""
    _check_arch(arch)
    return CHECKPOINT_DIR / f"fmnist_{arch}.pt"


def load_pretrained(arch: str) -> nn.Module:
    """The trained Fashion-MNIST model ``arch`` (a key of ``ARCHITECTURES``), in eval mode."""
    from tvm_compress.errors import UserError

    path = checkpoint_path(arch)
    if not path.is_file():
        raise UserError(f"no checkpoint for Fashion-MNIST model {arch!r} at {path}: train it with "
                        f"`python benchmarks/train_zoo.py --arch {arch}`")
    model = ARCHITECTURES[arch]()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
