"""Build the capacity report of one release: check the runs, write ``summary.json``, execute
``notebooks/capacity_report.ipynb`` with papermill and render it to HTML without code cells.

Output directory (``reports/<release>/`` by default)::

    index.html                 the report (inputs hidden, figures embedded)
    capacity_report.ipynb      the executed notebook, saved even when a cell fails
    summary.json               the typed summary (loadkit.report.summary.ReportSummary): verdict,
                               gates, headroom, DNS, latency, anomalies, models, changes, manifests
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from loadkit import resources
from loadkit.errors import RecordError, ReportError
from loadkit.schema import RUN_LAYOUT
from loadkit.record.reader import RunData, load_manifest, load_run
from loadkit.record.writer import record_complete

from .analysis import locust_html_of, summarize
from .summary import ReportSummary

#: the notebook every release report is executed from (resolved by :func:`build_report`, not at
#: import: an installation without its notebooks must still list and run every other subcommand)
NOTEBOOK_NAME = "capacity_report"
#: where ``loadkit report`` looks for runs when none are given, and where reports go
RUNS_DIR = Path("runs")
REPORTS_DIR = Path("reports")
#: per-cell limit for the notebook (a one-hour run renders in well under this)
CELL_TIMEOUT_S = 600

Progress = Callable[[str], None]


@dataclass
class Report:
    """Where a built report is, and what it says."""

    out_dir: Path
    html: Path
    notebook: Path
    summary_json: Path
    summary: ReportSummary

    @property
    def verdict(self) -> str:
        return self.summary.verdict


def _quiet(_msg: str) -> None:
    pass


def find_runs(release: str, runs_dir: str | Path = RUNS_DIR) -> list[Path]:
    """Run directories under ``runs_dir`` (one or two levels down) whose manifest names
    ``release``, oldest first; :class:`ReportError` when there are none."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ReportError(f"runs directory {runs_dir} does not exist; pass the runs with --runs DIR")
    found: list[tuple[float, Path]] = []
    seen = 0
    for manifest in sorted([*runs_dir.glob("*/manifest.json"), *runs_dir.glob("*/*/manifest.json")]):
        seen += 1
        try:
            data = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if str(data.get("release")) == release:
            found.append((float(data.get("started_unix_s") or 0.0), manifest.parent))
    if not found:
        raise ReportError(
            f"no runs of release {release!r} in {runs_dir} ({seen} run manifests looked at); "
            "record some with 'loadkit run --release' or pass them with --runs DIR"
        )
    return [path for _, path in sorted(found)]


def check_run(path: str | Path) -> RunData:
    """Load one run for the report; :class:`ReportError` naming the run when it is missing or
    incomplete (still running, killed before its manifest was rewritten, or without requests)."""
    path = Path(path)
    try:
        manifest = load_manifest(path)
    except RecordError as err:
        raise ReportError(f"cannot report on run {path}: {err}") from err
    status = manifest.get("status")
    if not record_complete(manifest):
        raise ReportError(
            f"run {path} is incomplete (manifest status {status!r}, no end written): it is still "
            "running or its Locust process was killed before closing the record; wait for it to "
            "finish or leave it out"
        )
    if not (path / RUN_LAYOUT["requests"]).is_dir() or not any((path / RUN_LAYOUT["requests"]).glob("*.parquet")):
        raise ReportError(f"run {path} is incomplete: it has no request statistics ({RUN_LAYOUT['requests']}/)")
    try:
        return load_run(path)
    except RecordError as err:
        raise ReportError(f"cannot report on run {path}: {err}") from err


