"""What the capacity report says: :func:`summarize` turns loaded runs into a typed
:class:`~loadkit.report.summary.ReportSummary` (``summary.json``), which the notebook renders.

This module holds the facts about one run the rest of the report shares (its service, its setup,
its window, where its proxies failed, how it ended, its latency percentiles) and the verdict. The
figures come from :mod:`loadkit.model` through :mod:`.capacity` and :mod:`.models`; generator
counters and gauges are read only through :mod:`loadkit.record.counters`. A model that cannot be
fitted leaves its figure out and says why in ``notes``: one unfit model must not sink the report.

Everything is relative to each run's own start: events and cumulative counters (OOM kills) from
before a run do not mark it. Runs of different scenarios or lab setups are never merged: each
setup gets its own rows, and the baseline is compared scenario by scenario.

Verdict: ``FAIL`` when a gate failed (a designed abort is not a failure: see :func:`run_outcome`)
or a service has no headroom left at its forecast peak; ``WARN`` when a figure regressed against
the baseline, a run did not complete, a gate was not evaluated or bursts overflowed the receive
buffer without a forecast to judge them by; ``PASS`` otherwise.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from loadkit.record import counters
from loadkit.record.reader import RunData
from loadkit.schema import RUN_LAYOUT, SESSION_HOLD_NAMES

from .summary import (
    OUTCOME_COMPLETED,
    OUTCOME_DESIGNED_ABORT,
    GateRow,
    LatencyRow,
    ReportSummary,
    RunRow,
)

MAIL_TYPES = ("IMAP", "POP3")

#: request names that time how long a session was held, not how fast the service answered
HOLD_NAMES = SESSION_HOLD_NAMES

MIB = 2**20


# --------------------------------------------------------------------------------------------
# facts about one run
# --------------------------------------------------------------------------------------------


def num(value: Any) -> float | None:
    """A finite float or None (JSON has no NaN)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def run_window(run: RunData) -> tuple[float, float]:
    """(start, end) of the run in unix seconds; end is inf when the manifest has none."""
    m = run.manifest
    start = num(m.get("started_unix_s"))
    if not start:
        start = float(run.requests["ts_unix_s"].min()) if len(run.requests) else 0.0
    end = num(m.get("ended_unix_s")) or math.inf
    return float(start), float(end)


def run_service(run: RunData) -> str:
    """The service a run loads: "DNS", "IMAP", "POP3", or "IMAP+POP3" when a storm logged in
    with both protocols (their sessions fill the same proxies)."""
    req = run.requests
    if len(req) and "request_type" in req:
        counts = req.groupby("request_type")["requests_n"].sum()
        counts.index = [str(i).upper() for i in counts.index]
        counts = counts.groupby(level=0).sum()
        counts = counts[counts > 0]
        if len(counts):
            mail = [t for t in MAIL_TYPES if t in counts.index]
            if mail and counts[mail].sum() >= counts.sum() / 2:
                return "+".join(mail)
            return str(counts.idxmax())
    return str((run.manifest.get("profile") or {}).get("protocol", "unknown")).upper()


def proxy_groups(run: RunData) -> pd.DataFrame:
    """Samples of the run's memory-limited groups (the proxies), empty when there are none."""
    g = run.groups
    if not len(g) or "cgroup_limit_bytes" not in g:
        return g.iloc[0:0]
    limited = g.groupby("group")["cgroup_limit_bytes"].max()
    names = [n for n, lim in limited.items() if lim and lim > 0]
    return g[g["group"].isin(names)].sort_values("ts_unix_s").copy()


