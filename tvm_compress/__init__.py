"""tvm-compress: compression for Apache TVM (Relax): cropping, quantization search, int kernels.

Entry points: :func:`load` (ONNX path / ``zoo:NAME``), :func:`from_torch`, :func:`build`,
:func:`evaluate`, :func:`benchmark`. Heavy modules are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tvm_compress.frontend import Model

_LAZY = {
    "from_onnx": "tvm_compress.frontend", "from_torch": "tvm_compress.frontend",
    "Model": "tvm_compress.frontend", "build": "tvm_compress.compiler",
    "evaluate": "tvm_compress.evaluation", "benchmark": "tvm_compress.bench",
    "LayerTable": "tvm_compress.layers", "UserError": "tvm_compress.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tvm_compress' has no attribute {name!r}")


def load(ref: str, *, batch: int = 1) -> Model:
    """Load ``zoo:NAME`` or an ONNX file path as a :class:`~tvm_compress.frontend.Model`."""
    from pathlib import Path

    from tvm_compress.errors import UserError

    if ref.startswith("zoo:"):
        from tvm_compress.zoo import load_zoo

        return load_zoo(ref[4:], batch=batch)
    from tvm_compress.frontend import from_onnx

    if not Path(ref).exists():
        raise UserError(f"model file not found: {ref} (give an ONNX file path or zoo:NAME)")
    return from_onnx(ref, batch=batch)
