"""Side-by-side latency: TVM vs ONNX Runtime vs PyTorch, same model, same machine, one run."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tvm_compress.backend.build import CompiledModel, Latency, build, latency_stats
from tvm_compress.backend.targets import host_cores
from tvm_compress.frontend.importers import Model, export_onnx
from tvm_compress.frontend.inputs import random_feed
from tvm_compress.runtime.threads import set_threads

# Thread pools (ONNX Runtime's above all) keep spinning for tens of milliseconds after a call and
# take the cores from whatever runs next. Measured on rapidocr_cls (0.4 ms a call, 2 cores, 2
# threads each engine): TVM called 10-20 ms after ONNX Runtime ran 2x slower (0.83-0.94 ms),
# at full speed (0.41-0.43 ms) from 50 ms on. Interleaved timings wait this long between engines.
SETTLE_S = 0.1
# Engines in separate processes (one per engine) wait longer: TVM's pool threads in the previous
# process keep yielding for longer than 0.1 s (TVM_THREAD_POOL_SPIN_COUNT) and slow the next TVM
# process on the same cores. MobileNetV2 in bench_int8: with 0.1 s the 7-bit build's typical time
# was 1.9x its minimum (5.33 vs 2.83 ms); with 0.5 s every engine's typical is within 2% of it.
SETTLE_PROCESSES_S = 0.5


# Untimed calls at the start of each engine's turn, after the settle: a sub-millisecond model
# woken from sleep takes several calls to reach its steady time (the other engines have evicted
# its weights and activations from the caches, its pool threads are asleep). Measured on
# rapidocr_cls (0.3-0.4 ms steady, 2 cores): timed from the first call of a turn, the fastest of
# 5 calls read 0.64 ms for fp32 and 0.46 ms for int8, a 0.72x ratio that steady calls do not show.
TURN_WARMUP_S = 0.005


def settle(seconds: float | None = None) -> None:
    """Wait until the previous engine's threads have gone idle (``SETTLE_S`` by default)."""
    time.sleep(SETTLE_S if seconds is None else seconds)


def warm_turn(fn: Callable[[], Any], seconds: float | None = None) -> None:
    """Call ``fn`` untimed for ``seconds`` (``TURN_WARMUP_S`` by default), at least once."""
    until = time.perf_counter() + (TURN_WARMUP_S if seconds is None else seconds)
    fn()
    while time.perf_counter() < until:
        fn()


