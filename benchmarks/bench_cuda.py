"""CUDA: compile here, run and time on an NVIDIA GPU, compare with PyTorch on the same GPU.

Three steps, because the build machine has no GPU and the GPU machine has no TVM compiler:

1. ``prepare`` (this machine): builds fp32 and W8A8 (realized integer) modules of MobileNetV2
   and two Fashion-MNIST zoo models for ``--target`` (default ``cuda-sm90``, the H100), exports
   each as a library holding its CUDA kernels' source, and writes for each model a fixed input,
   the x86 build's output on it (the reference) and the torch weights, into ``--dir``.
   It also stages the TVM *runtime* (the apache-tvm wheel's Python package without the compiler
   library) and an apache-tvm-ffi wheel for the GPU machine's Python.
2. ``device`` (the GPU machine, runtime-only TVM: ``TVM_USE_RUNTIME_LIB=1``): loads each library
   (its CUDA source is compiled on load by ``tvm_callback_cuda_compile``), runs it on ``cuda:0``,
   checks the output against the x86 reference, times ``main`` with the runtime's time evaluator,
   and times the same torch model in eager PyTorch on the same GPU (CUDA events, cudnn
   autotuning on). Writes ``cuda_device.json``.
3. ``report`` (this machine): merges that file with the build facts into
   ``benchmarks/results/cuda.json`` and ``cuda.md``.

    .venv/bin/python benchmarks/bench_cuda.py prepare
    # on the GPU machine, from the repository root:
    python3 benchmarks/bench_cuda.py device --dir .gpu --out OUTDIR
    .venv/bin/python benchmarks/bench_cuda.py report --device-json OUTDIR/cuda_device.json
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# (zoo name, batch): MobileNetV2 as the headline, two small Fashion-MNIST models
MODELS = (("mobilenet_v2", 1), ("mobilenet_v2", 16), ("fmnist_resnet", 1),
          ("fmnist_mobilenet_v2", 1))
TVM_VERSION = "0.27.0.post1"


# ------------------------------------------------------------------------------------ prepare
def batch_input(x1, batch: int):  # noqa: ANN001, ANN201
    """A batch made from one stored sample (scaled copies), rebuilt the same way on both sides."""
    import numpy as np

    return np.concatenate([x1 * np.float32(1 + 0.01 * k) for k in range(batch)]).astype("float32")


def _xz(path: Path) -> Path:
    packed = path.with_suffix(path.suffix + ".xz")
    packed.write_bytes(lzma.compress(path.read_bytes(), preset=6))
    path.unlink()
    return packed


def _stage_runtime(out: Path) -> dict[str, int]:
    """The apache-tvm Python package minus its compiler library, and a cp312 tvm-ffi wheel."""
    from gpu_steps import FFI_VERSION, download_wheel

    download_wheel("apache-tvm-ffi", FFI_VERSION, out / "wheels")
    runtime = out / "tvm_runtime.zip"
    if not runtime.exists():
        src = download_wheel("apache-tvm", TVM_VERSION, out / "tvm_wheel")
        # repack without libtvm_compiler.so (260 MB): the GPU machine only loads and runs modules
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(runtime, "w",
                                                            zipfile.ZIP_DEFLATED) as zout:
            for item in zin.infolist():
                if item.filename.startswith("tvm/") and not item.filename.endswith(
                        "libtvm_compiler.so") and "/__pycache__/" not in item.filename:
                    zout.writestr(item, zin.read(item.filename))
        src.unlink()  # 100 MB: must not travel to the GPU machine
    return {"tvm_runtime.zip": runtime.stat().st_size}


def prepare(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from tvm_compress import load
    from tvm_compress.backend.build import build
    from tvm_compress.quant.config import QuantConfig
    from tvm_compress.quant.quantize import quantize
    from tvm_compress.runtime.evaluation import task_data
    from tvm_compress.zoo import torch_model

    out = Path(args.dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    manifest: dict = {"target": args.target, "models": [], "staged": _stage_runtime(out)}
    rng = np.random.default_rng(0)
    for name, batch in MODELS:
        model = load(f"zoo:{name}", batch=batch)
        one = out / "models" / f"{name}_input.npy"
        if not one.exists():
            x1 = rng.standard_normal((1, *model.input_shape[1:])).astype("float32")
            if name.startswith("fmnist_"):
                x1 = task_data(model.task, "val")[0][:1].astype("float32")
            np.save(one, x1)
        x = batch_input(np.load(one), batch)
        calib, _ = task_data(model.task, "calib")
        qmodel = quantize(model, QuantConfig(), calib, progress=False)
        tag = f"{name}_b{batch}"
        # PyTorch baseline on the GPU: the small models as TorchScript with their weights;
        # MobileNetV2 is rebuilt there from torchvision's definition with random weights
        # (14 MB less to carry; eager latency does not depend on the weight values)
        if name != "mobilenet_v2" and not (out / "models" / f"{name}.pt").exists():
            torch.jit.save(torch.jit.trace(torch_model(name), torch.from_numpy(x)),
                           str(out / "models" / f"{name}.pt"))
        for kind, m in (("fp32", model), ("int8", qmodel.model)):
            t0 = time.perf_counter()
            compiled = build(m, target=args.target)
            build_s = time.perf_counter() - t0
            lib = out / "models" / f"{tag}_{kind}.so"
            compiled.export(lib)
            lib_bytes = lib.stat().st_size
            lib = _xz(lib)
            ref = build(m, target="x86").run(x)
            np.save(out / "models" / f"{tag}_{kind}_ref.npy", ref)
            manifest["models"].append({
                "name": name, "batch": batch, "kind": kind, "lib": lib.name,
                "input": one.name, "reference": f"{tag}_{kind}_ref.npy",
                "torch_weights": (None if kind != "fp32" else
                                  "torchvision-random" if name == "mobilenet_v2" else f"{name}.pt"),
                "build_s": round(build_s, 2), "lib_bytes": lib_bytes,
                "weight_bytes": (qmodel.weight_bytes if kind == "int8"
                                 else qmodel.fp32_weight_bytes)})
            print(f"{tag} {kind}: built in {build_s:.1f} s, {lib_bytes / 1e6:.2f} MB",
                  flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"staged {total / 2**20:.1f} MiB in {out}")
    return 0


# ------------------------------------------------------------------------------------- device
def _torch_module(name: str, weights: Path):  # noqa: ANN202
    """MobileNetV2: torchvision's architecture + the zoo weights; the others: TorchScript."""
    import torch

    if name != "mobilenet_v2":
        return torch.jit.load(str(weights), map_location="cpu").eval()
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2().eval()  # random weights: timing only


