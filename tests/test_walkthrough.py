"""The README's compose walk-through, end to end through the CLI, at small sizes.

PreCrop a zoo architecture to half its MACs -> train it (seeded) -> Quantune on the cropped model,
and ZeroQ data-free as the alternative -> compose into an aarch64 bundle -> run the bundle's own
README command, verbatim, inside the bundle directory (under qemu here).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tvm_compress.cli.main import main
from tvm_compress.plan import CompressionPlan
from tvm_compress.runtime.deploy import runner_prefix

pytestmark = pytest.mark.slow


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("walkthrough")


def test_precrop_train_quantune_zeroq_compress_bundle(workdir: Path, capsys) -> None:
    crop_dir, train_dir = workdir / "precrop", workdir / "trained"
    r = _run(["precrop", "zoo:fmnist_resnet", "--budget", "macs=0.5", "--iterations", "2",
              "-o", str(crop_dir)], capsys)
    assert 0.4 < r["achieved_fraction"]["macs"] <= 0.55
    crop = CompressionPlan.load(crop_dir / "plan.json")
    assert crop.method == "precrop" and crop.crops and not crop.quantizes

    t = _run(["train", "zoo:fmnist_resnet", "--plan", str(crop_dir / "plan.json"), "--epochs",
              "2", "--train-samples", "4000", "--test-samples", "500", "-o", str(train_dir)],
             capsys)
    assert t["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    model = str(train_dir / "model.onnx")

    q = _run(["quantune", model, "--trials", "3", "--limit", "200", "-o",
              str(workdir / "quantune")], capsys)
    assert q["best"] is not None
    qplan = CompressionPlan.load(workdir / "quantune" / "plan.json")
    assert qplan.method == "quantune" and qplan.quantizes

    z = _run(["zeroq", model, "--samples", "4", "--iterations", "10", "--limit", "200",
              "-o", str(workdir / "zeroq")], capsys)
    assert CompressionPlan.load(workdir / "zeroq" / "plan.json").method == "zeroq"
    assert z["evaluation"]["accuracy"] > t["test_accuracy"] - 0.1

    bundle = workdir / "bundle"
    c = _run(["compress", model, "--plan", str(workdir / "quantune" / "plan.json"), "--target",
              "aarch64", "--limit", "200", "--repeat", "3", "-o", str(bundle)], capsys)
    after = c["host"]["after"]
    assert after["accuracy"] > t["test_accuracy"] - 0.05
    assert c["weight_bytes"]["after"] < c["weight_bytes"]["before"] / 3
    assert c["artifact"]["top1_agrees_with_host"]

    # The bundle README's command, verbatim, from inside the bundle directory.
    readme = (bundle / "README.md").read_text()
    line = next(m.group(1) for m in re.finditer(r"^    (\./runner run .*)$", readme, re.M)
                if "--output-dir" in m.group(1))
    assert line == "./runner run --model model.so --input input.npy --output-dir out"
    proc = subprocess.run([*runner_prefix("aarch64"), *shlex.split(line)], cwd=bundle,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = np.load(bundle / "out" / "output_0.npy")
    assert out.shape == (1, 10) and np.isfinite(out).all()


def _crop_plan(workdir: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """The directory of a quick PreCrop plan (made by the first test that needs it)."""
    crop_dir = workdir / "precrop"
    if not (crop_dir / "plan.json").is_file():
        _run(["precrop", "zoo:fmnist_resnet", "--budget", "macs=0.5", "--iterations", "2",
              "-o", str(crop_dir)], capsys)
    return crop_dir


def test_base_plan_searches_on_the_cropped_model(workdir: Path, capsys) -> None:
    """quantize --base-plan works on the cropped import; compress composes both plans."""
    crop_dir = _crop_plan(workdir, capsys)
    r = _run(["quantize", "zoo:fmnist_resnet", "--base-plan", str(crop_dir / "plan.json"),
              "--limit", "100", "--repeat", "0", "-o", str(workdir / "q_on_crop")], capsys)
    plan = CompressionPlan.load(workdir / "q_on_crop" / "plan.json")
    assert plan.provenance.base == (str(crop_dir / "plan.json"),)
    assert r["weight_bytes"]["quantized"] < r["weight_bytes"]["fp32"] / 3
    c = _run(["compress", "zoo:fmnist_resnet", "--plan", str(crop_dir / "plan.json"), "--plan",
              str(workdir / "q_on_crop" / "plan.json"), "--target", "x86", "--limit", "100",
              "--repeat", "0", "-o", str(workdir / "composed")], capsys)
    # cropped pretrained weights without retraining lose accuracy; size must drop ~8x
    assert c["weight_bytes"]["after"] < c["weight_bytes"]["before"] / 6
    assert c["artifact"]["top1_agrees_with_host"]


def test_ajpq_on_top_of_a_crop_composes(workdir: Path, capsys) -> None:
    """ajpq --base-plan searches the cropped network; compress applies crop, then AJPQ's plan."""
    crop_dir = _crop_plan(workdir, capsys)
    r = _run(["ajpq", "zoo:fmnist_resnet", "--base-plan", str(crop_dir / "plan.json"),
              "--episodes", "2", "--val-samples", "50", "--finetune-samples", "0",
              "--test-samples", "100", "--no-baselines", "--repeat", "0",
              "-o", str(workdir / "ajpq")], capsys)
    plan = CompressionPlan.load(workdir / "ajpq" / "plan.json")
    assert plan.method == "ajpq" and plan.channel_bits and plan.quantizes
    c = _run(["compress", "zoo:fmnist_resnet", "--plan", str(crop_dir / "plan.json"), "--plan",
              str(workdir / "ajpq" / "plan.json"), "--target", "x86", "--limit", "100",
              "--repeat", "0", "-o", str(workdir / "ajpq_bundle")], capsys)
    # the composed artifact is AJPQ's model: the weight bytes of its own realization (each layer
    # stored at its widest channel's bits, as the packed library stores it)
    assert c["weight_bytes"]["after"] == r["methods"]["ajpq"]["weight_bytes_layer_max_bits"]
    assert c["artifact"]["top1_agrees_with_host"]


def test_bundle_for_a_cpu_this_machine_lacks_is_not_run(workdir: Path, capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An x86 bundle that needs instructions this CPU lacks is written, and not run (it would
    die with an illegal instruction); the report says why. The host is made to lack AVX2."""
    from tvm_compress.backend.schedules import hardware

    host = hardware.host_features()
    monkeypatch.setattr(hardware, "host_features", lambda: {
        **host, **{f: False for f in host if f.startswith(("avx", "fma", "f16c", "amx"))}})
    crop_dir = _crop_plan(workdir, capsys)
    c = _run(["compress", "zoo:fmnist_resnet", "--plan", str(crop_dir / "plan.json"),
              "--target", "x86-avx2", "--limit", "20", "--repeat", "0",
              "-o", str(workdir / "avx2_bundle")], capsys)
    assert c["artifact"]["run"].startswith("not run here: this CPU lacks avx, avx2")
    assert (workdir / "avx2_bundle" / "model.so").is_file()
    assert "top1_agrees_with_host" not in c["artifact"]
