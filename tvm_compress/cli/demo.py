"""`tvm-compress demo`: a zoo model through import -> compile -> evaluate -> bench, as one table."""

from __future__ import annotations

from typing import Any

import numpy as np

from tvm_compress.errors import UserError
from tvm_compress.runtime.metrics import top1_agreement


def run_demo(con: Any, *, model_ref: str = "zoo:mobilenet_v2", repeat: int = 20) -> dict[str, Any]:
    """Run the showcase and print its table; returns everything measured.

    ``con`` is the CLI's console (progress on stderr, tables on stdout).
    """
    from tvm_compress import load
    from tvm_compress.backend.build import build
    from tvm_compress.cli.common import _print_bench, reference_outputs
    from tvm_compress.quant.quantize import folded_weight_bytes
    from tvm_compress.runtime.bench import benchmark
    from tvm_compress.runtime.evaluation import evaluate, task_data

    if not model_ref.startswith("zoo:"):
        raise UserError(f"demo runs on a zoo model (it needs labelled data); got {model_ref!r}")
    with con.step(f"importing {model_ref} (torch.export -> Relax)"):
        model = load(model_ref)
    with con.step("compiling for this CPU (target preset x86)"):
        compiled = build(model, target="x86")
    images, labels = task_data(model.task, "test")
    with con.step(f"evaluating on {len(images)} labelled real images"):
        ref_name, reference = reference_outputs(model, images)
        report = evaluate(compiled, images, labels=labels, reference=reference,
                          weight_bytes=folded_weight_bytes(model), latency_repeat=0)
    with con.step("timing TVM, ONNX Runtime and PyTorch"):
        bench = benchmark(model, compiled=compiled, repeat=repeat)
    int8 = _int8_side_by_side(con, model, images, labels, report["logits"], repeat)
    rows = [
        ["layers", f"{len(model.layers)} ({model.layers.count('depthwise')} depthwise)"],
        ["MACs", f"{model.layers.total_macs:,}"],
        ["weight bytes (fp32)", f"{report['weight_bytes']:,}"],
        ["top-1 on labelled images", f"{report['correct']}/{report['samples']}"],
        [f"top-1 agreement with {ref_name}", f"{report['agreement']:.3f}"],
        [f"max |logit diff| vs {ref_name}", f"{report['max_abs_diff']:.2e}"],
    ]
    con.table(f"tvm-compress demo: {model.name}", ["what", "measured"], rows)
    _print_bench(con, bench)
    _print_int8(con, model.name, bench, report, int8)
    report.pop("logits")
    from tvm_compress.cli.quantune_demo import quantune_demo  # Quantune from the shipped prior

    quantune = quantune_demo(con)
    return {"model": model.name, "layers": len(model.layers), "macs": model.layers.total_macs,
            "evaluation": report, "bench": bench, "int8": int8, "quantune": quantune}


def _int8_side_by_side(con: Any, model: Any, images: np.ndarray, labels: np.ndarray,
                       fp32_logits: np.ndarray, repeat: int) -> dict[str, Any]:
    """Our W8A8 integer model and ONNX Runtime's own quantize_static model, same calibration."""
    from tvm_compress.backend.build import build
    from tvm_compress.backend.targets import host_cores
    from tvm_compress.quant.config import QuantConfig
    from tvm_compress.quant.ort_quant import ort_quantize_static
    from tvm_compress.quant.quantize import quantize
    from tvm_compress.runtime.bench import onnx_of, onnxruntime_session, time_callable
    from tvm_compress.runtime.evaluation import evaluate, task_data

    calib, _ = task_data(model.task, "calib")
    config = QuantConfig(calib_samples=len(calib))
    with con.step(f"quantizing in TVM ({config.short()}, {len(calib)} calibration samples)"):
        qmodel = quantize(model, config, calib, progress=False)
        compiled = build(qmodel.model, target="x86")
        ours = evaluate(compiled, images, labels=labels, reference=fp32_logits,
                        latency_repeat=repeat)
    with con.step("quantizing with ONNX Runtime's quantize_static (same calibration data)"):
        x = images[:1]
        session = onnxruntime_session(ort_quantize_static(onnx_of(model, x), calib),
                                      threads=host_cores())
        name = session.get_inputs()[0].name
        ort_logits = np.concatenate([session.run(None, {name: images[i:i + 1]})[0]
                                     for i in range(len(images))])
        ort_ms = time_callable(lambda: session.run(None, {name: x}), repeat=repeat,
                               warmup=3).median_ms
    return {"config": config.to_dict(), "fp32_layers": qmodel.fp32_layers,
            "weight_bytes": qmodel.weight_bytes, "fp32_weight_bytes": qmodel.fp32_weight_bytes,
            "tvm": {"correct": ours["correct"], "agreement": ours["agreement"],
                    "latency_ms": ours["latency"]["median_ms"]},
            "onnxruntime": {"correct": int(np.sum(np.argmax(ort_logits, 1) == labels)),
                            "agreement": top1_agreement(ort_logits, fp32_logits),
                            "latency_ms": ort_ms}}


def _print_int8(con: Any, name: str, bench: dict[str, Any], fp32: dict[str, Any],
                int8: dict[str, Any]) -> None:
    n = fp32["samples"]
    rows = [
        ["TVM fp32", f"{fp32['correct']}/{n}", "1.000", f"{int8['fp32_weight_bytes']:,}",
         f"{bench['tvm']['median_ms']:.2f}"],
        ["TVM int8 (tvm-compress)", f"{int8['tvm']['correct']}/{n}",
         f"{int8['tvm']['agreement']:.3f}", f"{int8['weight_bytes']:,}",
         f"{int8['tvm']['latency_ms']:.2f}"],
        ["ONNX Runtime fp32", "-", "-", "-", f"{bench['onnxruntime']['median_ms']:.2f}"],
        ["ONNX Runtime int8 (quantize_static)", f"{int8['onnxruntime']['correct']}/{n}",
         f"{int8['onnxruntime']['agreement']:.3f}", "-",
         f"{int8['onnxruntime']['latency_ms']:.2f}"],
    ]
    con.table(f"{name}: fp32 vs int8", ["model", "top-1", "agreement", "weight bytes",
                                        "latency ms"], rows)