def _torch_cuda_ms(net, x, *, repeat: int, warmup: int = 20) -> list[float]:  # noqa: ANN001
    import torch

    torch.backends.cudnn.benchmark = True
    net = net.cuda()
    xd = torch.from_numpy(x).cuda()
    out = None
    with torch.inference_mode():
        for _ in range(warmup):
            out = net(xd)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            net(xd)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return times, out.float().cpu().numpy()


def _register_nvcc_jit(arch: str, *, fast_math: bool = True) -> None:
    """The runtime compiles a library's CUDA source on load through ``tvm_callback_cuda_compile``.

    TVM's own callback asks the compiler library for the current target, which a runtime-only
    install does not have; this one calls nvcc with TVM's flags for a fixed architecture.
    """
    import tempfile

    import tvm_ffi

    def compile_source(code: str, *_: object) -> bytearray:
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
            src.write_text(code)
            num = arch.removeprefix("sm_")
            subprocess.run(["nvcc", "--fatbin", "-O3", "-gencode",
                            f"arch=compute_{num},code=sm_{num}",
                            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                            "--expt-relaxed-constexpr",
                            *(["--use_fast_math"] if fast_math else ["-fmad=false"]),
                            "-o", str(out), str(src)], check=True, capture_output=True)
            return bytearray(out.read_bytes())

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_source, override=True)


