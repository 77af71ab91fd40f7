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
from loadkit.errors import ModelError  # noqa: E402
from loadkit.record.reader import RunData  # noqa: E402

from .analysis import HOLD_NAMES, first_failure_ts, gauge, kpi_series, proxy_groups  # noqa: E402

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
    start = run.manifest.get("started_unix_s")
    if start:
        return float(start)
    return float(run.requests["ts_unix_s"].min()) if len(run.requests) else 0.0


def headroom_bars(services: Sequence[dict]) -> Figure:
    """Per service: forecast peak, recommended admission limit, first failure and fall-over."""
    n = max(1, len(services))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.6), squeeze=False)
    for ax, svc in zip(axes[0], services):
        if svc.get("unit") == "queries per burst":
            labels = ["burst offered", "admission limit", "first failure", "absorbed without loss"]
        else:
            labels = ["forecast peak", "admission limit", "first failure", "all fall over"]
        values = [svc.get("forecast_peak"), svc.get("admission_limit"), svc.get("first_failure"), svc.get("fall_over")]
        colours = ["#34495E", GREEN, "#E67E22", RED]
        shown = [(lab, v, c) for lab, v, c in zip(labels, values, colours) if v is not None]
        if svc["service"] == "DNS":
            shown = [s for s in shown if s[0] != "first failure"]
        ax.barh([s[0] for s in shown], [s[1] for s in shown], color=[s[2] for s in shown])
        for i, (_, v, _) in enumerate(shown):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=10)
        ax.invert_yaxis()
        head = svc.get("headroom_pct")
        ax.set_title(f"{svc['service']}: headroom {head:+.0f} %" if head is not None else f"{svc['service']}")
        ax.set_xlabel(svc.get("unit", ""))
        ax.set_xlim(0, max(s[1] for s in shown) * 1.25 if shown else 1)
    fig.suptitle("Capacity against the forecast peak")
    fig.tight_layout()
    return fig


def proxy_memory(run: RunData, service: dict | None) -> Figure:
    """Left: each proxy's memory against its sessions, with the fit, the limit and the fall-over
    line. Right: the same memory over time, with OOM kills marked."""
    g = proxy_groups(run)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    fits = {p["name"]: p for p in (service or {}).get("proxies", [])}
    first = first_failure_ts(run)
    start = _start(run)
    limit_mib = None
    for i, (name, rows) in enumerate(g.groupby("group")):
        colour = PALETTE[i % len(PALETTE)]
        cut = first.get(str(name), math.inf)
        before = rows[rows["ts_unix_s"] < cut]
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
    first_fail = (service or {}).get("first_failure")
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
    """Held sessions (generator gauge) and failures per second."""
    held = None
    for metric in ("imap.held_sessions", "pop3.held_sessions"):
        s = gauge(run, metric)
        if len(s):
            held = s
            break
    if held is None:
        return None
    start = _start(run)
    fig, ax = plt.subplots(figsize=(12, 3.2))
    t, tlabel = _time_axis(held.index, start)
    ax.plot(t, held.values, color=PALETTE[0], lw=1.6, label="held sessions")
    ax.set_ylabel("sessions")
    ax.set_xlabel(tlabel)
    fails = run.failures
    if len(fails):
        per_s = fails.groupby("ts_unix_s")["failures_n"].sum()
        ax_r = ax.twinx()
        tf, _ = _time_axis(per_s.index, start)
        ax_r.bar(tf, per_s.values, width=max(0.8 * (tf[1] - tf[0]) if len(tf) > 1 else 0.8, 1e-3), color=RED, alpha=0.5, label="failures")
        ax_r.set_ylabel("failed requests per interval", color=RED)
        ax_r.spines["right"].set_visible(True)
    ax.set_title(f"Run {run.run_id}: sessions held by the load generator, and failures")
    fig.tight_layout()
    return fig


