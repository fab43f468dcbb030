"""Target presets: short names -> TVM 0.27 target dicts (CLI-style target strings are rejected)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tvm

from tvm_compress.backend.schedules.hardware import host_cores, host_cpu, missing_host_features
from tvm_compress.errors import UserError

_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {}


def register_preset(name: str, factory: Callable[[], dict[str, Any]]) -> None:
    """Add a preset; names are unique."""
    if name in _PRESETS:
        raise ValueError(f"target preset {name!r} is already registered")
    _PRESETS[name] = factory


def _host_x86() -> dict[str, Any]:
    return {"kind": "llvm", **host_cpu(), "num-cores": host_cores()}


def _x86(mcpu: str) -> Callable[[], dict[str, Any]]:
    return lambda: {"kind": "llvm", "mcpu": mcpu, "num-cores": host_cores()}


def _aarch64(*mattr: str) -> Callable[[], dict[str, Any]]:
    # num-cores: meta-schedule's parallelization rules need one; 4 is the common board (A53 to
    # A78 clusters); pass a target dict with another "num-cores" for other devices
    return lambda: {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": list(mattr),
                    "num-cores": 4}


def _cuda(arch: str) -> Callable[[], dict[str, Any]]:
    return lambda: {"kind": "cuda", "arch": arch}


register_preset("x86", _host_x86)                      # this machine's CPU, all its cores
register_preset("x86-avx2", _x86("core-avx2"))         # reference target of the shipped databases
register_preset("x86-avx512", _x86("skylake-avx512"))
register_preset("x86-vnni", _x86("cascadelake"))
register_preset("aarch64", _aarch64("+neon"))
register_preset("aarch64-dotprod", _aarch64("+neon", "+v8.2a", "+dotprod"))
register_preset("cuda-sm80", _cuda("sm_80"))
register_preset("cuda-sm90", _cuda("sm_90"))


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def resolve_target(target: str | dict[str, Any] | tvm.target.Target) -> tvm.target.Target:
    """A preset name, a target dict, or a Target -> Target (unknown names list the presets)."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if target not in _PRESETS:
        raise UserError(f"unknown target {target!r}; valid presets: {', '.join(preset_names())}")
    return tvm.target.Target(_PRESETS[target]())


AARCH64_CXX = "aarch64-linux-gnu-g++"


def export_compiler(target: tvm.target.Target) -> Any:
    """``fcompile`` for ``export_library`` of a module built for ``target`` on this machine: the
    aarch64 cross g++ for aarch64 CPU targets, None (the host compiler) otherwise."""
    from tvm_compress.backend.schedules.hardware import is_aarch64

    if target.kind.name != "llvm" or is_host_runnable(target) or not is_aarch64(target):
        return None
    from tvm.support import cc

    return cc.cross_compiler(AARCH64_CXX)


def is_host_runnable(target: tvm.target.Target) -> bool:
    """Whether a module built for ``target`` runs on this machine's CPU."""
    if target.kind.name != "llvm":
        return False
    mtriple = str(target.attrs.get("mtriple", ""))
    if mtriple and not mtriple.startswith("x86_64"):
        return False
    return not missing_host_features(target)