def timed_turn(fn: Callable[[], Any], calls: int) -> list[float]:
    """One engine's turn: :func:`warm_turn`, then the wall seconds of ``calls`` calls of ``fn``."""
    warm_turn(fn)
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_callable(fn: Callable[[], Any], *, repeat: int, warmup: int) -> Latency:
    """Median wall time of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return latency_stats(seconds)


def interleaved(engines: dict[str, Callable[[], Any]], *, rounds: int = 5, per_round: int = 6,
                warmup: int = 2) -> dict[str, Latency]:
    """Time several engines in turn, round by round, in this process.

    Each engine gets ``warmup`` untimed calls, then every round times ``per_round`` calls of each
    engine before moving to the next one, so a shared machine's slow spells hit all engines alike
    (a sequential A-then-B timing has been off by 2x here); each engine's turn starts after
    :func:`settle` and :func:`warm_turn`. Returns each engine's statistics over all its
    ``rounds * per_round`` calls.
    """
    if rounds < 1 or per_round < 1:
        raise ValueError(f"interleaved timing needs rounds >= 1 and per_round >= 1, got "
                         f"{rounds} and {per_round}")
    for fn in engines.values():
        for _ in range(warmup):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, fn in engines.items():
            settle()
            seconds[name].extend(timed_turn(fn, per_round))
    return {name: latency_stats(s) for name, s in seconds.items()}


def kernel_call_times(vm: Any, *args: Any, runs: int, warmup: int = 2) -> dict[str, np.ndarray]:
    """Per-call-site minimum seconds of every function ``vm["main"](*args)`` calls.

    The VM is instrumented for ``runs`` calls after ``warmup`` plain ones; a function called k
    times per run gets k entries (the minimum over runs of each call site). VM builtins are
    included; callers filter by the kernel names they know.
    """
    from collections import defaultdict

    calls: dict[str, list[float]] = defaultdict(list)
    started: dict[str, float] = {}

    def instrument(_func: Any, symbol: str, before: bool, _ret: Any, *_args: Any) -> int:
        if before:
            started[symbol] = time.perf_counter()
        else:
            calls[symbol].append(time.perf_counter() - started[symbol])
        return 0

    for _ in range(warmup):
        vm["main"](*args)
    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            vm["main"](*args)
    finally:
        vm.set_instrument(None)
    return {name: np.array(seconds).reshape(runs, -1).min(axis=0)
            for name, seconds in calls.items()}


def vm_runner(vm: Any) -> Callable[[np.ndarray], Any]:
    """``run(x)`` of a Relax VM's ``main`` on a numpy input, for timing next to ONNX Runtime.

    The input is copied into a TVM tensor once per distinct array, not on every call:
    ``tvm.runtime.tensor`` costs 10-60 us of Python FFI work (``.numpy()`` on the output another
    ~10 us), as much as a whole 28x28 model's inference, and ONNX Runtime and PyTorch take the
    numpy array as it is. The output stays a TVM tensor (``np.asarray``-able via ``.numpy()``).
    """
    import tvm

    held: dict[str, Any] = {}

    def run(x: np.ndarray) -> Any:
        if held.get("source") is not x:
            held.update(source=x, tensor=tvm.runtime.tensor(x))
        return vm["main"](held["tensor"])

    return run


def onnxruntime_session(onnx_model: Any, *, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx_model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def onnx_of(model: Model, x: np.ndarray) -> Any:
    """The model as ONNX: the imported file, or an export of the torch module."""
    import onnx

    if model.onnx_model is not None:
        return model.onnx_model
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model.torch_module, x, Path(tmp) / "model.onnx")
        return onnx.load(str(path))


def benchmark(model: Model, *, target: str = "x86", repeat: int = 30, warmup: int = 5,
              compiled: CompiledModel | None = None) -> dict[str, Any]:
    """Latency of the model in TVM, ONNX Runtime and PyTorch eager, with output differences.

    All three use this machine's cores and are timed the same way (``time.perf_counter`` around
    the Python call, tens of microseconds of overhead each), interleaved round by round in this
    process (:func:`interleaved`).
    """
    import torch

    threads = host_cores()
    set_threads(threads)  # the same count for all three engines
    feed = random_feed(model.inputs)
    x = feed[model.input_name]
    compiled = compiled or build(model, target=target)
    results: dict[str, Any] = {"model": model.name, "target": str(compiled.target),
                               "input_shape": list(model.input_shape), "threads": threads}
    if len(model.inputs) > 1:
        results["input_shapes"] = {s.name: list(s.shape) for s in model.inputs}
    tvm_outs = compiled.run_outputs(feed)
    tvm_out = tvm_outs[0]
    args = compiled._args((feed,))
    engines: dict[str, Callable[[], Any]] = {"tvm": lambda: compiled.vm["main"](*args)}

    session = onnxruntime_session(onnx_of(model, x), threads=threads)
    ort_outs = session.run(None, feed)
    engines["onnxruntime"] = lambda: session.run(None, feed)
    diffs = [float(np.max(np.abs(t - o))) for t, o in zip(tvm_outs, ort_outs, strict=True)]
    results["max_abs_diff"] = {"tvm_vs_onnxruntime": max(diffs)}
    if len(diffs) > 1:  # every output compared; the worst one above
        names = model.outputs or tuple(str(i) for i in range(len(diffs)))
        results["max_abs_diff_per_output"] = dict(zip(names, diffs, strict=True))

    if model.torch_module is not None:
        torch.set_num_threads(threads)
        tx = torch.from_numpy(x)
        with torch.inference_mode():
            torch_out = model.torch_module(tx).numpy()

        def torch_call() -> Any:
            with torch.inference_mode():
                return model.torch_module(tx)

        engines["pytorch"] = torch_call
        results["max_abs_diff"]["tvm_vs_pytorch"] = float(np.max(np.abs(tvm_out - torch_out)))
    rounds = max(1, min(10, repeat // 3))
    timed = interleaved(engines, rounds=rounds, per_round=max(1, repeat // rounds),
                        warmup=warmup)
    for name, stats in timed.items():
        results[name] = stats.as_dict()
    results["timing"] = f"interleaved: {rounds} rounds, engines in turn, one process"
    ort_ms = results["onnxruntime"]["median_ms"]
    results["ratio_to_onnxruntime"] = {
        k: results[k]["median_ms"] / ort_ms for k in ("tvm", "onnxruntime", "pytorch")
        if k in results}
    return results
