"""benchmarks/bench_ort_profile.py: ONNX Runtime profile nodes matched to TVM kernels by layer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_ort_profile import _ort_key, match  # noqa: E402


def _node(op: str, data: list[int], out: list[int], ms: float) -> dict:
    return {"op": op, "input": data, "output": out, "ms": ms}


ORT = {
    # fp32 NCHWc conv (shapes as ONNX Runtime reports them: NCHW), a depthwise, the classifier
    "stem_nchwc": _node("Conv", [1, 3, 224, 224], [1, 32, 112, 112], 0.30),
    "dw_nchwc": _node("Conv", [1, 32, 112, 112], [1, 32, 112, 112], 0.10),
    "pw_nchwc": _node("Conv", [1, 32, 112, 112], [1, 16, 112, 112], 0.08),
    "fc": _node("Gemm", [1, 1280], [1, 1000], 0.05),
    "reorder": _node("ReorderOutput", [1, 32, 7, 7], [1, 32, 7, 7], 0.01),
    # int8, channels last, node names with ONNX Runtime's token suffix
    "/q/Conv_token_3": _node("QLinearConv", [1, 56, 56, 24], [1, 56, 56, 144], 0.07),
}
KINDS = {"stem_nchwc": {"op": "Conv", "group": 1, "channels_last": False},
         "dw_nchwc": {"op": "Conv", "group": 32, "channels_last": False},
         "pw_nchwc": {"op": "Conv", "group": 1, "channels_last": False},
         "fc": {"op": "Gemm", "group": 1, "channels_last": False},
         "/q/Conv": {"op": "QLinearConv", "group": 1, "channels_last": True}}


def _kernel(data: list[int], out: list[int], ms: float) -> dict:
    return {"input": data, "output": out, "ms": ms, "calls": 1}


TVM = {"fused_conv2d_nchwc_add_clip": _kernel([1, 1, 224, 224, 4], [1, 4, 112, 112, 8], 0.20),
       "fused_depthwise_conv2d_nchwc_add": _kernel([1, 4, 112, 112, 8], [1, 4, 112, 112, 8],
                                                   0.12),
       "fused_conv2d_nchwc1_add1": _kernel([1, 4, 112, 112, 8], [1, 2, 112, 112, 8], 0.06),
       "fused_conv2d_nchwc_int8_requantize": _kernel([1, 3, 56, 56, 8], [1, 18, 56, 56, 8],
                                                     0.05),
       "fused_matmul_add": _kernel([1, 1280], [1, 1000], 0.04),
       "te_layout_transform": _kernel([1, 3, 224, 224], [1, 1, 224, 224, 4], 0.02)}


def test_keys_read_layout_and_groups() -> None:
    assert _ort_key(ORT["dw_nchwc"], KINDS["dw_nchwc"]) == ("depthwise", (112, 112), 2, 2)
    assert _ort_key(ORT["pw_nchwc"], KINDS["pw_nchwc"]) == ("conv", (112, 112), 2, 1)
    # channels last: channels are the last axis, the spatial size the middle two
    assert _ort_key(ORT["/q/Conv_token_3"], KINDS["/q/Conv"]) == ("conv", (56, 56), 2, 9)
    assert _ort_key(ORT["fc"], KINDS["fc"]) == ("dense", (1, 1000), 80, 63)
    assert _ort_key(ORT["reorder"], None) is None


def test_every_layer_meets_its_counterpart_and_the_rest_is_other() -> None:
    rows = {(r["kind"], tuple(r["output"]), r["in_blocks16"], r["out_blocks16"]): r
            for r in match(ORT, KINDS, TVM)}
    depthwise = rows[("depthwise", (112, 112), 2, 2)]
    assert depthwise["ort_ms"] == pytest.approx(0.10)
    assert depthwise["tvm_ms"] == pytest.approx(0.12)
    assert rows[("conv", (56, 56), 2, 9)]["tvm_kernels"] == [
        "fused_conv2d_nchwc_int8_requantize"]
    assert rows[("dense", (1, 1000), 80, 63)]["tvm_ms"] == pytest.approx(0.04)
    # the 3-channel stem: 4 zero-padded channels in TVM, 3 in ONNX Runtime: one 16-block each
    stem = rows[("conv", (112, 112), 1, 2)]
    assert (stem["ort_ms"], stem["tvm_ms"]) == (pytest.approx(0.30), pytest.approx(0.20))
    assert rows[("conv", (112, 112), 2, 1)]["tvm_kernels"] == ["fused_conv2d_nchwc1_add1"]
    other = rows[("other", (), 0, 0)]
    assert other["ort_nodes"] == ["ReorderOutput:reorder"]
    assert other["tvm_kernels"] == ["te_layout_transform"]
    # nothing counted twice or lost
    assert sum(r["ort_ms"] for r in rows.values()) == pytest.approx(
        sum(n["ms"] for n in ORT.values()))
    assert sum(r["tvm_ms"] for r in rows.values()) == pytest.approx(
        sum(k["ms"] for k in TVM.values()))


def test_keep_faster_keeps_each_kernels_fastest_reading() -> None:
    from bench_int8 import keep_faster

    best: dict[str, dict] = {}
    keep_faster(best, {"a": {"ms": 0.30, "calls": 1}, "b": {"ms": 0.10, "calls": 2}})
    keep_faster(best, {"a": {"ms": 0.20, "calls": 1}, "b": {"ms": 0.15, "calls": 2},
                       "c": {"ms": 0.05, "calls": 1}})
    assert {name: k["ms"] for name, k in best.items()} == {"a": 0.20, "b": 0.10, "c": 0.05}
