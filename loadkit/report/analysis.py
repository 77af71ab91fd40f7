"""What the capacity report says, as plain data: :func:`summarize` turns loaded runs into the
``summary.json`` the notebook renders and a release pipeline reads.

The figures come from :mod:`loadkit.model` (headroom and cascade, UDP burst, retries,
anomalies); this module only picks the runs each model needs and puts the results side by side.
A model that cannot be fitted to a run (too few points, no counters) leaves its figure out and
says why in ``notes``: one unfit model must not sink the whole report.

Verdict: ``FAIL`` when a run's gate failed or a service has no headroom left at its forecast
peak; ``WARN`` when a figure regressed against the baseline release or a run did not complete;
``PASS`` otherwise.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from loadkit import model
from loadkit.errors import ModelError
from loadkit.record.reader import RunData

#: fraction of a proxy's memory limit the recommended admission limit keeps it under
ADMISSION_FRACTION = 0.9
#: a capacity figure (fall-over, admission limit) that shrank by more than this is a regression
REGRESSION_CAPACITY_PCT = 5.0
#: headroom that shrank by more than this many percentage points is a regression
REGRESSION_HEADROOM_PP = 5.0
#: a p99 latency that grew by more than this is a regression
REGRESSION_LATENCY_PCT = 20.0
#: a DNS drop ratio that grew by more than this many percentage points is a regression
REGRESSION_DROP_PP = 1.0

MAIL_TYPES = ("IMAP", "POP3")

#: request names that time how long a session was held, not how fast the service answered
HOLD_NAMES = ("hold",)

METRIC_LABELS = {
    "first_failure": "first failure",
    "fall_over": "all fall over",
    "admission_limit": "admission limit",
    "headroom_pct": "headroom",
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite float or None (JSON has no NaN)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def run_service(run: RunData) -> str:
    """The service a run loads: the request type with most requests ("DNS", "IMAP", "POP3")."""
    req = run.requests
    if len(req) and "request_type" in req:
        counts = req.groupby("request_type")["requests_n"].sum()
        if len(counts):
            return str(counts.idxmax()).upper()
    return str(run.manifest.get("profile", {}).get("protocol", "unknown")).upper()


def proxy_groups(run: RunData) -> pd.DataFrame:
    """Samples of the run's memory-limited groups (the proxies), empty when there are none."""
    g = run.groups
    if not len(g) or "cgroup_limit_bytes" not in g:
        return g.iloc[0:0]
    limited = g.groupby("group")["cgroup_limit_bytes"].max()
    names = [n for n, lim in limited.items() if lim and lim > 0]
    return g[g["group"].isin(names)].copy()


def gauge(run: RunData, metric: str) -> pd.Series:
    gen = run.generator
    if not len(gen):
        return pd.Series(dtype="float64")
    s = gen[gen["metric"] == metric].set_index("ts_unix_s")["value"].sort_index()
    return s[~s.index.duplicated(keep="last")]


def first_failure_ts(run: RunData) -> dict[str, float]:
    """group -> time of its first OOM kill or the exit of its master (events first, cgroup
    counters second). A login process ending its session is not a failure: with one process per
    connection they exit all the time."""
    first: dict[str, float] = {}
    for ev in run.events:
        kind = ev.get("kind")
        if kind == "oom_kill" or (kind == "process_exited" and (ev.get("detail") or {}).get("root")):
            src = str(ev.get("source"))
            first[src] = min(first.get(src, math.inf), float(ev.get("ts_unix_s", math.inf)))
    g = proxy_groups(run)
    if len(g):
        killed = g[g["cgroup_oom_kills_n"] > 0]
        for name, ts in killed.groupby("group")["ts_unix_s"].min().items():
            first[str(name)] = min(first.get(str(name), math.inf), float(ts))
    return first


# --------------------------------------------------------------------------------------------
# headroom (mail services)
# --------------------------------------------------------------------------------------------


