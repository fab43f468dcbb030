"""ZeroQ distilled data: calibration inputs made from the model's own BatchNorm statistics.

Starting from Gaussian noise, the inputs are optimized with Adam so that at every BatchNorm the
per-channel mean / std of its input match the stored running mean / sqrt(running var), and the
input itself has per-channel mean 0 / std 1 (ZeroQ, CVPR 2020). No data and no labels are used.
The gradient step runs in PyTorch: a model needs its torch module (zoo models and ``from_torch``
keep it); an ONNX model with its BatchNorms preserved is converted with :mod:`onnx_torch`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tvm_compress.errors import UserError

if TYPE_CHECKING:
    import torch

    from tvm_compress.frontend.importers import Model
    from tvm_compress.quant.config import QuantConfig
    from tvm_compress.quant.quantize import QuantizedModel

# ZeroQ's published settings (REFERENCE.md section 4): Adam, lr 0.5, 500 iterations, batch 32.
DEFAULT_BATCH = 32
DEFAULT_ITERATIONS = 500
DEFAULT_LR = 0.5


@dataclass
class Distilled:
    """Distilled inputs and how they were made."""

    images: np.ndarray                    # float32 (batch, *sample_shape)
    losses: list[float] = field(default_factory=list)  # BN-statistics loss per iteration
    initial_loss: float = float("nan")    # loss of the Gaussian-noise start
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else self.initial_loss


def resolve_threads(threads: int | None) -> int:
    """``threads``, or every core this process may use when None."""
    if threads is not None:
        return max(1, threads)
    from tvm_compress.backend.targets import host_cores

    return host_cores()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run torch on ``threads`` threads (None: every core this process may use), restoring the
    old setting."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def batchnorms(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The BatchNorm layers with running statistics, in module order."""
    from torch import nn

    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def torch_module_of(model: Model | torch.nn.Module) -> torch.nn.Module:
    """The torch module to distill from (converted from ONNX when the model has no torch source)."""
    import torch

    if isinstance(model, torch.nn.Module):
        return model.eval()
    if model.torch_module is not None:
        return model.torch_module.eval()
    if model.onnx_model is not None:
        from tvm_compress.frontend.onnx_torch import onnx_to_torch

        return onnx_to_torch(model.onnx_model, where=model.name).eval()
    raise UserError(f"{model.name}: ZeroQ needs the source model to distill data from; load it "
                    "from an ONNX file, zoo:NAME or tvm_compress.from_torch")


