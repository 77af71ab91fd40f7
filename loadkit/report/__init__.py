"""report stage: the per-release capacity report.

:func:`build_report` checks the runs, writes ``summary.json`` (:func:`analysis.summarize`),
executes ``notebooks/capacity_report.ipynb`` with papermill and renders it to HTML without code.
"""

from loadkit.report.build import Report, build_report, check_run, find_runs, render_html

__all__ = ["Report", "build_report", "check_run", "find_runs", "render_html"]
