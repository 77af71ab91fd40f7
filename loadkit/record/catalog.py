"""The catalog: every run record under a runs directory, queried with DuckDB.

Manifests (small JSON files) say what each run was; request and failure totals come from DuckDB
over all runs' Parquet part files at once (``read_parquet('runs/*/requests/*.parquet')``), so
listing a hundred runs does not load a hundred tables into pandas. Runs are filtered by release
and scenario and sorted by start time.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from loadkit.errors import RecordError
from loadkit.record.latency import load_latency, percentile, percentiles_by_name
from loadkit.record.reader import load_manifest, read_events
from loadkit.record.writer import record_complete
from loadkit.schema import RUN_LAYOUT

log = logging.getLogger(__name__)

LIST_COLUMNS = [
    "run_id", "scenario", "release", "status", "complete", "started_unix_s", "duration_s",
    "requests_n", "failures_n", "gates", "path",
]


def _manifests(runs_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(runs_dir.glob(f"*/{RUN_LAYOUT['manifest']}")):
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("skipping %s: %s", path, err)
            continue
        m["path"] = str(path.parent)
        m["dir_name"] = path.parent.name
        out.append(m)
    return out


def _sql_path(p: Path) -> str:
    return str(p).replace("'", "''")


def _totals(runs_dir: Path, table: str, columns: str, group: str) -> pd.DataFrame:
    """DuckDB aggregate over every run's part files of ``table``, grouped by run directory."""
    pattern = runs_dir / "*" / RUN_LAYOUT[table] / "*.parquet"
    if not any(runs_dir.glob(f"*/{RUN_LAYOUT[table]}/*.parquet")):
        return pd.DataFrame()
    con = duckdb.connect()
    try:
        return con.execute(
            f"""
            SELECT regexp_extract(filename, '([^/]+)/{RUN_LAYOUT[table]}/[^/]+$', 1) AS dir_name,
                   {columns}
            FROM read_parquet('{_sql_path(pattern)}', filename = true, union_by_name = true)
            GROUP BY {group}
            """
        ).df()
    finally:
        con.close()


def _gate_summary(gates: list[dict]) -> str:
    if not gates:
        return "-"
    failed = [g["name"] for g in gates if g.get("passed") is False]
    if failed:
        return "FAIL " + ",".join(failed)
    passed = sum(1 for g in gates if g.get("passed"))
    return f"pass {passed}/{len(gates)}"


