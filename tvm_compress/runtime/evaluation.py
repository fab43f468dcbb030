"""Evaluate a compiled model: accuracy, fidelity to the fp32 model, weight bytes, latency."""

from __future__ import annotations

from typing import Any

import numpy as np

from tvm_compress.backend.build import CompiledModel
from tvm_compress.errors import UserError
from tvm_compress.frontend.inputs import Samples, num_samples
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


def evaluate(compiled: CompiledModel, images: Samples, *, labels: np.ndarray | None = None,
             reference: np.ndarray | list[np.ndarray] | None = None,
             weight_bytes: int | None = None, latency_repeat: int = 30) -> dict[str, Any]:
    """Run ``images`` through ``compiled`` and report what can be measured.

    Parameters
    ----------
    images : array or {input name: array}
        The samples (one array per input name for a model with several inputs).
    labels : array, optional
        Integer labels: adds ``accuracy`` (of the first output).
    reference : array or list of arrays, optional
        The fp32 model's outputs on the same images (a list for several outputs): adds
        ``agreement`` (top-1 of the first output), ``sqnr_db`` and ``max_abs_diff`` (the worst
        output), and per output ``outputs`` when there are several.
    weight_bytes : int, optional
        Size of the weights (``tvm_compress.runtime.metrics.weight_bytes(mod)``), passed through.
    latency_repeat : int
        Timed runs at the compiled batch size (0 skips latency).
    """
    n = num_samples(images)
    if n == 0:
        raise UserError("evaluation set is empty: give at least one image")
    outputs = compiled.predict_outputs(images)
    logits = outputs[0]
    report: dict[str, Any] = {"samples": int(n)}
    if labels is not None:
        report["accuracy"] = accuracy(logits, labels)
        report["correct"] = int(round(report["accuracy"] * n))
    if reference is not None:
        refs = [reference] if isinstance(reference, np.ndarray) else list(reference)
        if len(refs) != len(outputs):
            raise UserError(f"the reference has {len(refs)} output(s), the model "
                            f"{len(outputs)}; give the outputs of the same model")
        per = [{"sqnr_db": sqnr_db(o, r), "max_abs_diff": float(np.max(np.abs(o - r)))}
               for o, r in zip(outputs, refs, strict=True)]
        report["agreement"] = top1_agreement(logits, refs[0])
        report["sqnr_db"] = min(p["sqnr_db"] for p in per)
        report["max_abs_diff"] = max(p["max_abs_diff"] for p in per)
        if len(per) > 1:
            report["outputs"] = per
    if weight_bytes is not None:
        report["weight_bytes"] = int(weight_bytes)
    if latency_repeat:
        report["latency"] = compiled.latency(repeat=latency_repeat).as_dict()
    report["logits"] = logits if len(outputs) == 1 else outputs
    return report
