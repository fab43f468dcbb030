"""Accuracy of the short requantization mantissas (``realize_integer.mantissa_bits``) against
31-bit ones, on MobileNetV2 and the real-model corpus.

``RealizeInteger`` gives convs whose accumulators are small enough (depthwise, narrow 1x1)
per-channel mantissas of 12+ bits, so that the requantization is one 32-bit multiply; every other
layer keeps 31 bits. Both integer models come from the same quantized (QDQ) model and differ in
nothing else; each is compared with TVM fp32 on held-out samples (top-1 agreement where the
outputs are classes, the lowest SQNR over the outputs), and with each other (the share of
samples whose outputs are identical). No timing here: bench_int8 / bench_corpus time them.

    python benchmarks/bench_mantissa.py                 # MobileNetV2 + the whole corpus
    python benchmarks/bench_mantissa.py --models mobilenet_v2 rapidocr_cls
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
from bench_corpus import _outputs, _quality, _quality_cell  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ZOO = "mobilenet_v2"


def short_layers(mod: Any) -> tuple[int, int]:
    """(requantizations with short mantissas, all conv / matmul requantizations) of a realized
    module: the int64 multiplies of an int32 accumulator, short where every multiplier is below
    2**30 (31-bit mantissas are at least 2**30, or 0)."""
    import tvm

    from tvm_compress.graph.dataflow import bindings, op_name

    values = {b.var: b.value for b in bindings(mod["main"])}
    short = total = 0
    for value in values.values():
        if op_name(value) != "relax.multiply" or \
                not isinstance(value.args[1], tvm.ir.expr.Constant):
            continue
        cast = values.get(value.args[0])
        if op_name(cast) != "relax.astype" or str(cast.args[0].ty.dtype) != "int32":
            continue
        m = value.args[1].value.numpy()
        total += 1
        short += int(np.all(m < 2**30))
    return short, total


def _data(name: str, n: int) -> tuple[Any, Any, dict, dict]:
    """(model, corpus entry or None, calibration feed, held-out feed)."""
    import tvm_compress as tc
    from tvm_compress.data import real_photos

    if name == ZOO:
        model = tc.load(f"zoo:{ZOO}")
        calib = {model.input_name: real_photos("calib", n=32)}
        return model, None, calib, {model.input_name: real_photos("eval", n=n)}
    entry = corpus.entries([name])[0]
    model = tc.load(str(corpus.fetch(entry)), input_shapes=entry.input_shapes)
    calib = corpus.inputs(entry, entry.input_shapes, n=8, seed=0)
    return model, entry, calib, corpus.inputs(entry, entry.input_shapes, n=n, seed=1)


def run_model(name: str, n: int) -> dict[str, Any]:
    from tvm_compress.backend.build import build
    from tvm_compress.passes.realize_integer import RealizeInteger
    from tvm_compress.quant.config import QuantConfig
    from tvm_compress.quant.quantize import quantize

    model, entry, calib, held_out = _data(name, n)
    outputs = "classes" if entry is None else entry.outputs
    reference = _outputs(build(model, target="x86").run_outputs, held_out)
    calib_arg = calib if len(calib) > 1 else next(iter(calib.values()))
    qres = quantize(model, QuantConfig(calib_samples=len(next(iter(calib.values())))),
                    calib_arg, progress=False)
    builds = {"short": qres.model,
              "31-bit": qres.model.with_mod(RealizeInteger(short_mantissas=False)(qres.simulated))}
    outs = {k: _outputs(build(m, target="x86").run_outputs, held_out) for k, m in builds.items()}
    short_out, long_out = outs["short"], outs["31-bit"]
    equal = [float(np.mean([np.array_equal(a[j], b[j])
                            for a, b in zip(short_out, long_out, strict=True)]))
             for j in range(len(reference[0]))]
    short, total = short_layers(qres.model.mod)
    return {"model": name, "samples": len(reference), "short_layers": short,
            "requantized_layers": total, "equal_outputs": equal,
            **{k: _quality(outputs, reference, o) for k, o in outs.items()}}


def markdown(results: list[dict], meta: dict) -> str:
    lines = ["# Short requantization mantissas vs 31-bit (accuracy)", "",
             f"{meta['samples']} held-out samples per model (MobileNetV2: held-out photo crops; "
             "corpus: as bench_corpus, seed 1), W8A8 `QuantConfig()`, both integer models from the "
             "same QDQ model. Agreement with TVM fp32: top-1 where the outputs are classes, "
             "lowest SQNR over the outputs. `equal`: share of samples whose outputs are "
             "identical in both builds. Run time "
             f"{meta['seconds']:.0f} s.", "",
             "| model | short / requantized layers | 31-bit vs fp32 | short vs fp32 | equal |",
             "|---|---|---|---|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['model']} | failed: {r['failed']} | | | |")
            continue
        lines.append(f"| {r['model']} | {r['short_layers']} / {r['requantized_layers']} | "
                     f"{_quality_cell(r['31-bit'])} | {_quality_cell(r['short'])} | "
                     f"{min(r['equal_outputs']):.2f} |")
    ok = [r for r in results if "failed" not in r]
    deltas = [min(r["short"]["sqnr_db"]) - min(r["31-bit"]["sqnr_db"]) for r in ok]
    top1 = [(r["short"]["top1_agreement"], r["31-bit"]["top1_agreement"]) for r in ok
            if "top1_agreement" in r["short"]]
    if ok:
        lines += ["", f"Lowest SQNR, short minus 31-bit: median {np.median(deltas):+.2f} dB, "
                  f"range {min(deltas):+.2f} to {max(deltas):+.2f} dB over {len(ok)} models."]
    if top1:
        lines.append(f"Mean top-1 agreement with fp32 over {len(top1)} classifiers: short "
                     f"{np.mean([a for a, _ in top1]):.3f}, 31-bit "
                     f"{np.mean([b for _, b in top1]):.3f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None,
                        help="mobilenet_v2 and / or corpus names (default: all)")
    parser.add_argument("--samples", type=int, default=64, help="held-out samples per model")
    parser.add_argument("--out", default=str(RESULTS / "mantissa"))
    args = parser.parse_args(argv)
    names = args.models or [ZOO, *(e.name for e in corpus.entries())]
    out = Path(args.out)
    start, results = time.time(), []
    for name in names:
        print(f"{name} ...", flush=True)
        try:
            results.append(run_model(name, args.samples))
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            results.append({"model": name, "failed": f"{type(err).__name__}: {err}"[:200]})
        meta = {"samples": args.samples, "seconds": time.time() - start}
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results},
                                                       indent=1))
        out.with_suffix(".md").write_text(markdown(results, meta))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
