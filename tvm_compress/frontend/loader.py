"""Loading a model by reference: ``zoo:NAME`` or an ONNX file path, as the CLI and the API do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tvm_compress.errors import UserError


def load(ref: str, *, batch: int = 1,
         input_shapes: Mapping[str | None, Sequence[int]] | None = None) -> Any:
    """Load ``zoo:NAME`` or an ONNX file path as a :class:`~tvm_compress.frontend.importers.Model`."""
    if ref.startswith("zoo:"):
        from tvm_compress.zoo import load_zoo

        if input_shapes:
            raise UserError(f"{ref} has a fixed input shape; --input-shape is for ONNX files "
                            "(use --batch to change the batch size)")
        return load_zoo(ref[4:], batch=batch)
    from tvm_compress.frontend.importers import from_onnx

    if not Path(ref).exists():
        raise UserError(f"model file not found: {ref} (give an ONNX file path or zoo:NAME)")
    return from_onnx(ref, batch=batch, input_shapes=input_shapes)


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
    """The model a command's ``MODEL`` argument (and ``--batch``) names."""
    return load(args.model, batch=getattr(args, "batch", 1),
                 input_shapes=parse_input_shapes(getattr(args, "input_shape", None) or []))
