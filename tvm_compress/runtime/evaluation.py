"""Evaluate a compiled model: accuracy, fidelity to the fp32 model, weight bytes, latency."""

from __future__ import annotations

from typing import Any

import numpy as np

from tvm_compress.backend.build import CompiledModel
from tvm_compress.errors import UserError
from tvm_compress.runtime.metrics import accuracy, sqnr_db, top1_agreement


def task_data(task: str | None, split: str = "test") -> tuple[np.ndarray, np.ndarray | None]:
    """Real evaluation data for a zoo task: images and labels (labels None when unlabelled).

    ``imagenet``: ``test`` = the 20 labelled photos, ``calib`` = crops of other real photos.
    ``fashion_mnist``: the named split of the Fashion-MNIST files.
    """
    from tvm_compress import data

    if task == "imagenet":
        if split == "calib":
            return data.real_photos("calib", n=32), None
        return data.imagenet_photos()
    if task == "fashion_mnist":
        return data.fashion_mnist(split)
    raise UserError(f"no built-in data for task {task!r}; pass images (and labels) explicitly")


def evaluate(compiled: CompiledModel, images: np.ndarray, *, labels: np.ndarray | None = None,
             reference: np.ndarray | None = None, weight_bytes: int | None = None,
             latency_repeat: int = 30) -> dict[str, Any]:
    """Run ``images`` through ``compiled`` and report what can be measured.

    Parameters
    ----------
    labels : array, optional
        Integer labels: adds ``accuracy``.
    reference : array, optional
        The fp32 model's outputs on the same images: adds ``agreement`` (top-1) and ``sqnr_db``.
    weight_bytes : int, optional
        Size of the weights (``tvm_compress.runtime.metrics.weight_bytes(mod)``), passed through.
    latency_repeat : int
        Timed runs at the compiled batch size (0 skips latency).
    """
    if len(images) == 0:
        raise UserError("evaluation set is empty: give at least one image")
    logits = compiled.predict(images)
    report: dict[str, Any] = {"samples": int(len(images))}
    if labels is not None:
        report["accuracy"] = accuracy(logits, labels)
        report["correct"] = int(round(report["accuracy"] * len(images)))
    if reference is not None:
        report["agreement"] = top1_agreement(logits, reference)
        report["sqnr_db"] = sqnr_db(logits, reference)
        report["max_abs_diff"] = float(np.max(np.abs(logits - reference)))
    if weight_bytes is not None:
        report["weight_bytes"] = int(weight_bytes)
    if latency_repeat:
        report["latency"] = compiled.latency(repeat=latency_repeat).as_dict()
    report["logits"] = logits
    return report
