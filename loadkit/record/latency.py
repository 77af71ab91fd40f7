"""Latency percentiles of a run record: one computation for gates, ``runs show`` and the report.

A run records, per interval and (type, name), how many requests completed in each log bucket
(:class:`loadkit.schema.LatencyBucket`, the ``latency`` table). A percentile over any window is
computed here and nowhere else: merge the buckets of the window, take the bucket that holds the
rank ``ceil(q * n)`` (nearest rank, as HdrHistogram does) and report its **upper edge**, capped at
the largest latency of the window when a generator's fine histogram recorded it exactly (as the
generator's console line is). So a figure never under-reports: it is at most
:data:`~loadkit.schema.LATENCY_BUCKET_ERROR` (about 4.4 %) above the true value for a generator's
fine histogram, and for requests that Locust timed (it keeps
milliseconds rounded to 2 significant digits) at most half a rounding step more (0.5 ms below
100 ms, else 5 %).

Averaging per-interval percentiles, or taking the worst of them, gives a figure that is no
percentile of the run; :func:`percentile_series` is for plots over time, :func:`percentile` for the
one number of a window.

Runs recorded before the ``latency`` table existed fall back to the whole-run percentiles of
Locust's own CSV (``locust/locust_stats.csv``), and say so in the label; a window cannot be cut from
those.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import pandas as pd

from loadkit.schema import (
    LATENCY_BUCKET_ERROR,
    RUN_LAYOUT,
    SESSION_HOLD_NAMES,
    latency_bucket,
    nearest_rank,
    percentile_edge_s,
)

#: Locust writes <run>/locust/<prefix>_stats.csv (``loadkit run`` passes --csv with this prefix)
LOCUST_CSV_PREFIX = "locust"

#: Locust CSV percentile columns by quantile
_CSV_COLUMNS = {0.5: "50%", 0.66: "66%", 0.75: "75%", 0.8: "80%", 0.9: "90%", 0.95: "95%", 0.98: "98%",
                0.99: "99%", 0.999: "99.9%", 0.9999: "99.99%", 1.0: "100%"}


class Percentile(NamedTuple):
    """One latency percentile of a window of a run, with where it came from."""

    q: float
    value_s: float | None  #: None when nothing completed in the window (or it cannot be known)
    requests_n: int  #: requests the figure is over (0 when unknown: Locust's CSV fallback)
    source: str  #: "fine", "locust", "fine+locust", "locust_csv" or "none"
    label: str  #: what to print: "p99 ≤ 1.05 s (bucket upper edge, +4.4 % at most; 9,812 requests)"


def format_latency(value_s: float) -> str:
    """``812 µs``, ``12.3 ms``, ``1.05 s``: three significant digits in a readable unit."""
    if value_s < 1e-3:
        return f"{value_s * 1e6:.3g} µs"
    if value_s < 1.0:
        return f"{value_s * 1e3:.3g} ms"
    return f"{value_s:.3g} s"


def _error_note(source: str) -> str:
    edge = f"+{LATENCY_BUCKET_ERROR * 100:.1f} % at most"
    if source == "fine":
        return f"bucket upper edge, {edge}"
    # Locust's keys are rounded: each counts at the top of its rounding step, then in its bucket
    return f"bucket upper edge of Locust's rounded ms: up to +0.5 ms or +5 %, then {edge}"


def percentile_of_counts(counts: Mapping[int, int] | pd.Series, q: float, max_s: float | None = None) -> float | None:
    """The ``q`` quantile (0..1) in seconds of merged bucket counts (bucket index -> count): the
    upper edge of the bucket holding rank ``ceil(q * n)``, capped at ``max_s`` (the same requests'
    exact largest latency, when known) by :func:`~loadkit.schema.percentile_edge_s`; None when
    there are no counts."""
    nearest_rank(q, 1)  # checks q before the empty case returns
    series = counts if isinstance(counts, pd.Series) else pd.Series(dict(counts), dtype="int64")
    series = series[series > 0].sort_index()
    n = int(series.sum())
    if n == 0:
        return None
    rank = nearest_rank(q, n)
    cumulative = series.cumsum()
    index = int(cumulative.index[cumulative.searchsorted(rank)])
    return percentile_edge_s(index, max_s)


def locust_key_upper_s(key_ms: int) -> float:
    """The largest latency (seconds) Locust stores under response-time key ``key_ms``.

    Locust rounds to 2 significant digits (``locust.stats.bucket_response_time``): whole ms below
    100 ms, 10 ms below 1 s, 100 ms below 10 s, 1 s above; a key holds values up to half a step
    above it."""
    step_ms = 1 if key_ms < 100 else 10 if key_ms < 1000 else 100 if key_ms < 10000 else 1000
    return (key_ms + step_ms / 2) / 1000.0


def buckets_from_locust_ms(response_times: Mapping[int, int]) -> dict[int, int]:
    """Locust's response-time dict (rounded ms -> count) as log-bucket counts, each key counted at
    the upper edge of its rounding step, so percentiles from them never under-report."""
    out: dict[int, int] = {}
    for key_ms, count in response_times.items():
        if count > 0:
            b = latency_bucket(locust_key_upper_s(int(key_ms)))
            out[b] = out.get(b, 0) + int(count)
    return out


class _Loaded(NamedTuple):
    """The latency and requests tables of a run directory, read once for several figures."""

    path: Path
    latency: pd.DataFrame
    requests: pd.DataFrame


def load_latency(run: Any) -> Any:
    """``run`` itself when it holds its tables (RunData), else its directory's latency and requests
    tables read once (pass the result to several of these functions instead of the directory)."""
    if getattr(run, "latency", None) is not None:
        return run
    from loadkit.record.reader import read_table

    return _Loaded(Path(run), read_table(Path(run), "latency"), read_table(Path(run), "requests"))


def _buckets(run: Any) -> pd.DataFrame:
    return load_latency(run).latency


def _run_path(run: Any) -> Path:
    return Path(getattr(run, "path", run))


def select(run: Any, *, request_type: str | None = None, name: str | None = None,
           start_unix_s: float | None = None, end_unix_s: float | None = None) -> pd.DataFrame:
    """The run's LatencyBucket rows of one type/name (None: all but the held-session pseudo-requests
    :data:`~loadkit.schema.SESSION_HOLD_NAMES`) whose interval *ends* in ``(start_unix_s, end_unix_s]``
    (None: open)."""
    return _window(_buckets(run), request_type=request_type, name=name, start_unix_s=start_unix_s,
                   end_unix_s=end_unix_s)


def _window(table: pd.DataFrame, *, request_type: str | None, name: str | None,
            start_unix_s: float | None, end_unix_s: float | None) -> pd.DataFrame:
    """The rows of a per-interval table (latency buckets or requests) in one type/name and window."""
    if table.empty:
        return table
    keep = pd.Series(True, index=table.index)
    if name is None:  # a held session's duration is not a latency
        keep &= ~table["name"].isin(SESSION_HOLD_NAMES)
    if request_type is not None:
        keep &= table["request_type"] == request_type
    if name is not None:
        keep &= table["name"] == name
    if start_unix_s is not None:
        keep &= table["ts_unix_s"] > start_unix_s
    if end_unix_s is not None:
        keep &= table["ts_unix_s"] <= end_unix_s
    return table[keep]


def percentile(run: Any, q: float, *, request_type: str | None = None, name: str | None = None,
               start_unix_s: float | None = None, end_unix_s: float | None = None) -> Percentile:
    """The ``q`` quantile of every request of the window, with its source and a label.

    ``run`` is a :class:`~loadkit.record.reader.RunData` or a run directory."""
    label_q = f"p{q * 100:g}"
    run = load_latency(run)
    if run.latency.empty:
        windowed = start_unix_s is not None or end_unix_s is not None
        return _from_locust_csv(run, q, request_type, name, windowed=windowed)
    rows = select(run, request_type=request_type, name=name, start_unix_s=start_unix_s, end_unix_s=end_unix_s)
    counts = rows.groupby("bucket_index")["count_n"].sum() if len(rows) else pd.Series(dtype="int64")
    sources = sorted(rows["source"].unique()) if len(rows) else []
    source = "fine" if sources == ["fine"] else "locust" if sources == ["locust"] else "fine+locust"
    # a generator's exact maximum caps the top bucket's edge, as its own console line does, so the
    # run shows one figure (Locust's maximum is not one: its requests keep their edges)
    top_s = _max_s(select_requests(run, request_type, name, start_unix_s, end_unix_s)) if source == "fine" else None
    value = percentile_of_counts(counts, q, top_s)
    if value is None:
        return Percentile(q, None, 0, "none", f"{label_q}: no requests completed in this window")
    n = int(counts.sum())
    note = _error_note("fine" if source == "fine" else "locust")
    return Percentile(q, value, n, source, f"{label_q} ≤ {format_latency(value)} ({note}; {n:,} requests)")


def select_requests(run: Any, request_type: str | None = None, name: str | None = None,
                    start_unix_s: float | None = None, end_unix_s: float | None = None) -> pd.DataFrame:
    """The run's RequestInterval rows of the same selection and window as :func:`select` (empty
    when the run has no requests table)."""
    requests = getattr(run, "requests", None)
    if requests is None or requests.empty:
        return pd.DataFrame()
    return _window(requests, request_type=request_type, name=name, start_unix_s=start_unix_s,
                   end_unix_s=end_unix_s)


def _max_s(requests: pd.DataFrame) -> float | None:
    """The largest ``latency_max_s`` of intervals that completed requests; None without one."""
    tops = _max_by(requests.assign(_all=0) if len(requests) else requests, ["_all"])
    return float(tops[0]) if tops else None


def percentile_s(run: Any, q: float, *, request_type: str | None = None, name: str | None = None,
                 start_unix_s: float | None = None, end_unix_s: float | None = None) -> float | None:
    """Just the value of :func:`percentile` in seconds (None when nothing completed)."""
    return percentile(run, q, request_type=request_type, name=name, start_unix_s=start_unix_s,
                      end_unix_s=end_unix_s).value_s


def percentile_series(run: Any, q: float, *, request_type: str | None = None,
                      name: str | None = None) -> pd.DataFrame:
    """Per recorded interval: ``ts_unix_s``, ``interval_s``, ``requests_n``, ``latency_s`` (the
    ``q`` quantile of that interval's requests of the type/name, all of them when None). For plots
    over time; a run's single figure is :func:`percentile`, not an average of these."""
    columns = ["ts_unix_s", "interval_s", "requests_n", "latency_s"]
    run = load_latency(run)
    rows = select(run, request_type=request_type, name=name)
    if rows.empty:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
    tops = _max_by(select_requests(run, request_type, name), ["ts_unix_s"])
    out = []
    for ts, part in rows.groupby("ts_unix_s", sort=True):
        counts = part.groupby("bucket_index")["count_n"].sum()
        top_s = tops.get(ts) if list(part["source"].unique()) == ["fine"] else None
        value_s = percentile_of_counts(counts, q, top_s)
        out.append((float(ts), float(part["interval_s"].max()), int(counts.sum()), value_s))
    return pd.DataFrame(out, columns=columns)


def _max_by(requests: pd.DataFrame, keys: list[str]) -> dict:
    """The largest ``latency_max_s`` per group of ``keys`` (a tuple key for several), over
    intervals that completed requests: one groupby for every group's cap."""
    if requests.empty or "latency_max_s" not in requests:
        return {}
    done = requests[requests["requests_n"] > 0]
    return done.groupby(keys if len(keys) > 1 else keys[0])["latency_max_s"].max().to_dict()


def percentiles_by_name(run: Any, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> pd.DataFrame:
    """Whole-run percentiles per (request_type, name), held-session pseudo-requests left out:
    columns ``request_type``, ``name``, ``requests_n``, ``source`` and ``p50_s``, ``p90_s``... (one
    per ``q``). Empty for runs without the latency table."""
    run = load_latency(run)
    rows = run.latency
    if len(rows):  # a held session's duration is not a latency
        rows = rows[~rows["name"].isin(SESSION_HOLD_NAMES)]
    columns = ["request_type", "name", "requests_n", "source"] + [_column(q) for q in qs]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    tops = _max_by(select_requests(run), ["request_type", "name"])
    out = []
    for (request_type, name), part in rows.groupby(["request_type", "name"], sort=True):
        counts = part.groupby("bucket_index")["count_n"].sum()
        sources = sorted(part["source"].unique())
        top_s = tops.get((request_type, name)) if sources == ["fine"] else None
        out.append([request_type, name, int(counts.sum()), "+".join(sources)]
                   + [percentile_of_counts(counts, q, top_s) for q in qs])
    return pd.DataFrame(out, columns=columns)


def _column(q: float) -> str:
    """``0.99`` -> ``p99_s``, ``0.999`` -> ``p99.9_s``."""
    return f"p{q * 100:g}_s"


# -- runs recorded before the latency table ----------------------------------------------------------


def _from_locust_csv(run: Any, q: float, request_type: str | None, name: str | None,
                     windowed: bool) -> Percentile:
    label_q = f"p{q * 100:g}"
    if windowed:
        return Percentile(q, None, 0, "none", f"{label_q}: this record has no latency table, and Locust's "
                          "CSV has whole-run figures only")
    path = _run_path(run) / RUN_LAYOUT["locust"] / f"{LOCUST_CSV_PREFIX}_stats.csv"
    column = _CSV_COLUMNS.get(round(q, 6))
    value = _csv_value(path, column, request_type, name) if column else None
    if value is None:
        return Percentile(q, None, 0, "none", f"{label_q}: this record has no latency table and no usable "
                          "Locust CSV")
    held = ", held sessions included" if name is None else ""  # Locust's Aggregated row has them
    return Percentile(q, value, 0, "locust_csv",
                      f"{label_q} {format_latency(value)} (from Locust's CSV: whole run{held}, rounded by "
                      "Locust, may under-report; this record has no latency table)")


def _csv_value(path: Path, column: str, request_type: str | None, name: str | None) -> float | None:
    if not path.exists():
        return None
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if request_type is None and name is None:
                wanted = row.get("Name") == "Aggregated"
            else:  # one (type, name) row; a type alone has no row of its own there
                wanted = row.get("Type") == request_type and row.get("Name") == name
            if wanted:
                try:
                    return float(row[column]) / 1000.0
                except (KeyError, ValueError):  # "N/A" when nothing completed
                    return None
    return None
