"""Train and evaluate any Fashion-MNIST classifier (1x28x28 -> 10 logits) on the CPU.

Used for the shipped zoo (``benchmarks/train_zoo.py``) and again for models that must be trained
from scratch after pruning (PreCrop) or fine-tuned after compression, so it takes any
``nn.Module`` and knows nothing about particular architectures.

Recipe: SGD with Nesterov momentum and a one-cycle learning-rate schedule, weight decay on conv
and linear weights only (decaying BN scales and biases just fights the normalization), light
augmentation (random 28x28 crop of the image padded by 2 with background, horizontal flip).
Training runs in channels-last memory format, which oneDNN executes markedly faster on CPU; the
model is handed back in the default format. Everything stochastic is drawn from ``seed``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from tvm_compress.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist
from tvm_compress.errors import UserError

_PAD = 2
_BACKGROUND = -FASHION_MNIST_MEAN / FASHION_MNIST_STD  # a black pixel after normalization


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: np.ndarray | torch.Tensor,
                      labels: np.ndarray | torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``images`` (N,1,28,28) against ``labels`` (N,).

    The model runs in eval mode (on the device of its parameters); its previous train/eval mode
    is restored afterwards.
    """
    images, labels = _as_tensor(images), _as_tensor(labels)
    if len(images) != len(labels) or len(images) == 0:
        raise UserError(f"evaluate_accuracy needs as many labels as images (>0), got "
                        f"{len(images)} images and {len(labels)} labels")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size].to(device)).cpu()
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / len(images)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the batch padded by 2 pixels of background, and random horizontal flip."""
    n, _, h, w = batch.shape
    padded = nn.functional.pad(batch, (_PAD,) * 4, value=_BACKGROUND)
    dy = torch.randint(0, 2 * _PAD + 1, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * _PAD + 1, (n, 1, 1), generator=generator)
    rows = dy + torch.arange(h).view(1, h, 1)
    cols = dx + torch.arange(w).view(1, 1, w)
    flip = torch.rand(n, 1, 1, generator=generator) < 0.5
    cols = torch.where(flip, dx + (w - 1) - torch.arange(w).view(1, 1, w), cols)
    out = padded[torch.arange(n).view(n, 1, 1), 0, rows, cols]
    return out.unsqueeze(1)


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=0.9, nesterov=True)


def _progress(enabled: bool):  # noqa: ANN202 (rich is imported lazily)
    from rich import progress as rp

    return rp.Progress(rp.TextColumn("[bold]{task.description}"), rp.BarColumn(),
                       rp.MofNCompleteColumn(), rp.TextColumn("loss {task.fields[loss]:.3f}"),
                       rp.TimeElapsedColumn(), rp.TimeRemainingColumn(), disable=not enabled)


def _run_epoch(model, optimizer, scheduler, images, labels, *, batch_size, generator,
               progress, task, device) -> float:
    model.train()
    order = torch.randperm(len(images), generator=generator)
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        index = order[start:start + batch_size]
        batch = augment(images[index], generator).to(device)  # augmented on the CPU: seeded
        batch = batch.contiguous(memory_format=torch.channels_last)
        loss = nn.functional.cross_entropy(model(batch), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total, count = total + loss.item() * len(index), count + len(index)
        progress.update(task, advance=1, loss=total / count)
    return total / count


def train(model: nn.Module, *, epochs: int, lr: float, batch_size: int = 128, seed: int = 0,
          weight_decay: float = 5e-4, progress: bool = True,
          train_data: tuple[np.ndarray, np.ndarray] | None = None,
          device: str = "cpu", eval_samples: int | None = None) -> dict[str, Any]:
    """Train ``model`` in place on Fashion-MNIST and report held-out accuracy.

    Parameters
    ----------
    model
        Any module mapping float32 (N,1,28,28) normalized images to (N,10) logits. Weights are
        trained from their current values (initialize or seed them before calling).
    epochs
        Passes over the training data (>= 1); the one-cycle schedule spans all of them.
    lr
        Peak learning rate of the one-cycle schedule (SGD, Nesterov momentum 0.9).
    batch_size, seed, weight_decay
        Mini-batch size; seed of shuffling, augmentation and dropout (same seed, same result on
        the same machine and thread count); L2 decay of conv/linear weights.
    progress
        Show a rich progress bar and one line per epoch.
    train_data
        (images, labels) to train on instead of the "train" split, e.g. a subset for speed.
    eval_samples
        Validate (each epoch) and test on the first N images of those splits (None: all).
    device
        Where the model trains ("cpu", "cuda"); it is returned on the CPU.

    Returns
    -------
    dict with "test_accuracy", "val_accuracy" (after the last epoch), "epochs", "seconds" (wall
    time of training, evaluation excluded) and "history" (per epoch: loss, val accuracy).
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise UserError(f"train needs epochs >= 1, lr > 0 and batch_size >= 1, got "
                        f"epochs={epochs}, lr={lr}, batch_size={batch_size}")
    images, labels = (_as_tensor(a) for a in (train_data or fashion_mnist("train")))
    val_images, val_labels = (a[:eval_samples] for a in fashion_mnist("val"))
    torch.manual_seed(seed)  # dropout draws from the global generator
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    optimizer = _optimizer(model, lr, weight_decay)
    steps = (len(images) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                    steps_per_epoch=steps, pct_start=0.2)
    model.to(memory_format=torch.channels_last)
    history, seconds = [], 0.0
    with _progress(progress) as bar:
        for epoch in range(epochs):
            task = bar.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, loss=0.0)
            start = time.perf_counter()
            loss = _run_epoch(model, optimizer, scheduler, images, labels, batch_size=batch_size,
                              generator=generator, progress=bar, task=task, device=device)
            seconds += time.perf_counter() - start
            val = evaluate_accuracy(model, val_images, val_labels)
            history.append({"epoch": epoch + 1, "loss": round(loss, 4), "val_accuracy": val})
            if progress:
                bar.console.log(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}, val {val:.4f}, "
                                f"{seconds:.0f} s")
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    test_images, test_labels = (a[:eval_samples] for a in fashion_mnist("test"))
    test_accuracy = evaluate_accuracy(model, test_images, test_labels)
    model.to("cpu")
    return {"test_accuracy": test_accuracy,
            "val_accuracy": history[-1]["val_accuracy"], "epochs": epochs,
            "seconds": round(seconds, 1), "history": history}