def list_runs(runs_dir: str | Path = "runs", release: str | None = None,
              scenario: str | None = None) -> pd.DataFrame:
    """One row per run (columns :data:`LIST_COLUMNS`), oldest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise RecordError(f"runs directory {runs_dir} does not exist (run 'loadkit run' first or pass --dir)")
    manifests = [
        m for m in _manifests(runs_dir)
        if (release is None or m.get("release") == release) and (scenario is None or m.get("scenario") == scenario)
    ]
    if not manifests:
        return pd.DataFrame(columns=LIST_COLUMNS)
    totals = _totals(runs_dir, "requests", "sum(requests_n) AS requests_n, sum(failures_n) AS failures_n",
                     "dir_name")
    by_dir = {r.dir_name: r for r in totals.itertuples()} if len(totals) else {}
    rows = []
    for m in manifests:
        t = by_dir.get(m["dir_name"])
        started, ended = m.get("started_unix_s") or 0.0, m.get("ended_unix_s") or 0.0
        rows.append({
            "run_id": m.get("run_id", m["dir_name"]),
            "scenario": m.get("scenario", ""),
            "release": m.get("release", ""),
            "status": m.get("status", ""),
            "complete": record_complete(m),
            "started_unix_s": started,
            "duration_s": round(ended - started, 1) if ended else float("nan"),
            "requests_n": int(t.requests_n) if t is not None else 0,
            "failures_n": int(t.failures_n) if t is not None else 0,
            "gates": _gate_summary(m.get("gates") or []),
            "path": m["path"],
        })
    return pd.DataFrame(rows, columns=LIST_COLUMNS).sort_values("started_unix_s", ignore_index=True)


def find_run(run: str, runs_dir: str | Path = "runs") -> Path:
    """A run directory from a path, a run id, or a unique prefix of one."""
    p = Path(run)
    if (p / RUN_LAYOUT["manifest"]).exists():
        return p
    runs_dir = Path(runs_dir)
    if (runs_dir / run / RUN_LAYOUT["manifest"]).exists():
        return runs_dir / run
    matches = sorted(d.parent for d in runs_dir.glob(f"{run}*/{RUN_LAYOUT['manifest']}"))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise RecordError(f"run {run!r} is ambiguous in {runs_dir}: {', '.join(m.name for m in matches[:5])}")
    raise RecordError(f"no run {run!r} in {runs_dir} (see 'loadkit runs list --dir {runs_dir}')")


def show_run(run: str, runs_dir: str | Path = "runs") -> dict[str, Any]:
    """Manifest, per-request totals and whole-run percentiles, the run's percentiles over every
    request (``latency``: what the latency gates compare), failures by class, events by kind."""
    path = find_run(run, runs_dir)
    manifest = load_manifest(path)
    con = duckdb.connect()
    try:
        requests = pd.DataFrame()
        failures = pd.DataFrame()
        last_interval_unix_s = None
        req_glob = path / RUN_LAYOUT["requests"] / "*.parquet"
        if any((path / RUN_LAYOUT["requests"]).glob("*.parquet")):
            requests = con.execute(
                f"""
                SELECT request_type, name, sum(requests_n) AS requests_n, sum(failures_n) AS failures_n,
                       sum(latency_mean_s * requests_n) / sum(requests_n) AS latency_mean_s,
                       max(latency_max_s) AS latency_max_s,
                       sum(requests_n) / (max(ts_unix_s) - min(ts_unix_s - interval_s)) AS rate_per_s
                FROM read_parquet('{_sql_path(req_glob)}')
                GROUP BY request_type, name ORDER BY request_type, name
                """
            ).df()
            last_interval_unix_s = con.execute(
                f"SELECT max(ts_unix_s) FROM read_parquet('{_sql_path(req_glob)}')").fetchone()[0]
        if any((path / RUN_LAYOUT["failures"]).glob("*.parquet")):
            failures = con.execute(
                f"""
                SELECT request_type, name, failure_class, sum(failures_n) AS failures_n
                FROM read_parquet('{_sql_path(path / RUN_LAYOUT['failures'] / '*.parquet')}')
                GROUP BY ALL ORDER BY failures_n DESC
                """
            ).df()
    finally:
        con.close()
    run = load_latency(path)  # one read of the latency table for every figure below
    requests = _with_percentiles(run, requests)
    events = read_events(path)
    kinds: dict[str, int] = {}
    for e in events:
        kinds[e.get("kind", "?")] = kinds.get(e.get("kind", "?"), 0) + 1
    notable = [e for e in events if e.get("kind") in ("abort", "worker_lost", "oom_kill", "warning")]
    return {"path": str(path), "manifest": manifest, "requests": requests, "failures": failures,
            "latency": run_latency(run), "event_counts": kinds, "notable_events": notable,
            "complete": record_complete(manifest), "incomplete": _incomplete(manifest, last_interval_unix_s)}


def _incomplete(manifest: dict[str, Any], last_interval_unix_s: float | None) -> str:
    """'' for a complete record, else one line: how it ended and what it holds."""
    if record_complete(manifest):
        return ""
    if manifest.get("status") in (None, "running"):
        how = "still running, or its recording process was killed before closing it"
    else:
        how = f"its recording process died; the runner closed it as {manifest.get('status')}"
    held = (f"request intervals up to {time.strftime('%H:%M:%S UTC', time.gmtime(last_interval_unix_s))}"
            if last_interval_unix_s else "no request intervals")
    return f"INCOMPLETE ({how}): it holds {held}; the report refuses it"


#: the percentiles ``runs show`` gives per request name and for the whole run
SHOW_QUANTILES = (0.5, 0.9, 0.95, 0.99)


def run_latency(run: Any) -> dict[str, Any]:
    """Whole-run percentiles over every request (the figures the latency gates compare), each
    with its label: ``{"p99_s": 1.04, "p99_label": "p99 ≤ 1.04 s (bucket upper edge, ...)", ...}``."""
    out: dict[str, Any] = {}
    run = load_latency(run)
    for q in SHOW_QUANTILES:
        figure = percentile(run, q)
        key = f"p{q * 100:g}"
        out[f"{key}_s"], out[f"{key}_label"] = figure.value_s, figure.label
        out["source"] = figure.source
    return out


def _with_percentiles(run: Any, requests: pd.DataFrame) -> pd.DataFrame:
    """Per-name whole-run percentiles from the latency buckets (upper edges) beside the totals;
    none for runs recorded before the latency table (their figure is the labelled whole-run one)."""
    if requests.empty:
        return requests
    by_name = percentiles_by_name(run, SHOW_QUANTILES)
    if by_name.empty:
        return requests
    by_name = by_name.drop(columns=["requests_n"]).rename(columns={"source": "latency_source"})
    return requests.merge(by_name, on=["request_type", "name"], how="left")
