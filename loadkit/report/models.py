"""Models in the report: each model's answer beside what the runs measured, with its caveat.

One small adapter per model turns its result into :class:`~loadkit.report.summary.ModelRow`s
(predicted, measured, caveat in words). A model that does not apply to a run (no steps for the
USL, no many-sources configuration, no firewall in front of the target) gives no row; one that
applies but cannot answer says why in its row or in the summary's notes. None stops the report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import pandas as pd

from loadkit import model
from loadkit.errors import ModelError
from loadkit.record.reader import RunData

from .analysis import abort_event, first_failure_ts, num, proxy_groups, run_outcome
from .capacity import udp_fit
from .summary import OUTCOME_DESIGNED_ABORT, AnomalyRow, DnsRun, MailCapacity, ModelRow, ReportSummary

#: a model fitted on less than this share of the load it predicts is called an extrapolation
EXTRAPOLATION_BELOW = 0.9
#: intervals a concurrency level must last to count as a USL step
MIN_INTERVALS_PER_LEVEL = 3


def model_rows(s: ReportSummary, groups: dict[tuple[str, str, str], list[RunData]]) -> list[ModelRow]:
    """Rows of every model the report uses, in the order the report shows them."""
    by_id = {r.run_id: r for runs in groups.values() for r in runs}
    rows: list[ModelRow] = []
    for m in s.mail:
        rows += headroom_rows(m, [by_id[i] for i in m.run_ids])
    for d in s.dns:
        rows += udp_rows(d, by_id[d.run_id])
        rows += retry_rows(d, by_id[d.run_id])
        rows += source_limit_rows(d, by_id[d.run_id])
        rows += firewall_rows(d, by_id[d.run_id])
    for runs in groups.values():
        rows += usl_rows(runs)
    scenarios = {r.run_id: r.scenario for r in s.runs}
    rows += [anomaly_model_row(a, scenarios.get(a.run_id, "")) for a in s.anomalies if a.spikes]
    return rows


# --------------------------------------------------------------------------------------------
# headroom
# --------------------------------------------------------------------------------------------


def sessions_at(run: RunData, ts_unix_s: float) -> float | None:
    """Sessions all proxies held at their last sample at or before ``ts_unix_s``."""
    g = proxy_groups(run)
    g = g[g["ts_unix_s"] <= ts_unix_s]
    if not len(g):
        return None
    last = g.sort_values("ts_unix_s").groupby("group").tail(1)
    return float(last["sessions_n"].sum())


def _predicted_at_fraction(m: MailCapacity, fraction: float) -> float | None:
    """Total sessions (round robin) when the first proxy reaches ``fraction`` of its limit."""
    caps = [(fraction * p["limit_bytes"] - p["base_bytes"]) / p["bytes_per_session"]
            for p in m.proxies if p.get("bytes_per_session")]
    return num(min(caps) * len(caps)) if caps else None


def _headroom_caveat(m: MailCapacity) -> str:
    """The model's own caveats (extrapolation, limits given, pooled proxies), else the
    extrapolation worked out here; what was measured goes in its own column."""
    parts = [c for c in m.caveats if not c.startswith(("measured:", "no run reached"))]
    frac = m.max_fraction_observed
    if not m.caveats and frac is not None and frac < EXTRAPOLATION_BELOW:
        parts.append(f"extrapolation: fitted on up to {frac:.0%} of the predicted first failure")
    if m.all_fail_ci95_sessions:
        lo, hi = m.all_fail_ci95_sessions
        parts.append(f"95 % interval {lo:,.0f}–{hi:,.0f}")
    return "; ".join(parts)


def _measured_fall_over(m: MailCapacity, runs: Sequence[RunData]) -> tuple[str, float | None]:
    if m.measured_first_failure_sessions is not None:
        at = m.measured_first_failure_sessions
        return f"first OOM kill with {at:,.0f} sessions held", at
    fell = [(min(first_failure_ts(r).values()), r) for r in runs if first_failure_ts(r)]
    if fell:
        ts, run = min(fell, key=lambda f: f[0])
        at = sessions_at(run, ts - 1e-6)  # the sample at the failure already lost the proxy's sessions
        return (f"first proxy fell over with ≈ {at:,.0f} sessions held (run {run.run_id})" if at
                else "a proxy fell over"), at
    held = max((float(proxy_groups(r).groupby("ts_unix_s")["sessions_n"].sum().max()) for r in runs
                if len(proxy_groups(r))), default=math.nan)
    return (f"not reached: the runs held at most {held:,.0f} sessions" if math.isfinite(held)
            else "not measured"), None


def headroom_rows(m: MailCapacity, runs: Sequence[RunData]) -> list[ModelRow]:
    """The fall-over the model predicts against the fall-over (or the designed abort) measured,
    and N+1 when the model gives it."""
    common = dict(model="headroom", scenario=m.scenario, run_ids=m.run_ids, unit="sessions")
    verb = (f"all {len(m.proxies)} proxies fall over" if m.cascade_all_fail
            else f"first proxy ({m.first_failure_proxy}) falls over")
    measured, at = _measured_fall_over(m, runs)
    rows = [ModelRow(question=f"concurrent {m.service} sessions at which the proxies fall over",
                     predicted=f"{verb} at ≈ {m.first_failure_sessions:,.0f} sessions", measured=measured,
                     caveat=_headroom_caveat(m), predicted_value=m.first_failure_sessions,
                     measured_value=at, **common)]
    for run in runs:
        outcome, _ = run_outcome(run)
        detail = abort_event(run).get("detail") or {}
        fraction, ts = num(detail.get("fraction")), num(detail.get("sample_unix_s"))
        if outcome != OUTCOME_DESIGNED_ABORT or not fraction or ts is None:
            continue
        want, got = _predicted_at_fraction(m, fraction), sessions_at(run, ts)
        rows.append(ModelRow(
            question=f"sessions when the first proxy reaches {fraction:.0%} of its memory (the designed abort)",
            predicted=f"≈ {want:,.0f} sessions" if want else "–",
            measured=f"{got:,.0f} sessions at the abort (run {run.run_id})" if got is not None else "–",
            caveat="", predicted_value=want, measured_value=got, **common))
    if m.n_minus_1_sessions is not None and len(m.proxies) > 1:
        rows.append(ModelRow(
            question=f"sessions the others survive with {m.n_minus_1_proxy_down or 'one proxy'} down (N+1)",
            predicted=f"≈ {m.n_minus_1_sessions:,.0f} sessions", measured="not measured: no run took a proxy down",
            caveat="predicted from the same fits", predicted_value=m.n_minus_1_sessions, **common))
    return rows


# --------------------------------------------------------------------------------------------
# DNS: UDP burst and retries
# --------------------------------------------------------------------------------------------


def udp_rows(d: DnsRun, run: RunData) -> list[ModelRow]:
    """Loss per burst: the fluid model at the run's buffers and drain rate against the drops
    counted at the server's socket after each burst (:func:`loadkit.model.fit_udp_burst`)."""
    fit = udp_fit(run)
    if fit is None or not d.burst_queries:
        return []
    window = d.burst_window_s or 0.0
    recorded = num(getattr(fit, "burst_n", None)) == d.burst_queries and num(getattr(fit, "predicted_loss_n", None)) is not None
    loss = float(fit.predicted_loss_n if recorded else fit.expected_loss(d.burst_queries, window))
    per_burst = num(getattr(fit, "measured_loss_mean_n", None))
    if per_burst is not None:
        measured = f"{per_burst:,.0f} dropped per burst on average ({d.drops_source})"
    else:
        measured = f"{d.drops_n or 0:,.0f} dropped in the run ({d.drops_source}); not measured per burst"
    caveats = [str(c) for c in getattr(fit, "caveats", None) or []]
    if d.largest_burst_is_lower_bound and not any(c.startswith("lower bound") for c in caveats):
        caveats.append("lower bound: no burst was dropped, so the buffer may absorb more")
    drain = num(fit.service_rate_qps)
    how = f"drain {drain:,.0f}/s" if drain is not None else "drain rate not measured"
    planned = d.burst_window_planned_s
    asked = f" (the profile asked for {planned * 1000:.0f} ms)" if planned is not None and abs(planned - window) > 1e-3 else ""
    return [ModelRow(model="udp burst", scenario=d.scenario, run_ids=[d.run_id],
                     question=f"queries lost from a burst of {d.burst_queries:,.0f} sent in {window * 1000:.0f} ms{asked}",
                     predicted=f"{loss:,.0f} lost per burst (buffers {fit.buffer_datagrams} queries, {how})",
                     measured=measured, caveat="; ".join(caveats), predicted_value=loss,
                     measured_value=per_burst, unit="queries per burst")]


