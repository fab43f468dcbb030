"""Packed sub-8-bit weights in the compiled artifact: size and unpack cost.

For 8/6/4/2-bit weights (symmetric, per-channel; activations 8-bit asymmetric) of MobileNetV2
(ImageNet) and the Fashion-MNIST MobileNetV2, the quantized module is lowered once by the default
CPU schedule pipeline and compiled twice: as it is (weights stored as int8 / integer-valued
float32) and with ``PackConstants`` (bit-packed uint8 streams unpacked inside ``main``). Reports
the exported ``.so`` size, the bytes of the large (>= 256 element) constants, the real-bit-width
weight bytes, the latency of both builds (interleaved) and whether their outputs are identical.
Writes benchmarks/results/pack_weights.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

import tvm_compress as tc
from tvm_compress.backend.build import CompiledModel, InputSpec
from tvm_compress.backend.schedules import default_schedule_pipeline
from tvm_compress.backend.targets import resolve_target
from tvm_compress.data import fashion_mnist, real_photos
from tvm_compress.passes.pack_constants import PackConstants
from tvm_compress.quant.config import QuantConfig, QuantSpec
from tvm_compress.quant.quantize import collect_calibration, quantize

RESULTS = Path(__file__).parent / "results"


def large_constant_bytes(mod: tvm.IRModule) -> int:
    total = 0

    def visit(expr: relax.Expr) -> None:
        nonlocal total
        if isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, tvm.runtime.Tensor):
            arr = expr.value.numpy()
            if arr.size >= 256 or arr.dtype == np.uint8:
                total += arr.nbytes

    relax.analysis.post_order_visit(mod["main"], visit)
    return total


def so_bytes(executable, tmp: Path, name: str) -> int:  # noqa: ANN001
    path = tmp / f"{name}.so"
    executable.export_library(str(path))
    return path.stat().st_size


def measure(name: str, model, calib: np.ndarray, images: np.ndarray, bits: int, stats,  # noqa: ANN001
            repeat: int, tmp: Path) -> dict:
    config = QuantConfig(weight=QuantSpec(bits, "symmetric", "per_channel"),
                         calib_samples=len(calib))
    q = quantize(model, config, calib, progress=False, stats=stats)
    target = resolve_target("x86")
    spec = InputSpec(model.input_name, model.input_shape, model.input_dtype)
    with target:
        lowered = default_schedule_pipeline(target)(q.model.mod)
    packed = PackConstants()(lowered)
    plain_c = CompiledModel(tvm.compile(lowered, target=target), target, spec)
    packed_c = CompiledModel(tvm.compile(packed, target=target), target, spec)
    same = bool(np.array_equal(plain_c.predict(images), packed_c.predict(images)))
    plain_ms, packed_ms = [], []
    for _ in range(3):  # interleaved rounds against load drift
        plain_ms.append(plain_c.latency(repeat=repeat).median_ms)
        packed_ms.append(packed_c.latency(repeat=repeat).median_ms)
    return {"model": name, "weight_bits": bits, "config": config.short(),
            "weight_bytes_real_bits": q.weight_bytes, "fp32_weight_bytes": q.fp32_weight_bytes,
            "so_bytes_plain": so_bytes(plain_c.executable, tmp, f"{name}{bits}p"),
            "so_bytes_packed": so_bytes(packed_c.executable, tmp, f"{name}{bits}k"),
            "constant_bytes_plain": large_constant_bytes(lowered),
            "constant_bytes_packed": large_constant_bytes(packed),
            "outputs_identical": same, "latency_ms_plain": min(plain_ms),
            "latency_ms_packed": min(packed_ms)}


def write(rows: list[dict]) -> None:
    path = RESULTS / "pack_weights.json"
    if path.exists():  # keep rows of other (model, bits) measured before
        mine = {(r["model"], r["weight_bits"]) for r in rows}
        rows = [r for r in json.loads(path.read_text())["rows"]
                if (r["model"], r["weight_bits"]) not in mine] + rows
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_average": [round(v, 2) for v in os.getloadavg()], "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pack_weights.json").write_text(json.dumps(result, indent=2))
    lines = ["# Packed sub-8-bit weights in the compiled artifact", "",
             "Weights symmetric per-channel at the given bits, activations 8-bit; x86 (znver3 "
             "preset, default schedules). plain = lowered module compiled as it is; packed = "
             "with `PackConstants` (what `compiler.build` does by default). constant bytes = "
             "constants of >= 256 elements plus the packed streams. Latency: batch 1, best of "
             f"3 interleaved medians. Machine: {result['machine']}, shared; load average "
             f"{result['load_average']}.", "",
             "| model | w bits | weight bytes (real bits) | .so plain | .so packed | "
             "constants plain | constants packed | ms plain | ms packed | outputs identical |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['weight_bits']} | {r['weight_bytes_real_bits']:,} | "
                     f"{r['so_bytes_plain']:,} | {r['so_bytes_packed']:,} | "
                     f"{r['constant_bytes_plain']:,} | {r['constant_bytes_packed']:,} | "
                     f"{r['latency_ms_plain']:.2f} | {r['latency_ms_packed']:.2f} | "
                     f"{'yes' if r['outputs_identical'] else 'NO'} |")
    (RESULTS / "pack_weights.md").write_text("\n".join(lines) + "\n")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", nargs="*", type=int, default=[8, 6, 4, 2])
    parser.add_argument("--models", nargs="*", default=["fmnist_mobilenet_v2", "mobilenet_v2"])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = tc.load(f"zoo:{name}")
            if name == "mobilenet_v2":
                calib, images = real_photos("calib", n=16), real_photos("eval", n=4)
            else:
                calib, images = fashion_mnist("calib")[0][:100], fashion_mnist("test")[0][:16]
            stats = collect_calibration(model, QuantConfig(calib_samples=len(calib)), calib,
                                        progress=False)
            for bits in args.bits:
                rows.append(measure(name, model, calib, images, bits, stats, args.repeat,
                                    Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
                write(rows)
if __name__ == "__main__":
    main()
