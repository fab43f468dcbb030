"""Deployment bundles: a compiled model + the C++ runner + the TVM runtime, for a host or a device.

A bundle is a self-contained directory::

    model.so        the compiled model (Relax VM executable, cross-compiled for the device)
    model.json      input name / shape / dtype, target, sizes
    runner          C++ runner (tvm_compress/runtime/runner/runner.cc): `run` (.npy in/out, timing)
    and
                    `rpc` (a TVM RPC server, also registers with a tracker)
    lib/            libtvm_runtime.so and libtvm_ffi.so of the matching apache-tvm wheels
    input.npy       a sample input
    README.md       how to run it on the device

The aarch64 runtime libraries come from the aarch64 apache-tvm / apache-tvm-ffi wheels of the
installed versions (``pip download``, cached under ``build/deploy`` in a source checkout, else
``~/.cache/tvm-compress/deploy``; ``TVM_COMPRESS_DEPLOY_CACHE`` overrides). The runner is built with
CMake (aarch64: the toolchain file ``runner/aarch64-linux-gnu.cmake``) and cached per architecture.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tvm_compress.backend.targets import AARCH64_CXX
from tvm_compress.errors import UserError

RUNNER_SRC = Path(__file__).resolve().parent / "runner"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
# Files taken from each aarch64 wheel: (distribution, files inside the wheel).
_WHEEL_FILES = {
    "apache-tvm": ("tvm/lib/libtvm_runtime.so",),
    "apache-tvm-ffi": ("tvm_ffi/lib/libtvm_ffi.so", "tvm_ffi/include/"),
}


def cache_dir() -> Path:
    """Where wheels, extracted runtimes and runner builds are cached."""
    if os.environ.get("TVM_COMPRESS_DEPLOY_CACHE"):
        return Path(os.environ["TVM_COMPRESS_DEPLOY_CACHE"])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / ".git").exists():
        return repo / "build" / "deploy"
    return Path.home() / ".cache" / "tvm-compress" / "deploy"


def host_arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                        platform.machine().lower())


def target_arch(target: Any) -> str:
    """'x86_64', 'aarch64' or 'cuda' for a tvm Target (CPU targets without a triple: the host)."""
    if target.kind.name == "cuda":
        return "cuda"
    if target.kind.name != "llvm":
        raise UserError(f"targets of kind {target.kind.name!r} cannot be bundled; use an x86, "
                        "aarch64 or cuda preset")
    triple = str(target.attrs.get("mtriple", ""))
    if not triple:
        return host_arch()
    return "aarch64" if triple.startswith(("aarch64", "arm64")) else triple.split("-")[0]


def _versions() -> dict[str, str]:
    return {dist: importlib.metadata.version(dist) for dist in _WHEEL_FILES}


# ----------------------------------------------------------------------------- runtime libraries


def runtime_paths(arch: str) -> dict[str, Path]:
    """``{"tvm_lib": dir of libtvm_runtime.so, "ffi_lib": ..., "ffi_include": ...}`` for ``arch``.

    The host architecture uses the installed wheels; aarch64 downloads (once) the aarch64 wheels
    of the same versions.
    """
    if arch == host_arch():
        import tvm
        import tvm_ffi

        tvm_dir, ffi_dir = Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent
        return {"tvm_lib": tvm_dir / "lib", "ffi_lib": ffi_dir / "lib",
                "ffi_include": ffi_dir / "include"}
    if arch != "aarch64":
        raise UserError(f"no runtime for architecture {arch!r}; bundles exist for the host "
                        f"({host_arch()}) and aarch64")
    with _exclusive("runtime-aarch64"):
        return _aarch64_runtime()


def _aarch64_runtime() -> dict[str, Path]:
    versions = _versions()
    root = cache_dir() / ("aarch64-" + "-".join(versions.values()))
    paths = {"tvm_lib": root / "tvm" / "lib", "ffi_lib": root / "tvm_ffi" / "lib",
             "ffi_include": root / "tvm_ffi" / "include"}
    if (root / ".complete").is_file():
        return paths
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for dist, version in versions.items():
        found = _find_wheel(wheels, dist, version)
        if found is None:
            _download_wheel(wheels, dist, version)
            found = _find_wheel(wheels, dist, version)
        if found is None:
            raise UserError(f"pip download put no aarch64 wheel of {dist}=={version} into "
                            f"{wheels}; download it there by hand")
        with zipfile.ZipFile(found) as zf:
            for name in zf.namelist():
                if any(name == f or (f.endswith("/") and name.startswith(f))
                       for f in _WHEEL_FILES[dist]):
                    zf.extract(name, root)
    (root / ".complete").write_text(json.dumps(versions))
    return paths


def _find_wheel(folder: Path, dist: str, version: str) -> Path | None:
    stem = dist.replace("-", "_") + "-" + version + "-"
    hits = sorted(p for p in folder.glob(stem + "*aarch64*.whl"))
    return hits[-1] if hits else None


def _download_wheel(folder: Path, dist: str, version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--platform", "manylinux_2_28_aarch64", "--python-version",
           f"{sys.version_info.major}.{sys.version_info.minor}", "-d", str(folder),
           f"{dist}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"cannot download the aarch64 wheel {dist}=={version} ({last}); "
                        f"connect to PyPI or put the wheel into {folder}")


# -------------------------------------------------------------------------------------- runner


def _runner_hash() -> str:
    digest = hashlib.sha256()
    for name in ("runner.cc", "CMakeLists.txt", "aarch64-linux-gnu.cmake"):
        digest.update((RUNNER_SRC / name).read_bytes())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _exclusive(name: str) -> Iterator[None]:
    """Hold a lock file in the cache: parallel processes (pytest-xdist, two CLI runs) build a
    runner or unpack the aarch64 runtime once, not on top of each other."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_runner(arch: str) -> Path:
    """The runner executable for ``arch`` (built with CMake once per source version)."""
    with _exclusive(f"runner-{arch}"):
        return _build_runner(arch)