def retry_rows(d: DnsRun, run: RunData) -> list[ModelRow]:
    """Whether the retries sustain themselves after the trigger, beside the amplification."""
    if d.retry_queries_n is None:
        return []
    measured = (f"retry amplification {d.retry_amplification_mean or 1:.2f}× over the run, "
                f"{d.retry_amplification_max or 1:.2f}× at most")
    try:
        res = model.metastability(run)
    except ModelError as err:
        predicted, caveat = "no verdict", str(err)
    else:
        predicted = res.summary()
        caveat = "; ".join(str(c) for c in getattr(res, "caveats", None) or [])
    return [ModelRow(model="retries", scenario=d.scenario, run_ids=[d.run_id],
                     question="do retries keep the server down after the trigger?", predicted=predicted,
                     measured=measured, caveat=caveat, measured_value=d.retry_amplification_max, unit="×")]


def source_limit_rows(d: DnsRun, run: RunData) -> list[ModelRow]:
    """Many small sources (incident 3): the per-IP limit that refuses < 0.1 % of sources, and at
    the limit the run was made against, the dropped share predicted beside measured."""
    try:
        res = model.fit_source_limit(run)
    except ModelError:
        return []  # not a many-sources run: its manifest names no dns-sources
    common = dict(model="source limit", scenario=d.scenario, run_ids=[d.run_id], unit="queries/s per source")
    caveat = "; ".join(str(c) for c in res.caveats)
    rec = res.row(res.recommended_limit_qps)
    rows = [ModelRow(question=f"per-IP limit that refuses < {res.target_share:.1%} of {res.sources_n:,} sources",
                     predicted=f"{res.recommended_limit_qps} queries/s per source (refuses "
                               f"{rec.refused_sources_share if rec else math.nan:.3%} of sources in a second)",
                     measured="not measured: the recommendation is for the observed distribution", caveat=caveat,
                     predicted_value=float(res.recommended_limit_qps), **common)]
    if res.applied_limit_qps is not None:
        p, m = res.predicted_refused_queries_share, res.measured_refused_queries_share
        rows.append(ModelRow(
            question=f"share of queries dropped at the run's per-IP limit of {res.applied_limit_qps} queries/s",
            predicted=f"{p:.2%}" if p is not None else "–", measured=f"{m:.2%}" if m is not None else "–",
            caveat=caveat, predicted_value=num(p), measured_value=num(m),
            **{**common, "unit": "share of queries"}))
    return rows