def run_setup(run: RunData) -> str:
    """The scenario and the lab it ran against, in words: runs whose setups differ are reported
    side by side, never merged (a 2 × 64 MiB lab and a 3 × 256 MiB lab are different systems)."""
    m = run.manifest
    parts = [", ".join(str(t) for t in m.get("targets") or []) or "no target recorded"]
    g = proxy_groups(run)
    if len(g):
        limits = g.groupby("group")["cgroup_limit_bytes"].max()
        sizes = sorted({f"{v / MIB:.0f} MiB" for v in limits})
        parts.append(f"{len(limits)} proxies × {'/'.join(sizes)}")
    # a load stated relative to the lab's measured capacity: the expression and the figure it was
    # (a lab measuring another capacity is another setup)
    for option, row in ((m.get("profile") or {}).get("capacity_relative") or {}).items():
        parts.append(f"{option} {row.get('expression')} = {num(row.get('value_qps')) or 0:,.0f} q/s "
                     f"of {num(row.get('capacity_qps')) or 0:,.0f} q/s measured")
    return f"{m.get('scenario', '') or 'no scenario'} ({'; '.join(parts)})"


def held_sessions(run: RunData) -> tuple[str, pd.Series]:
    """Sessions the load generator held, summed over IMAP and POP3 (``<proto>.held_sessions``
    gauges), with a label naming the protocols; empty when the run has no such gauge."""
    series = {p: counters.gauge(run, f"{p.lower()}.held_sessions") for p in MAIL_TYPES}
    series = {p: s for p, s in series.items() if len(s)}
    if not series:
        return "", pd.Series(dtype="float64")
    # each protocol's gauge holds its value until its next sample
    wide = pd.concat(series, axis=1).sort_index().ffill().fillna(0.0)
    return "+".join(series), wide.sum(axis=1)


def first_failure_ts(run: RunData) -> dict[str, float]:
    """group -> time of its first OOM kill or master exit *during this run*.

    From events inside the run's window, and from the cgroup's cumulative OOM-kill counter rising
    above its value at the run's first sample (a kill from an earlier run leaves the counter at
    94, not 0). A login process ending its session is not a failure: with one process per
    connection they exit all the time.
    """
    start, end = run_window(run)
    first: dict[str, float] = {}
    for ev in run.events:
        kind = ev.get("kind")
        ts = num(ev.get("ts_unix_s"))
        if ts is None or not start <= ts <= end:
            continue
        if kind == "oom_kill" or (kind == "process_exited" and (ev.get("detail") or {}).get("root")):
            src = str(ev.get("source"))
            first[src] = min(first.get(src, math.inf), ts)
    g = proxy_groups(run)
    for name, rows in g.groupby("group"):
        kills = rows["cgroup_oom_kills_n"].to_numpy(dtype=float)
        rose = rows["ts_unix_s"].to_numpy(dtype=float)[kills > kills[0]]
        if len(rose):
            first[str(name)] = min(first.get(str(name), math.inf), float(rose[0]))
    return first


def abort_event(run: RunData) -> dict:
    return next((e for e in reversed(run.events) if e.get("kind") == "abort"), {})


def run_outcome(run: RunData) -> tuple[str, str]:
    """(outcome, detail): the manifest's status, except that an abort the profile was set up to
    reach is ``aborted as designed``.

    A profile cannot say "this run ends by its abort", so the rule reads what was recorded: the
    abort's reason is the ``[abort] cgroup_memory_fraction`` threshold the profile set (a ramp that
    stops before the OOM killer acts, as ``scenarios/proxies_fall_over.toml`` does) and no proxy
    fell over before it. A failure-ratio abort, or one after an OOM kill, stays a failure.
    """
    status = str(run.manifest.get("status", ""))
    if status != "aborted":
        return status, ""
    detail = abort_event(run).get("detail") or {}
    reason = str(detail.get("reason", "unknown reason"))
    source = str(abort_event(run).get("source", ""))
    thresholds = ((run.manifest.get("profile") or {}).get("abort") or {})
    threshold = num(thresholds.get(reason))
    if reason == "cgroup_memory_fraction" and threshold and not first_failure_ts(run):
        fraction = num(detail.get("fraction")) or threshold
        return OUTCOME_DESIGNED_ABORT, (
            f"{source} reached {fraction:.0%} of its memory limit, the [abort] cgroup_memory_fraction "
            f"{threshold:g} the ramp is set to stop at, before any proxy fell over"
        )
    return status, f"aborted: {reason}" + (f" on {source}" if source else "")