def _forecast(runs: Iterable[RunData], key: str) -> float | None:
    """The largest forecast peak the runs' profiles give (``[gates]`` or the top level)."""
    values = []
    for run in runs:
        profile = run.manifest.get("profile") or {}
        for table in (profile, profile.get("gates") or {}):
            value = table.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                values.append(float(value))
    return max(values) if values else None


def headroom_for(
    runs: Sequence[RunData], forecast: float | None, notes: list[str], service: str
) -> dict | None:
    """:func:`loadkit.model.fit_headroom` over one mail service's runs, as a dict (None and a note
    when the model cannot be fitted)."""
    try:
        res = model.fit_headroom(
            list(runs),
            policy="roundrobin",
            admission_fraction=ADMISSION_FRACTION,
            forecast_peak_sessions=forecast,
        )
    except ModelError as err:
        notes.append(f"{service}: no headroom figures: {err}")
        return None
    result = res.to_dict()
    result["source"] = "loadkit.model.fit_headroom (round-robin)"
    return result


# --------------------------------------------------------------------------------------------
# DNS
# --------------------------------------------------------------------------------------------


def offered_burst(run: RunData) -> tuple[int, float]:
    """(queries per burst, burst window in s) the run's profile offered; (0, 0.0) without bursts."""
    options = ((run.manifest.get("profile") or {}).get("load") or {}).get("options") or {}
    try:
        size = int(options.get("dns-burst-size") or 0)
        window_s = float(options.get("dns-burst-ms") or 0.0) / 1000.0
    except (TypeError, ValueError):
        return 0, 0.0
    return max(size, 0), max(window_s, 0.0)


def dns_figures(run: RunData, notes: list[str]) -> dict:
    """Offered/answered/dropped totals, RcvbufErrors, retry amplification, drop onset and the
    largest burst the receive buffer absorbs without loss."""
    out: dict[str, Any] = {"run_id": run.run_id}
    try:
        amp = model.retry_amplification(run)
    except ModelError as err:
        notes.append(f"DNS run {run.run_id}: no retry figures: {err}")
        amp = None
    if amp is not None:
        dt = amp["interval_s"]
        original = float((amp["original_qps"] * dt).sum())
        offered = float((amp["offered_qps"] * dt).sum())
        answered = float((amp["answered_qps"] * dt).sum())
        out.update(
            offered_n=offered,
            original_n=original,
            retry_n=offered - original,
            answered_n=answered,
            dropped_n=max(0.0, offered - answered),
            retry_amplification_mean=_num(offered / original) if original else None,
            retry_amplification_max=_num(amp["amplification"].max()),
            peak_offered_qps=_num(amp["offered_qps"].max()),
        )
    label, drops = model.receive_drops(run)
    out["drops_source"] = label
    out["rcvbuf_errors_n"] = float(drops.sum()) if len(drops) else None
    net = run.net
    if len(net) and "udp_rcvbuf_errors_n" in net:
        per_ts = net.groupby("ts_unix_s")["udp_rcvbuf_errors_n"].sum().sort_index()
        out["host_rcvbuf_errors_n"] = float(per_ts.iloc[-1] - per_ts.iloc[0])
    offered_n = out.get("offered_n")
    dropped = out["rcvbuf_errors_n"]
    out["drop_ratio"] = _num(dropped / offered_n) if dropped is not None and offered_n else None
    size, window_s = offered_burst(run)
    try:
        burst = model.fit_udp_burst(run, burst_window_s=window_s, rcvbuf_bytes=_rcvbuf_hint(run))
    except ModelError as err:
        notes.append(f"DNS run {run.run_id}: no burst figures: {err}")
    else:
        absorbed = _num(burst.max_burst_no_loss)
        lower_bound = bool(size and dropped == 0)
        if lower_bound:  # what was measured beats the model: every burst offered was absorbed
            absorbed = max(float(size), absorbed or 0.0)
        out.update(
            offered_burst_n=size or None,
            burst_window_s=window_s,
            largest_burst_without_loss=absorbed,
            largest_burst_is_lower_bound=lower_bound,
            rcvbuf_needed_bytes=burst.rcvbuf_for(size, window_s) if size and not lower_bound else None,
            buffer_datagrams=burst.buffer_datagrams,
            rcvbuf_bytes=_num(burst.rcvbuf_bytes),
            service_rate_qps=_num(burst.service_rate_qps),
            drop_onset_qps=_num(burst.observed_onset_qps),
            udp_burst_summary=burst.summary(),
        )
    for key in ("offered_n", "original_n", "retry_n", "answered_n", "dropped_n", "retry_amplification_mean",
                "retry_amplification_max", "peak_offered_qps", "largest_burst_without_loss",
                "buffer_datagrams", "rcvbuf_bytes", "service_rate_qps", "drop_onset_qps"):
        out.setdefault(key, None)
    return out


