"""The AJPQ job end to end: search (AJPQ + baselines), fine-tune, realize in TVM, measure, plot.

Used by ``tvm-compress ajpq`` and ``benchmarks/bench_ajpq.py``. Fashion-MNIST models with a torch
module only (the reward needs labels and the fine-tune needs gradients).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tvm_compress.errors import UserError


@dataclass
class AJPQSettings:
    budget: str = "size=0.2"
    episodes: int = 60
    seed: int = 0
    val_samples: int = 500        # proxy reward subset of the "val" split
    calib_samples: int = 256      # bias compensation and activation calibration ("calib" split)
    finetune_samples: int = 10000  # subset of "train" for the short fine-tune (0: none)
    finetune_epochs: int = 1
    finetune_lr: float = 0.01
    test_samples: int = 2000      # final accuracies on the first N "test" images
    baselines: bool = True
    latency_repeat: int = 30
    target: str = "x86"
    max_sparsity: float = 0.5
    granule: int = 8


def _tvm_accuracy(compiled: Any, images: np.ndarray, labels: np.ndarray) -> tuple[float,
                                                                                  np.ndarray]:
    logits = compiled.predict(images)
    return float(np.mean(logits.argmax(1) == labels)), logits


def run_ajpq(torch_module: Any, settings: AJPQSettings, *, name: str = "model",
             out_dir: Path | None = None, progress: bool = True,
             log: Any = None) -> dict[str, Any]:
    """Search, fine-tune and realize; returns a JSON-able report (see the README)."""
    import torch

    from tvm_compress.backend.build import build
    from tvm_compress.data import fashion_mnist
    from tvm_compress.tuning.ajpq.agent import ajpq_search, random_search, sequential_search
    from tvm_compress.tuning.ajpq.joint import (
        JointSpace,
        compression_plan,
        parse_budget,
        realize,
        within_budget,
    )
    from tvm_compress.tuning.ajpq.joint import finetune as run_finetune

    budget = parse_budget(settings.budget)
    if settings.episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {settings.episodes}")
    say = log or (lambda _text: None)
    torch.set_num_threads(1)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    records = None if out_dir is None else out_dir / "episodes.jsonl"
    calib = fashion_mnist("calib")[0][:settings.calib_samples]
    xv, yv = fashion_mnist("val")
    xv = torch.from_numpy(xv[:settings.val_samples])
    yv = torch.from_numpy(yv[:settings.val_samples])
    xt, yt = fashion_mnist("test")
    xt, yt = xt[:settings.test_samples], yt[:settings.test_samples]
    say("analyzing the joint space")
    space = JointSpace(torch_module, torch.zeros(1, 1, 28, 28), calib=calib,
                       max_sparsity=settings.max_sparsity, granule=settings.granule)

    def reward(plan: Any) -> float:
        return space.proxy_accuracy(plan, xv, yv)

    searches = {}
    say(f"AJPQ search: {settings.episodes} episodes")
    searches["ajpq"] = ajpq_search(space, budget, reward, episodes=settings.episodes,
                                   seed=settings.seed, records=records, progress=progress)
    if settings.baselines:
        say("baselines: L1 prune-then-quantize, random search")
        searches["sequential"] = sequential_search(space, budget, reward)
        searches["random"] = random_search(space, budget, reward, episodes=settings.episodes,
                                           seed=settings.seed, records=records,
                                           progress=progress)
    xtr = ytr = None
    if settings.finetune_samples:
        xtr, ytr = fashion_mnist("train")
        rng = np.random.default_rng(settings.seed)
        idx = rng.choice(len(xtr), min(settings.finetune_samples, len(xtr)), replace=False)
        xtr, ytr = xtr[idx], ytr[idx]
    say("fp32 reference build")
    fp32 = build(space.model, target=settings.target)
    fp32_acc, _ = _tvm_accuracy(fp32, xt, yt)
    fp32_lat = fp32.latency(repeat=settings.latency_repeat).as_dict() \
        if settings.latency_repeat else None
    report: dict[str, Any] = {
        "model": name, "budget": budget.describe(), "settings": settings.__dict__.copy(),
        "fp32": {"test_accuracy": fp32_acc, "weight_bytes": space.fp32_bytes,
                 "macs": space.fp32_macs, "latency": fp32_lat},
        "methods": {}, "load_avg": list(os.getloadavg())}
    xt_t = torch.from_numpy(xt)
    for method, result in searches.items():
        plan = result.best
        assert within_budget(space, plan, budget)
        entry: dict[str, Any] = {
            "best_proxy_reward": result.best_reward, "search_seconds": round(result.seconds, 1),
            "evaluations": len(result.records),
            "size_fraction": space.plan_bytes(plan) / space.fp32_bytes,
            "compression": space.fp32_bytes / space.plan_bytes(plan),
            "macs_fraction": space.plan_macs(plan) / space.fp32_macs,
            "plan": plan.to_dict(space),
            "test_accuracy_before_finetune": float(np.mean(
                space.proxy_logits(plan, xt_t).argmax(1) == yt))}
        weights = None
        if xtr is not None:
            say(f"{method}: fine-tuning")
            start = time.perf_counter()
            weights = run_finetune(space, plan, xtr, ytr, epochs=settings.finetune_epochs,
                                   lr=settings.finetune_lr, seed=settings.seed,
                                   progress=progress)
            entry["finetune_seconds"] = round(time.perf_counter() - start, 1)
        proxy_logits = space.proxy_logits(plan, xt_t, weights)
        entry["test_accuracy_proxy"] = float(np.mean(proxy_logits.argmax(1) == yt))
        say(f"{method}: realizing in TVM (CropChannels + integer kernels)")
        real = realize(space, plan, calib[:64], weights=weights)
        compiled = build(real.quantized.model, target=settings.target)
        acc, logits = _tvm_accuracy(compiled, xt, yt)
        entry.update({
            "test_accuracy": acc, "accuracy_drop_points": 100 * (fp32_acc - acc),
            "tvm_vs_proxy_top1_agreement": float(np.mean(logits.argmax(1) ==
                                                         proxy_logits.argmax(1))),
            "weight_bytes": real.plan_bytes, "weight_bytes_layer_max_bits": real.layer_max_bytes,
            "fp32_layers": real.quantized.fp32_layers})
        if settings.latency_repeat:
            lat = compiled.latency(repeat=settings.latency_repeat).as_dict()
            entry["latency"] = lat
            entry["speedup_vs_fp32"] = fp32_lat["median_ms"] / lat["median_ms"]
        report["methods"][method] = entry
        if out_dir is not None:
            (out_dir / f"joint_{method}.json").write_text(json.dumps(entry["plan"], indent=1))
            cplan = compression_plan(space, plan, method=method, budget=str(budget),
                                     seed=settings.seed, metrics={
                                         k: entry.get(k) for k in ("test_accuracy",
                                                                   "weight_bytes")})
            cplan.save(out_dir / f"plan_{method}.json")
            if method == "ajpq":
                cplan.save(out_dir / "plan.json")
    report["episodes"] = {m: [r["reward"] for r in s.records] for m, s in searches.items()
                          if m != "sequential"}
    if out_dir is not None:
        report["plot"] = str(plot(report, out_dir / f"ajpq_{name}.png"))
        (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def plot(report: dict[str, Any], path: Path) -> Path:
    """Episode rewards (AJPQ, random) and final accuracy vs size of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method, rewards in report["episodes"].items():
        a.plot(range(1, len(rewards) + 1), rewards, ".-" if method == "ajpq" else ".",
               label=method, alpha=0.8)
    a.set_xlabel("episode")
    a.set_ylabel("proxy reward (val accuracy, no fine-tune)")
    a.set_title(f"{report['model']}: search ({report['budget']})")
    a.legend()
    b.scatter([1.0], [report["fp32"]["test_accuracy"]], marker="*", s=120, label="fp32")
    for method, entry in report["methods"].items():
        b.scatter([entry["size_fraction"]], [entry["test_accuracy"]], s=50, label=method)
    b.set_xlabel("weight size / fp32")
    b.set_ylabel("test accuracy (TVM, after fine-tune)")
    b.set_xscale("log")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
