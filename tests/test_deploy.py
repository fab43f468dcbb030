"""Deployment: bundles with the C++ runner (host and aarch64 under qemu), TVM RPC, CUDA codegen.

The aarch64 bundles run under qemu-aarch64-static (Debian qemu-user-static, installed by
`make setup`) and must reproduce the x86 build: within 1e-5 for fp32, exactly for int8.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

from tvm_compress.cli.main import main
from tvm_compress.errors import UserError
from tvm_compress.runtime import deploy
from tvm_compress.runtime.remote import Candidate, RemoteSpec, measure, parse_remote

MODEL = "zoo:fmnist_vgg"  # the quickest zoo model to import and quantize
QEMU = shutil.which("qemu-aarch64-static")


def _require_qemu() -> None:
    """The aarch64 bundle must run here: `make setup` installs qemu-user-static (as root)."""
    if QEMU is None:
        pytest.fail("qemu-aarch64-static not found: run `make setup` as root or "
                    "`apt-get install qemu-user-static`")


def _elf_machine(path) -> int:
    data = path.read_bytes()[:20]
    assert data[:4] == b"\x7fELF"
    return int.from_bytes(data[18:20], "little")  # e_machine: 62 x86-64, 183 aarch64


@pytest.fixture(scope="session")
def fmnist():
    from tvm_compress import load
    from tvm_compress.data import fashion_mnist

    model = load(MODEL)
    images, _ = fashion_mnist("test")
    return model, images[:1].astype("float32")


@pytest.fixture(scope="session")
def fmnist_int8(fmnist):
    from tvm_compress.data import fashion_mnist
    from tvm_compress.quant.config import QuantConfig
    from tvm_compress.quant.quantize import quantize

    model, _ = fmnist
    calib, _ = fashion_mnist("calib")
    return quantize(model, QuantConfig(calib_samples=16), calib[:16], progress=False).model


@pytest.fixture(scope="session")
def builds(fmnist, fmnist_int8):
    """fp32 and int8 fmnist_vgg built once per target, shared by the bundle and RPC tests."""
    from tvm_compress.backend.build import build

    model, _ = fmnist
    return {f"{kind}-{arch}": build(mod, target=target)
            for kind, mod in (("fp32", model), ("int8", fmnist_int8))
            for arch, target in (("x86", "x86"), ("a64", "aarch64"))}


@pytest.fixture(scope="session")
def bundles(fmnist, builds, tmp_path_factory):
    """aarch64 bundles (fp32, int8) and the x86 int8 bundle; x86 reference outputs."""
    _, x = fmnist
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name in ("fp32-a64", "int8-a64", "int8-x86"):
        deploy.write_bundle(builds[name], root / name, model_name=f"fmnist_vgg-{name}",
                            preset="x86" if name.endswith("x86") else "aarch64", sample=x)
        out[name] = root / name
    out["fp32-x86-ref"] = builds["fp32-x86"].run(x)
    out["int8-x86-ref"] = builds["int8-x86"].run(x)
    return out


@pytest.fixture
def tiny_onnx(tiny_cnn, tiny_input, tmp_path):
    from tvm_compress.frontend.importers import export_onnx

    return export_onnx(tiny_cnn, tiny_input, tmp_path / "tiny.onnx")


def test_host_runner_reproduces_the_vm_and_times_runs(bundles, fmnist):
    _, x = fmnist
    bundle = bundles["int8-x86"]
    assert _elf_machine(bundle / "runner") == 62
    outs, report = deploy.run_bundle(bundle, [x], repeat=3)
    np.testing.assert_array_equal(outs[0], bundles["int8-x86-ref"])
    assert report["outputs"] == [[1, 10]] and len(report["runs_ms"]) == 3
    assert report["median_ms"] > 0


def test_host_runner_uses_every_cpu_unless_told(bundles):
    """TVM alone would start one worker per two logical CPUs on x86; the runner sizes the pool to
    the CPUs it may run on, and --threads / TVM_NUM_THREADS still win."""
    bundle = bundles["int8-x86"]
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    base = [str(bundle / "runner"), "run", "--model", str(bundle / "model.so"),
            "--input", str(bundle / "input.npy"), "--repeat", "1"]

    def threads(cmd: list[str], **extra: str) -> int:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, **extra},
                              cwd=bundle, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])["threads"]

    assert threads(base) == len(os.sched_getaffinity(0))
    assert threads([*base, "--threads", "1"]) == 1
    assert threads(base, TVM_NUM_THREADS="3") == 3  # passed through as given


def test_cli_writes_a_self_contained_aarch64_bundle(tiny_onnx, tiny_cnn, tiny_input, tmp_path,
                                                    capsys):
    import torch

    bundle = tmp_path / "bundle"
    assert main(["compile", str(tiny_onnx), "--target", "aarch64", "-o", str(bundle),
                 "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    names = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert names == {"model.so", "model.json", "runner", "README.md", "input.npy",
                     "lib/libtvm_runtime.so", "lib/libtvm_ffi.so"}
    for name in ("runner", "model.so", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so"):
        assert _elf_machine(bundle / name) == 183, name
    assert meta["arch"] == "aarch64" and meta["input"]["shape"] == [1, 3, 16, 16]
    assert meta["bytes"] == deploy.bundle_sizes(bundle)
    print(f"aarch64 bundle of the tiny CNN: {meta['bytes']['total']:,} bytes")
    assert meta["bytes"]["total"] < 16 * 2**20  # the runtime libraries, not the compiler (240 MB)
    _require_qemu()
    outs, _ = deploy.run_bundle(bundle, [tiny_input])
    expected = tiny_cnn(torch.from_numpy(tiny_input)).detach().numpy()
    np.testing.assert_allclose(outs[0], expected, rtol=1e-4, atol=1e-4)


def test_aarch64_bundle_size(bundles):
    sizes = deploy.bundle_sizes(bundles["fp32-a64"])
    print(f"aarch64 fp32 fmnist_vgg bundle: {sizes['total']:,} bytes ({sizes})")
    runtime = sizes["lib/libtvm_runtime.so"] + sizes["lib/libtvm_ffi.so"] + sizes["runner"]
    assert sizes["model.so"] > 383_000  # holds the 0.38 MB of fp32 weights
    assert runtime < 8 * 2**20


def test_aarch64_fp32_under_qemu_matches_x86(bundles, fmnist):
    _require_qemu()
    _, x = fmnist
    outs, report = deploy.run_bundle(bundles["fp32-a64"], [x], repeat=1)
    ref = bundles["fp32-x86-ref"]
    assert outs[0].shape == ref.shape and outs[0].dtype == np.float32
    np.testing.assert_allclose(outs[0], ref, rtol=0, atol=1e-5)
    assert outs[0].argmax() == ref.argmax()


def test_aarch64_int8_under_qemu_equals_x86_exactly(bundles, fmnist):
    _require_qemu()
    _, x = fmnist
    a64, _ = deploy.run_bundle(bundles["int8-a64"], [x])
    x86, _ = deploy.run_bundle(bundles["int8-x86"], [x])
    np.testing.assert_array_equal(a64[0], x86[0])
    assert np.abs(a64[0] - bundles["fp32-x86-ref"]).max() > 0  # really the quantized model


def test_aarch64_dotprod_int8_is_sdot_and_equals_x86_exactly(fmnist, fmnist_int8, bundles,
                                                              tmp_path):
    # aarch64-dotprod: the int8 convs are the NEON sdot kernel (int8_sdot); under qemu its
    # outputs are the x86 int8 build's, bit for bit.
    from tvm_compress.backend.build import build

    _, x = fmnist
    compiled = build(fmnist_int8, target="aarch64-dotprod")
    asm = "\n".join(m.inspect_source("asm") for m in _llvm_modules(compiled.executable.mod))
    assert asm.count("sdot\tv") >= 4
    _require_qemu()
    deploy.write_bundle(compiled, tmp_path / "dot", model_name="fmnist_vgg-int8-a64dot",
                        preset="aarch64-dotprod", sample=x)
    outs, _ = deploy.run_bundle(tmp_path / "dot", [x])
    x86, _ = deploy.run_bundle(bundles["int8-x86"], [x])
    np.testing.assert_array_equal(outs[0], x86[0])


def _llvm_modules(mod):  # noqa: ANN001, ANN202
    """``mod`` and the modules it imports, recursively, that hold LLVM code."""
    def walk(m):  # noqa: ANN001, ANN202
        return [m, *(found for sub in m.imports for found in walk(sub))]

    return [m for m in walk(mod) if m.kind == "llvm"]


def test_runner_rejects_bad_input(bundles, tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an npy file")
    bundle = bundles["int8-x86"]
    proc = subprocess.run([str(bundle / "runner"), "run", "--model", str(bundle / "model.so"),
                           "--input", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "is not an .npy file" in proc.stderr
    proc = subprocess.run([str(bundle / "runner"), "bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_compile_bundle_bad_output(tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    assert main(["compile", MODEL, "--target", "aarch64", "-o", str(existing)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["compile", MODEL, "--target", "riscv", "-o", str(tmp_path / "d")]) == 2


# ------------------------------------------------------------------------------------------ RPC

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def rpc_farm():
    """A loopback device farm: TVM's tracker, TVM's Python server (key x86) and the bundle's C++
    server for aarch64 under qemu (key aarch64; Python itself cannot run under qemu here)."""
    _require_qemu()
    from concurrent.futures import ThreadPoolExecutor

    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    # TVM's own tracker and server, each in a worker process that imports TVM: start both at
    # once (the server retries the tracker for up to 60 s)
    port = _free_port()
    with ThreadPoolExecutor(2) as pool:
        started = pool.submit(Tracker, "127.0.0.1", port=port, port_end=port + 1, silent=True)
        x86 = Server("127.0.0.1", port=_free_port(), port_end=65535, key="x86", silent=True,
                     tracker_addr=("127.0.0.1", port))
        tracker = started.result()
    a64 = subprocess.Popen([*deploy.runner_prefix("aarch64"), str(deploy.build_runner("aarch64")),
                            "rpc", "--host", "127.0.0.1", "--port", str(_free_port()),
                            "--tracker", f"127.0.0.1:{tracker.port}", "--key", "aarch64"],
                           stderr=subprocess.DEVNULL)
    from tvm import rpc

    deadline = time.time() + 180
    while True:
        try:
            summary = rpc.connect_tracker("127.0.0.1", tracker.port).summary()
            keys = {k: v["free"] for k, v in summary["queue_info"].items()}
            if keys.get("x86") and keys.get("aarch64"):
                break
        except Exception:  # noqa: BLE001 - the tracker is still starting
            pass
        assert time.time() < deadline, "the loopback tracker or its servers did not come up"
        time.sleep(1)
    yield f"127.0.0.1:{tracker.port}"
    a64.kill()
    a64.wait()
    x86.terminate()
    tracker.terminate()


def test_bench_through_tracker_on_x86_and_aarch64_servers(rpc_farm, tiny_onnx, tmp_path,
                                                          capsys):
    from tvm_compress import load
    from tvm_compress.backend.build import build

    records = tmp_path / "records.jsonl"
    assert main(["bench", str(tiny_onnx), "--target", "aarch64", "--tracker", rpc_farm, "--key",
                 "aarch64", "--repeat", "2", "--records", str(records), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["remote"] == f"tracker {rpc_farm} key 'aarch64'" and out["tvm"]["median_ms"] > 0
    host, port = rpc_farm.split(":")
    [rec] = measure(RemoteSpec(host, int(port), "x86", via_tracker=True),
                    [Candidate("x86", build(load(str(tiny_onnx)), target="x86"))], repeat=2,
                    records=records)
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["target"] for r in lines] == ["llvm aarch64-linux-gnu", "llvm host"]
    assert rec == lines[1] and rec["latency"]["repeat"] == 2
    # same model and default input on both devices: the outputs agree (fp32 rounding only)
    assert lines[0]["output_checksum"] == pytest.approx(lines[1]["output_checksum"], rel=1e-4)


def test_server_dying_mid_run_keeps_finished_records(builds, fmnist, tmp_path):
    _, x = fmnist
    compiled = builds["fp32-x86"]
    port = _free_port()
    server = subprocess.Popen([str(deploy.build_runner(deploy.host_arch())), "rpc", "--host",
                               "127.0.0.1", "--port", str(port)], stderr=subprocess.PIPE)
    assert b"listening" in server.stderr.readline()
    records = tmp_path / "records.jsonl"
    spec = parse_remote(rpc=f"127.0.0.1:{port}")

    def kill_after_first(rec):
        server.kill()
        server.wait()

    with pytest.raises(UserError) as err:
        measure(spec, [Candidate(n, compiled) for n in ("a", "b", "c")], repeat=2,
                records=records, x=x, on_record=kill_after_first)
    message = str(err.value)
    assert f"RPC server 127.0.0.1:{port} failed while measuring 'b'" in message
    assert f"1 finished record(s) kept in {records}" in message
    assert [json.loads(line)["name"] for line in records.read_text().splitlines()] == ["a"]
    with pytest.raises(UserError, match="cannot reach the RPC server"):
        measure(spec, [Candidate("a", compiled)], x=x)


def test_tune_through_tracker_on_aarch64_server(rpc_farm, tiny_onnx, tmp_path, capsys):
    """A short meta-schedule search measured on the aarch64 server (qemu) through the tracker;
    the database it writes is picked up by an aarch64 build."""
    from tvm_compress import load
    from tvm_compress.backend.build import build

    db = tmp_path / "db"
    assert main(["tune", str(tiny_onnx), "--target", "aarch64", "--tracker", rpc_farm, "--key",
                 "aarch64", "--trials", "2", "--top", "1", "--population", "8", "--keep-all",
                 "--db", str(db), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured_on"] == f"tracker {rpc_farm} key 'aarch64'"
    [task] = out["tasks"]
    assert task["trials"] >= 1 and task["kept"] and task["default_us"] > 0 < task["tuned_us"]
    compiled = build(load(str(tiny_onnx)), target="aarch64", database=db)
    assert compiled.tuned_functions == 1


def test_tune_keeps_measured_candidates_when_the_server_dies(builds, tiny_onnx, tmp_path,
                                                             capsys, monkeypatch):
    from tvm_compress.backend.tuning_ms import open_database
    from tvm_compress.runtime import remote_tune

    port = _free_port()

    def serve():
        proc = subprocess.Popen([str(deploy.build_runner(deploy.host_arch())), "rpc", "--host",
                                 "127.0.0.1", "--port", str(port)], stderr=subprocess.PIPE)
        assert b"listening" in proc.stderr.readline()
        return proc

    server = serve()
    original = remote_tune.RemoteSession.time_library

    def die_after_one(self, *args, **kwargs):
        if self.measured == 1:
            server.kill()
            server.wait()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(remote_tune.RemoteSession, "time_library", die_after_one)
    db = tmp_path / "db"
    argv = ["tune", str(tiny_onnx), "--target", "x86", "--rpc", f"127.0.0.1:{port}",
            "--trials", "4", "--top", "1", "--population", "8", "--db", str(db)]
    code, err = main(argv), capsys.readouterr().err
    assert code == 2, err
    assert f"RPC server 127.0.0.1:{port} failed during tuning" in err
    assert "1 candidate(s) measured" in err and str(db / "raw") in err
    kept = len(open_database(db / "raw").get_all_tuning_records())
    assert kept >= 1  # the measured candidate survived the failure
    monkeypatch.setattr(remote_tune.RemoteSession, "time_library", original)
    server = serve()
    try:  # the same command again resumes from those records
        assert main(argv) == 0
    finally:
        server.kill()
        server.wait()
    assert len(open_database(db / "raw").get_all_tuning_records()) > kept


def test_remote_flags_are_checked(capsys):
    with pytest.raises(UserError, match="needs --key"):
        parse_remote(tracker="127.0.0.1:9190")
    with pytest.raises(UserError, match="not HOST:PORT"):
        parse_remote(rpc="localhost")
    with pytest.raises(UserError, match="not both"):
        parse_remote(rpc="a:1", tracker="b:2", key="k")
    assert parse_remote() is None
    assert main(["bench", MODEL, "--rpc", "nohost"]) == 2
    assert "--rpc 'nohost' is not HOST:PORT" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- CUDA


def _check_cuda_package(out, arch):
    meta = json.loads((out / "model.json").read_text())
    source = (out / "model.cu").read_text()
    assert meta["cuda_arch"] == arch and meta["kernels"] == len(deploy.kernel_names(source)) > 0
    assert "blockIdx.x" in source and "threadIdx.x" in source  # GPU-scheduled (dlight), bound
    if deploy.nvcc_path() is None:  # no CUDA toolkit: the CUDA source is what CI can check
        assert meta["ptx"] is None
        return source, None
    ptx = (out / meta["ptx"]).read_text()
    assert f".target {arch}" in ptx and ptx.count(".entry") == meta["kernels"]
    return source, ptx


def test_compile_cuda_fp32_writes_source_and_ptx(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "cuda"
    assert main(["compile", str(tiny_onnx), "--target", "cuda-sm80", "-o", str(out),
                 "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["bytes"]["model.so"] > 0 and meta["target"] == "cuda-sm80"
    _check_cuda_package(out, "sm_80")


def test_compile_cuda_int8_kernels(fmnist_int8, tmp_path):
    from tvm_compress.backend.build import build

    compiled = build(fmnist_int8, target="cuda-sm90")
    deploy.write_cuda_package(compiled, tmp_path / "int8", model_name="fmnist_vgg-int8",
                              preset="cuda-sm90")
    source, ptx = _check_cuda_package(tmp_path / "int8", "sm_90")
    assert "signed char" in source  # int8 operands reach the kernels (integer convs)
    if ptx is not None:  # nvcc turns the int8 dot-product loops into dp4a instructions
        assert "dp4a.s32" in ptx


def _has_gpu() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU on this machine")
def test_cuda_build_runs_on_gpu_like_cpu(fmnist, fmnist_int8):
    from tvm_compress.backend.build import build

    model, x = fmnist
    for mod, target in ((model, "cuda-sm80"), (fmnist_int8, "cuda-sm80")):
        import tvm
        from tvm import relax

        compiled = build(mod, target=target)
        vm = relax.VirtualMachine(compiled.executable, tvm.cuda(0))
        got = vm["main"](tvm.runtime.tensor(x, tvm.cuda(0))).numpy()
        ref = build(mod, target="x86").run(x)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