def bn_loss(stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
            x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's statistics loss: sum over BNs of ||mu - mu_bn||^2 / C + ||sigma - sigma_bn||^2 / C,
    plus the same for the input against mean 0 / std 1."""
    import torch

    dims = [0, *range(2, x.dim())]
    terms = [(x.mean(dims), x.std(dims), torch.zeros(x.shape[1], device=x.device),
              torch.ones(x.shape[1], device=x.device)),
             *stats]
    total = x.new_zeros(())
    for mean, std, ref_mean, ref_std in terms:
        total = total + ((mean - ref_mean) ** 2).mean() + ((std - ref_std) ** 2).mean()
    return total


def distill(model: Model | torch.nn.Module, *, sample_shape: tuple[int, ...] | None = None,
            batch: int = DEFAULT_BATCH, iterations: int = DEFAULT_ITERATIONS,
            lr: float = DEFAULT_LR, seed: int = 0, threads: int | None = None,
            label_weight: float = 0.0,
            input_range: tuple[Any, Any] | str | None = "auto", device: str = "cpu",
            progress: bool = True) -> Distilled:
    """ZeroQ distilled data for a model with BatchNorm.

    Parameters
    ----------
    model : Model or torch.nn.Module
        A :class:`~tvm_compress.frontend.importers.Model` (its torch module, or its ONNX graph
        converted to
        torch) or a torch module directly (then ``sample_shape`` is required).
    sample_shape : tuple, optional
        Shape of one input sample without the batch axis (default: the model's input shape).
    batch, iterations, lr, seed
        Number of distilled samples, Adam steps and learning rate (lr decays to 1% with a cosine
        schedule), noise seed: the same seed gives the same images.
    label_weight : float
        0 (the paper): BN statistics only. > 0 adds ``label_weight`` x cross-entropy towards a
        random class per sample (as in later data-free work, e.g. GDFQ): BN statistics say
        nothing about the last layer, whose outputs (logits) otherwise stay far smaller than on
        real data, so calibrating the output range on them clips real logits.
    input_range : (low, high), "auto" or None
        Keep the inputs inside this box (scalars or per-channel arrays), projecting after every
        Adam step. Without it, a few pixels drift to values no image has (|x| ~ 90 for the
        ImageNet MobileNetV2 after 500 steps, real inputs stay within 2.7), and the activation
        ranges calibrated on them are far too wide. "auto" (default): the normalized pixel range
        of a zoo model's task (:func:`tvm_compress.data.pixel_range`), no box for other models;
        None: no box (the paper).
    threads : int, optional
        Torch threads (default: every core this process may use; on a machine shared with other
        jobs 1 can be faster, and set ``OMP_WAIT_POLICY=PASSIVE`` before torch is imported so
        idle OpenMP threads do not spin).
    device : str
        Where the optimization runs ("cpu", "cuda"); the images come back as NumPy either way.

    Raises
    ------
    UserError
        The model has no BatchNorm with running statistics, or the settings are invalid.
    """
    import torch

    if batch < 1 or iterations < 0 or not lr > 0:
        raise UserError(f"distillation needs batch >= 1, iterations >= 0 and lr > 0 (got "
                        f"batch={batch}, iterations={iterations}, lr={lr})")
    name = getattr(model, "name", type(model).__name__)
    if sample_shape is None:
        if isinstance(model, torch.nn.Module):
            raise UserError("distill(torch module) needs sample_shape=(C, H, W)")
        sample_shape = tuple(model.input_shape[1:])
    if isinstance(input_range, str):
        if input_range != "auto":
            raise UserError(f"input_range must be (low, high), 'auto' or None, got {input_range!r}")
        from tvm_compress.data import pixel_range

        input_range = pixel_range(getattr(model, "task", None))
    module = torch_module_of(model)
    bns = batchnorms(module)
    if not bns:
        raise UserError(f"{name} has no BatchNorm layers with running statistics: ZeroQ distills "
                        "data from BN statistics; calibrate it with real samples (--calib)")
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(bn: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.dim())]
        captured.append((x.mean(dims), torch.sqrt(x.var(dims, unbiased=False) + bn.eps),
                         bn.running_mean, torch.sqrt(bn.running_var + bn.eps)))

    handles = [bn.register_forward_hook(hook) for _, bn in bns]
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    result = Distilled(np.empty(0, np.float32), settings={
        "batch": batch, "iterations": iterations, "lr": lr, "seed": seed,
        "batchnorms": len(bns), "threads": resolve_threads(threads),
        "label_weight": label_weight,
        "input_range": (None if input_range is None
                        else [np.ravel(v).tolist() for v in input_range])})
    try:
        with torch_threads(threads):
            gen = torch.Generator().manual_seed(seed)
            module.to(device)
            x = torch.randn((batch, *sample_shape), generator=gen).to(device)
            box = None if input_range is None else _box(input_range, sample_shape, device)
            if box is not None:
                x = x.clamp(*box)
            x.requires_grad_(True)
            if label_weight > 0:
                with torch.no_grad():
                    classes = module(x[:1]).reshape(1, -1).shape[1]
                targets = torch.randint(classes, (batch,), generator=gen).to(device)
            opt = torch.optim.Adam([x], lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iterations, 1),
                                                               eta_min=lr * 0.01)
            from rich.progress import Progress

            with Progress(disable=not progress, transient=True) as bar:
                task = bar.add_task(f"distilling {batch} inputs", total=iterations)
                for step in range(iterations + 1):
                    captured.clear()
                    opt.zero_grad()
                    out = module(x)
                    loss = bn_loss(captured, x)
                    if label_weight > 0:
                        loss = loss + label_weight * torch.nn.functional.cross_entropy(
                            out.reshape(batch, -1), targets)
                    value = float(loss.detach())
                    if step == 0:
                        result.initial_loss = value
                    else:
                        result.losses.append(value)
                    if step == iterations:
                        break
                    loss.backward()
                    opt.step()
                    sched.step()
                    if box is not None:
                        with torch.no_grad():
                            x.clamp_(*box)
                    bar.update(task, advance=1, description=f"distilling (loss {value:.3g})")
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        module.to("cpu")
    result.images = x.detach().cpu().numpy().astype(np.float32)
    result.seconds = time.perf_counter() - start
    return result


def _box(input_range: tuple[Any, Any], sample_shape: tuple[int, ...],
         device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) broadcastable to one batch: scalars, or one value per channel (axis 1)."""
    import torch

    out = []
    for value in input_range:
        v = np.asarray(value, dtype=np.float32).ravel()
        if v.size not in (1, sample_shape[0]):
            raise UserError(f"input_range has {v.size} values per bound; the input has "
                            f"{sample_shape[0]} channels: give 1 or {sample_shape[0]}")
        out.append(torch.from_numpy(v).reshape(1, -1, *([1] * (len(sample_shape) - 1))).to(device))
    if bool((out[0] >= out[1]).any()):
        raise UserError(f"input_range low must be below high, got {input_range}")
    return out[0], out[1]


def gaussian_images(sample_shape: tuple[int, ...], n: int, *, seed: int = 0) -> np.ndarray:
    """The naive data-free baseline: standard Gaussian noise inputs."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *sample_shape)).astype(np.float32)


def quantize_data_free(model: Model, config: QuantConfig, *, distilled: Distilled | None = None,
                       realize: bool = True, progress: bool = True,
                       **distill_options: Any) -> tuple[QuantizedModel, Distilled]:
    """The "distilled" calibration source: quantize with any QuantConfig and no data.

    Distills ``config.calib_samples`` inputs (unless ``distilled`` is given) and calibrates
    :func:`~tvm_compress.quant.quantize.quantize` on them.
    """
    from tvm_compress.quant.quantize import quantize

    if distilled is None:
        distill_options.setdefault("batch", config.calib_samples)
        distilled = distill(model, progress=progress, **distill_options)
    images = distilled.images.astype(model.input_dtype)
    return quantize(model, config, images, realize=realize, progress=progress), distilled