def dns_traffic(run: RunData) -> Figure:
    """Offered / answered / dropped queries per second, RcvbufErrors, and retry amplification."""
    try:
        amp = model.retry_amplification(run)
    except ModelError:
        amp = pd.DataFrame(columns=["offered_qps", "answered_qps", "amplification"], dtype="float64")
    offered, answered = amp["offered_qps"], amp["answered_qps"]
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
    ratio = amp["amplification"].dropna()
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


def latency_over_time(run: RunData) -> Figure | None:
    """p50 / p95 / p99 over time, request-weighted over request names, per request type
    (without the held-session pseudo-requests)."""
    req = run.requests
    if len(req):
        req = req[~req["name"].isin(HOLD_NAMES)]  # held-session time is not a latency
    if not len(req):
        return None
    types = sorted(req["request_type"].unique())
    fig, axes = plt.subplots(len(types), 1, figsize=(12, 3.4 * len(types)), squeeze=False)
    start = _start(run)
    for ax, rtype in zip(axes[:, 0], types):
        r = req[req["request_type"] == rtype]
        w = r["requests_n"].clip(lower=0).astype(float)
        for p, colour in (("p50", GREEN), ("p95", "#E67E22"), ("p99", RED)):
            col = f"latency_{p}_s"
            num = (r[col] * w).groupby(r["ts_unix_s"]).sum()
            den = w.groupby(r["ts_unix_s"]).sum().replace(0, np.nan)
            series = (num / den * 1000.0).dropna()
            t, tlabel = _time_axis(series.index, start)
            ax.plot(t, series.values, label=p, color=colour, lw=1.2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.set_ylabel("latency (ms, log scale)")
        ax.set_xlabel(tlabel)
        ax.set_title(f"{rtype} latency percentiles over time")
        ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.suptitle(f"Run {run.run_id}: latency")
    fig.tight_layout()
    return fig


def anomalies(run: RunData, found: dict) -> Figure | None:
    """The KPI series the anomaly search looked at, with the spikes it found marked."""
    label, series = kpi_series(run)
    if len(series) < 2:
        return None
    start = _start(run)
    fig, ax = plt.subplots(figsize=(12, 3.2))
    t, tlabel = _time_axis(series.index, start)
    ax.plot(t, series.values, color=PALETTE[0], lw=1.1, label=label)
    spikes = [s for s in found.get("spikes", []) if s.get("ts_unix_s") is not None]
    if spikes:
        ts = np.array([float(s["ts_unix_s"]) for s in spikes])
        vals = series.reindex(ts).to_numpy(float)
        tt, _ = _time_axis(ts, start)
        ax.scatter(tt, vals, color=RED, s=36, zorder=3, label=f"spikes ({len(spikes)})")
    for cp in found.get("change_points") or []:
        cp_ts = cp.get("ts_unix_s") if isinstance(cp, dict) else cp
        if isinstance(cp_ts, (int, float)):
            tc, _ = _time_axis(np.array([cp_ts]), start)
            ax.axvline(tc[0], color="#8E44AD", ls="--", lw=1)
    unit = "p99 latency (s)" if "latency" in label else "dropped datagrams per interval"
    ax.set_ylabel(unit)
    ax.set_xlabel(tlabel)
    ax.set_title(f"Run {run.run_id}: anomalies in {label}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def baseline_changes(changes: Sequence[dict], baseline_release: str) -> Figure | None:
    """Change of each figure against the baseline release; regressions in red."""
    if not changes:
        return None
    labels = [f"{c['service']} {c['metric']}" for c in changes]
    values = [c["change"] or 0.0 for c in changes]
    colours = [RED if c["regression"] else GREEN if c.get("improvement") else GREY for c in changes]
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(changes) + 1.4))
    ax.barh(labels, values, color=colours)
    for i, c in enumerate(changes):
        ax.text(values[i], i, f" {values[i]:+.1f} {c['change_unit']}", va="center", fontsize=9)
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("change against the baseline (% of the baseline value; pp for percentages)")
    ax.set_title(f"Change against {baseline_release} (red: regression, green: improvement)")
    fig.tight_layout()
    return fig
