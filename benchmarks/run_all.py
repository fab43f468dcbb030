"""Run every benchmark (``benchmarks/bench_*.py``) one after another: `make bench`.

Each benchmark is its own process (so one's threads and caches do not disturb the next) and writes
its own ``benchmarks/results/<name>.json`` and ``.md``. This script only sequences them and prints
a summary; a failing benchmark is reported and the others still run.

    python benchmarks/run_all.py              # all of them
    python benchmarks/run_all.py int8 zeroq   # those whose name contains one of the words
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benchmarks(words: list[str]) -> list[Path]:
    found = sorted(HERE.glob("bench_*.py"))
    if words:
        found = [p for p in found if any(w in p.stem for w in words)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="run only benchmarks whose name contains a word")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    selected = benchmarks(args.only)
    if not selected:
        print(f"error: no benchmark matches {args.only}; see --list", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(p.stem for p in selected))
        return 0
    summary = []
    for path in selected:
        print(f"== {path.stem} (load average {os.getloadavg()[0]:.2f})", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(path)], cwd=HERE.parent)
        summary.append((path.stem, code, time.perf_counter() - start))
    print("\n| benchmark | exit | seconds |\n|---|---|---|")
    for name, code, seconds in summary:
        print(f"| {name} | {code} | {seconds:.0f} |")
    return max((code for _, code, _ in summary), default=0) and 1


if __name__ == "__main__":
    sys.exit(main())
