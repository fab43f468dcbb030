"""Measure compiled models on remote devices through TVM RPC (direct server or tracker).

``--rpc HOST:PORT`` connects to one server; ``--tracker HOST:PORT --key KEY`` asks a TVM tracker
(``python -m tvm.exec.rpc_tracker``) for a free device of that key - the engine of a device farm.
Servers: TVM's Python ``python -m tvm.exec.rpc_server`` or, on a device without Python, the
bundle's C++ ``runner rpc`` (tvm_compress/runtime/runner/runner.cc), which also registers with a
tracker.

Each finished measurement is appended to a JSONL records file at once (flushed), so a server that
dies mid-run loses nothing already measured; the error names the server and the records file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tvm_compress.errors import UserError


@dataclass(frozen=True)
class RemoteSpec:
    """Where to measure: a direct server (``host``/``port``) or a tracker plus a device key."""

    host: str
    port: int
    key: str = ""
    via_tracker: bool = False

    def describe(self) -> str:
        where = f"{self.host}:{self.port}"
        return f"tracker {where} key '{self.key}'" if self.via_tracker else f"RPC server {where}"


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{flag} {text!r} is not HOST:PORT; give e.g. {flag} 192.168.1.20:9090")
    return host, int(port)


def parse_remote(rpc: str | None = None, tracker: str | None = None,
                 key: str | None = None) -> RemoteSpec | None:
    """The remote of the CLI flags, or None for local measurement."""
    if rpc and tracker:
        raise UserError("give either --rpc HOST:PORT or --tracker HOST:PORT --key KEY, not both")
    if tracker:
        if not key:
            raise UserError("--tracker needs --key KEY (the device key the servers registered "
                            "with, e.g. aarch64)")
        return RemoteSpec(*_host_port(tracker, "--tracker"), key=key, via_tracker=True)
    if rpc:
        return RemoteSpec(*_host_port(rpc, "--rpc"), key=key or "")
    if key:
        raise UserError("--key only applies with --tracker HOST:PORT")
    return None


def add_remote_args(p: argparse.ArgumentParser, *, records: bool = True) -> None:
    """``--rpc``, ``--tracker``, ``--key`` (and ``--records``) for a measuring command."""
    p.add_argument("--rpc", metavar="HOST:PORT",
                   help="measure on a TVM RPC server (device) instead of this machine")
    p.add_argument("--tracker", metavar="HOST:PORT",
                   help="measure on a device from a TVM RPC tracker (needs --key)")
    p.add_argument("--key", help="device key registered with the tracker (e.g. aarch64)")
    if records:
        p.add_argument("--records", help="append each remote measurement to this JSONL file")


def connect(spec: RemoteSpec, *, timeout: float = 60.0) -> Any:
    """An RPC session (``tvm.rpc.RPCSession``); unreachable servers raise UserError."""
    from tvm import rpc

    try:
        if spec.via_tracker:
            tracker = rpc.connect_tracker(spec.host, spec.port)
            return tracker.request(spec.key, priority=1, session_timeout=timeout * 10,
                                   max_retry=3)
        return rpc.connect(spec.host, spec.port, key=spec.key)
    except Exception as exc:  # noqa: BLE001 - TVM raises RuntimeError/TVMError/OSError here
        raise UserError(f"cannot reach the {spec.describe()}: {_first_line(exc)}; check that the "
                        "server (or tracker) runs and the address is right") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return next((line for line in reversed(text) if line.strip()), type(exc).__name__)[:200]


@dataclass
class Candidate:
    """One thing to measure: a name (record id) and a CPU ``CompiledModel``."""

    name: str
    compiled: Any
    extra: dict[str, Any] | None = None


def measure(spec: RemoteSpec, candidates: Sequence[Candidate], *, repeat: int = 10,
            number: int = 1, records: str | Path | None = None, x: np.ndarray | None = None,
            on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Latency of each candidate on the remote device, in one session.

    Every finished record is appended to ``records`` (JSONL, flushed) before the next starts; a
    failure (server died, session lost) raises UserError naming the server, the candidate and
    how many records were kept.
    """
    import tvm
    from tvm import relax

    from tvm_compress.backend.build import latency_stats

    done: list[dict[str, Any]] = []
    sink = None
    if records:
        Path(records).parent.mkdir(parents=True, exist_ok=True)
        sink = open(records, "a")  # noqa: SIM115 - kept open across candidates, closed below
    session = connect(spec)
    current = "connecting"
    try:
        with tempfile.TemporaryDirectory(prefix="tvm-compress-rpc-") as tmp:
            for i, cand in enumerate(candidates):
                current = cand.name
                spec_in = cand.compiled.spec
                data = x if x is not None else np.random.default_rng(0).standard_normal(
                    spec_in.shape).astype(spec_in.dtype)
                lib_name = f"cand{i}_{os.getpid()}.so"
                start = time.perf_counter()
                cand.compiled.export(Path(tmp) / lib_name)
                session.upload(str(Path(tmp) / lib_name))
                rlib = session.load_module(lib_name)
                dev = session.cpu()
                vm = relax.VirtualMachine(rlib, dev)
                arg = tvm.runtime.tensor(cand.compiled.check_input(data), dev)
                out = vm["main"](arg).numpy()  # also the warm-up run
                timer = vm.time_evaluator("main", dev, number=number, repeat=repeat)
                lat = latency_stats(list(timer(arg).results))
                rec = {"name": cand.name, "remote": spec.describe(),
                       "target": str(cand.compiled.target.kind.name) + " " +
                       str(cand.compiled.target.attrs.get("mtriple", "host")),
                       "latency": lat.as_dict(), "output_checksum": float(np.abs(out).sum()),
                       "seconds": round(time.perf_counter() - start, 3),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       **(cand.extra or {})}
                done.append(rec)
                if sink:
                    sink.write(json.dumps(rec) + "\n")
                    sink.flush()
                    os.fsync(sink.fileno())
                if on_record:
                    on_record(rec)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any RPC failure becomes one clear message
        kept = f"{len(done)} finished record(s) kept" + (f" in {records}" if records else "")
        raise UserError(f"the {spec.describe()} failed while measuring {current!r} "
                        f"({_first_line(exc)}); {kept}; restart the server and run again") \
            from exc
    finally:
        if sink:
            sink.close()
    return done


