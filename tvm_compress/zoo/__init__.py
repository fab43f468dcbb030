"""Model zoo: ``zoo:NAME`` references to real trained models.

- ``mobilenet_v2``: ImageNet MobileNetV2 with torchvision's published weights (1x3x224x224).
- ``fmnist_<arch>``: six small Fashion-MNIST CNNs trained here (1x1x28x28), checkpoints shipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tvm_compress.errors import UserError

if TYPE_CHECKING:
    import torch

    from tvm_compress.frontend.importers import Model

FMNIST_ARCHS = ("resnet", "mobilenet_v2", "shufflenet_v2", "squeezenet", "googlenet", "vgg")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], torch.nn.Module]
    sample_shape: tuple[int, ...]  # one sample, without the batch axis
    task: str
    description: str


def _mobilenet_v2() -> torch.nn.Module:
    from tvm_compress.zoo.mobilenet_v2 import mobilenet_v2_imagenet

    return mobilenet_v2_imagenet()


def _fmnist(arch: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from tvm_compress.zoo.fmnist import load_pretrained

        return load_pretrained(arch)

    return build


ZOO: dict[str, ZooEntry] = {
    "mobilenet_v2": ZooEntry("mobilenet_v2", _mobilenet_v2, (3, 224, 224), "imagenet",
                             "ImageNet MobileNetV2, torchvision weights (top-1 71.9%)"),
    **{f"fmnist_{a}": ZooEntry(f"fmnist_{a}", _fmnist(a), (1, 28, 28), "fashion_mnist",
                               f"Fashion-MNIST {a}, trained by tvm-compress")
       for a in FMNIST_ARCHS},
}


def zoo_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise UserError(f"unknown zoo model {name!r}; valid names: "
                        f"{', '.join('zoo:' + n for n in ZOO)}")
    return ZOO[name]


def torch_model(name: str) -> torch.nn.Module:
    """The zoo model as a torch module in eval mode."""
    return zoo_entry(name).build().eval()


def load_zoo(name: str, *, batch: int = 1) -> Model:
    """Import a zoo model through the torch frontend at the given batch size."""
    import torch

    from tvm_compress.frontend.importers import from_torch

    entry = zoo_entry(name)
    example = torch.zeros((batch, *entry.sample_shape))
    return from_torch(entry.build(), example, name=f"zoo:{name}", task=entry.task)
