"""tvm-compress: compression for Apache TVM (Relax): cropping, quantization search, int kernels.

The public API (heavy modules are imported lazily):

* :func:`load` (ONNX path / ``zoo:NAME``), :func:`from_torch`, :func:`from_onnx` -> ``Model``
* :class:`CompressionPlan` (what every method returns), :func:`apply_plans`, :func:`quantize`
* :func:`pipeline` - a Pass for ``tvm.compile(mod, target, relax_pipeline=...)``;
  :func:`register_pipeline` registers it as the named Relax pipeline ``"tvm_compress"``
* :func:`build`, :func:`evaluate`, :func:`benchmark`
* the methods live in ``tvm_compress.tuning`` (``precrop``, ``quantune``, ``zeroq``, ``ajpq``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def _use_every_core() -> None:
    # TVM would start one worker per two logical CPUs on x86 (see runtime/threads.py).
    from tvm_compress.runtime.threads import default_threads

    default_threads()


_use_every_core()

if TYPE_CHECKING:
    from tvm_compress.frontend.importers import Model

_LAZY = {
    "from_onnx": "tvm_compress.frontend.importers", "from_torch": "tvm_compress.frontend.importers",
    "Model": "tvm_compress.frontend.importers", "build": "tvm_compress.backend.build",
    "evaluate": "tvm_compress.runtime.evaluation", "benchmark": "tvm_compress.runtime.bench",
    "LayerTable": "tvm_compress.frontend.layers", "UserError": "tvm_compress.errors",
    "CompressionPlan": "tvm_compress.plan", "apply_plans": "tvm_compress.plan",
    "pipeline": "tvm_compress.plan", "quantize": "tvm_compress.quant.quantize",
    "QuantConfig": "tvm_compress.quant.config",
}


def register_pipeline() -> None:
    """Register :func:`pipeline` as the named Relax pipeline ``"tvm_compress"`` (idempotent)."""
    from tvm_compress.plan import register

    register()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tvm_compress' has no attribute {name!r}")


def load(ref: str, *, batch: int = 1,
         input_shapes: dict[str | None, tuple[int, ...]] | None = None) -> Model:
    """Load ``zoo:NAME`` or an ONNX file path as a
    :class:`~tvm_compress.frontend.importers.Model`.

    ``input_shapes={name: shape}`` pins an ONNX file's dynamic dimensions (the key None names
    the only input of a single-input model); ``batch`` pins a dynamic batch dimension.
    """
    from tvm_compress.frontend.loader import load as _load

    return _load(ref, batch=batch, input_shapes=input_shapes)