def target_firewall(run: RunData) -> str | None:
    """The firewall table in front of the run's DNS target (the lab's, when the run targeted
    the port it guards); None otherwise. The collector samples every firewall table on the host,
    other labs' too, so only that one is the run's."""
    fw = (run.manifest.get("lab") or {}).get("firewall") or {}
    dns = fw.get("dns")
    if isinstance(dns, dict):
        dns = [dns.get("host") or dns.get("address"), dns.get("port")]
    if not fw.get("table") or not isinstance(dns, (list, tuple)) or len(dns) != 2:
        return None
    if f"udp://{dns[0]}:{dns[1]}" not in [str(t) for t in run.manifest.get("targets") or []]:
        return None
    table = str(fw["table"])
    return table if len(getattr(run, "firewall", ())) and (run.firewall["firewall"] == table).any() else None


def firewall_rows(d: DnsRun, run: RunData) -> list[ModelRow]:
    """The firewall session table in front of DNS: its largest fill predicted from the flows the
    generator sent (Little's law over the table's timeout) beside the entries measured; and
    whether the retry loop has a second, self-sustaining state at the run's demand."""
    table = target_firewall(run)
    if table is None:
        return []
    mine = dataclasses.replace(run, firewall=run.firewall[run.firewall["firewall"] == table])
    try:
        res = model.fit_firewall(mine)
        peak = float(model.firewall.predicted_occupancy(model.retry_amplification(run), res.timeout_s,
                                                        port_policy=res.port_policy).max())
    except (ModelError, ValueError):
        return []
    common = dict(model="firewall", scenario=d.scenario, run_ids=[d.run_id])
    caveat = "; ".join(str(c) for c in res.caveats)
    if res.occupancy_error_pct is not None:
        caveat = "; ".join(filter(None, [f"worst error of one sample before the table filled: "
                                         f"{res.occupancy_error_pct:.1f} % ({res.occupancy_points_n} samples)", caveat]))
    drops = f"; {res.measured_drops_n:,.0f} new flows dropped" if res.measured_drops_n is not None else ""
    rows = [ModelRow(question=f"most entries in the {res.size_n:,.0f}-entry session table ({res.timeout_s:g} s timeout)",
                     predicted=f"{min(peak, res.size_n):,.0f} entries", caveat=caveat,
                     measured=(f"{res.measured_max_entries_n:,.0f} entries{drops}"
                               if res.measured_max_entries_n is not None else "not measured"),
                     predicted_value=min(peak, res.size_n), measured_value=num(res.measured_max_entries_n),
                     unit="entries", **common)]
    # the loop kept per query, with the server's late answers (waste)
    predicted = f"yes: {res.waste.summary()}" if res.waste.sustains else f"no: {res.waste.reason}"
    rows.append(ModelRow(
        question=f"does the retry loop sustain itself with {res.original_qps:,.0f}/s of original demand?",
        predicted=predicted,
        measured=f"run verdict: {res.verdict}" if res.verdict else "no verdict for the run",
        caveat="", **common))
    return rows


