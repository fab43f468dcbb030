"""tvm-compress: compression for Apache TVM (Relax): cropping, quantization search, int kernels.

Entry points: :func:`load` (ONNX path / ``zoo:NAME``), :func:`from_torch`, :func:`build`,
:func:`evaluate`, :func:`benchmark`. Heavy modules are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tvm_compress.frontend.importers import Model

_LAZY = {
    "from_onnx": "tvm_compress.frontend.importers", "from_torch": "tvm_compress.frontend.importers",
    "Model": "tvm_compress.frontend.importers", "build": "tvm_compress.backend.build",
    "evaluate": "tvm_compress.runtime.evaluation", "benchmark": "tvm_compress.runtime.bench",
    "LayerTable": "tvm_compress.frontend.layers", "UserError": "tvm_compress.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tvm_compress' has no attribute {name!r}")


def load(ref: str, *, batch: int = 1,
         input_shapes: dict[str | None, tuple[int, ...]] | None = None) -> Model:
    """Load ``zoo:NAME`` or an ONNX file path as a :class:`~tvm_compress.frontend.importers.Model`."""
    from tvm_compress.frontend.loader import load as _load

    return _load(ref, batch=batch, input_shapes=input_shapes)