def _build_runner(arch: str) -> Path:
    paths = runtime_paths(arch)
    build = cache_dir() / f"runner-{arch}-{_runner_hash()}"
    exe = build / "runner"
    if exe.is_file() and (build / "lib" / "libtvm_ffi.so").exists():
        return exe
    shutil.rmtree(build, ignore_errors=True)
    if shutil.which("cmake") is None:
        raise UserError("cmake is not installed; install it (apt-get install cmake or pip "
                        "install cmake) to build the runner")
    cmd = ["cmake", "-S", str(RUNNER_SRC), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
           f"-DTVM_LIB_DIR={paths['tvm_lib']}", f"-DTVM_FFI_LIB_DIR={paths['ffi_lib']}",
           f"-DTVM_FFI_INCLUDE_DIR={paths['ffi_include']}"]
    if arch != host_arch():
        if shutil.which(AARCH64_CXX) is None:
            raise UserError(f"{AARCH64_CXX} is not installed; run: sudo apt-get install -y "
                            "g++-aarch64-linux-gnu (or `make setup` as root)")
        cmd.append(f"-DCMAKE_TOOLCHAIN_FILE={RUNNER_SRC / 'aarch64-linux-gnu.cmake'}")
    for step in (cmd, ["cmake", "--build", str(build), "-j", "2"]):
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(build, ignore_errors=True)
            raise RuntimeError(f"building the {arch} runner failed:\n{proc.stdout}\n{proc.stderr}")
    # the runner finds its libraries in $ORIGIN/lib: make the build directory runnable in place
    (build / "lib").mkdir(exist_ok=True)
    for lib in (paths["tvm_lib"] / "libtvm_runtime.so", paths["ffi_lib"] / "libtvm_ffi.so"):
        (build / "lib" / lib.name).symlink_to(lib)
    return exe


