"""Capacity rows of the report: mail headroom in sessions, DNS per burst or per second.

One row per (service, scenario, lab setup): runs against different systems are never fitted
together. Mail rows come from :func:`loadkit.model.fit_headroom`; DNS rows from the UDP burst
model (:func:`loadkit.model.fit_udp_burst`) and the run's counters (:mod:`loadkit.record.counters`).
A "forecast peak" is only ever a forecast (``--forecast-peak-*`` or the profile's ``[gates]
forecast_peak_*``), never the load a run happened to offer.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from loadkit import model
from loadkit.errors import ModelError
from loadkit.record import counters
from loadkit.record.reader import RunData

from .analysis import MAIL_TYPES, num
from .summary import DnsCapacity, DnsRun, MailCapacity, ReportSummary

#: fraction of a proxy's memory limit the recommended admission limit keeps it under
ADMISSION_FRACTION = 0.9

from loadkit.model.retries import ANSWERED, ORIGINAL, RETRY  # the DNS generator's counter names


def forecast(runs: Iterable[RunData], key: str) -> float | None:
    """The largest forecast ``key`` the runs' profiles give (``[gates]``, or the profile's top
    level as older records have it)."""
    values = []
    for run in runs:
        profile = run.manifest.get("profile") or {}
        for table in (profile, profile.get("gates") or {}):
            value = table.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                values.append(float(value))
    return max(values) if values else None


def fill(s: ReportSummary, groups: dict[tuple[str, str, str], list[RunData]],
         forecast_peak_sessions: float | None, forecast_peak_qps: float | None,
         forecast_peak_burst_queries: float | None = None) -> None:
    """Add the mail, DNS-run and DNS-capacity rows of every setup to ``s``."""
    for (service, scenario, setup), runs in groups.items():
        if service in MAIL_TYPES or "+" in service:
            row = mail_capacity(runs, service, scenario, setup, forecast_peak_sessions, s.notes)
            if row is not None:
                s.mail.append(row)
        elif service == "DNS":
            dns_runs = [dns_run(r, s.notes) for r in runs]
            s.dns += dns_runs
            s.dns_capacity.append(dns_capacity(runs, dns_runs, scenario, setup, forecast_peak_qps,
                                               forecast_peak_burst_queries))


# --------------------------------------------------------------------------------------------
# mail
# --------------------------------------------------------------------------------------------


def mail_capacity(runs: Sequence[RunData], service: str, scenario: str, setup: str,
                  forecast_peak_sessions: float | None, notes: list[str]) -> MailCapacity | None:
    """:func:`loadkit.model.fit_headroom` over one setup's runs (None and a note when it cannot
    be fitted)."""
    peak = forecast_peak_sessions or forecast(runs, "forecast_peak_sessions")
    try:
        res = model.fit_headroom(list(runs), policy="roundrobin", admission_fraction=ADMISSION_FRACTION,
                                 forecast_peak_sessions=peak)
    except ModelError as err:
        notes.append(f"{service} ({scenario}): no headroom figures: {err}")
        return None
    per_proxy = [num(p.admission_limit_sessions) for p in res.proxies]
    recommendation = "admission limit per proxy " + "/".join(f"{v:.0f}" for v in per_proxy if v is not None) + " sessions"
    survive = num(getattr(res, "n_minus_1_sessions", None))
    down = str(getattr(res, "n_minus_1_proxy_down", "") or "")
    if survive is not None:
        recommendation += f"; with {down or 'one proxy'} down (N+1) the others hold ≈ {survive:,.0f} sessions"
    return MailCapacity(
        service=service, scenario=scenario, setup=setup, run_ids=[r.run_id for r in runs],
        forecast_peak_sessions=num(peak), first_failure_sessions=num(res.first_failure_sessions),
        first_failure_proxy=str(res.first_failure_proxy), all_fail_sessions=num(res.all_fail_sessions),
        all_fail_ci95_sessions=[v for v in (num(x) for x in res.all_fail_ci95) if v is not None],
        cascade_all_fail=bool(res.cascade_all_fail), headroom_pct=num(res.headroom_pct),
        admission_limit_total_sessions=num(res.admission_limit_total_sessions),
        admission_limit_per_proxy_sessions=[v for v in per_proxy if v is not None],
        proxies_needed_for_forecast_n=res.proxies_needed_for_forecast,
        max_fraction_observed=num(res.max_fraction_observed), recommendation=recommendation,
        model_summary=res.summary(), proxies=[p.to_dict() for p in res.proxies],
        measured_first_failure_sessions=num(getattr(res, "measured_first_failure_sessions", None)),
        n_minus_1_sessions=survive, n_minus_1_proxy_down=down,
        admission_limit_sum_sessions=num(getattr(res, "admission_limit_sum_sessions", None)),
        caveats=[str(c) for c in getattr(res, "caveats", None) or []],
    )


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


def bursts_sent(run: RunData) -> int | None:
    """Bursts the generator recorded (``burst`` events; one per worker share, counted once)."""
    indexes = {(e.get("detail") or {}).get("burst_index") for e in run.events if e.get("kind") == "burst"}
    return len(indexes) or None


def _traffic(run: RunData) -> dict:
    """Totals and per-interval peaks of the DNS generator's counters."""
    frame = counters.counter_frame(run, [ORIGINAL, RETRY, ANSWERED])
    if not counters.has_metric(run, ORIGINAL) or not len(frame):
        return {}
    original = counters.total(run, ORIGINAL)
    retry = counters.total(run, RETRY)
    answered = counters.total(run, ANSWERED)
    offered_i = frame[ORIGINAL] + frame[RETRY]
    amp = offered_i / frame[ORIGINAL].where(frame[ORIGINAL] > 0)
    offered = original + retry
    return dict(
        offered_queries_n=offered, original_queries_n=original, retry_queries_n=retry,
        answered_queries_n=answered, unanswered_queries_n=max(0.0, offered - answered),
        retry_amplification_mean=num(offered / original) if original else None,
        retry_amplification_max=num(amp.max()),
        peak_offered_qps=num((offered_i / frame["interval_s"]).max()),
    )