def _rcvbuf_hint(run: RunData) -> float | None:
    """Receive-buffer bytes from the profile's ``[lab] dns_rcvbuf_bytes`` hint (the record itself
    has no socket buffer size), doubled as the kernel does; None for the platform default."""
    hint = ((run.manifest.get("profile") or {}).get("lab") or {}).get("dns_rcvbuf_bytes")
    if isinstance(hint, (int, float)) and not isinstance(hint, bool) and hint > 0:
        return 2.0 * float(hint)
    return None


def _dns_service(runs: Sequence[RunData], dns: list[dict], forecast_peak_qps: float | None) -> dict:
    """The DNS row of the headroom table.

    When the runs offered bursts, capacity is a burst size: the largest burst the receive buffer
    absorbs in the burst's window (``loadkit.model`` UDP burst model, service rate measured)
    against the burst offered, and the recommendation is the buffer that would absorb it. Without
    bursts it is a rate: the lowest offered rate of an interval with drops against the forecast.
    """
    bursts = [(offered_burst(r), r) for r in runs]
    bursts = [(size, window, r) for (size, window), r in bursts if size > 0]
    row: dict[str, Any] = {"service": "DNS", "fall_over_ci95": [], "runs": [r.run_id for r in runs],
                           "admission_limit": None}
    if bursts:
        size, window_s, run = max(bursts, key=lambda b: b[0])
        d = next(d for d in dns if d["run_id"] == run.run_id)
        absorbed = d.get("largest_burst_without_loss")
        needed = d.get("rcvbuf_needed_bytes")
        lower_bound = bool(d.get("largest_burst_is_lower_bound"))
        if lower_bound:
            recommendation = "none: no drops at the server's socket"
            source = "no drops observed: the buffer absorbed every burst offered (a lower bound)"
        else:
            recommendation = (
                f"receive buffer ≥ {needed / 2**20:.1f} MiB (so-rcvbuf {needed / 2 / 2**20:.1f} MiB)" if needed else ""
            )
            source = (
                f"UDP burst model: largest burst absorbed within {window_s * 1000:.0f} ms at the measured "
                "service rate, against the burst the profile offered"
            )
        row.update(
            unit="queries per burst",
            forecast_peak=float(size),
            first_failure=absorbed,
            fall_over=absorbed,
            fall_over_is_lower_bound=lower_bound,
            headroom_pct=_num((absorbed / size - 1) * 100) if absorbed else None,
            rcvbuf_needed_bytes=needed,
            recommendation=recommendation,
            source=source,
        )
        return row
    forecast = forecast_peak_qps or _forecast(runs, "forecast_peak_qps")
    onsets = [d["drop_onset_qps"] for d in dns if d["drop_onset_qps"]]
    peaks = [d["peak_offered_qps"] for d in dns if d["peak_offered_qps"]]
    fall = min(onsets) if onsets else (max(peaks) if peaks else None)
    row.update(
        unit="queries/s",
        forecast_peak=_num(forecast),
        first_failure=_num(fall),
        fall_over=_num(fall),
        fall_over_is_lower_bound=not onsets,
        headroom_pct=_num((fall / forecast - 1) * 100) if fall and forecast else None,
        admission_limit=_num(ADMISSION_FRACTION * fall) if fall else None,
        recommendation=f"rate limit ≤ {ADMISSION_FRACTION * fall:,.0f} queries/s" if fall else "",
        source="drop onset: lowest offered rate of an interval with receive-buffer drops"
        + (" (none: the highest rate offered, a lower bound)" if not onsets else ""),
    )
    return row


