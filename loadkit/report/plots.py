"""The report's figures. Each function takes loaded runs and/or summary figures and returns a
matplotlib Figure with a title and units on every axis; the notebook only calls and shows them.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # the report renders to files; there is never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from loadkit import model  # noqa: E402
from loadkit.record import counters, latency  # noqa: E402
from loadkit.record.reader import RunData  # noqa: E402

from .analysis import (  # noqa: E402
    HOLD_NAMES,
    abort_event,
    first_failure_ts,
    held_sessions,
    num,
    proxy_groups,
    run_window,
)
from .capacity import ANSWERED, ORIGINAL, RETRY  # noqa: E402
from .models import kpi  # noqa: E402
from .summary import Change, DnsCapacity, MailCapacity  # noqa: E402

MIB = 1024 * 1024
#: one colour per proxy / series, colour-blind safe (Okabe-Ito)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
RED = "#C0392B"
GREEN = "#1E8449"
GREY = "#7F8C8D"

plt.rcParams.update(
    {
        "figure.dpi": 96,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.titleweight": "bold",
        "axes.titlesize": 12,
        "figure.titlesize": 14,
        "figure.titleweight": "bold",
        "legend.frameon": False,
    }
)


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (closed afterwards), for ``IPython.display.Image``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


def to_img_html(fig: Figure, dpi: int = 110) -> str:
    """The figure as an ``<img>`` with its titles as alternative text (closed afterwards)."""
    titles = [fig._suptitle.get_text()] if fig._suptitle is not None else []
    titles += [ax.get_title() for ax in fig.axes if ax.get_title()]
    alt = html.escape("; ".join(titles) or "figure", quote=True)
    data = base64.b64encode(to_png(fig, dpi)).decode("ascii")
    return f'<img alt="{alt}" src="data:image/png;base64,{data}" style="max-width:100%;height:auto;">'


def _time_axis(ts: pd.Series | np.ndarray | pd.Index, start: float) -> tuple[np.ndarray, str]:
    """Seconds since the run started, in minutes when the run is longer than ten minutes."""
    t = np.asarray(ts, dtype=float) - start
    if len(t) and np.nanmax(t) > 600:
        return t / 60.0, "time since start (min)"
    return t, "time since start (s)"


def _start(run: RunData) -> float:
    return run_window(run)[0]


def _bars(ax, shown: list[tuple[str, float, str]], title: str, unit: str) -> None:
    ax.barh([lab for lab, _, _ in shown], [v for _, v, _ in shown], color=[c for _, _, c in shown])
    for i, (_, v, _) in enumerate(shown):
        ax.text(v, i, f" {v:,.0f}", va="center", fontsize=10)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(unit)
    ax.set_xlim(0, max(v for _, v, _ in shown) * 1.25 if shown else 1)


def headroom_bars(mail: Sequence[MailCapacity], dns: Sequence[DnsCapacity] = ()) -> Figure | None:
    """Per service and setup: its forecast peak (only when there is a forecast), admission limit,
    first failure and fall-over; for DNS the burst offered against the largest absorbed."""
    panels = []
    for m in mail:
        values = [("forecast peak", m.forecast_peak_sessions, "#34495E"),
                  ("admission limit", m.admission_limit_total_sessions, GREEN),
                  ("first failure", m.first_failure_sessions, "#E67E22"),
                  ("all fall over", m.all_fail_sessions, RED)]
        head = f": headroom {m.headroom_pct:+.0f} %" if m.headroom_pct is not None else ""
        panels.append(([v for v in values if v[1] is not None], f"{m.service} · {m.scenario}{head}", "sessions"))
    for d in dns:
        if d.mode == "burst":
            values = [("forecast burst", d.forecast_peak_burst_queries, "#34495E"),
                      ("burst offered", d.burst_queries, GREY),
                      ("absorbed without loss" + (" (≥)" if d.is_lower_bound else ""),
                       d.largest_burst_without_loss_queries, RED)]
            unit = "queries per burst"
        else:
            values = [("forecast peak", d.forecast_peak_qps, "#34495E"),
                      ("rate limit", d.rate_limit_qps, GREEN),
                      ("drops from" if d.drop_onset_qps else "highest offered (no drops)",
                       d.drop_onset_qps or d.peak_offered_qps, RED)]
            unit = "queries/s"
        head = f": headroom {d.headroom_pct:+.0f} %" if d.headroom_pct is not None else ""
        panels.append(([v for v in values if v[1] is not None], f"DNS · {d.scenario}{head}", unit))
    if not panels:
        return None
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(max(6.0, 4.6 * n), 3.4), squeeze=False)
    for ax, (shown, title, unit) in zip(axes[0], panels):
        _bars(ax, shown, title, unit)
    fig.suptitle("Capacity, per service and scenario")
    fig.tight_layout()
    return fig


def proxy_memory(run: RunData, service: MailCapacity | None) -> Figure:
    """Left: each proxy's memory against its sessions, with the fit, the limit and the fall-over
    line. Right: the same memory over time, with OOM kills marked."""
    g = proxy_groups(run)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    fits = {p["name"]: p for p in (service.proxies if service else [])}
    first = first_failure_ts(run)
    start = _start(run)
    stopped = num((abort_event(run).get("detail") or {}).get("sample_unix_s")) or math.inf
    limit_mib = None
    for i, (name, rows) in enumerate(g.groupby("group")):
        colour = PALETTE[i % len(PALETTE)]
        cut = first.get(str(name), math.inf)
        # after an abort the users are gone while the memory is still being released
        before = rows[(rows["ts_unix_s"] < cut) & (rows["ts_unix_s"] <= stopped)]
        ax.scatter(before["sessions_n"], before["cgroup_memory_bytes"] / MIB, s=8, alpha=0.6, color=colour, label=str(name))
        limit_mib = float(rows["cgroup_limit_bytes"].max()) / MIB
        fit = fits.get(str(name))
        if fit and fit.get("bytes_per_session"):
            at = fit.get("sessions_at_limit") or 0
            xs = np.linspace(0, max(at, float(before["sessions_n"].max() or 1)) * 1.05, 50)
            ax.plot(xs, (fit["base_bytes"] + fit["bytes_per_session"] * xs) / MIB, color=colour, lw=1)
            ax.axvline(at, color=colour, ls=":", lw=1.2)
        t, tlabel = _time_axis(rows["ts_unix_s"], start)
        ax2.plot(t, rows["cgroup_memory_bytes"] / MIB, color=colour, lw=1.4, label=str(name))
        if math.isfinite(cut):
            tc, _ = _time_axis(np.array([cut]), start)
            ax2.axvline(tc[0], color=colour, ls=":", lw=1)
            ax2.annotate("OOM", (tc[0], limit_mib), color=colour, fontsize=8, ha="right", va="bottom")
        ax2.set_xlabel(tlabel)
    if limit_mib:
        for a in (ax, ax2):
            a.axhline(limit_mib, color=RED, ls="--", lw=1.2, label=f"memory limit {limit_mib:.0f} MiB")
    first_fail = service.first_failure_sessions if service else None
    if first_fail and fits:
        per_proxy = first_fail / max(1, len(fits))
        ax.axvline(per_proxy, color=RED, lw=2, alpha=0.7, label=f"fall-over ≈ {per_proxy:.0f} sessions/proxy")
    ax.set_xlabel("sessions held by the proxy")
    ax.set_ylabel("cgroup memory (MiB)")
    ax.set_title("Memory against sessions, per proxy")
    ax.legend(fontsize=8, loc="upper left")
    ax2.set_ylabel("cgroup memory (MiB)")
    ax2.set_title("Memory over time, per proxy")
    ax2.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Run {run.run_id}: proxy memory")
    fig.tight_layout()
    return fig


def sessions_over_time(run: RunData) -> Figure | None:
    """Held sessions (the generator's gauges, IMAP and POP3 summed) and failures per interval."""
    protocols, held = held_sessions(run)
    if not len(held):
        return None
    start = _start(run)
    fig, ax = plt.subplots(figsize=(12, 3.2))
    t, tlabel = _time_axis(held.index, start)
    ax.plot(t, held.values, color=PALETTE[0], lw=1.6, label=f"held sessions ({protocols})")
    ax.set_ylabel("sessions")
    ax.set_xlabel(tlabel)
    ax.legend(fontsize=8, loc="upper left")
    fails = run.failures
    if len(fails):
        per_s = fails.groupby("ts_unix_s")["failures_n"].sum()
        ax_r = ax.twinx()
        tf, _ = _time_axis(per_s.index, start)
        ax_r.bar(tf, per_s.values, width=max(0.8 * (tf[1] - tf[0]) if len(tf) > 1 else 0.8, 1e-3), color=RED, alpha=0.5, label="failures")
        ax_r.set_ylabel("failed requests per interval", color=RED)
        ax_r.spines["right"].set_visible(True)
    ax.set_title(f"Run {run.run_id}: {protocols} sessions held by the load generator, and failures")
    fig.tight_layout()
    return fig


def dns_traffic(run: RunData) -> Figure:
    """Offered / answered / dropped queries per second, receive-buffer drops, and retry
    amplification, from the generator's counters (:mod:`loadkit.record.counters`)."""
    frame = counters.counter_frame(run, [ORIGINAL, RETRY, ANSWERED])
    dt = frame["interval_s"].where(frame["interval_s"] > 0)
    offered = (frame[ORIGINAL] + frame[RETRY]) / dt
    answered = frame[ANSWERED] / dt
    dropped = (offered - answered).clip(lower=0)
    start = _start(run)
    fig, axes = plt.subplots(3, 1, figsize=(12, 8.2), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]})
    ax = axes[0]
    tlabel = "time since start (s)"
    for series, label, colour in (
        (offered, "offered (original + retries)", PALETTE[0]),
        (answered, "answered", GREEN),
        (dropped, "not answered", RED),
    ):
        series = series.dropna()
        if len(series):
            t, tlabel = _time_axis(series.index, start)
            ax.plot(t, series.values, label=label, color=colour, lw=1.3)
    ax.set_ylabel("queries per second")
    ax.set_title("Offered, answered and unanswered queries")
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1]
    label, drops = model.receive_drops(run)
    if len(drops):
        t, tlabel = _time_axis(drops.index, start)
        width = 0.8 * float(np.median(np.diff(t))) if len(t) > 1 else 0.8
        ax.bar(t, drops.values, width=width, color=RED)
        ax.set_title(f"Receive-buffer drops, {label}: {int(drops.sum()):,} in the run")
    else:
        ax.set_title("Receive-buffer drops: no socket or network samples in this run")
    ax.set_ylabel("dropped datagrams per interval")

    ax = axes[2]
    ratio = ((frame[ORIGINAL] + frame[RETRY]) / frame[ORIGINAL].where(frame[ORIGINAL] > 0)).dropna()
    if len(ratio):
        t, tlabel = _time_axis(ratio.index, start)
        ax.plot(t, ratio.values, color="#8E44AD", lw=1.3)
        ax.axhline(1.0, color=GREY, ls="--", lw=1)
    ax.set_ylabel("offered / original (×)")
    ax.set_title("Retry amplification")
    ax.set_xlabel(tlabel)
    fig.suptitle(f"Run {run.run_id}: DNS")
    fig.tight_layout()
    return fig


