"""Meta-schedule tuning: `tvm-compress tune` writes a per-target database that builds reuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import tirx

from tvm_compress.backend.build import build
from tvm_compress.backend.schedules import default_schedule_pipeline
from tvm_compress.backend.targets import resolve_target
from tvm_compress.backend.tuning_ms import (
    TUNED_ATTR,
    _workload,
    database_dirs,
    open_database,
    recheck_database,
    target_key,
    tuning_module,
    without_tensor_intrinsics,
)
from tvm_compress.cli.main import main
from tvm_compress.errors import UserError
from tvm_compress.frontend.importers import export_onnx, from_onnx


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tiny tuning run through the CLI into the (redirected) per-target cache."""
    from conftest import TinyCNN, randomize_bn

    torch.manual_seed(0)
    module = randomize_bn(TinyCNN(), 0)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype("float32")
    root = tmp_path_factory.mktemp("tuning")
    onnx_path = export_onnx(module, x, root / "tiny.onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVM_COMPRESS_TUNING_DIR", str(root / "cache"))
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["tune", str(onnx_path), "--target", "x86-avx2", "--trials", "4",
                         "--top", "1", "--population", "8", "--keep-all", "--json"])
        yield {"code": code, "result": json.loads(out.getvalue()), "onnx": onnx_path, "x": x,
               "module": module, "cache": root / "cache", "mp": mp}


def test_tune_writes_a_database_per_target(tuned):
    assert tuned["code"] == 0
    result = tuned["result"]
    target = resolve_target("x86-avx2")
    db_dir = tuned["cache"] / target_key(target)
    assert result["database"] == str(db_dir)
    assert result["kept"] == 1 and result["tasks"][0]["trials"] >= 1
    assert result["tasks"][0]["tuned_us"] > 0 and result["tasks"][0]["default_us"] > 0
    assert database_dirs(target)[0] == db_dir  # found automatically (cache first)
    assert len(open_database(db_dir).get_all_tuning_records()) == 1
    assert (db_dir / "raw" / "database_tuning_record.json").stat().st_size > 0


def test_recheck_drops_schedules_that_lose_to_the_defaults(tuned, tmp_path):
    """After the default schedules change, a shipped record that no longer wins is dropped."""
    import shutil

    target = resolve_target("x86-avx2")
    src = tuned["cache"] / target_key(target)
    db = tmp_path / "db"
    db.mkdir()
    for name in ("database_workload.json", "database_tuning_record.json"):
        shutil.copy(src / name, db / name)
    workload = open_database(db).get_all_tuning_records()[0].workload.mod

    def default_is(us: float):  # the default schedule is the one our rules mark as scheduled
        return lambda f: us if f.attrs and f.attrs.get("tirx.is_scheduled", False) else 50.0

    infos = recheck_database(db, target, timer=default_is(80.0))  # tuned 50 < default 80
    assert [(i.kept, i.default_us, i.tuned_us) for i in infos] == [(True, 80.0, 50.0)]
    assert len(open_database(db).get_all_tuning_records()) == 1
    infos = recheck_database(db, target, timer=default_is(20.0))  # now the default wins
    assert [i.kept for i in infos] == [False]
    assert open_database(db).get_all_tuning_records() == []
    assert not open_database(db).has_workload(workload)
    # measured for real on this machine, both schedules time and the record is kept or not
    for name in ("database_workload.json", "database_tuning_record.json"):
        shutil.copy(src / name, db / name)
    (info,) = recheck_database(db, target)
    assert info.default_us > 0 and info.tuned_us > 0
    assert len(open_database(db).get_all_tuning_records()) == int(info.kept)


