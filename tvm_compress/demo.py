"""`tvm-compress demo`: a zoo model through import -> compile -> evaluate -> bench, as one table."""

from __future__ import annotations

from typing import Any

from tvm_compress.errors import UserError


def run_demo(con: Any, *, model_ref: str = "zoo:mobilenet_v2", repeat: int = 20) -> dict[str, Any]:
    """Run the showcase and print its table; returns everything measured.

    ``con`` is the CLI's console (progress on stderr, tables on stdout).
    """
    from tvm_compress import load
    from tvm_compress.bench import benchmark
    from tvm_compress.cli import _print_bench, reference_outputs
    from tvm_compress.compiler import build
    from tvm_compress.evaluation import evaluate, task_data
    from tvm_compress.quantize import folded_weight_bytes

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
    report.pop("logits")
    return {"model": model.name, "layers": len(model.layers), "macs": model.layers.total_macs,
            "evaluation": report, "bench": bench}