def dns_run(run: RunData, notes: list[str]) -> DnsRun:
    """Offered/answered/dropped totals, receive-buffer drops, retry amplification and the
    burst model's figures for one run."""
    traffic = _traffic(run)
    if not traffic:
        notes.append(f"DNS run {run.run_id}: no retry figures: no '{ORIGINAL}' counter recorded")
    label, drops = model.receive_drops(run)
    drops_n = float(drops.sum()) if len(drops) else None
    host_errors = None
    if len(run.net) and "udp_rcvbuf_errors_n" in run.net:
        per_ts = run.net.groupby("ts_unix_s")["udp_rcvbuf_errors_n"].sum().sort_index()
        host_errors = float(per_ts.diff().clip(lower=0).sum())  # a counter reset is not negative
    offered = traffic.get("offered_queries_n")
    size, window_s = offered_burst(run)
    row = DnsRun(
        run_id=run.run_id, scenario=str(run.manifest.get("scenario", "")),
        offered_queries_n=offered, original_queries_n=traffic.get("original_queries_n"),
        retry_queries_n=traffic.get("retry_queries_n"), answered_queries_n=traffic.get("answered_queries_n"),
        unanswered_queries_n=traffic.get("unanswered_queries_n"), drops_n=drops_n, drops_source=label,
        host_rcvbuf_errors_n=host_errors,
        drop_ratio=num(drops_n / offered) if drops_n is not None and offered else None,
        retry_amplification_mean=traffic.get("retry_amplification_mean"),
        retry_amplification_max=traffic.get("retry_amplification_max"),
        peak_offered_qps=traffic.get("peak_offered_qps"), bursts_n=bursts_sent(run),
        burst_queries=float(size) if size else None, burst_window_s=window_s if size else None,
        burst_window_planned_s=window_s if size else None,
        largest_burst_without_loss_queries=None, largest_burst_is_lower_bound=False,
        rcvbuf_needed_bytes=None, buffer_datagrams_n=None, rcvbuf_bytes=None, service_rate_qps=None,
        drop_onset_qps=None, udp_burst_summary="",
    )
    _burst_figures(run, row, notes)
    return row


def udp_fit(run: RunData, notes: list[str] | None = None):
    """:func:`loadkit.model.fit_udp_burst` for the run (its recorded bursts, buffers and drain
    rate); None, and a note, when it cannot be fitted."""
    try:
        return model.fit_udp_burst(run)
    except ModelError as err:
        if notes is not None:
            notes.append(f"DNS run {run.run_id}: no burst figures: {err}")
        return None


def _burst_figures(run: RunData, row: DnsRun, notes: list[str]) -> None:
    """The UDP burst model's figures for the burst the profile offered (else the largest the run
    recorded); what was measured beats the model when nothing dropped."""
    fit = udp_fit(run, notes)
    if fit is None:
        return
    recorded = bool(getattr(fit, "bursts", None) and num(fit.burst_n))
    if recorded:
        # the bursts as the generator really sent them (its burst events), as `loadkit fit
        # udp-burst` judges them: a 4,000-query burst asked for in 10 ms may take 116 ms to leave
        row.burst_queries = float(fit.burst_n)
        row.burst_window_s = num(fit.burst_window_s) or 0.0
    size, window_s = row.burst_queries or 0.0, row.burst_window_s or 0.0
    absorbed = num(fit.max_burst_in_window(window_s))
    row.largest_burst_is_lower_bound = bool(size and row.drops_n == 0)
    if size and row.drops_n is None:
        # nothing to tell absorbed from overflowed: the model's figures from the answers stand alone
        notes.append(f"DNS run {run.run_id}: no drops were counted (no collector sampled the server's socket "
                     "or the host's UDP counters: --collect-udp-port PORT); its burst figures are the model's, "
                     "from the answers")
    if row.largest_burst_is_lower_bound:  # every burst offered was absorbed: at least that much
        absorbed = max(size, absorbed or 0.0)
    row.largest_burst_without_loss_queries = absorbed
    if size and not row.largest_burst_is_lower_bound:
        # the fit's own figure for its headline burst (sized for the slowest burst it measured)
        row.rcvbuf_needed_bytes = int(fit.needed_rcvbuf_bytes if recorded else fit.rcvbuf_for(size, window_s))
    row.buffer_datagrams_n = int(fit.buffer_datagrams)
    row.rcvbuf_bytes = num(fit.rcvbuf_bytes)
    row.service_rate_qps = num(fit.service_rate_qps)  # None when no burst measured the drain rate
    row.drop_onset_qps = num(fit.observed_onset_qps)
    row.udp_burst_summary = fit.summary()


