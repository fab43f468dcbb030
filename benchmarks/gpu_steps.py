"""Command line of the benchmarks split between this machine and a GPU machine.

Each such benchmark has steps (``prepare`` here, ``device`` on the GPU machine, ``report`` /
``evaluate`` here); :func:`run_steps` builds the sub-command parser from a table of steps.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Option = tuple[str, dict[str, Any]]
FFI_VERSION = "0.1.14.post0"  # apache-tvm-ffi, as pinned here (tvm_compress.errors imports it)
# On the GPU machine, before a ``device`` step (its Python is 3.12 and lacks tvm-ffi):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/wheels/*.whl
#   export PYTHONPATH=$PWD:/tmp/site


def download_wheel(dist: str, version: str, wheels: Path) -> Path:
    """The manylinux x86_64 wheel of ``dist==version`` for the GPU machine's Python
    (``$GPU_PYTHON``, default 3.12) in ``wheels``, downloaded from PyPI unless already there."""
    pyver = os.environ.get("GPU_PYTHON", "3.12")
    stem = f"{dist.replace('-', '_')}-{version}-"
    found = [w for w in wheels.glob(f"{stem}*.whl")
             if "-py3-" in w.name or f"-cp{pyver.replace('.', '')}-" in w.name]
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--python-version", pyver, "--implementation",
                        "cp", *[f"--platform=manylinux_2_{n}_x86_64" for n in (28, 27, 24, 17)],
                        "-d", str(wheels), f"{dist}=={version}"], check=True)
        found = list(wheels.glob(f"{stem}*.whl"))
    return found[0]


def dir_option(default: Path) -> Option:
    """``--dir``: the staging folder carried to the GPU machine."""
    return ("--dir", {"default": str(default), "help": f"staging folder (default {default})"})


def out_option() -> Option:
    """``--out``: where the GPU machine writes its results (the device tool's ``$OUT``)."""
    return ("--out", {"default": os.environ.get("OUT", "."), "help": "results folder"})


def run_steps(doc: str, steps: dict[str, tuple[Callable[[argparse.Namespace], int],
                                               Sequence[Option]]],
              argv: list[str] | None = None) -> int:
    """Parse ``STEP [options]`` and run that step's function."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    for name, (_, options) in steps.items():
        step = sub.add_parser(name)
        for flag, kwargs in options:
            step.add_argument(flag, **kwargs)
    args = p.parse_args(argv)
    return steps[args.step][0](args)