def test_build_applies_the_tuned_schedule_and_keeps_outputs(tuned):
    model = from_onnx(tuned["onnx"])
    target = resolve_target("x86-avx2")
    tuned_build = build(model, target=target)  # database picked up automatically
    plain = build(model, target=target, database=False)
    assert tuned_build.tuned_functions == 1 and plain.tuned_functions == 0
    expected = tuned["module"](torch.from_numpy(tuned["x"])).detach().numpy()
    np.testing.assert_allclose(tuned_build.run(tuned["x"]), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(plain.run(tuned["x"]), expected, rtol=1e-4, atol=1e-4)

    # structurally: the tuned function is the database's schedule, not the default one
    db = open_database(tuned["cache"] / target_key(target))
    with_db = default_schedule_pipeline(target, [db])(model.mod)
    without = default_schedule_pipeline(target)(model.mod)
    tuned_funcs = [(gv, f) for gv, f in with_db.functions_items()
                   if isinstance(f, tirx.PrimFunc) and f.attrs.get(TUNED_ATTR, False)]
    assert len(tuned_funcs) == 1
    gv, func = tuned_funcs[0]
    record = db.get_all_tuning_records()[0]
    unscheduled = tuning_module(model, target)[gv.name_hint]
    assert tvm_ffi.structural_equal(record.workload.mod, _workload(unscheduled))
    assert not tvm_ffi.structural_equal(func.without_attr(TUNED_ATTR), without[gv.name_hint])
    assert not tvm_ffi.structural_equal(func.body, unscheduled.body)


def test_int8_build_still_works_with_a_database(tuned):
    from tvm_compress.quant.config import QuantConfig
    from tvm_compress.quant.quantize import quantize

    model = from_onnx(tuned["onnx"])
    calib = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype("float32")
    q = quantize(model, QuantConfig(calib_samples=4), calib, progress=False).model
    target = resolve_target("x86-avx2")
    with_db = build(q, target=target)
    without = build(q, target=target, database=False)
    np.testing.assert_array_equal(with_db.run(tuned["x"]), without.run(tuned["x"]))


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["tune", "zoo:no_such_model", "--trials", "4"]) == 2
    assert main(["tune", "zoo:fmnist_vgg", "--trials", "0"]) == 2
    assert main(["tune", "zoo:fmnist_vgg", "--target", "nope"]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(UserError, match="not a tuning database"):
        open_database(tmp_path)


def test_stub_intrinsics_are_removed_afterwards():
    import sys

    already = "tvm.s_tir.tensor_intrin" in sys.modules
    with without_tensor_intrinsics():
        assert "tvm.s_tir.tensor_intrin" in sys.modules
    assert ("tvm.s_tir.tensor_intrin" in sys.modules) == already
    assert tvm.target.Target("llvm") is not None


def test_shipped_database_covers_the_reference_target():
    from tvm_compress.backend.schedules.blocks import child_blocks
    from tvm_compress.backend.schedules.compute import KERNEL_ATTR
    from tvm_compress.backend.tuning_ms import REFERENCE_KEY, SHIPPED_DIR

    shipped = SHIPPED_DIR / REFERENCE_KEY
    assert shipped in database_dirs(resolve_target("x86-avx2"))
    assert shipped in database_dirs(resolve_target({"kind": "llvm", "mcpu": "znver3"}))
    assert shipped not in database_dirs(resolve_target("x86-avx512"))
    records = open_database(shipped).get_all_tuning_records()
    # The shipped records are exactly the schedules the last tuning run / recheck of each model
    # kept (benchmarks/tune_shipped.py logs them); today none beats the default schedules.
    log = Path(__file__).parents[1] / "benchmarks" / "results" / "tuning_shipped.jsonl"
    rechecked, tuned_since = None, {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        kept = sum(t["kept"] for t in entry["tasks"])
        if entry.get("recheck"):  # every shipped record re-timed: the survivors
            rechecked, tuned_since = kept, {}
        else:  # a model's later run replaces its earlier one
            tuned_since[entry["model"]] = kept
    assert rechecked is not None, "the shipped database was never rechecked"
    assert len(records) == rechecked + sum(tuned_since.values())
    for rec in records:  # only float32 blocked-conv kernels, each with a measured time
        sch = tvm.s_tir.Schedule(rec.workload.mod)
        kinds = {str(sch.get(b).annotations.get(KERNEL_ATTR, "")) for b in child_blocks(sch)}
        assert kinds & {"conv2d_nchwc", "depthwise_nchwc"}
        assert rec.run_secs and min(float(s) for s in rec.run_secs) > 0
