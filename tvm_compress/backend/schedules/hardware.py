"""What the schedules need to know about a CPU target: SIMD lanes, vector registers, cores."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import tvm
from tvm.target.codegen import target_has_features


def _has(feature: str, target: tvm.target.Target) -> bool:
    try:
        return bool(target_has_features(feature, target))
    except (RuntimeError, ValueError):  # a feature name unknown to this target's LLVM backend
        return False


def is_aarch64(target: tvm.target.Target) -> bool:
    """Whether ``target`` compiles for 64-bit ARM."""
    triple = str(target.attrs.get("mtriple", ""))
    return triple.startswith(("aarch64", "arm64"))


def vector_bits(target: tvm.target.Target) -> int:
    """Width of one SIMD register in bits.

    ``llvm_get_vector_width`` reports 512 for AVX2-only CPUs such as znver3, so the width is
    derived from the target's features instead.
    """
    if is_aarch64(target):
        return 128
    if _has("avx512f", target):
        return 512
    if _has("avx", target):
        return 256
    return 128


def vector_lanes(target: tvm.target.Target, dtype_bits: int = 32) -> int:
    """How many elements of ``dtype_bits`` one SIMD register holds."""
    return max(vector_bits(target) // dtype_bits, 1)


def vector_registers(target: tvm.target.Target) -> int:
    """Architectural SIMD registers: 32 on AArch64 and AVX-512, 16 on AVX/SSE."""
    if is_aarch64(target) or _has("avx512f", target):
        return 32
    return 16


def host_features() -> dict[str, bool]:
    """LLVM's view of this CPU's features (CPUID and the register state the OS enables)."""
    import tvm_ffi

    query = tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")
    return {str(k): bool(v) for k, v in query().items()}


def host_cpu() -> dict[str, object]:
    """This CPU as LLVM target attributes: ``mcpu`` and the ``mattr`` that correct it.

    LLVM names the CPU from its family and model (``znver4``), which implies that model's full
    feature set. A virtual machine may hide some of it: a KVM guest on Zen 4 reports
    ``znver4`` without AVX-512, and code built for plain ``znver4`` dies there with an illegal
    instruction. ``mattr`` switches off what the CPU name implies but this CPU does not report
    (LLVM's host feature query: CPUID and the state the OS enables), and on what it reports but
    the name does not imply.
    """
    mcpu = str(tvm.target.codegen.llvm_get_system_cpu())
    host = host_features()
    with tvm.target.Target({"kind": "llvm", "mcpu": mcpu}):
        implied = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features()}
    mattr = [f"-{f}" for f, on in sorted(host.items()) if not on and f in implied]
    mattr += [f"+{f}" for f, on in sorted(host.items()) if on and f not in implied]
    return {"mcpu": mcpu, "mattr": mattr} if mattr else {"mcpu": mcpu}


# instruction-set extensions whose absence makes a module fail with an illegal instruction
_ISA = ("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
        "avx512vnni", "avx512vbmi", "avx512bf16", "avx512fp16", "avxvnni", "amx-int8")


def missing_host_features(target: tvm.target.Target) -> list[str]:
    """The ISA extensions ``target`` may use that this CPU lacks (empty: it runs here)."""
    host = host_features()
    return [f for f in _ISA if _has(f, target) and not host.get(f, False)]


def host_cores() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    """The host CPU's model name (``/proc/cpuinfo``), for results files."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def num_cores(target: tvm.target.Target) -> int:
    """The target's ``num-cores``, else the cores this process may use."""
    cores = target.attrs.get("num-cores")
    if cores is not None and int(cores) > 0:
        return int(cores)
    return host_cores()


def has_avx2_int8(target: tvm.target.Target) -> bool:
    """Whether the AVX2 int8 micro-kernel (``int8_intrin``) is the one to use: AVX2, 256-bit
    registers (AVX-512 targets pack 16 channels, which that kernel does not cover)."""
    return not is_aarch64(target) and _has("avx2", target) and vector_bits(target) == 256


def vnni_lanes(target: tvm.target.Target) -> int:
    """int32 lanes of the widest ``vpdpbusd`` the target has: 16 with AVX512-VNNI (8 too, on
    ymm, with AVX512-VL), 8 with AVX-VNNI only, 0 without VNNI."""
    if is_aarch64(target):
        return 0
    if _has("avx512vnni", target) and _has("avx512bw", target):
        return 16 if _has("avx512vl", target) else 0
    return 8 if _has("avxvnni", target) else 0


def preferred_weight_bits(target: tvm.target.Target) -> int:
    """Weight bits the CLI quantizes to by default on ``target``: 7 on x86 with AVX2 and no
    VNNI, 8 elsewhere.

    Without VNNI the fast AVX2 step (``vpmaddubsw``, u8 x s8 pairs summed into int16) is exact only
    when no pair sum can saturate, which 7-bit weights guarantee; 8-bit weights take the exact
    int16 path (``vpmaddwd`` on a widened copy of the input), about 1.3x slower over the corpus
    (``benchmarks/results/corpus_avx2.md``: int8 / fp32 geomean 0.78x at 8 bits, 0.60x at 7; at
    or below 0.8x on 16 of 27 models at 8 bits, 24 of 27 at 7). VNNI (``vpdpbusd``) and NEON
    ``sdot`` are exact at 8 bits, and targets without an int8 kernel gain nothing from 7 bits.
    """
    return 7 if has_avx2_int8(target) and vnni_lanes(target) == 0 else 8


# Depthwise layers whose fp32 input is at most this size stay fp32 where they feed a float
# island (see preferred_weight_overrides): the 4x larger activations still fit a core's L2.
FLOAT_DEPTHWISE_BYTES = 1 << 20
FP32 = 32  # preferred_weight_overrides' "bits" for a layer kept in fp32


def preferred_weight_overrides(target: tvm.target.Target, layers: Iterable[Any],
                               mod: tvm.IRModule | None = None) -> dict[str, int]:
    """Layers (of a LayerTable) that keep 8-bit weights, or ``FP32``, where
    ``preferred_weight_bits`` says 7.

    On AVX2 without VNNI the depthwise int8 kernel computes in fp32 arithmetic
    (``depthwise_int8.py``), exact and just as fast with 8-bit weights; and depthwise layers are
    the ones fewer weight bits hurt most (MobileNetV2, 20 labelled photos: 16/20 top-1 with every
    layer at 7 bits, 18/20 with the depthwise layers at 8, as with all layers at 8).

    With the model's module ``mod``, a depthwise layer whose output goes through a float island
    (hardswish, SiLU, a squeeze-and-excitation gate: ``dataflow.feeds_float_island``) and whose
    fp32 input fits ``FLOAT_DEPTHWISE_BYTES`` stays fp32: its int8 kernel would add the u8 ->
    fp32 conversions, the requantization and the island's table or float epilogue to the same
    FMAs, while the fp32 kernel computes the island in registers. Measured (AVX2 host, whole models,
    int8 / fp32 with every depthwise layer int8, then with this rule): EfficientNet-B0 0.83 ->
    0.77, MobileNetV3-Large 0.67 -> 0.61, the PaddleOCR classifiers 0.94 -> 0.82 and 1.07 ->
    0.94, PP-PicoDet at 800 x 608 0.78 either way. Every depthwise layer fp32 (no rule) made
    ShuffleNetV2 (no island) 0.55 -> 0.64 and PP-PicoDet (large activations) 0.77 -> 0.83.
    """
    if preferred_weight_bits(target) == 8:
        return {}
    islands: set[str] = set()
    if mod is not None:
        from tvm_compress.frontend.layers import scan_layers
        from tvm_compress.graph.dataflow import DataflowView, feeds_float_island

        view = DataflowView.of(mod["main"])
        islands = {layer.name for var, layer in scan_layers(mod["main"])
                   if layer.kind == "depthwise"
                   and 4 * math.prod(layer.input_shape) <= FLOAT_DEPTHWISE_BYTES
                   and feeds_float_island(view, var)}
    return {layer.name: FP32 if layer.name in islands else 8
            for layer in layers if layer.kind == "depthwise"}


def has_sdot(target: tvm.target.Target) -> bool:
    """Whether the target has the NEON dot product (``sdot``, Armv8.2 ``+dotprod``)."""
    return is_aarch64(target) and _has("dotprod", target)


def has_int8_kernel(target: tvm.target.Target) -> bool:
    """Whether integer convolutions get a tensorized micro-kernel (AVX2, VNNI or NEON
    ``sdot``) on ``target``, and so are packed to the blocked layout with their neighbours."""
    return has_avx2_int8(target) or vnni_lanes(target) > 0 or has_sdot(target)


def has_vbmi(target: tvm.target.Target) -> bool:
    """Whether the target permutes bytes across a whole register (AVX512-VBMI ``vpermb``)."""
    return _has("avx512vbmi", target)
