"""Command line of the benchmarks split between this machine and a GPU machine.

Each such benchmark has steps (``prepare`` here, ``device`` on the GPU machine, ``report`` /
``evaluate`` here); :func:`run_steps` builds the sub-command parser from a table of steps.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Option = tuple[str, dict[str, Any]]


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