def device(args: argparse.Namespace) -> int:
    import numpy as np

    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    import tvm
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                    extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    from tvm.runtime import vm as rvm

    _register_nvcc_jit(args.arch)

    src = Path(args.dir)
    manifest = json.loads((src / "manifest.json").read_text())
    dev = tvm.cuda(0)
    if not dev.exist:
        print("no CUDA device visible to TVM", file=sys.stderr)
        return 2
    info = {"gpu": dev.device_name, "compute_version": dev.compute_version,
            "python": platform.python_version(), "tvm_runtime_only": True}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_gpu"] = torch.cuda.get_device_name(0)
    except Exception as err:  # noqa: BLE001
        info["torch_error"] = repr(err)
    print(json.dumps(info), flush=True)
    rows = []
    models = src / "models"
    for entry in manifest["models"]:
        row = dict(entry)
        x = batch_input(np.load(models / entry["input"]), entry["batch"])
        ref = np.load(models / entry["reference"])
        try:
            t0 = time.perf_counter()
            so = Path("/tmp") / entry["lib"].removesuffix(".xz")
            so.write_bytes(lzma.decompress((models / entry["lib"]).read_bytes()))
            lib = tvm.runtime.load_module(str(so))  # CUDA source -> nvcc -> fatbin
            machine = rvm.VirtualMachine(lib, dev)
            xd = tvm.runtime.tensor(x, dev)
            y = machine["main"](xd).numpy()
            row["load_and_first_run_s"] = round(time.perf_counter() - t0, 2)
            row["max_abs_diff_vs_x86"] = float(np.abs(y.astype("float64") - ref).max())
            row["argmax_agree_vs_x86"] = float((y.argmax(-1) == ref.argmax(-1)).mean())
            machine.set_input("main", xd)
            timer = machine.time_evaluator("invoke_stateful", dev, number=args.number,
                                           repeat=args.repeat, min_repeat_ms=0)
            ms = sorted(1000.0 * t for t in timer("main").results)
            row["tvm_ms"] = {"median": float(np.median(ms)), "p10": ms[len(ms) // 10],
                             "p90": ms[(9 * len(ms)) // 10], "repeat": len(ms),
                             "number": args.number}
            if entry["kind"] == "int8":  # same library, kernels compiled without fast math
                _register_nvcc_jit(args.arch, fast_math=False)
                precise = rvm.VirtualMachine(tvm.runtime.load_module(str(so)), dev)
                y2 = precise["main"](xd).numpy()
                row["precise_max_abs_diff_vs_x86"] = float(np.abs(y2.astype("float64")
                                                                  - ref).max())
                precise.set_input("main", xd)
                t2 = precise.time_evaluator("invoke_stateful", dev, number=args.number,
                                            repeat=args.repeat, min_repeat_ms=0)
                row["precise_tvm_ms"] = float(np.median([1000.0 * t for t in
                                                         t2("main").results]))
                _register_nvcc_jit(args.arch)
        except Exception as err:  # noqa: BLE001 - record the failure, go on with the others
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[-1][:400]}"
        if entry.get("torch_weights") and "torch" in info:
            try:
                net = _torch_module(entry["name"], models / entry["torch_weights"])
                times, tout = _torch_cuda_ms(net, x, repeat=args.repeat * args.number)
                row["torch_cuda_ms"] = {"median": float(np.median(times)), "repeat": len(times)}
                if entry["torch_weights"] != "torchvision-random":
                    row["torch_max_abs_diff_vs_x86"] = float(np.abs(tout - ref).max())
            except Exception as err:  # noqa: BLE001
                row["torch_error"] = f"{type(err).__name__}: {err}"[:400]
        print(json.dumps({k: row.get(k) for k in ("lib", "tvm_ms", "torch_cuda_ms",
                                                  "max_abs_diff_vs_x86", "error",
                                                  "precise_max_abs_diff_vs_x86",
                                                  "precise_tvm_ms")}), flush=True)
        rows.append(row)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "cuda_device.json").write_text(json.dumps({"device": info, "rows": rows},
                                                        indent=1))
    return 0