def so_rcvbuf_advice(sk_rcvbuf_bytes: int) -> str:
    """The setting for a needed ``sk_rcvbuf``: Linux doubles ``SO_RCVBUF`` and caps the request
    at ``net.core.rmem_max``, so ask for half (of the need with the model's headroom), rounded up,
    and allow at least that."""
    so = int(model.so_rcvbuf_for(sk_rcvbuf_bytes))
    return (f"so-rcvbuf ≥ {so:,} bytes (the kernel doubles it to {2 * so:,} per socket, "
            f"{100 * (model.RCVBUF_HEADROOM - 1):.0f} % over the {sk_rcvbuf_bytes:,} needed); "
            f"net.core.rmem_max must be ≥ {so:,}")


def _headroom(capacity: float | None, peak: float | None, is_lower_bound: bool) -> float | None:
    """Headroom in percent of ``capacity`` over a forecast ``peak``; None when either is missing,
    and None when the capacity is only a lower bound that the peak passes (the service was never
    pushed to where it drops, so passing the bound says nothing about failing)."""
    if not capacity or not peak:
        return None
    pct = (capacity / peak - 1) * 100
    return None if is_lower_bound and pct < 0 else num(pct)


def dns_capacity(runs: Sequence[RunData], rows: Sequence[DnsRun], scenario: str, setup: str,
                 forecast_peak_qps: float | None, forecast_peak_burst_queries: float | None = None) -> DnsCapacity:
    """The DNS row of one scenario: per burst when its runs offered bursts, else per second."""
    bursty = [(r.burst_queries, r) for r in rows if r.burst_queries]
    common = dict(scenario=scenario, setup=setup, run_ids=[r.run_id for r in runs],
                  forecast_peak_qps=num(forecast_peak_qps or forecast(runs, "forecast_peak_qps")),
                  rcvbuf_needed_bytes=None, rate_limit_qps=None)
    if bursty:
        _, d = max(bursty, key=lambda b: b[0])
        peak = forecast_peak_burst_queries or forecast(runs, "forecast_peak_burst_queries")
        absorbed = d.largest_burst_without_loss_queries
        if d.largest_burst_is_lower_bound:
            recommendation = "none: no drops at the server's socket"
        elif d.rcvbuf_needed_bytes:
            recommendation = so_rcvbuf_advice(d.rcvbuf_needed_bytes)
        else:
            recommendation = ""
        return DnsCapacity(
            mode="burst", burst_queries=d.burst_queries, burst_window_s=d.burst_window_s,
            largest_burst_without_loss_queries=absorbed, is_lower_bound=d.largest_burst_is_lower_bound,
            drops_counted=d.drops_n is not None,
            forecast_peak_burst_queries=peak, drop_onset_qps=d.drop_onset_qps,
            peak_offered_qps=d.peak_offered_qps,
            headroom_pct=_headroom(absorbed, peak, d.largest_burst_is_lower_bound),
            recommendation=recommendation,
            source="UDP burst model: the largest burst the receive buffers absorb in the "
                   f"{(d.burst_window_s or 0) * 1000:.0f} ms the bursts took to send, at the drain rate measured in them",
            **{**common, "rcvbuf_needed_bytes": d.rcvbuf_needed_bytes},
        )
    onsets = [r.drop_onset_qps for r in rows if r.drop_onset_qps]
    peaks = [r.peak_offered_qps for r in rows if r.peak_offered_qps]
    fall = min(onsets) if onsets else (max(peaks) if peaks else None)
    limit = num(ADMISSION_FRACTION * fall) if fall else None
    fq = common["forecast_peak_qps"]
    return DnsCapacity(
        mode="rate", burst_queries=None, burst_window_s=None, largest_burst_without_loss_queries=None,
        is_lower_bound=not onsets, drops_counted=any(r.drops_n is not None for r in rows),
        forecast_peak_burst_queries=None,
        drop_onset_qps=num(min(onsets)) if onsets else None, peak_offered_qps=num(max(peaks)) if peaks else None,
        headroom_pct=_headroom(fall, fq, not onsets),
        recommendation=f"rate limit ≤ {limit:,.0f} queries/s" if limit else "",
        source="drop onset: the lowest offered rate of an interval with receive-buffer drops"
               + (" (none: the highest rate offered, a lower bound)" if not onsets else ""),
        **{**common, "rate_limit_qps": limit},
    )