# --------------------------------------------------------------------------------------------
# latency: one computation for every percentile shown
# --------------------------------------------------------------------------------------------

_INTERVAL_COLUMNS = {0.5: "latency_p50_s", 0.9: "latency_p90_s", 0.95: "latency_p95_s", 0.99: "latency_p99_s"}

#: where a percentile came from -> how the report describes it ("{p}" is "p99")
PERCENTILE_SOURCES = {
    "fine": "{p} over the whole run, ≤ +{err:.1f} % (upper edge of its histogram bucket)",
    "locust": "{p} over the whole run, upper bucket edge of Locust's rounded ms (≤ +0.5 ms or +5 %, then +{err:.1f} %)",
    "locust_csv": "{p} over the whole run from Locust's CSV (rounded by Locust, may under-report)",
    "interval_max": "{p} over the whole run: an upper bound (the highest {p} of any recording interval)",
    "none": "{p}: no requests completed",
}


def percentile(run: RunData, q: float, request_type: str | None = None,
               name: str | None = None) -> tuple[float | None, str]:
    """(seconds, source): the ``q`` quantile (0.99 for p99) of latency over the whole run.

    One computation for every percentile the report shows: the run's latency histogram through
    :func:`loadkit.record.latency.percentile` (upper bucket edge, as gates and ``runs show`` use).
    A record without one (older, or synthetic) falls back to the highest per-interval percentile,
    which bounds the run's from above: if no interval has more than 1 % of its requests above X,
    neither has the run. ``source`` is a key of :data:`PERCENTILE_SOURCES`.
    """
    from loadkit.record import latency

    found = latency.percentile(run, q, request_type=request_type, name=name)
    if found.value_s is not None:
        return num(found.value_s), "locust" if found.source == "fine+locust" else found.source
    req = run.requests
    if request_type is not None:
        req = req[req["request_type"] == request_type]
    if name is not None:
        req = req[req["name"] == name]
    req = req[req["requests_n"] > 0]
    column = _INTERVAL_COLUMNS.get(round(q, 4))
    if column is None or not len(req):
        return None, "none"
    return num(req[column].max()), "interval_max"


def latency_label(sources: set[str] | list[str], q: float = 0.99) -> str:
    """What the report's percentiles are, in words, from the sources :func:`percentile` gave."""
    from loadkit.schema import LATENCY_BUCKET_ERROR

    known = [src for src in PERCENTILE_SOURCES if src in set(sources) and src != "none"] or ["none"]
    return "; ".join(PERCENTILE_SOURCES[src].format(p=f"p{q * 100:g}", err=LATENCY_BUCKET_ERROR * 100)
                     for src in known)


def latency_rows(run: RunData) -> list[LatencyRow]:
    """Whole-run percentiles per (type, name) (:func:`percentile`), without the held-session
    pseudo-requests."""
    req = run.requests
    rows: list[LatencyRow] = []
    if not len(req):
        return rows
    req = req[~req["name"].isin(HOLD_NAMES)]
    for (rtype, name), g in req.groupby(["request_type", "name"]):
        n = int(g["requests_n"].clip(lower=0).sum())
        if n == 0:
            continue
        p99, source = percentile(run, 0.99, str(rtype), str(name))
        rows.append(LatencyRow(
            run_id=run.run_id, scenario=str(run.manifest.get("scenario", "")), service=str(rtype),
            name=str(name), requests_n=n, failures_n=int(g["failures_n"].sum()),
            p50_s=percentile(run, 0.5, str(rtype), str(name))[0],
            p95_s=percentile(run, 0.95, str(rtype), str(name))[0],
            p99_s=p99, p99_source=source, max_s=num(g["latency_max_s"].max()),
        ))
    return rows