# ------------------------------------------------------------------------------------- report
def report(args: argparse.Namespace) -> int:
    data = json.loads(Path(args.device_json).read_text())
    info, rows = data["device"], data["rows"]
    data["measured_on"] = args.when or time.strftime("%Y-%m-%d")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cuda.json").write_text(json.dumps(data, indent=1))
    fp32 = {(r["name"], r["batch"]): r for r in rows if r["kind"] == "fp32"}
    lines = [
        "# CUDA: TVM (dlight default GPU schedules) vs eager PyTorch on the same GPU",
        "",
        f"GPU: {info.get('gpu')} (compute {info.get('compute_version')}); TVM {TVM_VERSION} "
        f"runtime only on the GPU machine, modules compiled on the 2-core x86 build machine for "
        f"`cuda-sm90`; PyTorch {info.get('torch')} eager, cudnn.benchmark on, CUDA-event timing. "
        "Latency = median over the timed runs, milliseconds. `diff` = max |output - x86 build "
        "output| on the same input. Measured by `benchmarks/bench_cuda.py`.",
        "",
        "| model | batch | kind | TVM ms | PyTorch ms | TVM / PyTorch | int8 / fp32 (TVM) "
        "| diff vs x86 | top-1 agree | library MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['batch']} | {r['kind']} | failed: {r['error']} "
                         "| | | | | | |")
            continue
        tvm_ms = r["tvm_ms"]["median"]
        base = fp32.get((r["name"], r["batch"]), {})
        torch_ms = base.get("torch_cuda_ms", {}).get("median")
        ratio = f"{tvm_ms / torch_ms:.2f}x" if torch_ms else ""
        q = (f"{tvm_ms / base['tvm_ms']['median']:.2f}x"
             if r["kind"] == "int8" and "tvm_ms" in base else "")
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['kind']} | {tvm_ms:.3f} | "
            f"{torch_ms:.3f} | {ratio} | {q} | {r['max_abs_diff_vs_x86']:.2e} | "
            f"{r['argmax_agree_vs_x86']:.2f} | {r['lib_bytes'] / 1e6:.2f} |"
            if torch_ms else
            f"| {r['name']} | {r['batch']} | {r['kind']} | {tvm_ms:.3f} | | | {q} | "
            f"{r['max_abs_diff_vs_x86']:.2e} | {r['argmax_agree_vs_x86']:.2f} | "
            f"{r['lib_bytes'] / 1e6:.2f} |")
    precise = [r for r in rows if "precise_tvm_ms" in r]
    lines += [
        "",
        "PyTorch: MobileNetV2 runs torchvision's definition with random weights (eager latency "
        "does not depend on the weight values; the weights are not carried to the GPU machine); "
        "the Fashion-MNIST models run as TorchScript with their trained weights. At batch 1 eager "
        "PyTorch is bound by kernel launches from Python, which TVM's VM avoids.",
        "",
        "int8 on the GPU runs the realized integer graph through dlight's default schedules: "
        "no int8 tensor-core schedules (nvcc may still turn the int8 loops into dp4a). On "
        "MobileNetV2 int8 is therefore slower than "
        "fp32 on the GPU (its large int8 convolutions fall back to generic schedules); on the "
        "small Fashion-MNIST models it is faster. The x86 int8 micro-kernels do not apply to CUDA.",
        "",
        "Exactness: the Fashion-MNIST int8 modules equal the x86 build bit for bit. MobileNetV2 "
        "int8 differs (max |logit diff| above, top-1 identical). The graph's one float step is the "
        "likely source (not isolated on the GPU): the last block is dequantized, averaged in "
        "float32 (global pool) and re-quantized, and a GPU reduction sums the 49 values in another "
        "order, so a pooled value near a rounding boundary lands on the neighbouring step. "
        "Every other step is integer arithmetic. Compiling "
        "the kernels without fast math (`-fmad=false`) gives "
        + ", ".join(f"{r['name']} b{r['batch']}: diff {r['precise_max_abs_diff_vs_x86']:.3g}, "
                    f"{r['precise_tvm_ms']:.3f} ms" for r in precise) + ".",
    ]
    (RESULTS / "cuda.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    from gpu_steps import dir_option, out_option, run_steps

    return run_steps(__doc__, {
        "prepare": (prepare, [dir_option(ROOT / ".gpu"), ("--target", {"default": "cuda-sm90"})]),
        "device": (device, [dir_option(ROOT / ".gpu"), out_option(),
                            ("--arch", {"default": "sm_90"}),
                            ("--number", {"type": int, "default": 10}),
                            ("--repeat", {"type": int, "default": 30})]),
        "report": (report, [("--device-json", {"required": True}), ("--when", {"default": None})]),
    }, argv)


if __name__ == "__main__":
    raise SystemExit(main())
