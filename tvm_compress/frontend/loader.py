"""Loading a model by reference: ``zoo:NAME`` or an ONNX file path, as the CLI and the API do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tvm_compress.errors import UserError


def load(ref: str, *, batch: int = 1,
         input_shapes: Mapping[str | None, Sequence[int]] | None = None) -> Any:
    """Load ``zoo:NAME`` or an ONNX file path as a
    :class:`~tvm_compress.frontend.importers.Model`.
    """
    if ref.startswith("zoo:"):
        from tvm_compress.zoo import load_zoo

        if input_shapes:
            raise UserError(f"{ref} has a fixed input shape; --input-shape is for ONNX files "
                            "(use --batch to change the batch size)")
        return load_zoo(ref[4:], batch=batch)
    from tvm_compress.frontend.importers import from_onnx

    if not Path(ref).exists():
        raise UserError(f"model file not found: {ref} (give an ONNX file path or zoo:NAME)")
    model = from_onnx(ref, batch=batch, input_shapes=input_shapes)
    return with_task_from_metadata(model)


def with_task_from_metadata(model: Any) -> Any:
    """The zoo task an ONNX file records (``tvm-compress train`` writes ``tvm_compress.task``)."""
    onnx_model = getattr(model, "onnx_model", None)
    if model.task is None and onnx_model is not None:
        meta = {p.key: p.value for p in onnx_model.metadata_props}
        if meta.get("tvm_compress.task"):
            model.task = meta["tvm_compress.task"]
    return model


def parse_input_shapes(values: Sequence[str]) -> dict[str | None, tuple[int, ...]]:
    """``--input-shape`` values: ``1x3x48x192`` (the only input) or ``NAME:1x3x640x640``."""
    shapes: dict[str | None, tuple[int, ...]] = {}
    for text in values:
        name, _, dims = text.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise UserError(f"--input-shape {text!r}: expected dimensions like 1x3x224x224, "
                            "optionally after the input name (NAME:1x3x224x224)") from None
        key = name or None
        if key in shapes:
            raise UserError(f"--input-shape given twice for {name or 'the input'}")
        shapes[key] = shape
    if None in shapes and len(shapes) > 1:
        raise UserError("--input-shape without a name is for single-input models; name every "
                        "input: --input-shape NAME:1x3x224x224 (repeat it per input)")
    return shapes


def load_from_args(args: Any) -> Any:
    """The model a command's ``MODEL`` argument (and ``--batch``) names, after ``--base-plan``."""
    model = load(args.model, batch=getattr(args, "batch", 1),
                 input_shapes=parse_input_shapes(getattr(args, "input_shape", None) or []))
    return apply_base_plans(model, getattr(args, "base_plan", None) or [])


def apply_base_plans(model: Any, paths: list[str]) -> Any:
    """Crop ``model`` by the plans a search builds on (``--base-plan``; crops only)."""
    if not paths:
        return model
    from tvm_compress.plan import CompressionPlan, apply_plans

    plans = [CompressionPlan.load(p) for p in paths]
    for path, plan in zip(paths, plans, strict=True):
        if plan.quantizes:
            raise UserError(f"--base-plan {path} quantizes; a search builds on cropping plans "
                            "only (give quantizing plans to `tvm-compress compress`)")
    return apply_plans(model, plans)