# --------------------------------------------------------------------------------------------
# runs and gates
# --------------------------------------------------------------------------------------------


#: where a run's Locust HTML is copied to, relative to the report's directory
LOCUST_HTML_IN_REPORT = "locust/{run_id}.html"


def locust_html_of(run_path: str | Path) -> Path | None:
    """The Locust HTML report a run recorded (``loadkit run`` passes ``--html`` into its ``locust/``
    folder), or None."""
    found = sorted((Path(run_path) / RUN_LAYOUT["locust"]).glob("*.html"))
    return found[0] if found else None


def run_row(run: RunData) -> RunRow:
    m = run.manifest
    start, end = run_window(run)
    outcome, detail = run_outcome(run)
    return RunRow(
        run_id=run.run_id, scenario=str(m.get("scenario", "")), release=str(m.get("release", "")),
        status=str(m.get("status", "")), outcome=outcome, outcome_detail=detail,
        service=run_service(run), setup=run_setup(run), started_unix_s=start,
        duration_s=max(0.0, end - start) if math.isfinite(end) else None,
        targets=[str(t) for t in m.get("targets") or []],
        versions={str(k): str(v) for k, v in (m.get("versions") or {}).items()}, path=str(run.path),
        locust_html=LOCUST_HTML_IN_REPORT.format(run_id=run.run_id) if locust_html_of(run.path) else "",
    )


def gate_rows(run: RunData, outcome: str) -> list[GateRow]:
    """The run's recorded gates; the ``no_abort`` gate of a designed abort is not a failure."""
    rows = []
    for gate in run.manifest.get("gates") or []:
        passed = gate.get("passed")
        if passed is None:
            verdict = "not evaluated"
        elif passed:
            verdict = "pass"
        elif gate.get("name") == "no_abort" and outcome == OUTCOME_DESIGNED_ABORT:
            verdict = OUTCOME_DESIGNED_ABORT
        else:
            verdict = "fail"
        rows.append(GateRow(run_id=run.run_id, name=str(gate.get("name", "")), passed=passed,
                            value=num(gate.get("value")), limit=num(gate.get("limit")),
                            detail=str(gate.get("detail", "") or ""), outcome=verdict))
    return rows


# --------------------------------------------------------------------------------------------
# the summary and its verdict
# --------------------------------------------------------------------------------------------


def group_by_setup(runs: Sequence[RunData]) -> dict[tuple[str, str, str], list[RunData]]:
    """(service, scenario, setup) -> runs, in the order first seen."""
    groups: dict[tuple[str, str, str], list[RunData]] = {}
    for run in runs:
        key = (run_service(run), str(run.manifest.get("scenario", "")), run_setup(run))
        groups.setdefault(key, []).append(run)
    return groups


def summarize(
    runs: Sequence[RunData],
    *,
    release: str,
    baseline_runs: Sequence[RunData] = (),
    baseline_release: str | None = None,
    forecast_peak_sessions: float | None = None,
    forecast_peak_qps: float | None = None,
    forecast_peak_burst_queries: float | None = None,
) -> ReportSummary:
    """The report's figures (see the module docstring for the verdict). A forecast not given
    here is read from the runs' profiles (``[gates] forecast_peak_*``)."""
    # imported here: those modules build on the run facts above (they import this module)
    from . import capacity, compare, models

    s = ReportSummary(release=release, baseline_release=baseline_release, generated_unix_s=time.time())
    s.runs = [run_row(r) for r in runs]
    outcomes = {row.run_id: row.outcome for row in s.runs}
    s.gates = [g for r in runs for g in gate_rows(r, outcomes[r.run_id])]
    groups = group_by_setup(runs)
    capacity.fill(s, groups, forecast_peak_sessions, forecast_peak_qps, forecast_peak_burst_queries)
    s.latency = [row for run in runs for row in latency_rows(run)]
    s.latency_label = latency_label({row.p99_source for row in s.latency})
    s.anomalies = [models.anomaly_row(run, s.notes) for run in runs]
    s.models = models.model_rows(s, groups)
    _note_merges(s, groups)
    if baseline_runs:
        base = summarize(baseline_runs, release=baseline_release or "baseline",
                         forecast_peak_sessions=forecast_peak_sessions, forecast_peak_qps=forecast_peak_qps,
                         forecast_peak_burst_queries=forecast_peak_burst_queries)
        s.baseline_runs = base.runs
        s.changes = compare.compare(s, base)
        s.notes += compare.unmatched(s, base)
    verdict(s)
    return s