# --------------------------------------------------------------------------------------------
# latency and anomalies
# --------------------------------------------------------------------------------------------


def latency_figures(run: RunData) -> list[dict]:
    """Request-weighted means of the per-interval percentiles, per (type, name)."""
    req = run.requests
    rows = []
    if not len(req):
        return rows
    for (rtype, name), g in req.groupby(["request_type", "name"]):
        w = g["requests_n"].clip(lower=0).to_numpy(float)
        if w.sum() == 0:
            continue
        row = {"run_id": run.run_id, "service": str(rtype), "name": str(name), "requests_n": int(w.sum())}
        row["failures_n"] = int(g["failures_n"].sum())
        for p in ("p50", "p95", "p99"):
            row[f"latency_{p}_s"] = _num(np.average(g[f"latency_{p}_s"].to_numpy(float), weights=w))
        row["latency_max_s"] = _num(g["latency_max_s"].max())
        rows.append(row)
    return rows


def kpi_series(run: RunData) -> tuple[str, pd.Series]:
    """The KPI the anomaly search looks at: DNS receive-buffer drops per interval, else the
    worst p99 latency per interval."""
    if run_service(run) == "DNS":
        label, drops = model.receive_drops(run)
        if len(drops):
            return f"{label} per interval", drops
    req = run.requests
    if not len(req):
        return "p99 latency (s)", pd.Series(dtype="float64")
    req = req[~req["name"].isin(HOLD_NAMES)]
    return "p99 latency (s)", req.groupby("ts_unix_s")["latency_p99_s"].max().sort_index()


def anomaly_figures(run: RunData, notes: list[str]) -> dict:
    """:func:`loadkit.model.find_anomalies` on the run's KPI series (see :func:`kpi_series`)."""
    label, series = kpi_series(run)
    out: dict[str, Any] = {"run_id": run.run_id, "series": label, "spikes": [], "daily_period": None,
                           "change_points": [], "detection_delay_s": {}}
    if not len(series):
        return out
    duration = float(series.index.max() - series.index.min())
    try:
        # "normal" is the rolling median over a quarter of the run, at most an hour
        res = model.find_anomalies(series, window_s=max(60.0, min(3600.0, duration / 4)), name=label)
    except ModelError as err:
        notes.append(f"run {run.run_id}: no anomaly search on {label}: {err}")
        return out
    data = res.to_dict()
    out.update(
        spikes=[
            {"ts_unix_s": sp["peak_unix_s"], "value": sp["peak_value"], "score": sp["score"],
             "start_unix_s": sp["start_unix_s"], "end_unix_s": sp["end_unix_s"]}
            for sp in data.get("spikes") or []
        ],
        daily_period=(data.get("daily_period") or {}).get("time_of_day"),
        change_points=data.get("change_points") or [],
        detection_delay_s=data.get("detection_delay_s") or {},
        summary=res.summary(),
        source="loadkit.model.find_anomalies",
    )
    return out


# --------------------------------------------------------------------------------------------
# baseline comparison
# --------------------------------------------------------------------------------------------


def _change(metric: str, service: str, base: Any, cur: Any, unit: str, worse: str, limit: float, pp: bool) -> dict | None:
    base, cur = _num(base), _num(cur)
    if base is None or cur is None:
        return None
    if pp:
        delta = cur - base
    else:
        delta = (cur - base) / abs(base) * 100 if base else (0.0 if cur == 0 else math.inf)
    regression = (delta < -limit) if worse == "lower" else (delta > limit)
    improvement = (delta > limit) if worse == "lower" else (delta < -limit)
    return {
        "service": service,
        "metric": METRIC_LABELS.get(metric, metric),
        "unit": unit,
        "baseline": base,
        "current": cur,
        "change": _num(delta),
        "change_unit": "pp" if pp else "%",
        "regression": bool(regression),
        "improvement": bool(improvement),
    }


