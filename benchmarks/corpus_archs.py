"""Standard CNN architectures for the real-model corpus, written here (torchvision does not import
next to torch 2.13 CPU): ResNet-50, MobileNetV3-Large, EfficientNet-B0 with TensorFlow-style
"same" padding, ShuffleNetV2 1.0x, a ConvNeXt-style net and a U-Net. Random weights (seeded);
the layouts follow the published papers, not any one checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# -------------------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(conv_bn(cin, width), conv_bn(width, width, 3, stride),
                                  conv_bn(width, cout, act=None))
        self.down = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + (x if self.down is None else self.down(x)))


def resnet50(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, 2 if b == 0 and i > 0 else 1))
            cin = 4 * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


# ------------------------------------------------------------------------------ MobileNetV3-Large


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int, gate: type[nn.Module] = nn.Hardsigmoid,
                 act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, squeeze, 1), act(),
                                nn.Conv2d(squeeze, c, 1), gate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


def _div8(v: float) -> int:
    return max(8, int(v + 4) // 8 * 8)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, exp: int, cout: int, k: int, stride: int, se: bool,
                 act: type[nn.Module]) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(cin, exp, act=act)] if exp != cin else []
        layers.append(conv_bn(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcite(exp, _div8(exp / 4)))
        layers.append(conv_bn(exp, cout, act=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


_MBV3_LARGE = [  # kernel, expansion, out, squeeze-excite, hardswish, stride
    (3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1)]


def mobilenet_v3_large(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, 16, 3, 2, act=nn.Hardswish)]
    cin = 16
    for k, exp, cout, se, hs, stride in _MBV3_LARGE:
        layers.append(InvertedResidual(cin, exp, cout, k, stride, se,
                                       nn.Hardswish if hs else nn.ReLU))
        cin = cout
    layers += [conv_bn(cin, 960, act=nn.Hardswish), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(960, 1280), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1280, classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------- EfficientNet-B0, "same" pad


class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding computed from the input size at run time (as TF-ported
    checkpoints do): the TorchScript exporter records it as Shape arithmetic feeding a Pad."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pad_w = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv_bn_same(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [Conv2dSame(cin, cout, k, stride, groups=groups, bias=False),
                               nn.BatchNorm2d(cout, eps=1e-3)]
    return nn.Sequential(*layers, nn.SiLU()) if act else nn.Sequential(*layers)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = [conv_bn_same(cin, mid)] if expand != 1 else []
        layers += [conv_bn_same(mid, mid, k, stride, groups=mid),
                   SqueezeExcite(mid, max(1, cin // 4), gate=nn.Sigmoid, act=nn.SiLU),
                   conv_bn_same(mid, cout, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


_B0 = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
       (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]  # expand, kernel, stride, out, repeats


def efficientnet_b0(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [conv_bn_same(3, 32, 3, 2)]
    cin = 32
    for expand, k, stride, cout, repeats in _B0:
        for r in range(repeats):
            layers.append(MBConv(cin, cout, k, stride if r == 0 else 1, expand))
            cin = cout
    layers += [conv_bn_same(cin, 1280), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(1280, classes)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        src = cin if stride > 1 else half
        self.branch = nn.Sequential(conv_bn(src, half), conv_bn(half, half, 3, stride, half, None),
                                    conv_bn(half, half))
        self.proj = nn.Sequential(conv_bn(cin, cin, 3, stride, cin, None), conv_bn(cin, half)) \
            if stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch(b)), 1)
        else:
            out = torch.cat((self.proj(x), self.branch(x)), 1)
        return channel_shuffle(out, 2)


def shufflenet_v2(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1)]
    cin = 24
    for cout, repeats in ((116, 4), (232, 8), (464, 4)):
        for r in range(repeats):
            layers.append(ShuffleBlock(cin, cout, 2 if r == 0 else 1))
            cin = cout
    layers += [conv_bn(cin, 1024), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, classes)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------- ConvNeXt


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of an NCHW tensor, written out (mean, variance, rsqrt) as the
    ConvNeXt reference code does for its downsampling layers."""

    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.gamma = nn.Parameter(torch.full((c,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)  # channels last for LayerNorm and the MLP
        y = self.gamma * self.mlp(self.norm(y))
        return x + y.permute(0, 3, 1, 2)


def convnext(classes: int = 1000, dims: tuple[int, ...] = (64, 128, 256, 512),
             depths: tuple[int, ...] = (2, 2, 6, 2)) -> nn.Module:
    """ConvNeXt with ConvNeXt-Tiny's layout at about half its width (a "nano" size)."""
    layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0])]
    for i, (c, depth) in enumerate(zip(dims, depths, strict=True)):
        if i:
            layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], c, 2, 2)]
        layers += [ConvNeXtBlock(c) for _ in range(depth)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1], eps=1e-6),
               nn.Linear(dims[-1], classes)]
    return nn.Sequential(*layers)


# -------------------------------------------------------------------------------------- U-Net


def _double(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv_bn(cin, cout, 3), conv_bn(cout, cout, 3))


class UNet(nn.Module):
    """Four-level U-Net (segmentation maps): max-pool down, ConvTranspose2d up on the two deep
    levels and bilinear Resize + conv on the two shallow ones, skip concatenations."""

    def __init__(self, classes: int = 2, w: int = 32) -> None:
        super().__init__()
        chans = [w, 2 * w, 4 * w, 8 * w, 16 * w]
        self.downs = nn.ModuleList([_double(3, w)] + [_double(a, b) for a, b in
                                                        zip(chans, chans[1:], strict=False)])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(chans[4], chans[3], 2, 2),
                                  nn.ConvTranspose2d(chans[3], chans[2], 2, 2),
                                  nn.Conv2d(chans[2], chans[1], 1), nn.Conv2d(chans[1], w, 1)])
        self.merges = nn.ModuleList([_double(2 * c, c) for c in reversed(chans[:4])])
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.downs):
            x = down(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        skips.pop()
        for i, (up, merge) in enumerate(zip(self.ups, self.merges, strict=True)):
            if i < 2:
                x = up(x)
            else:
                x = up(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
            x = merge(torch.cat((x, skips.pop()), 1))
        return self.head(x)


ARCHS = {"resnet50": resnet50, "mobilenet_v3_large": mobilenet_v3_large,
         "efficientnet_b0": efficientnet_b0, "shufflenet_v2": shufflenet_v2,
         "convnext": convnext, "unet": UNet}


def build_arch(name: str, seed: int = 0) -> nn.Module:
    """The architecture with seeded random weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = ARCHS[name]()
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()