def _note_merges(s: ReportSummary, groups: dict[tuple[str, str, str], list[RunData]]) -> None:
    services: dict[str, int] = {}
    for service, _scenario, _setup in groups:
        services[service] = services.get(service, 0) + 1
    for service, n in services.items():
        if n > 1:
            s.notes.append(f"{service}: runs of {n} different scenarios or lab setups are reported side "
                           "by side, one row each, never merged")


def verdict(s: ReportSummary) -> None:
    """Set ``verdict``, ``verdict_reasons`` and ``verdict_notes`` from the figures."""
    fail = [f"gate {g.name} failed in run {g.run_id}" for g in s.gates if g.outcome == "fail"]
    for m in s.mail:
        if m.headroom_pct is not None and m.headroom_pct < 0:
            fail.append(f"{m.service} ({m.scenario}): forecast peak {m.forecast_peak_sessions:.0f} sessions is "
                        f"above the first failure at {m.first_failure_sessions:.0f} sessions")
    warn = []
    for d in s.dns_capacity:
        if d.headroom_pct is not None and d.headroom_pct < 0:
            fail.append(f"DNS ({d.scenario}): the forecast peak is above what the service absorbs; {d.recommendation}")
        elif d.mode == "burst" and not d.is_lower_bound and d.burst_queries and d.forecast_peak_burst_queries is None:
            if d.drops_counted:
                warn.append(f"DNS ({d.scenario}): bursts of {d.burst_queries:,.0f} queries offered overflowed the "
                            f"receive buffer, which absorbs ≈ {d.largest_burst_without_loss_queries or 0:,.0f} "
                            "(no forecast burst to judge them by: --forecast-peak-burst-queries N)")
            else:
                warn.append(f"DNS ({d.scenario}): no collector counted the server's drops, so whether bursts of "
                            f"{d.burst_queries:,.0f} queries overflowed is not known; the model puts the largest "
                            f"burst without loss at ≈ {d.largest_burst_without_loss_queries or 0:,.0f} "
                            "(run with --collect-udp-port PORT)")
    warn += [f"{c.service} {c.metric} ({c.scenario}) regressed {c.change:+.1f} {c.change_unit} against "
             f"{s.baseline_release}" for c in s.regressions]
    aborted_by_gate = {g.run_id for g in s.gates if g.name == "no_abort"}
    warn += [f"run {r.run_id} ended '{r.status}'" for r in s.runs
             if r.outcome not in (OUTCOME_COMPLETED, OUTCOME_DESIGNED_ABORT) and r.run_id not in aborted_by_gate]
    warn += [f"gate {g.name} not evaluated in run {g.run_id}" for g in s.gates if g.outcome == "not evaluated"]
    s.verdict_notes = [f"run {r.run_id} {OUTCOME_DESIGNED_ABORT}: {r.outcome_detail}"
                       for r in s.runs if r.outcome == OUTCOME_DESIGNED_ABORT]
    s.verdict = "FAIL" if fail else ("WARN" if warn else "PASS")
    s.verdict_reasons = fail + warn
