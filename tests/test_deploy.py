"""Deployment: bundles with the C++ runner (host and aarch64 under qemu), TVM RPC, CUDA codegen.

The aarch64 bundles run under qemu-aarch64-static (Debian qemu-user-static, installed by
`make setup`) and must reproduce the x86 build: within 1e-5 for fp32, exactly for int8.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from tvm_compress import deploy
from tvm_compress.cli import main

MODEL = "zoo:fmnist_vgg"  # the quickest zoo model to import and quantize


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
    from tvm_compress.qconfig import QuantConfig
    from tvm_compress.quantize import quantize

    model, _ = fmnist
    calib, _ = fashion_mnist("calib")
    return quantize(model, QuantConfig(calib_samples=16), calib[:16], progress=False).model


@pytest.fixture(scope="session")
def bundles(fmnist, fmnist_int8, tmp_path_factory):
    """fp32 aarch64 bundle written by the CLI; int8 aarch64 + x86 bundles through the API."""
    from tvm_compress.compiler import build

    model, x = fmnist
    root = tmp_path_factory.mktemp("bundles")
    assert main(["compile", MODEL, "--target", "aarch64", "-o", str(root / "fp32-a64"),
                 "--json"]) == 0
    out = {"fp32-a64": root / "fp32-a64", "fp32-x86-ref": build(model, target="x86").run(x)}
    for name, target in (("int8-a64", "aarch64"), ("int8-x86", "x86")):
        compiled = build(fmnist_int8, target=target)
        deploy.write_bundle(compiled, root / name, model_name="fmnist_vgg-int8", preset=target,
                            sample=x)
        out[name] = root / name
    out["int8-x86-ref"] = compiled.run(x)
    return out


def test_host_runner_reproduces_the_vm_and_times_runs(bundles, fmnist):
    _, x = fmnist
    bundle = bundles["int8-x86"]
    assert _elf_machine(bundle / "runner") == 62
    outs, report = deploy.run_bundle(bundle, [x], repeat=3)
    np.testing.assert_array_equal(outs[0], bundles["int8-x86-ref"])
    assert report["outputs"] == [[1, 10]] and len(report["runs_ms"]) == 3
    assert report["median_ms"] > 0


def test_aarch64_bundle_is_self_contained(bundles):
    bundle = bundles["fp32-a64"]
    names = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert names == {"model.so", "model.json", "runner", "README.md", "input.npy",
                     "lib/libtvm_runtime.so", "lib/libtvm_ffi.so"}
    for name in ("runner", "model.so", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so"):
        assert _elf_machine(bundle / name) == 183, name
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["arch"] == "aarch64" and meta["input"]["shape"] == [1, 1, 28, 28]
    sizes = deploy.bundle_sizes(bundle)
    print(f"aarch64 fp32 bundle: {sizes['total']:,} bytes ({sizes})")
    assert sizes["total"] < 16 * 2**20  # the runtime libraries, not the compiler (240 MB)


@pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None,
                    reason="qemu-user-static is not installed (make setup installs it as root)")
def test_aarch64_fp32_under_qemu_matches_x86(bundles, fmnist):
    _, x = fmnist
    outs, report = deploy.run_bundle(bundles["fp32-a64"], [x], repeat=1)
    ref = bundles["fp32-x86-ref"]
    assert outs[0].shape == ref.shape and outs[0].dtype == np.float32
    np.testing.assert_allclose(outs[0], ref, rtol=0, atol=1e-5)
    assert outs[0].argmax() == ref.argmax()


@pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None,
                    reason="qemu-user-static is not installed (make setup installs it as root)")
def test_aarch64_int8_under_qemu_equals_x86_exactly(bundles, fmnist):
    _, x = fmnist
    a64, _ = deploy.run_bundle(bundles["int8-a64"], [x])
    x86, _ = deploy.run_bundle(bundles["int8-x86"], [x])
    np.testing.assert_array_equal(a64[0], x86[0])
    assert np.abs(a64[0] - bundles["fp32-x86-ref"]).max() > 0  # really the quantized model


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
