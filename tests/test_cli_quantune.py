"""`tvm-compress quantune`: end to end on a tiny budget, resume, bad input; Quantune with the
shipped prior against random search on held-out replay of the shipped records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tvm_compress.cli.main import main
from tvm_compress.frontend.importers import export_onnx
from tvm_compress.tuning.quantune.tuner import SHIPPED_PRIOR
from tvm_compress.tuning.records import read_records


@pytest.fixture
def tiny_setup(tiny_cnn, tiny_input, tmp_path: Path) -> dict[str, str]:
    import torch

    onnx = export_onnx(tiny_cnn, tiny_input, tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((10, 3, 16, 16)).astype("float32")
    images = rng.standard_normal((24, 3, 16, 16)).astype("float32")
    with torch.no_grad():  # labels = the fp32 model's own predictions: accuracy starts at 1.0
        labels = tiny_cnn(torch.from_numpy(images)).argmax(1).numpy()
    np.savez(tmp_path / "calib.npz", images=calib)
    np.savez(tmp_path / "val.npz", images=images, labels=labels)
    np.savez(tmp_path / "nolabels.npz", images=images)
    return {"model": str(onnx), "calib": str(tmp_path / "calib.npz"),
            "val": str(tmp_path / "val.npz"), "nolabels": str(tmp_path / "nolabels.npz"),
            "dir": str(tmp_path)}


def _argv(s: dict[str, str], out: str, *extra: str) -> list[str]:
    return ["quantune", s["model"], "--calib", s["calib"], "--val", s["val"], "--json",
            "-o", out, *extra]


def _run(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_quantune_cli_end_to_end_and_resume(capsys, tiny_setup) -> None:
    s = tiny_setup
    out = str(Path(s["dir"]) / "run")
    # grid order is the space's order: the first two points are known
    first = _run(capsys, _argv(s, out, "--trials", "2", "--tuner", "grid"))
    assert first["trials_total"] == 2 and first["trials_measured"] == 2
    assert first["stopped"] == "trials"
    best = first["best"]
    assert best is not None and 0.0 <= best["result"]["accuracy"] <= 1.0
    assert first["baseline"]["accuracy"] == 1.0  # labels are the fp32 predictions
    assert Path(out, "model.so").stat().st_size > 0 and Path(out, "best_vs_trials.png").is_file()
    config = json.loads(Path(out, "best_config.json").read_text())
    assert config == best["config"]
    recs = read_records(Path(out, "records.jsonl"))
    assert [r.key for r in recs] == ["fp32"] + [t["key"] for t in first["trials"]]

    # the same command again measures nothing and reports the same search
    again = _run(capsys, _argv(s, out, "--trials", "2", "--tuner", "grid"))
    assert again["trials_measured"] == 0 and again["trials"] == [
        {**t, "replayed": True} for t in first["trials"]]
    # a larger budget continues: two trials replayed, one measured, one record appended
    more = _run(capsys, _argv(s, out, "--trials", "3", "--tuner", "grid"))
    assert more["trials_measured"] == 1
    assert [t["key"] for t in more["trials"][:2]] == [t["key"] for t in first["trials"]]
    assert len(read_records(Path(out, "records.jsonl"))) == len(recs) + 1

    # an interrupted Quantune run (1 trial, then killed) resumed to 2 trials ends with the
    # same records as an uninterrupted 2-trial run with the same seed
    # (the first part runs with a prior of foreign model features: said, then searched without)
    cut, whole = str(Path(s["dir"]) / "cut"), str(Path(s["dir"]) / "whole")
    foreign = Path(s["dir"]) / "foreign.jsonl"
    line = json.loads(SHIPPED_PRIOR.read_text().splitlines()[1])
    line["descriptors"] = {"layers": 3.0}
    foreign.write_text(json.dumps(line) + "\n")
    part = _run(capsys, _argv(s, cut, "--trials", "1", "--prior", str(foreign), "--seed", "3"))
    assert any("continuing without the prior" in w for w in part["warnings"])
    resumed = _run(capsys, _argv(s, cut, "--trials", "2", "--prior", "none", "--seed", "3"))
    straight = _run(capsys, _argv(s, whole, "--trials", "2", "--prior", "none", "--seed", "3"))
    assert resumed["trials_measured"] == 1
    assert [t["key"] for t in resumed["trials"]] == [t["key"] for t in straight["trials"]]
    keys = [[r.key for r in read_records(Path(d, "records.jsonl"))] for d in (cut, whole)]
    assert keys[0] == keys[1]


@pytest.mark.parametrize("extra, message", [
    (["--prior", "/no/such/prior.jsonl"], "prior records file"),
    (["--objective", "speed"], "unknown objective"),
    (["--trials", "-1"], "--trials must be at least 1"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--objective", "size"], "needs a tolerated accuracy drop"),
    (["--tuner", "annealing"], "unknown --tuner"),
])
def test_quantune_cli_bad_input_exit_2(capsys, tiny_setup, extra, message) -> None:
    s = tiny_setup
    assert main(_argv(s, str(Path(s["dir"]) / "bad"), *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]


def test_quantune_cli_bad_data_exit_2(capsys, tiny_setup) -> None:
    s = tiny_setup
    out = str(Path(s["dir"]) / "bad")
    argv = ["quantune", s["model"], "--calib", s["calib"], "--val", s["nolabels"], "-o", out]
    assert main(argv) == 2
    assert "has no 'labels'" in capsys.readouterr().err
    Path(out).mkdir()
    Path(out, "records.jsonl").write_text('{"format": "something else"}\n')
    assert main(_argv(s, out)) == 2
    assert "records.jsonl:1:" in capsys.readouterr().err
