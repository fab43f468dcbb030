"""The demo's Quantune step: a short real search on a Fashion-MNIST zoo model, shipped prior.

The model's own records are taken out of the prior first, so the search learns only from the
*other* zoo models (what a user's new model gets). Every trial is measured for real (quantize,
realize, compile, validate); the search stops at the first configuration within the tolerated
accuracy drop, and the table shows what it chose and how many trials that cost.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

DEMO_MODEL = "zoo:fmnist_resnet"


def quantune_demo(con: Any, *, model_ref: str = DEMO_MODEL, trials: int = 6,
                  max_drop: float = 0.5, val: int = 500) -> dict[str, Any]:
    """Run the search and print its table; returns the search summary."""
    import warnings

    from tvm_compress import load
    from tvm_compress.data import fashion_mnist
    from tvm_compress.tuning.evaluator import QuantEvaluator
    from tvm_compress.tuning.quantune.space import SearchSpace
    from tvm_compress.tuning.quantune.tuner import SHIPPED_PRIOR
    from tvm_compress.tuning.records import read_records
    from tvm_compress.tuning.search import search

    prior = [r for r in read_records(SHIPPED_PRIOR) if r.model != model_ref]
    others = sorted({r.model.removeprefix("zoo:") for r in prior})
    with con.step(f"Quantune: importing {model_ref}"):
        model = load(model_ref, batch=50)
    images, labels = fashion_mnist("val")
    calib, _ = fashion_mnist("calib")
    with tempfile.TemporaryDirectory() as tmp:
        ev = QuantEvaluator(model, calib=calib, images=images[:val], labels=labels[:val],
                            records=Path(tmp) / "records.jsonl")
        with con.step(f"Quantune: searching the 96 PTQ configurations (prior: "
                      f"{len(prior)} records of {', '.join(others) or 'no other model'}), "
                      f"stop within {max_drop} point of fp32"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = search(ev, SearchSpace.paper(calib_available=len(calib)), tuner="quantune",
                         trials=trials, max_drop=max_drop, prior=prior)
    best = res.best
    n = len(images[:val])
    rows = [["prior", f"{len(prior)} records of {len(others)} other zoo models"],
            ["fp32 accuracy", f"{res.baseline.accuracy:.4f} ({n} validation images)"]]
    for t in res.trials:
        rows.append([f"trial {t.index + 1}", f"{t.knobs.key}: {t.result.accuracy:.4f} "
                                             f"({res.drop(t):+.2f} points)"])
    if best is not None:
        rows += [["chosen", best.knobs.key],
                 ["cost", f"{len(res.trials)} of 96 trials, stopped by: {res.stopped}"],
                 ["weight bytes", f"{best.result.weight_bytes:,} (fp32 "
                                  f"{res.baseline.weight_bytes:,})"]]
    con.table(f"Quantune on {model.name}", ["what", "result"], rows)
    out = res.to_dict()
    out.update({"model": model.name, "prior_records": len(prior), "prior_models": others})
    return out
