"""Per-kernel profile of a compiled model: time share, GFLOP/s, % of the measured machine peak.

The static half of the report (which rule scheduled each kernel, its FLOPs) comes with the build
(``CompiledModel.kernels``, :mod:`tvm_compress.backend.report`); this module times the kernels
inside the running model (VM instrumentation, per-call minima) and measures the machine's fp32
peak as the best of many short BLAS matrix products, the same way for every kernel, so "% of
peak" compares like with like.
"""

from __future__ import annotations

import time
from typing import Any

from tvm_compress.errors import UserError


def measure_peak(*, threads: int | None = None, size: int = 512,
                 repeat: int = 60) -> dict[str, Any]:
    """Machine fp32 peak in GFLOP/s: the fastest of ``repeat`` ``size``-square BLAS matmuls on
    one core (PyTorch's), times ``threads`` (default: the cores this process may use, as TVM's
    thread pool does).

    One core, because a multi-threaded product would measure the thread pool's wake-up
    (``OMP_WAIT_POLICY=PASSIVE``, which the CLI sets) and numpy's OpenBLAS sizes its pool from
    the whole host rather than this process's CPU affinity; short products, best of many, like
    the kernels' per-call minima, so that a loaded machine's preemptions do not count.
    """
    import torch

    from tvm_compress.backend.targets import host_cores

    threads = threads or host_cores()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.rand(size, size), torch.rand(size, size)
        out = torch.empty(size, size)
        for _ in range(3):
            torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    per_core = 2 * size ** 3 / best / 1e9
    return {"gflops": per_core * threads, "per_core_gflops": per_core, "threads": threads,
            "method": f"torch.mm {size}x{size} on one core, best of {repeat}, x {threads} cores"}


def profile_kernels(compiled: Any, x: Any = None, *, runs: int = 5,
                    peak_gflops: float | None = None) -> list[dict[str, Any]]:
    """Every kernel of ``compiled`` with its rule, calls, time per run, share, GFLOP/s.

    Parameters
    ----------
    compiled : CompiledModel
        Built for this host (``compiled.kernels`` set by ``build``).
    x : ndarray or dict, optional
        Input (one array, or {input name: array}); random inputs of the model's shapes by
        default.
    runs : int
        Instrumented runs; each call site's minimum over them is kept.
    peak_gflops : float, optional
        Machine peak (:func:`measure_peak`); adds ``pct_peak`` to each row.

    Returns
    -------
    list of dict
        Sorted by time, slowest first: ``name, rule, kind, calls, us_per_call, ms_per_run,
        share, gflops, pct_peak`` (kernels not called in a run have no time fields).
    """
    from tvm_compress.frontend.inputs import random_feed
    from tvm_compress.runtime.bench import kernel_call_times

    if compiled.kernels is None:
        raise UserError("this build has no kernel report (GPU target or schedule='none'); "
                        "build for a CPU target with the default schedules")
    args = compiled._args((random_feed(compiled.specs) if x is None else x,))
    calls = kernel_call_times(compiled.vm, *args, runs=runs)
    rows = []
    for info in compiled.kernels:
        row: dict[str, Any] = info.as_dict()
        seconds = calls.get(info.name)
        if seconds is not None:
            per_call = float(seconds.mean())
            row.update(calls=len(seconds), us_per_call=per_call * 1e6,
                       ms_per_run=float(seconds.sum()) * 1e3,
                       gflops=info.flops / per_call / 1e9 if per_call > 0 else 0.0)
            if peak_gflops:
                row["pct_peak"] = 100.0 * row["gflops"] / peak_gflops
        rows.append(row)
    total = sum(r.get("ms_per_run", 0.0) for r in rows)
    for r in rows:
        if "ms_per_run" in r:
            r["share"] = r["ms_per_run"] / total if total > 0 else 0.0
    return sorted(rows, key=lambda r: -r.get("ms_per_run", -1.0))
