"""``--report`` / ``--profile`` of ``compile`` and ``bench``: the build report on the terminal and
in ``--json`` (every kernel with the rule that scheduled it; when profiled, its time share and
GFLOP/s against the measured machine peak)."""

from __future__ import annotations

import argparse
from typing import Any

from tvm_compress.errors import UserError


def add_report_args(p: argparse.ArgumentParser, *, profile_default: bool = False) -> None:
    p.add_argument("--report", action="store_true",
                   help="list every kernel with the schedule rule that covers it (the --json "
                        "output always holds the list)")
    if not profile_default:
        p.add_argument("--profile", action="store_true",
                       help="also run the model here and time every kernel: share of the run, "
                            "GFLOP/s, %% of the measured fp32 peak (host targets only)")
    p.add_argument("--profile-runs", type=int, default=5,
                   help="instrumented runs for the kernel profile (default 5)")


def check_profile_target(args: argparse.Namespace, target: Any) -> None:
    """``--profile`` needs a model this host can run: say so before compiling."""
    from tvm_compress.backend.targets import is_host_runnable

    if getattr(args, "profile", False) and not is_host_runnable(target):
        raise UserError(f"--profile runs the model on this host, but --target {args.target} "
                        "does not run here; use --report alone, or profile on the device")


def kernel_report(args: argparse.Namespace, con: Any, compiled: Any, *,
                  profile: bool | None = None) -> dict[str, Any]:
    """The ``kernels`` (and, when profiled, ``peak``) entries of the command's result; prints the
    table when ``--report`` or ``--profile`` was given."""
    from tvm_compress.backend.report import arithmetic_counts, rule_counts, unscheduled
    from tvm_compress.backend.targets import is_host_runnable

    if compiled.kernels is None:
        if getattr(args, "report", False):
            con.err.print("[yellow]note:[/yellow] no kernel report for this target (the "
                          "default CPU schedules did not run)")
        return {}
    profile = getattr(args, "profile", False) if profile is None else profile
    if profile and not is_host_runnable(compiled.target):
        raise UserError(f"--profile runs the model on this host, but it was built for "
                        f"{compiled.target.kind.name} {compiled.target.attrs.get('mtriple', '')}"
                        "; use --report alone, or profile on the device")
    result: dict[str, Any] = {"schedule_rules": rule_counts(compiled.kernels),
                              "unscheduled_kernels": unscheduled(compiled.kernels),
                              "int8_arithmetic": arithmetic_counts(compiled.kernels)}
    if profile:
        from tvm_compress.runtime.profile import measure_peak, profile_kernels

        with con.step("profiling kernels"):
            peak = measure_peak()
            rows = profile_kernels(compiled, runs=args.profile_runs, peak_gflops=peak["gflops"])
        result["peak"] = peak
    else:
        rows = [k.as_dict() for k in compiled.kernels]
    result["kernels"] = rows
    if getattr(args, "report", False) or getattr(args, "profile", False):
        _print(con, rows, result.get("peak"))
    return result


def _print(con: Any, rows: list[dict[str, Any]], peak: dict[str, Any] | None) -> None:
    int8 = any(r.get("arithmetic") for r in rows)
    headers = ["kernel", "rule", *(["int8 arithmetic"] if int8 else []), "MFLOP"]
    if peak:
        headers += ["calls", "us/call", "share", "GFLOP/s", "% peak"]
    table = []
    for r in rows:
        row = [r["name"], r["rule"], *([r.get("arithmetic", "")] if int8 else []),
               round(r["flops"] / 1e6, 2)]
        if peak:
            timed = "us_per_call" in r
            row += [r.get("calls", 0), round(r["us_per_call"], 1) if timed else "-",
                    f"{100 * r['share']:.1f}%" if timed else "-",
                    round(r["gflops"], 1) if timed else "-",
                    f"{r['pct_peak']:.0f}%" if timed else "-"]
        table.append(row)
    title = "kernels and the rules that scheduled them"
    if peak:
        title += f" (peak {peak['gflops']:.0f} GFLOP/s, {peak['method']})"
    from rich.table import Table

    out = Table(title=title)
    for i, col in enumerate(headers):
        out.add_column(col, overflow="fold", justify="left" if i < 2 + int8 else "right")
    for row in table:
        out.add_row(*[str(v) for v in row])
    con.out.print(out)
    missing = [r["name"] for r in rows if r["rule"] == "unscheduled"]
    if missing:
        con.err.print(f"[yellow]unscheduled kernels (naive loops):[/yellow] {', '.join(missing)}")