def runner_prefix(arch: str) -> list[str]:
    """Command prefix to execute a binary of ``arch`` here (qemu for aarch64 on x86)."""
    if arch == host_arch():
        return []
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if arch != "aarch64" or qemu is None:
        raise UserError(f"cannot run {arch} binaries on this {host_arch()} machine; install "
                        "qemu-user-static or run the bundle on the device")
    return [qemu, "-L", AARCH64_SYSROOT]


# -------------------------------------------------------------------------------------- bundle

DEVICE_README = """# {model} for {arch}

Compiled by tvm-compress for target `{target}`. Everything needed is in this directory; the
device needs only a 64-bit Linux with glibc >= 2.28 and libstdc++ (no Python, no TVM install).

Run the model on an input (.npy, {dtype} {shape}) and write the outputs as .npy:

    ./runner run --model model.so --input input.npy --output-dir out

Time it (2 warm-up runs, then N timed runs; one JSON line with per-run milliseconds and
the median):

    ./runner run --model model.so --input input.npy --repeat 50 --threads 4

Serve it to a host for measurement through TVM RPC (direct, or registered with a tracker;
then `tvm-compress bench MODEL --target {preset} --rpc DEVICE:9090` or
`--tracker HOST:9190 --key {arch}` on the host):

    ./runner rpc --port 9090
    ./runner rpc --port 9090 --tracker HOST:9190 --key {arch}

`lib/` holds libtvm_runtime.so and libtvm_ffi.so of apache-tvm {tvm_version} /
apache-tvm-ffi {ffi_version}; the runner finds them through its RPATH ($ORIGIN/lib).
Files: {files}.
"""


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory; choose a new directory "
                        "name (or -o FILE.so for the library alone)")


