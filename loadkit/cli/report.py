"""`loadkit report`: the capacity report of one release, as HTML.

    loadkit report --release R [--runs DIR ...] [--baseline R0] [--out DIR]

Without ``--runs``, the runs of release R are found by their manifests under ``--runs-dir``
(``./runs``); the baseline's runs likewise, unless ``--baseline-runs`` names them. Exit status:
0 when the verdict is PASS or WARN, 1 when it is FAIL (a gate failed or no headroom is left at a
forecast), 2 when the report could not be made. A run that ended by the abort its profile set up
(``aborted as designed``) is printed as a note, not as a failure.
"""

from __future__ import annotations

import argparse
import sys

from loadkit.cli._common import add_command, finite
from loadkit.errors import ReportError
from loadkit.report.build import REPORTS_DIR, RUNS_DIR, build_report, find_runs


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "report", _run, "build the capacity report of a release (HTML, executed notebook, summary.json)",
                    "Execute notebooks/capacity_report.ipynb over the runs of a release and render it as HTML "
                    "without code. Exit 0: PASS or WARN, 1: FAIL, 2: the report could not be made.")
    p.add_argument("--release", required=True, help="release label the report is for")
    p.add_argument("--runs", nargs="+", metavar="DIR", help="run directories (default: the release's runs under --runs-dir)")
    p.add_argument("--baseline", metavar="R0", help="release to compare with; regressions are highlighted")
    p.add_argument("--baseline-runs", nargs="+", metavar="DIR", help="run directories of the baseline (default: found under --runs-dir)")
    p.add_argument("--runs-dir", default=str(RUNS_DIR), metavar="DIR", help="where runs are looked up by release (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", help=f"output directory (default: {REPORTS_DIR}/RELEASE)")
    p.add_argument("--forecast-peak-sessions", type=finite, metavar="N", help="forecast peak of concurrent mail sessions (default: from the runs' profiles)")
    p.add_argument("--forecast-peak-qps", type=finite, metavar="QPS", help="forecast peak DNS query rate (default: from the runs' profiles)")
    p.add_argument("--forecast-peak-burst-queries", type=finite, metavar="N",
                   help="forecast largest DNS burst, in queries, for runs that offered bursts (default: from the "
                        "runs' profiles; without one, a burst that overflowed the buffer is a warning, not a failure)")


def _progress(message: str) -> None:
    print(f"report: {message}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    for name in ("forecast_peak_sessions", "forecast_peak_qps", "forecast_peak_burst_queries"):
        value = getattr(args, name)  # finite already (nan and inf are refused by the option's type)
        if value is not None and not value > 0:
            raise ReportError(f"--{name.replace('_', '-')} {value:g} must be a positive number")
    runs = args.runs or find_runs(args.release, args.runs_dir)
    baseline_runs: list[str] = []
    if args.baseline:
        baseline_runs = args.baseline_runs or find_runs(args.baseline, args.runs_dir)
    elif args.baseline_runs:
        raise ReportError("--baseline-runs needs --baseline R0 to name the baseline release")
    report = build_report(
        args.release,
        runs,
        baseline_dirs=baseline_runs,
        baseline_release=args.baseline,
        out_dir=args.out,
        forecast_peak_sessions=args.forecast_peak_sessions,
        forecast_peak_qps=args.forecast_peak_qps,
        forecast_peak_burst_queries=args.forecast_peak_burst_queries,
        progress=_progress,
    )
    print(f"{report.verdict}: {report.html}")
    for reason in report.summary.verdict_reasons:
        print(f"  - {reason}")
    for note in report.summary.verdict_notes:
        print(f"  * {note}")
    return 1 if report.verdict == "FAIL" else 0
