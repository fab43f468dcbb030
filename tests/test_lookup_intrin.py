"""8-bit table lookups in registers (``lookup_intrin``): ``vpermi2b`` in the assembly, each output
exactly the table's entry, and the gather kept wherever the rewrite does not apply."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_lookup import _act_net_onnx
from tvm import s_tir, te
from tvm.target.codegen import target_has_features

from tvm_compress.backend.schedules import lookup, rules
from tvm_compress.backend.schedules.hardware import host_cpu
from tvm_compress.backend.schedules.lookup_intrin import tensorize_lookups

VBMI = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})
_THIS_CPU = tvm.target.Target({"kind": "llvm", **host_cpu()})
needs_vbmi = pytest.mark.skipif(not target_has_features("avx512vbmi", _THIS_CPU),
                                reason="running vpermi2b needs an AVX512-VBMI host")


def _lookup_func(q_dtype: str, table_dtype: str, width: int) -> tvm.tirx.PrimFunc:
    q = te.placeholder((3, width), q_dtype, name="q")
    table = te.placeholder((256,), table_dtype, name="table")
    out = lookup._lookup_te(q, table, True)
    return te.create_prim_func([q, table, out], index_dtype_override="int64")


def _random(dtype: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


CASES = [("uint8", "uint8", 64), ("int8", "int8", 32), ("uint8", "int8", 16), ("int8", "uint8", 8),
         ("uint8", "uint8", 24)]


def _compiled(q_dtype: str, table_dtype: str, width: int) -> tvm.runtime.Module:
    sch = s_tir.Schedule(_lookup_func(q_dtype, table_dtype, width))
    assert tensorize_lookups(sch) == 1
    return tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), VBMI)


@pytest.mark.parametrize(("q_dtype", "table_dtype", "width"), CASES)
def test_lookup_is_two_vpermi2b(q_dtype: str, table_dtype: str, width: int) -> None:
    asm = _compiled(q_dtype, table_dtype, width).mod.inspect_source("asm")
    assert asm.count("vpermi2b") + asm.count("vpermt2b") >= 2, "no byte permutation"


@needs_vbmi
@pytest.mark.parametrize(("q_dtype", "table_dtype", "width"), CASES)
def test_lookup_in_registers_is_exact(q_dtype: str, table_dtype: str, width: int) -> None:
    lib = _compiled(q_dtype, table_dtype, width)
    rng = np.random.default_rng(width)
    q, table = _random(q_dtype, (3, width), rng), _random(table_dtype, (256,), rng)
    out = tvm.runtime.tensor(np.zeros((3, width), table_dtype))
    lib(tvm.runtime.tensor(q), tvm.runtime.tensor(table), out)
    np.testing.assert_array_equal(out.numpy(), table[q.astype(np.int32) - np.iinfo(q_dtype).min])


def test_float_tables_and_unstaged_lookups_keep_the_gather() -> None:
    # a float32 table: no intrinsic (vpermi2ps was slower than the gather on Zen 4)
    sch = s_tir.Schedule(_lookup_func("uint8", "float32", 16))
    assert tensorize_lookups(sch) == 0
    # a lookup without its index stage (lookup.py on a target without VBMI)
    q = te.placeholder((3, 16), "uint8", name="q")
    table = te.placeholder((256,), "uint8", name="table")
    plain = te.create_prim_func([q, table, lookup._lookup_te(q, table, False)])
    assert tensorize_lookups(s_tir.Schedule(plain)) == 0


def _int8_act_net(tmp_path, activation: str):  # noqa: ANN001, ANN202
    import tvm_compress as tc
    from tvm_compress.quant.config import QuantConfig
    from tvm_compress.quant.quantize import quantize

    path = tmp_path / f"{activation}.onnx"
    path.write_bytes(_act_net_onnx(activation))
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((8, 8, 16, 16)).astype("float32")
    return quantize(tc.load(str(path)), QuantConfig(calib_samples=8), calib,
                    progress=False).model, rng.standard_normal((1, 8, 16, 16)).astype("float32")


def _scheduled_scripts(model) -> dict[str, str]:  # noqa: ANN001
    from tvm_compress.backend.schedules import default_schedule_pipeline

    scheduled = default_schedule_pipeline(VBMI)(model.mod)
    return {gv.name_hint: f.script() for gv, f in scheduled.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("activation", ["hardswish", "silu"])
def test_int8_model_tables_go_to_registers(tmp_path, monkeypatch,  # noqa: ANN001
                                           activation: str) -> None:
    model, _ = _int8_act_net(tmp_path, activation)
    tables = {n: s for n, s in _scheduled_scripts(model).items() if "lookup" in n}
    assert tables and all("vpermi2var.qi.512" in s for s in tables.values()), list(tables)
    monkeypatch.setattr(lookup, "has_vbmi", lambda _target: False)
    monkeypatch.setattr(rules, "has_vbmi", lambda _target: False)
    assert not any("vpermi2var" in s for s in _scheduled_scripts(model).values())


@needs_vbmi
@pytest.mark.parametrize("activation", ["hardswish", "silu"])
def test_int8_model_tables_in_registers_match_the_gather(tmp_path, monkeypatch,  # noqa: ANN001
                                                         activation: str) -> None:
    from tvm_compress.backend.build import build

    model, x = _int8_act_net(tmp_path, activation)
    in_registers = build(model, target="x86").run(x)
    monkeypatch.setattr(lookup, "has_vbmi", lambda _target: False)
    monkeypatch.setattr(rules, "has_vbmi", lambda _target: False)
    np.testing.assert_array_equal(in_registers, build(model, target="x86").run(x))
