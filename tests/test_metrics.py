from __future__ import annotations

import numpy as np
import pytest

from tvm_compress.backend.targets import preset_names, resolve_target
from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import from_torch
from tvm_compress.runtime.metrics import (
    accuracy,
    constant_bytes,
    sqnr_db,
    top1_agreement,
    weight_bytes,
)


def test_accuracy_and_agreement():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert top1_agreement(logits, np.array([[0, 1], [0, 1], [0, 1]])) == pytest.approx(2 / 3)


def test_sqnr():
    ref = np.ones(100)
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(ref + 0.1, ref) == pytest.approx(20.0)  # signal 1, noise 0.01 -> 100x


def test_weight_and_constant_bytes(tiny_cnn, tiny_input):
    from tvm_compress.passes.fold_batch_norm import FoldBatchNorm

    model = from_torch(tiny_cnn, tiny_input)
    n_params = sum(p.numel() for p in tiny_cnn.parameters())
    n_buffers = sum(b.numel() for n, b in tiny_cnn.named_buffers() if "running" in n)
    # every tensor constant: conv weights, BN (4 per channel), linear weight and bias, fp32
    assert constant_bytes(model.mod) == 4 * (n_params + n_buffers)
    # layer weights + biases after folding BN: each conv gains a bias of its out channels
    folded = FoldBatchNorm()(model.mod)
    expected = 16 * 27 + 16 + 16 * 9 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    assert weight_bytes(folded) == 4 * expected
    bits = {"stem.0": 4}  # a 4-bit weight is counted packed: 432 values -> 216 bytes
    assert weight_bytes(folded, bits) == 4 * expected - 4 * 16 * 27 + 16 * 27 // 2


def test_target_presets():
    assert {"x86", "x86-avx2", "aarch64", "aarch64-dotprod", "cuda-sm80"} <= set(preset_names())
    assert resolve_target("aarch64").attrs["mtriple"] == "aarch64-linux-gnu"
    assert resolve_target({"kind": "llvm"}).kind.name == "llvm"
    with pytest.raises(UserError, match="valid presets"):
        resolve_target("llvm -mcpu=haswell")


def test_host_target_drops_features_the_cpu_hides(monkeypatch: pytest.MonkeyPatch) -> None:
    # a KVM guest on Zen 4: LLVM names the CPU znver4 (which implies AVX-512) while CPUID hides
    # AVX-512; a module built for plain znver4 dies there with an illegal instruction
    import tvm

    from tvm_compress.backend.schedules import hardware
    from tvm_compress.backend.targets import is_host_runnable

    with tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}):
        znver4 = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features()}
    assert "avx512f" in znver4
    guest = {f: not f.startswith("avx512") for f in znver4}
    monkeypatch.setattr(tvm.target.codegen, "llvm_get_system_cpu", lambda: "znver4")
    monkeypatch.setattr(hardware, "host_features", lambda: guest)
    host = resolve_target("x86")
    assert host.attrs["mcpu"] == "znver4" and "-avx512f" in list(host.attrs["mattr"])
    assert hardware.vector_bits(host) == 256 and hardware.vnni_lanes(host) == 0
    assert hardware.has_avx2_int8(host)
    assert is_host_runnable(host) and is_host_runnable(resolve_target("x86-avx2"))
    assert not is_host_runnable(resolve_target("x86-vnni"))
    assert hardware.missing_host_features(resolve_target("x86-avx512"))[0] == "avx512f"