def _percentile_over_time(run: RunData, req: pd.DataFrame, rtype: str, q: float) -> tuple[pd.Series, str]:
    """(ms by interval end, how): each interval's ``q`` quantile over every request of the type,
    from the latency histogram; without one, the highest of the per-name percentiles."""
    found = latency.percentile_series(run, q, request_type=rtype)
    found = found.dropna(subset=["latency_s"]) if len(found) else found
    if len(found):
        return found.set_index("ts_unix_s")["latency_s"] * 1000.0, "histogram"
    col = f"latency_p{q * 100:g}_s"
    r = req[(req["request_type"] == rtype) & (req["requests_n"] > 0)]
    return r.groupby("ts_unix_s")[col].max() * 1000.0, "highest over request names"


def latency_over_time(run: RunData) -> Figure | None:
    """p50 / p95 / p99 of each recording interval, per request type (without the held-session
    pseudo-requests); a run's single figure is in the latency table, not an average of these."""
    req = run.requests
    if len(req):
        req = req[~req["name"].isin(HOLD_NAMES)]  # held-session time is not a latency
    if not len(req):
        return None
    types = sorted(req["request_type"].unique())
    fig, axes = plt.subplots(len(types), 1, figsize=(12, 3.4 * len(types)), squeeze=False)
    start = _start(run)
    for ax, rtype in zip(axes[:, 0], types):
        how = ""
        tlabel = "time since start (s)"
        for q, colour in ((0.5, GREEN), (0.95, "#E67E22"), (0.99, RED)):
            series, how = _percentile_over_time(run, req, rtype, q)
            series = series[series > 0].dropna()
            if not len(series):
                continue
            t, tlabel = _time_axis(series.index, start)
            ax.plot(t, series.values, label=f"p{q * 100:g}", color=colour, lw=1.2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.set_ylabel("latency (ms, log scale)")
        ax.set_xlabel(tlabel)
        ax.set_title(f"{rtype} latency percentiles of each recording interval ({how})")
        ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.suptitle(f"Run {run.run_id}: latency")
    fig.tight_layout()
    return fig


def anomalies(run: RunData, found) -> Figure | None:
    """The KPI series the anomaly search looked at (an ``AnomalyRow``), with its spikes marked."""
    label, series = kpi(run)
    if len(series) < 2 or series.nunique() < 2:
        return None  # a flat line says nothing the table does not
    start = _start(run)
    fig, ax = plt.subplots(figsize=(12, 3.2))
    t, tlabel = _time_axis(series.index, start)
    ax.plot(t, series.values, color=PALETTE[0], lw=1.1, label=label)
    spikes = [s for s in (found.spikes if found else []) if s.get("ts_unix_s") is not None]
    if spikes:
        ts = np.array([float(s["ts_unix_s"]) for s in spikes])
        vals = series.reindex(ts).to_numpy(float)
        tt, _ = _time_axis(ts, start)
        ax.scatter(tt, vals, color=RED, s=36, zorder=3, label=f"spikes ({len(spikes)})")
    unit = "failed requests per interval" if "failed" in label else "dropped datagrams per interval"
    ax.set_ylabel(unit)
    ax.set_xlabel(tlabel)
    ax.set_title(f"Run {run.run_id}: anomalies in {label}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def baseline_changes(changes: Sequence[Change], baseline_release: str) -> Figure | None:
    """Change of each figure against the baseline release, scenario by scenario; regressions red."""
    if not changes:
        return None
    labels = [f"{c.service} {c.metric} · {c.scenario}" for c in changes]
    values = [c.change or 0.0 for c in changes]
    colours = [RED if c.regression else GREEN if c.improvement else GREY for c in changes]
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(changes) + 1.4))
    ax.barh(labels, values, color=colours)
    for i, c in enumerate(changes):
        ax.text(values[i], i, f" {values[i]:+.1f} {c.change_unit}", va="center", fontsize=9)
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("change against the baseline (% of the baseline value; pp for percentages)")
    ax.set_title(f"Change against {baseline_release}, same scenario only (red: regression, green: improvement)")
    fig.tight_layout()
    return fig
