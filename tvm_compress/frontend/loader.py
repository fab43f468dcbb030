"""Loading a model by reference: ``zoo:NAME`` or an ONNX file path, as the CLI and the API do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tvm_compress.errors import UserError


def load(ref: str, *, batch: int = 1) -> Any:
    """Load ``zoo:NAME`` or an ONNX file path as a :class:`~tvm_compress.frontend.importers.Model`."""
    if ref.startswith("zoo:"):
        from tvm_compress.zoo import load_zoo

        return load_zoo(ref[4:], batch=batch)
    from tvm_compress.frontend.importers import from_onnx

    if not Path(ref).exists():
        raise UserError(f"model file not found: {ref} (give an ONNX file path or zoo:NAME)")
    return from_onnx(ref, batch=batch)


def load_from_args(args: Any) -> Any:
    """The model a command's ``MODEL`` argument (and ``--batch``) names."""
    return load(args.model, batch=getattr(args, "batch", 1))
