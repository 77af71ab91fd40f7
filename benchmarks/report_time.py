"""How long `loadkit report` takes over a one-hour run (1 Hz samples, five request names).

Writes a synthetic one-hour IMAP storm run (3 proxies, 3,600 one-second intervals, five request
names: 18,000 request rows, 10,800 proxy samples) with loadkit.record.synthetic, builds its report
and prints the time taken. The anchor, measured in the same process, is papermill executing a
one-cell notebook: the fixed cost of starting a kernel, which no report can avoid. Goal: the
report in <= 60 s.

    .venv/bin/python benchmarks/report_time.py [--duration-s 3600] [--keep DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import papermill as pm

from loadkit.record.synthetic import MAIL_NAMES, write_mail_run
from loadkit.report import build_report
from loadkit.report.build import _ipc_kernel_manager

GOAL_S = 60.0


def anchor_s(folder: Path) -> float:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("1 + 1")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src, out = folder / "anchor.ipynb", folder / "anchor-out.ipynb"
    nbformat.write(nb, str(src))
    t0 = time.perf_counter()
    pm.execute_notebook(str(src), str(out), kernel_name="python3", progress_bar=False,
                        kernel_manager_class=_ipc_kernel_manager(), shutdown_kernel="immediate")
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=int, default=3600)
    parser.add_argument("--keep", type=Path, help="write the run and the report here and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t0 = time.perf_counter()
        run = write_mail_run(root / "runs", run_id="hour", release="bench", duration_s=args.duration_s,
                             chunk_s=60, names=MAIL_NAMES)
        write_s = time.perf_counter() - t0
        anchor = anchor_s(Path(tmp))
        t0 = time.perf_counter()
        report = build_report("bench", [run], out_dir=root / "report")
        report_s = time.perf_counter() - t0
        print(f"run: {args.duration_s} s at 1 Hz, {len(MAIL_NAMES)} request names, written in {write_s:.1f} s")
        print(f"anchor (papermill, one-cell notebook): {anchor:.2f} s")
        print(f"report ({report.verdict}): {report_s:.2f} s = {report_s / anchor:.1f} x anchor; goal <= {GOAL_S:.0f} s")
        print(f"report_time_s={report_s:.2f} anchor_s={anchor:.2f} ratio={report_s / anchor:.2f} ok={report_s <= GOAL_S}")
        return 0 if report_s <= GOAL_S else 1


if __name__ == "__main__":
    sys.exit(main())