def bench_command(args: argparse.Namespace, con: Any, spec: RemoteSpec) -> dict[str, Any]:
    """``tvm-compress bench MODEL --rpc/--tracker ...``: TVM latency on the remote device."""
    from tvm_compress.backend.build import build
    from tvm_compress.frontend.loader import load_from_args as load_model

    with con.step(f"importing {args.model}"):
        model = load_model(args)
    if len(model.inputs) > 1:
        raise UserError(f"{args.model} has {len(model.inputs)} inputs; remote measurement feeds "
                        "one: bench it locally (without --rpc / --tracker)")
    with con.step(f"compiling for {args.target}"):
        compiled = build(model, target=args.target)
    if compiled.target.kind.name != "llvm":
        raise UserError(f"remote measurement runs CPU targets; {args.target} is "
                        f"{compiled.target.kind.name}")
    with con.step(f"measuring on the {spec.describe()} ({args.repeat} runs)"):
        [rec] = measure(spec, [Candidate(model.name, compiled, {"target_preset": args.target})],
                        repeat=args.repeat, records=args.records)
    con.table(f"latency of {model.name} on the {spec.describe()}", ["runtime", "median ms",
                                                                     "p10 ms", "p90 ms"],
              [["tvm", rec["latency"]["median_ms"], rec["latency"]["p10_ms"],
                rec["latency"]["p90_ms"]]])
    return {"model": model.name, "target": args.target, "remote": spec.describe(),
            "input_shape": list(model.input_shape), "tvm": rec["latency"],
            "records": args.records}