# --------------------------------------------------------------------------------------------
# USL and anomalies
# --------------------------------------------------------------------------------------------


def usl_rows(runs: Sequence[RunData]) -> list[ModelRow]:
    """Throughput the USL fit predicts at the highest concurrency measured, beside the measured
    one, for runs that stepped their users through enough levels."""
    rows = []
    for run in runs:
        try:
            points = model.usl_points(run)
            # a stepped run holds each level for several intervals; a ramp (a storm) is no USL data
            points = points[points["intervals_n"] >= MIN_INTERVALS_PER_LEVEL]
            res = model.fit_usl(points["concurrency"], points["throughput_rps"])
        except (ModelError, KeyError, ValueError):
            continue  # a run that did not step its concurrency has no USL: not worth a note
        rows += _usl_rows(run, points, res)
    return rows


def _usl_rows(run: RunData, points: pd.DataFrame, res) -> list[ModelRow]:
    """Throughput at the highest concurrency measured; and N* (with its interval) only when κ is
    significantly above 0, else the caveat says no retrograde region was measured."""
    common = dict(model="usl", scenario=str(run.manifest.get("scenario", "")), run_ids=[run.run_id])
    top = points.loc[points["concurrency"].idxmax()]
    n, x = float(top["concurrency"]), float(top["throughput_rps"])
    significant = getattr(res, "kappa_significant", None)
    if significant is None:  # a fit without the flag: the normal interval of κ
        significant = res.kappa - 1.96 * res.kappa_stderr > 0
    caveat = "" if significant else "κ not significantly above 0: no retrograde region measured, no N* given"
    rows = [ModelRow(question=f"throughput at {n:,.0f} concurrent users", predicted=f"{float(res.predict(n)):,.1f}/s",
                     measured=f"{x:,.1f}/s", caveat=caveat, predicted_value=float(res.predict(n)), measured_value=x,
                     unit="requests/s", **common)]
    if significant and math.isfinite(res.n_star):
        lo, hi = getattr(res, "n_star_ci95", (math.nan, math.nan))
        ci = f" (95 % {lo:,.0f}–{hi:,.0f})" if math.isfinite(lo) and math.isfinite(hi) else ""
        best = points.loc[points["throughput_rps"].idxmax()]  # as the fit's own measured maximum
        at = num(getattr(res, "concurrency_at_max_observed", None)) or float(best["concurrency"])
        top_x = num(getattr(res, "max_throughput_observed", None)) or float(best["throughput_rps"])
        rows.append(ModelRow(
            question="concurrency of peak throughput (N*)",
            predicted=f"N* ≈ {res.n_star:,.0f}{ci}, {res.x_max:,.1f}/s",
            measured=f"highest throughput measured at {at:,.0f} users, {top_x:,.1f}/s",
            caveat="extrapolation: N* lies beyond the concurrency measured" if res.n_star > n else "",
            predicted_value=float(res.n_star), measured_value=at, unit="users", **common))
    return rows


