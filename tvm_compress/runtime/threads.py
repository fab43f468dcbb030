"""The size of TVM's CPU thread pool.

TVM's runtime starts ``hardware_concurrency / 2`` worker threads on x86 unless
``TVM_NUM_THREADS`` says otherwise (it assumes two hyper-threads per core). On a machine whose
logical CPUs are whole cores - every small cloud VM - that halves the speed of every parallel
kernel: on the 2-core project machine TVM ran MobileNetV2 on one core while ONNX Runtime and
PyTorch used two. Importing ``tvm_compress`` sets ``TVM_NUM_THREADS`` to the cores this process
may use when the user has not set it (:func:`default_threads`); :func:`set_threads` resizes the
pool explicitly, e.g. to match another engine's thread count in a benchmark.
"""

from __future__ import annotations

import os

ENV = "TVM_NUM_THREADS"


def available_cpus() -> list[int]:
    """The logical CPUs this process may run on (``backend.targets.host_cores`` counts the same;
    this module stays free of TVM imports because the package root calls it on import)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_threads() -> None:
    """Set ``TVM_NUM_THREADS`` to the usable CPU count unless the user set it (or OpenMP's
    ``OMP_NUM_THREADS``, which TVM also reads). Takes effect when TVM's pool first starts."""
    if ENV not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ[ENV] = str(len(available_cpus()))


def set_threads(count: int | None = None) -> int:
    """Resize TVM's CPU thread pool to ``count`` threads (default: every usable CPU), sharing
    those CPUs (no pinning, so a busy CPU does not stall a thread). Returns the pool size."""
    import tvm

    cpus = available_cpus()
    count = count or len(cpus)
    if count < 1:
        raise ValueError(f"thread count must be at least 1, got {count}")
    # Mode -3 (kSpecifyThreadShareAllCore): `count` workers, each allowed on all listed CPUs.
    tvm.get_global_func("runtime.config_threadpool")(-3, count, [str(c) for c in cpus])
    return int(tvm.get_global_func("runtime.NumThreads")())


def current_threads() -> int:
    """Worker threads a parallel TVM kernel uses now."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())