def build_report(
    release: str,
    run_dirs: Sequence[str | Path],
    *,
    baseline_dirs: Sequence[str | Path] = (),
    baseline_release: str | None = None,
    out_dir: str | Path | None = None,
    forecast_peak_sessions: float | None = None,
    forecast_peak_qps: float | None = None,
    forecast_peak_burst_queries: float | None = None,
    notebook: str | Path | None = None,
    progress: Progress = _quiet,
) -> Report:
    """Build the report of ``release`` from ``run_dirs``; see the module docstring."""
    if not release or "/" in release or release.startswith("."):
        raise ReportError(f"release name {release!r} cannot be used as a directory name")
    if not run_dirs:
        raise ReportError(f"no runs given for release {release!r}")
    # the checkout's notebooks/, or the wheel's package data (InputFileError when both are missing)
    notebook = Path(notebook) if notebook is not None else resources.notebook(NOTEBOOK_NAME)
    if not notebook.exists():
        raise ReportError(f"report notebook {notebook} is missing")
    out = Path(out_dir) if out_dir is not None else REPORTS_DIR / release
    t0 = time.perf_counter()

    progress(f"checking {len(run_dirs)} run(s) of release {release}")
    runs = [check_run(p) for p in run_dirs]
    baseline = []
    if baseline_dirs:
        progress(f"checking {len(baseline_dirs)} baseline run(s) of release {baseline_release}")
        baseline = [check_run(p) for p in baseline_dirs]

    progress("fitting models and comparing with the baseline" if baseline else "fitting models")
    summary = summarize(
        runs,
        release=release,
        baseline_runs=baseline,
        baseline_release=baseline_release,
        forecast_peak_sessions=forecast_peak_sessions,
        forecast_peak_qps=forecast_peak_qps,
        forecast_peak_burst_queries=forecast_peak_burst_queries,
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create report directory {out}: {err.strerror}") from err
    summary_json = out / "summary.json"
    summary_json.write_text(summary.to_json())
    _copy_locust_html(summary.runs + summary.baseline_runs, out)

    executed = out / "capacity_report.ipynb"
    progress(f"executing {notebook.name} ({len(runs)} run(s))")
    _execute(
        notebook,
        executed,
        {
            "release": release,
            "run_dirs": [str(Path(p).resolve()) for p in run_dirs],
            "baseline_release": baseline_release or "",
            "baseline_dirs": [str(Path(p).resolve()) for p in baseline_dirs],
            "summary_json": str(summary_json.resolve()),
        },
        cwd=out,
    )
    progress("rendering HTML without code cells")
    html = out / "index.html"
    html.write_text(render_html(executed))
    progress(f"report of {release}: {summary.verdict} ({time.perf_counter() - t0:.1f} s) -> {html}")
    return Report(out, html, executed, summary_json, summary)


def _copy_locust_html(rows: Sequence, out: Path) -> None:
    """Each run's Locust HTML beside the report, so the report's links work wherever it is published."""
    for row in rows:
        source = locust_html_of(row.path) if row.locust_html else None
        if source is None:
            continue
        target = out / row.locust_html
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        except OSError as err:
            raise ReportError(f"cannot copy {source} to {target}: {err.strerror}") from err


def _execute(notebook: Path, output: Path, parameters: dict, cwd: Path) -> None:
    """papermill saves the output notebook before it raises, so a failed cell can be read."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    # papermill logs every path at INFO; our own progress lines say what matters
    logging.getLogger("papermill").setLevel(logging.WARNING)
    try:
        pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters,
            kernel_name="python3",
            progress_bar=False,
            cwd=str(cwd),
            execution_timeout=CELL_TIMEOUT_S,
            kernel_manager_class=_ipc_kernel_manager(),
            shutdown_kernel="immediate",  # a graceful stop makes the kernel log a KeyboardInterrupt
        )
    except PapermillExecutionError as err:
        raise ReportError(
            f"report notebook failed in cell {err.exec_count}: {err.ename}: {err.evalue}; "
            f"the executed notebook is saved at {output}"
        ) from err
    except Exception as err:  # kernel missing or died: name it rather than a traceback
        raise ReportError(f"report notebook could not run ({type(err).__name__}: {err}); see {output}") from err


def _ipc_kernel_manager() -> type:
    """A kernel manager that talks to the kernel over unix sockets in Jupyter's runtime
    directory: no TCP port is opened (and ipykernel has no unencrypted-TCP warning to print)."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IpcKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    return IpcKernelManager


def render_html(executed: str | Path) -> str:
    """The executed notebook as standalone HTML, without input cells or prompts."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    exporter = HTMLExporter()
    exporter.exclude_input = True
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(nb)
    return body