def write_bundle(compiled: Any, out_dir: str | Path, *, model_name: str, preset: str,
                 sample: np.ndarray | None = None, extra_meta: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Write a bundle for a CPU ``CompiledModel``; returns its metadata (sizes in bytes)."""
    arch = target_arch(compiled.target)
    if arch == "cuda":
        raise UserError("CUDA targets get a library, not a runner bundle; use -o model.so")
    out = Path(out_dir)
    _check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    runner = build_runner(arch)
    paths = runtime_paths(arch)
    compiled.export(out / "model.so")  # cross-compiled for aarch64
    shutil.copy2(runner, out / "runner")
    (out / "lib").mkdir(exist_ok=True)
    shutil.copy2(paths["tvm_lib"] / "libtvm_runtime.so", out / "lib" / "libtvm_runtime.so")
    shutil.copy2(paths["ffi_lib"] / "libtvm_ffi.so", out / "lib" / "libtvm_ffi.so")
    spec = compiled.spec
    if sample is None:
        sample = np.random.default_rng(0).standard_normal(spec.shape).astype(spec.dtype)
    np.save(out / "input.npy", np.ascontiguousarray(sample))
    versions = _versions()
    files = ["model.so", "model.json", "runner", "lib/", "input.npy", "README.md"]
    (out / "README.md").write_text(DEVICE_README.format(
        model=model_name, arch=arch, target=str(compiled.target), preset=preset,
        dtype=spec.dtype, shape=list(spec.shape), tvm_version=versions["apache-tvm"],
        ffi_version=versions["apache-tvm-ffi"], files=", ".join(files)))
    meta = {"model": model_name, "target": preset, "arch": arch, "target_str": str(compiled.target),
            "input": {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype},
            "runtime": versions, **(extra_meta or {})}
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    meta["bundle"] = str(out)
    meta["bytes"] = bundle_sizes(out)
    return meta


def bundle_sizes(out: str | Path) -> dict[str, int]:
    """Bytes per part of a bundle and in total."""
    out = Path(out)
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file()}
    sizes["total"] = sum(sizes.values())
    return sizes


def run_bundle(bundle: str | Path, inputs: list[np.ndarray] | None = None, *, repeat: int = 0,
               warmup: int | None = None, threads: int | None = None, timeout: float = 600
               ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Run a bundle's runner here (under qemu when it is an aarch64 bundle on x86).

    Returns the outputs and the runner's JSON report (``runs_ms``, ``median_ms`` when
    ``repeat > 0``).
    """
    bundle = Path(bundle)
    meta_path = bundle / "model.json"
    if not meta_path.is_file():
        raise UserError(f"{bundle} is not a bundle (no model.json); write one with "
                        "`tvm-compress compile MODEL --target T -o DIR`")
    meta = json.loads(meta_path.read_text())
    with tempfile.TemporaryDirectory(prefix="tvm-compress-run-") as tmp:
        cmd = [*runner_prefix(meta["arch"]), str(bundle / "runner"), "run",
               "--model", str(bundle / "model.so"), "--output-dir", f"{tmp}/out",
               "--repeat", str(repeat)]
        if inputs is None:
            cmd += ["--input", str(bundle / "input.npy")]
        for i, x in enumerate(inputs or []):
            np.save(f"{tmp}/in{i}.npy", np.ascontiguousarray(x))
            cmd += ["--input", f"{tmp}/in{i}.npy"]
        if threads:
            cmd += ["--threads", str(threads)]
        if warmup is not None:
            cmd += ["--warmup", str(warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"runner failed ({proc.returncode}): {proc.stderr.strip()}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        outs = [np.load(f"{tmp}/out/output_{i}.npy") for i in range(len(report["outputs"]))]
    return outs, report


# ---------------------------------------------------------------------------------------- CUDA


def cuda_source(compiled: Any) -> str:
    """The CUDA C source of every kernel of a CUDA-target ``CompiledModel``."""
    def walk(mod: Any) -> list[Any]:
        return [mod, *(m for sub in mod.imports for m in walk(sub))]

    sources = [m.inspect_source() for m in walk(compiled.executable.mod) if m.kind == "cuda"]
    if not sources:
        raise UserError(f"the model was built for {compiled.target.kind.name}, not CUDA; use "
                        "--target cuda-sm80 or cuda-sm90")
    return "\n".join(sources)


def kernel_names(source: str) -> set[str]:
    """Names of the ``__global__`` kernels in CUDA source (declared and defined: counted once)."""
    import re

    return set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\s*\(",
                          source))


def nvcc_path() -> str | None:
    """nvcc from PATH, CUDA_HOME or /usr/local/cuda (None when no CUDA toolkit is installed)."""
    for candidate in (shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def cuda_ptx(source: str, arch: str) -> str:
    """PTX for ``arch`` (``sm_80``) from CUDA source with nvcc; no GPU needed."""
    import tvm
    from tvm.support import nvcc

    path = nvcc_path()
    if path is None:
        raise UserError("nvcc is not installed; install a CUDA toolkit (nvcc on PATH or "
                        "CUDA_HOME) to produce PTX offline")
    env_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{os.path.dirname(path)}:{env_path}"
    try:
        with tvm.target.Target({"kind": "cuda", "arch": arch}):
            ptx = nvcc.compile_cuda(source, target_format="ptx", arch=arch, compiler="nvcc")
    finally:
        os.environ["PATH"] = env_path
    return bytes(ptx).decode()


def write_cuda_package(compiled: Any, out_dir: str | Path, *, model_name: str, preset: str,
                       extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """``model.so`` (host code + CUDA kernels, compiled by NVRTC when loaded on a GPU machine),
    ``model.cu`` (the kernels' source) and ``model_<arch>.ptx`` when nvcc is installed."""
    out = Path(out_dir)
    _check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    arch = str(compiled.target.attrs.get("arch", "sm_80"))
    source = cuda_source(compiled)
    compiled.export(out / "model.so")
    (out / "model.cu").write_text(source)
    meta: dict[str, Any] = {"model": model_name, "target": preset, "arch": "cuda",
                            "cuda_arch": arch, "target_str": str(compiled.target),
                            "input": {"name": compiled.spec.name,
                                      "shape": list(compiled.spec.shape),
                                      "dtype": compiled.spec.dtype},
                            "kernels": len(kernel_names(source)), **(extra_meta or {})}
    if nvcc_path() is not None:
        (out / f"model_{arch}.ptx").write_text(cuda_ptx(source, arch))
        meta["ptx"] = f"model_{arch}.ptx"
    else:
        meta["ptx"] = None
        meta["note"] = "no nvcc here: PTX not produced (the library compiles its source on load)"
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    meta["bundle"] = str(out)
    meta["bytes"] = bundle_sizes(out)
    return meta


# ------------------------------------------------------------------------------------- command


def write_artifact(compiled: Any, out_dir: str | Path, *, model_name: str, preset: str,
                   sample: np.ndarray | None = None, extra_meta: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """What a target deploys: the runner bundle for CPU targets, the CUDA package otherwise."""
    if target_arch(compiled.target) == "cuda":
        return write_cuda_package(compiled, out_dir, model_name=model_name, preset=preset,
                                  extra_meta=extra_meta)
    return write_bundle(compiled, out_dir, model_name=model_name, preset=preset, sample=sample,
                        extra_meta=extra_meta)


def compile_command(args: Any, con: Any, target: Any,
                    report: Any = None) -> dict[str, Any]:
    """``tvm-compress compile MODEL --target T -o DIR``: a bundle (CPU) or library + code (CUDA)."""
    from tvm_compress.backend.build import build
    from tvm_compress.frontend.loader import load_from_args as load_model
    from tvm_compress.quant.quantize import folded_weight_bytes

    arch = target_arch(target)
    _check_output_dir(Path(args.output))
    with con.step(f"importing {args.model}"):
        model = load_model(args)
    if arch != "cuda" and len(model.inputs) > 1:
        raise UserError(f"{args.model} has {len(model.inputs)} inputs but the bundle's C++ runner "
                        "feeds one; compile it with -o FILE.so (the library takes every input)")
    extra: dict[str, Any] = {"weight_bytes": folded_weight_bytes(model)}
    if getattr(args, "int8", False):
        model, extra = quantize_default(model, con, target)
    with con.step(f"compiling for {args.target}"):
        compiled = build(model, target=target)
    with con.step(f"writing {args.output} ({arch})"):
        meta = write_artifact(compiled, args.output, model_name=model.name, preset=args.target,
                              extra_meta=extra)
    sizes = meta["bytes"]
    con.table(f"{args.output} ({arch})", ["file", "bytes"], [[k, v] for k, v in sizes.items()])
    if report is not None:  # the CLI's --report / --profile (cli.report.kernel_report)
        meta.update(report(compiled))
    return meta


def quantize_default(model: Any, con: Any, target: Any) -> tuple[Any, dict[str, Any]]:
    """``compile --int8``: the default QuantConfig at the target's preferred weight bits (7 on
    AVX2 without VNNI, the depthwise layers 8; unlike ``quantize --wbits auto`` there is no
    accuracy check here)."""
    from tvm_compress.quant.config import QuantConfig, at_target_bits
    from tvm_compress.quant.quantize import quantize
    from tvm_compress.runtime.evaluation import task_data

    if model.task is None:
        raise UserError(f"compile --int8 calibrates on a zoo model's own data and {model.name} "
                        "has none: run `tvm-compress quantize MODEL --calib FILE.npz -o DIR`, "
                        "then `tvm-compress compress MODEL --plan DIR/plan.json`")
    config = at_target_bits(QuantConfig(), target, model.layers, mod=model.mod)
    calib, _ = task_data(model.task, "calib")
    with con.step(f"quantizing ({config.short()})"):
        qmodel = quantize(model, config, calib, progress=False)
    return qmodel.model, {"quantization": config.to_dict(),
                          "weight_bytes": qmodel.weight_bytes,
                          "fp32_weight_bytes": qmodel.fp32_weight_bytes}
