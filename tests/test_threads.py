"""TVM's CPU thread pool: every usable CPU by default, resizable (runtime/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tvm_compress.runtime.threads import available_cpus, current_threads, set_threads


def _pool_size_after_import(env: dict[str, str]) -> int:
    code = ("import tvm_compress, tvm; "
            "print(tvm.get_global_func('runtime.NumThreads')())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_sizes_the_pool_to_every_cpu():
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    assert _pool_size_after_import(env) == len(os.sched_getaffinity(0))


def test_a_users_setting_wins():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert _pool_size_after_import({**env, "TVM_NUM_THREADS": "1"}) == 1


def test_set_threads_resizes_and_restores():
    before = current_threads()
    try:
        assert set_threads(1) == 1 == current_threads()
        assert set_threads() == len(available_cpus())
    finally:
        set_threads(before)
    with pytest.raises(ValueError, match="at least 1"):
        set_threads(-1)


def test_interleaved_timing_lets_each_engines_threads_settle_before_its_turn(monkeypatch):
    """Thread pools spin after a call; every engine's turn must start after a settle pause,
    and the engines take turns round by round."""
    from tvm_compress.runtime import bench

    events: list[str] = []
    monkeypatch.setattr(bench, "settle", lambda: events.append("settle"))
    monkeypatch.setattr(bench, "TURN_WARMUP_S", 0.0)  # one untimed call per turn
    engines = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    stats = bench.interleaved(engines, rounds=2, per_round=2, warmup=1)
    assert events == ["a", "b"] + ["settle", "a", "a", "a", "settle", "b", "b", "b"] * 2
    assert set(stats) == {"a", "b"} and all(s.median_ms >= 0 for s in stats.values())
    assert bench.SETTLE_S >= 0.05  # measured: 10-20 ms after ONNX Runtime still ran TVM 2x slow


def test_warm_turn_calls_until_its_time_is_up() -> None:
    """Each turn starts with untimed calls for TURN_WARMUP_S (at least one): a sub-millisecond
    model's first calls after the other engines ran are slow (cold caches, sleeping threads)."""
    import time

    from tvm_compress.runtime import bench

    calls: list[float] = []
    bench.warm_turn(lambda: calls.append(time.perf_counter()), seconds=0.0)
    assert len(calls) == 1
    calls.clear()
    start = time.perf_counter()
    bench.warm_turn(lambda: (calls.append(0.0), time.sleep(0.001)), seconds=0.02)
    assert time.perf_counter() - start >= 0.02 and len(calls) <= 21  # 1 ms each, none late
    assert bench.TURN_WARMUP_S > 0


def test_settle_waits_longer_between_engine_processes(monkeypatch) -> None:  # noqa: ANN001
    """Process-per-engine benchmarks wait SETTLE_PROCESSES_S (TVM's pool in the previous
    process yields for longer than ONNX Runtime's spins), in-process ones SETTLE_S."""
    from tvm_compress.runtime import bench

    slept: list[float] = []
    monkeypatch.setattr(bench.time, "sleep", slept.append)
    bench.settle()
    bench.settle(bench.SETTLE_PROCESSES_S)
    assert slept == [bench.SETTLE_S, bench.SETTLE_PROCESSES_S]
    assert bench.SETTLE_PROCESSES_S > bench.SETTLE_S


def test_vm_runner_copies_each_input_once_and_computes_on_the_current_one(monkeypatch) -> None:  # noqa: ANN001
    """Benchmarks time a VM on a numpy input without the per-call tvm.runtime.tensor copy
    (10-60 us of FFI work: a 28x28 model's whole inference), but a new array is still used."""
    import numpy as np
    import tvm
    from tvm import relax

    from tvm_compress.runtime import bench

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.multiply(x, relax.const(np.float32(2))))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target="llvm"), tvm.cpu())
    copies: list[tuple] = []
    real = tvm.runtime.tensor
    monkeypatch.setattr(tvm.runtime, "tensor", lambda a: copies.append(a.shape) or real(a))
    run = bench.vm_runner(vm)
    a, b = np.ones((2, 3), "float32"), np.full((2, 3), 3.0, "float32")
    first = [run(a).numpy() for _ in range(3)]
    second = run(b).numpy()
    assert len(copies) == 2  # one per distinct array, not one per call
    assert all(np.array_equal(f, 2 * a) for f in first) and np.array_equal(second, 2 * b)