def compare(current: dict, baseline: dict) -> list[dict]:
    """Figure-by-figure change from ``baseline`` to ``current`` summaries, regressions marked."""
    changes: list[dict] = []
    base_services = {s["service"]: s for s in baseline.get("services", [])}
    for svc in current.get("services", []):
        b = base_services.get(svc["service"])
        if not b:
            continue
        name = svc["service"]
        unit = svc.get("unit", "")
        for metric, worse, limit, pp in (
            ("first_failure", "lower", REGRESSION_CAPACITY_PCT, False),
            ("fall_over", "lower", REGRESSION_CAPACITY_PCT, False),
            ("admission_limit", "lower", REGRESSION_CAPACITY_PCT, False),
            ("headroom_pct", "lower", REGRESSION_HEADROOM_PP, True),
        ):
            if metric == "fall_over" and svc.get("cascade_all_fail") and b.get("cascade_all_fail"):
                continue  # the same figure as the first failure: say it once
            c = _change(metric, name, b.get(metric), svc.get(metric), "%" if pp else unit, worse, limit, pp)
            if c:
                changes.append(c)
    base_lat = {(r["service"], r["name"]): r for r in baseline.get("latency", [])}
    for row in current.get("latency", []):
        b = base_lat.get((row["service"], row["name"]))
        if b:
            c = _change(
                f"p99 latency {row['name']}", row["service"], b.get("latency_p99_s"), row.get("latency_p99_s"),
                "s", "higher", REGRESSION_LATENCY_PCT, False,
            )
            if c:
                changes.append(c)
    bd = {d["scenario"]: d for d in baseline.get("dns", [])}
    for d in current.get("dns", []):
        b = bd.get(d["scenario"])
        if not b:
            continue
        for metric, key in (("drop ratio", "drop_ratio"),):
            bv, cv = _num(b.get(key)), _num(d.get(key))
            if bv is None or cv is None:
                continue
            c = _change(metric, "DNS", bv * 100, cv * 100, "%", "higher", REGRESSION_DROP_PP, True)
            if c:
                changes.append(c)
        c = _change(
            "retry amplification max", "DNS", b.get("retry_amplification_max"), d.get("retry_amplification_max"),
            "x", "higher", REGRESSION_LATENCY_PCT, False,
        )
        if c:
            changes.append(c)
    return changes


# --------------------------------------------------------------------------------------------
# the summary
# --------------------------------------------------------------------------------------------


def manifest_row(run: RunData) -> dict:
    m = run.manifest
    started = _num(m.get("started_unix_s")) or 0.0
    ended = _num(m.get("ended_unix_s")) or 0.0
    return {
        "run_id": run.run_id,
        "scenario": m.get("scenario", ""),
        "release": m.get("release", ""),
        "status": m.get("status", ""),
        "started_unix_s": started,
        "duration_s": max(0.0, ended - started) if ended else None,
        "targets": list(m.get("targets") or []),
        "versions": m.get("versions") or {},
        "path": str(run.path),
    }


