"""Small torch modules with the operators real models use beyond the zoo (schedule coverage).

Each entry: name -> (module factory, input shape). Used by tests/test_coverage.py and by
benchmarks/bench_coverage.py (which puts this folder on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1,
            act: nn.Module | None = None) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups),
                         nn.BatchNorm2d(cout), act if act is not None else nn.ReLU())


class UNet(nn.Module):
    """Encoder-decoder with skip concats, ConvTranspose2d (k2 s2 and k4 s2 p1) and a Resize."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(conv_bn(3, w, 3), conv_bn(w, w, 3))
        self.enc2 = nn.Sequential(conv_bn(w, 2 * w, 3, stride=2), conv_bn(2 * w, 2 * w, 3))
        self.enc3 = nn.Sequential(conv_bn(2 * w, 4 * w, 3, stride=2), conv_bn(4 * w, 4 * w, 3))
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = conv_bn(4 * w, 2 * w, 3)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1)
        self.dec1 = conv_bn(2 * w, w, 3)
        self.side = nn.Conv2d(4 * w, 1, 1)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up2(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        side = nn.functional.interpolate(self.side(e3), scale_factor=4.0, mode="bilinear")
        return torch.sigmoid(self.head(d1) + side)


class TextDetHead(nn.Module):
    """DB-style detector neck: odd channel counts, hardswish, nearest Resize, ConvTranspose
    with output_padding and 3x3 kernel, a grouped ConvTranspose."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 12, 3, stride=2, act=nn.Hardswish())
        self.body = conv_bn(12, 20, 3, stride=2, act=nn.Hardswish())
        self.deep = conv_bn(20, 40, 3, stride=2, act=nn.Hardswish())
        self.lat = nn.Conv2d(40, 20, 1)
        self.up = nn.ConvTranspose2d(20, 12, 3, stride=2, padding=1, output_padding=1)
        self.up_grouped = nn.ConvTranspose2d(12, 12, 2, stride=2, groups=3)
        self.out = nn.Conv2d(12, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.body(self.stem(x))
        d = self.lat(self.deep(s))
        f = s + nn.functional.interpolate(d, scale_factor=2.0, mode="nearest")
        return torch.sigmoid(self.out(self.up_grouped(self.up(f))))


class ConvZoo(nn.Module):
    """Convs the blocked rules did not cover: channels not multiples of 8, grouped convs of odd
    group sizes, 5x5 / 7x7 depthwise (also on 12 channels), strided + dilated, a multiplier-2
    depthwise."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 12, 3, stride=2)
        self.b = conv_bn(12, 12, 5, groups=12)
        self.c = conv_bn(12, 20, 1)
        self.d = conv_bn(20, 20, 3, groups=5)  # 4 channels per group
        self.e = conv_bn(20, 24, 3, groups=2)  # 10 -> 12 per group
        self.f = conv_bn(24, 24, 7, groups=24, act=nn.ReLU6())
        self.g = conv_bn(24, 24, 3, dilation=2)
        self.h = conv_bn(24, 48, 3, stride=2, groups=24)  # channel multiplier 2
        self.i = conv_bn(48, 48, 5, stride=2, groups=48)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.e(self.d(self.c(self.b(self.a(x)))))
        y = self.i(self.h(self.g(self.f(y))))
        return self.fc(y.mean((2, 3)))


class Attention(nn.Module):
    """Softmax, LayerNorm, GELU, split / slice / concat chains, batched matmul."""

    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        self.conv = conv_bn(3, dim, 3, stride=2)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).flatten(2).transpose(1, 2)  # B, N, C
        q, k, v = self.qkv(self.norm(t)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        t = t + self.proj(att @ v)
        t = t + self.mlp(self.norm(t))
        head = torch.cat([t[:, :4], t[:, -4:]], dim=1)
        return head.mean(1)


class BigInput(nn.Module):
    """A 640x640 input through a stride-2 stem, depthwise, and a nearest 2x upsample."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, stride=2, act=nn.Hardswish())
        self.dw = conv_bn(16, 16, 3, groups=16)
        self.pw = conv_bn(16, 8, 1)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(self.pw(self.dw(self.stem(x)))))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "unet": (UNet, (1, 3, 64, 64)),
    "textdet_head": (TextDetHead, (1, 3, 64, 64)),
    "conv_zoo": (ConvZoo, (1, 3, 32, 32)),
    "attention": (Attention, (1, 3, 16, 16)),
    "big_input": (BigInput, (1, 3, 640, 640)),
}


# Fully convolutional: any input size divisible by 8 works (benchmarks run them at 640x640).
SCALABLE = ("unet", "textdet_head", "conv_zoo")


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The module (eval mode, seeded weights and BatchNorm statistics) and a seeded input."""
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    module = factory().eval()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return module, torch.randn(*shape)