def kpi(run: RunData) -> tuple[str, pd.Series]:
    """(what it is, series): the KPI the anomaly search looks at, as the model picks it
    (:func:`loadkit.model.kpi_series` without a table: the DNS server's receive-buffer drops per
    interval, else failed requests per interval)."""
    series = model.kpi_series(run)
    return str(series.name or "KPI"), series


def anomaly_row(run: RunData, notes: list[str]) -> AnomalyRow:
    """:func:`loadkit.model.find_anomalies` on the run's KPI series (see :func:`kpi`)."""
    label, series = kpi(run)
    row = AnomalyRow(run_id=run.run_id, series=label, spikes=[], daily_period=None, change_points_n=0,
                     detection_delay_s={}, summary="", source="loadkit.model.find_anomalies")
    if len(series) < 2:
        return row
    duration = float(series.index.max() - series.index.min())
    try:
        # "normal" is the rolling median over a quarter of the run, at most an hour
        res = model.find_anomalies(series, window_s=max(60.0, min(3600.0, duration / 4)), name=label)
    except ModelError as err:
        notes.append(f"run {run.run_id}: no anomaly search on {label}: {err}")
        return row
    data = res.to_dict()
    row.spikes = [{"ts_unix_s": sp["peak_unix_s"], "value": sp["peak_value"], "score": sp["score"],
                   "start_unix_s": sp["start_unix_s"], "end_unix_s": sp["end_unix_s"]}
                  for sp in data.get("spikes") or []]
    row.daily_period = (data.get("daily_period") or {}).get("time_of_day")
    row.change_points_n = len(data.get("change_points") or [])
    row.detection_delay_s = {str(k): num(v) for k, v in (data.get("detection_delay_s") or {}).items()}
    row.summary = res.summary()
    return row


def _polling(p: str) -> str:
    s = int(float(p))
    return f"{s // 3600} h" if s % 3600 == 0 else (f"{s // 60} min" if s % 60 == 0 else f"{s} s")


def anomaly_model_row(a: AnomalyRow, scenario: str) -> ModelRow:
    """How late coarser polling would have seen what the recording interval shows."""
    delays = sorted(a.detection_delay_s.items(), key=lambda kv: -float(kv[0]))
    predicted = ", ".join(f"{_polling(p)} polling: " + ("not detected" if d is None else f"after {d:,.0f} s")
                          for p, d in delays)
    never = [_polling(p) for p, d in delays if d is None]
    caveat = f"{' and '.join(never)} polling would never have shown it" if never else ""
    if not delays:
        predicted = "not judged"
        caveat = "the run is shorter than the polling intervals compared (1 min, 15 min, 1 h)"
    return ModelRow(model="anomalies", scenario=scenario, run_ids=[a.run_id],
                    question=f"would coarser polling of {a.series} have seen its spikes?", predicted=predicted,
                    measured=f"{len(a.spikes)} spike(s), {a.change_points_n} level shift(s) in the recorded series",
                    caveat=caveat, measured_value=float(len(a.spikes)), unit="spikes")