def summarize(
    runs: Sequence[RunData],
    *,
    release: str,
    baseline_runs: Sequence[RunData] = (),
    baseline_release: str | None = None,
    forecast_peak_sessions: float | None = None,
    forecast_peak_qps: float | None = None,
) -> dict:
    """The report's figures as a JSON-ready dict (see the module docstring for the verdict)."""
    notes: list[str] = []
    by_service: dict[str, list[RunData]] = {}
    for run in runs:
        by_service.setdefault(run_service(run), []).append(run)

    services: list[dict] = []
    for svc in [s for s in MAIL_TYPES if s in by_service]:
        svc_runs = by_service[svc]
        forecast = forecast_peak_sessions or _forecast(svc_runs, "forecast_peak_sessions")
        h = headroom_for(svc_runs, forecast, notes, svc)
        if h is None:
            continue
        admission = h.get("admission_limit_total_sessions")
        per_proxy = [p.get("admission_limit_sessions") for p in h.get("proxies", [])]
        services.append(
            {
                "service": svc,
                "unit": "sessions",
                "forecast_peak": _num(forecast),
                "first_failure": _num(h.get("first_failure_sessions")),
                "fall_over": _num(h.get("all_fail_sessions")),
                "fall_over_ci95": [_num(v) for v in (h.get("all_fail_ci95") or [])],
                "cascade_all_fail": h.get("cascade_all_fail"),
                "first_failure_proxy": h.get("first_failure_proxy"),
                "model_summary": h.get("summary"),
                "headroom_pct": _num(h.get("headroom_pct")),
                "admission_limit": _num(admission),
                "admission_limit_per_proxy": [_num(v) for v in per_proxy],
                "proxies_needed_for_forecast": h.get("proxies_needed_for_forecast"),
                "recommendation": (
                    "admission limit per proxy "
                    + "/".join(f"{v:.0f}" for v in per_proxy if v is not None)
                    + " sessions"
                ),
                "proxies": h.get("proxies", []),
                "source": h.get("source"),
                "runs": [r.run_id for r in svc_runs],
            }
        )

    dns = []
    for run in by_service.get("DNS", []):
        d = dns_figures(run, notes)
        d["scenario"] = run.manifest.get("scenario", "")
        dns.append(d)
    if dns:
        services.append(_dns_service(by_service["DNS"], dns, forecast_peak_qps))

    latency = [row for run in runs for row in latency_figures(run)]
    anomalies = [anomaly_figures(run, notes) for run in runs]
    gates = []
    for run in runs:
        for gate in run.manifest.get("gates") or []:
            gates.append({"run_id": run.run_id, **gate})

    summary: dict = {
        "release": release,
        "baseline_release": baseline_release,
        "generated_unix_s": time.time(),
        "services": services,
        "dns": dns,
        "latency": latency,
        "anomalies": anomalies,
        "gates": gates,
        "runs": [manifest_row(r) for r in runs],
        "notes": notes,
        "changes": [],
        "regressions": [],
    }
    if baseline_runs:
        base = summarize(
            baseline_runs,
            release=baseline_release or "baseline",
            forecast_peak_sessions=forecast_peak_sessions,
            forecast_peak_qps=forecast_peak_qps,
        )
        summary["changes"] = compare(summary, base)
        summary["regressions"] = [c for c in summary["changes"] if c["regression"]]
        summary["baseline_runs"] = base["runs"]

    # passed is None for a gate that could not be evaluated: that is a warning, not a failure
    reasons_fail = [f"gate {g.get('name')} failed in run {g['run_id']}" for g in gates if g.get("passed") is False]
    for s in services:
        if s["headroom_pct"] is not None and s["headroom_pct"] < 0 and s["unit"] == "queries per burst":
            reasons_fail.append(
                f"{s['service']}: bursts of {s['forecast_peak']:,.0f} queries overflow the receive buffer, "
                f"which absorbs ≈ {s['first_failure']:,.0f}; {s.get('recommendation', '')}"
            )
        elif s["headroom_pct"] is not None and s["headroom_pct"] < 0:
            reasons_fail.append(
                f"{s['service']}: forecast peak {s['forecast_peak']:.0f} {s['unit']} is above the first "
                f"failure at {s['first_failure']:.0f} {s['unit']}"
            )
    reasons_warn = [
        f"{c['service']} {c['metric']} regressed {c['change']:+.1f} {c['change_unit']} against {baseline_release}"
        for c in summary["regressions"]
    ]
    reasons_warn += [
        f"run {r['run_id']} ended '{r['status']}'" for r in summary["runs"] if r["status"] != "completed"
    ]
    reasons_warn += [
        f"gate {g.get('name')} not evaluated in run {g['run_id']}" for g in gates if g.get("passed") is None
    ]
    if reasons_fail:
        verdict = "FAIL"
    elif reasons_warn:
        verdict = "WARN"
    else:
        verdict = "PASS"
    summary["verdict"] = verdict
    summary["verdict_reasons"] = reasons_fail + reasons_warn
    return summary
