"""Anomalies in a KPI series: spikes, a daily rhythm of spikes, level shifts, and how late
polling at a coarser interval would have noticed.

Spikes are points far above a rolling median, measured in robust standard deviations (1.4826 ×
MAD of the whole series' deviations), grouped into events. The median's window is tied to the
longest spike to be found (three times it): a plateau longer than half the window becomes the
median and disappears. A spike that recurs at the same time of day on several days (the 12:30
spike that was visible for weeks) is reported as a daily period. Level shifts are searched for in
the median-filtered series *after* its daily pattern (the median by time of day) is removed, so
an ordinary day/night cycle is not a string of shifts; binary segmentation with a BIC-like
penalty.

Detection delay: a KPI polled every P seconds reports the mean over each P-second bucket at its
end. The polled series is judged as :func:`loadkit.model.kpi.judge_polling` judges it for ``kpi
review`` (one method, so both commands give one delay for one series): against its own daily
pattern at that resolution, in the robust spread of its own hour of the day (an hourly mean is far
less noisy than a minute's value). A spike counts as detected by the first bucket that overlaps
the spike and stands out; the delay runs from the spike's start to that bucket's end. A spike no
bucket overlapping it shows is "not detected": a later, unrelated crossing is not its detection.
Too few buckets at an interval (fewer than 12) and nothing is said about it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loadkit.errors import ModelError
from loadkit.model._result import Result

DEFAULT_POLLING_S = (3600, 900, 60)


def interval_label(seconds: float) -> str:
    """A polling interval as an operator says it: ``1 h``, ``15 min``, ``90 s``, ``1.5 s``,
    ``500 ms`` (never truncated: a 500 ms poller is not a "0 h" one)."""
    p = float(seconds)
    if p >= 3600 and p % 3600 == 0:
        return f"{p / 3600:g} h"
    if p >= 60 and p % 60 == 0:
        return f"{p / 60:g} min"
    return f"{p * 1000:g} ms" if p < 1 else f"{p:g} s"


def _utc(ts_unix_s: float) -> str:
    return pd.Timestamp(ts_unix_s, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class Spike(Result):
    kind = "spike"

    start_unix_s: float
    peak_unix_s: float
    end_unix_s: float
    peak_value: float
    score: float  #: peak deviation from the rolling median in robust standard deviations

    def summary(self) -> str:
        return f"spike at {_utc(self.peak_unix_s)} UTC peak {self.peak_value:.4g} ({self.score:.1f} σ)"


@dataclass
class DailyPeriod(Result):
    kind = "daily_period"

    time_of_day: str  #: "HH:MM" UTC, the median time of day of the recurring spikes
    seconds_of_day: float
    days_n: int  #: distinct days with a spike at that time
    days_observed_n: int

    def summary(self) -> str:
        return f"daily spike at {self.time_of_day} UTC on {self.days_n} of {self.days_observed_n} days"


@dataclass
class ChangePoint(Result):
    kind = "change_point"

    ts_unix_s: float
    level_before: float
    level_after: float

    def summary(self) -> str:
        return f"level {self.level_before:.4g} → {self.level_after:.4g} at {_utc(self.ts_unix_s)} UTC"


@dataclass
class AnomalyResult(Result):
    kind = "anomalies"

    spikes: list[Spike]
    daily_period: DailyPeriod | None
    change_points: list[ChangePoint]
    #: polling interval (s) -> seconds from the first spike's start to the end of the first
    #: bucket overlapping it that stands out from its own baseline; None = not detected
    detection_delay_s: dict[int, float | None]
    threshold: float  #: value above which a point counts as a spike (level + z × sigma)
    sample_interval_s: float
    points_n: int
    name: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    #: polling interval (s) -> how many of the spikes its buckets detect
    detected_spikes_n: dict[int, int] = field(default_factory=dict)
    window_s: float = math.nan  #: rolling-median window: spikes up to half of it are found
    daily_pattern_removed: bool = False  #: level shifts searched after removing the daily pattern

    def summary(self) -> str:
        parts = [f"{len(self.spikes)} spikes"]
        if self.daily_period is not None:
            parts.append(self.daily_period.summary())
        parts.append(f"{len(self.change_points)} level shifts"
                     + (" (daily pattern removed)" if self.daily_pattern_removed else ""))
        if self.detection_delay_s:
            delays = []
            for p, d in sorted(self.detection_delay_s.items(), reverse=True):
                label = interval_label(p)
                seen = self.detected_spikes_n.get(p)
                count = f" ({seen} of {len(self.spikes)} spikes)" if seen is not None else ""
                delays.append(f"{label}: " + ("not detected" if d is None else f"{d:.0f} s") + count)
            parts.append("first spike detected after " + ", ".join(delays) + " polling")
        head = f"{self.name}: " if self.name else ""
        return head + "; ".join(parts)


def to_unix(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    s = series.dropna()
    if isinstance(s.index, pd.DatetimeIndex):
        idx = s.index if s.index.tz is not None else s.index.tz_localize("UTC")
        t = (idx - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
        t = np.asarray(t, dtype=float)
    else:
        t = np.asarray(s.index, dtype=float)
    v = s.to_numpy(dtype=float)
    order = np.argsort(t, kind="stable")
    return t[order], v[order]


def _rolling_median(v: np.ndarray, window: int) -> np.ndarray:
    return pd.Series(v).rolling(window, center=True, min_periods=1).median().to_numpy()


def _binary_segmentation(v: np.ndarray, penalty: float, min_size: int, max_cp: int = 20) -> list[int]:
    """Indices where the mean shifts (least-squares cost, stop when the gain is below penalty)."""
    cps: list[int] = []
    segments = [(0, len(v))]
    while segments and len(cps) < max_cp:
        best = None
        for a, b in segments:
            seg = v[a:b]
            n = len(seg)
            if n < 2 * min_size:
                continue
            c1 = np.cumsum(seg)
            c2 = np.cumsum(seg**2)
            total = c2[-1] - c1[-1] ** 2 / n
            k = np.arange(min_size, n - min_size + 1)
            left = c2[k - 1] - c1[k - 1] ** 2 / k
            right = (c2[-1] - c2[k - 1]) - (c1[-1] - c1[k - 1]) ** 2 / (n - k)
            gain = total - (left + right)
            j = int(np.argmax(gain))
            if best is None or gain[j] > best[0]:
                best = (float(gain[j]), a, b, a + int(k[j]))
        if best is None or best[0] <= penalty:
            break
        _, a, b, cp = best
        cps.append(cp)
        segments.remove((a, b))
        segments += [(a, cp), (cp, b)]
    return sorted(cps)


def find_anomalies(series: pd.Series, *, z_threshold: float = 6.0, window_s: float | None = None,
                   longest_spike_s: float = 3600.0, polling_s: tuple[int, ...] = DEFAULT_POLLING_S,
                   day_tolerance_s: float = 600.0, min_days: int = 2, change_min_s: float | None = None,
                   name: str = "") -> AnomalyResult:
    """Spikes, a daily period of spikes, change points and polling detection delays in ``series``.

    ``series`` is indexed by a DatetimeIndex (naive = UTC) or unix seconds. ``window_s`` is the
    rolling-median window that defines "normal" around each point; by default three times
    ``longest_spike_s``, the longest spike to be found. ``change_min_s`` is the shortest level
    segment (default 4 × window).
    """
    if not isinstance(series, pd.Series):
        raise ModelError("find_anomalies needs a pandas Series indexed by time")
    t, v = to_unix(series)
    if len(v) < 20:
        raise ModelError(f"series {name or series.name!r} has {len(v)} points; need >= 20 to tell normal from anomalous")
    step = float(np.median(np.diff(t)))
    if step <= 0:
        raise ModelError("series has duplicate timestamps only; cannot find a sample interval")
    if window_s is None:
        if longest_spike_s <= 0:
            raise ModelError(f"longest spike {longest_spike_s} s must be > 0")
        window_s = 3.0 * longest_spike_s
    win = max(5, int(round(window_s / step)) | 1)
    base = _rolling_median(v, win)
    dev = v - base
    mad = float(np.median(np.abs(dev - np.median(dev))))
    sigma = 1.4826 * mad
    if sigma <= 0:
        nz = np.abs(dev[dev != 0])
        sigma = float(np.min(nz)) if len(nz) else 1.0
    score = dev / sigma
    threshold = float(np.median(v)) + z_threshold * sigma
    spikes = find_spikes(t, v, score, z_threshold)
    daily = daily_period(spikes, t, day_tolerance_s, min_days)
    cps, deseasoned = _level_shifts(t, v, step, win, sigma, z_threshold, change_min_s or 4 * window_s)

    delays: dict[int, float | None] = {}
    detected: dict[int, int] = {}
    # one judgement of what polling shows, kpi review's (imported here: kpi imports this module)
    from loadkit.model.kpi import judge_polling

    for p in polling_s if spikes else ():
        view = judge_polling(t, v, spikes, float(p), step, "mean", z_threshold, window_s)
        if not view.note:
            delays[int(p)] = view.delays_s[0]
            detected[int(p)] = view.detected_n
    return AnomalyResult(spikes=spikes, daily_period=daily, change_points=cps, detection_delay_s=delays,
                         threshold=threshold, sample_interval_s=step, points_n=int(len(v)),
                         name=name or str(series.name or ""), detected_spikes_n=detected,
                         window_s=float(win * step), daily_pattern_removed=deseasoned)


def find_spikes(t: np.ndarray, v: np.ndarray, score: np.ndarray, z: float) -> list[Spike]:
    """Runs of points above the threshold, merged when closer than 2 samples."""
    above = score > z
    spikes: list[Spike] = []
    i = 0
    while i < len(v):
        if not above[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(v) and (above[j + 1] or (j + 2 < len(v) and above[j + 2])):
            j += 1
        k = i + int(np.argmax(score[i:j + 1]))
        spikes.append(Spike(start_unix_s=float(t[i]), peak_unix_s=float(t[k]), end_unix_s=float(t[j]),
                            peak_value=float(v[k]), score=float(score[k])))
        i = j + 1
    return spikes


def _level_shifts(t: np.ndarray, v: np.ndarray, step: float, win: int, sigma: float, z: float,
                  change_min_s: float) -> tuple[list[ChangePoint], bool]:
    """Level shifts of the median-filtered series, its daily pattern removed when it spans >= 2
    days (penalty ~ BIC for a mean shift). Returns (change points, pattern removed)."""
    min_len = max(3, int(round(change_min_s / step)))
    smooth = _rolling_median(v, max(5, min(win, min_len) | 1))
    level = v.astype(float)
    deseasoned = bool(t[-1] - t[0] >= 2 * 86400.0)
    if deseasoned:
        # the median by time of day (at the sample interval) over all days: robust to a shift
        # that covers fewer than half the days, and to spikes (already filtered out of smooth)
        slot = np.floor((t % 86400.0) / step).astype(int)
        pattern = pd.Series(smooth).groupby(slot).transform("median").to_numpy()
        pattern = pattern - float(np.median(pattern))
        smooth = smooth - pattern
        level = level - pattern
    penalty = 2.0 * math.log(len(v)) * sigma**2 * 4.0
    cps_idx = _binary_segmentation(smooth, penalty=penalty, min_size=min_len)
    bounds = [0, *cps_idx, len(v)]
    cps = []
    for a, cp, b in zip(bounds[:-2], bounds[1:-1], bounds[2:]):
        before, after = float(np.median(level[a:cp])), float(np.median(level[cp:b]))
        if abs(after - before) > z * sigma / 2:
            cps.append(ChangePoint(ts_unix_s=float(t[cp]), level_before=before, level_after=after))
    return cps, deseasoned


def daily_period(spikes: list[Spike], t: np.ndarray, tol_s: float, min_days: int) -> DailyPeriod | None:
    days_observed = int(len(np.unique(np.floor(t / 86400.0))))
    if len(spikes) < min_days or days_observed < min_days:
        return None
    sod = np.array([s.peak_unix_s % 86400.0 for s in spikes])
    day = np.array([math.floor(s.peak_unix_s / 86400.0) for s in spikes])
    best = None
    for center in sod:
        # circular distance on the clock
        dist = np.abs((sod - center + 43200.0) % 86400.0 - 43200.0)
        near = dist <= tol_s
        n_days = len(np.unique(day[near]))
        if best is None or n_days > best[0]:
            best = (n_days, center, near)
    n_days, center, near = best
    if n_days < min_days:
        return None
    offs = (sod[near] - center + 43200.0) % 86400.0 - 43200.0
    sec = float((center + np.median(offs)) % 86400.0)
    hh, mm = int(sec // 3600), int(round((sec % 3600) / 60))
    if mm == 60:
        hh, mm = (hh + 1) % 24, 0
    return DailyPeriod(time_of_day=f"{hh:02d}:{mm:02d}", seconds_of_day=sec, days_n=n_days,
                       days_observed_n=days_observed)


def kpi_series(run, table: str | None = None, column: str | None = None, *, group: str | None = None,
               delta: bool = False) -> pd.Series:
    """A KPI of a run as a Series by unix seconds, named with what it is.

    With ``table`` and ``column``: that column of the run's samples, summed per timestamp
    (``delta``: the per-interval increase, a drop counted as a counter reset). Without them, the
    KPI the report watches: the DNS server's receive-buffer drops per interval for a DNS run
    (:func:`loadkit.model.receive_drops`), else failed requests per interval.
    """
    from loadkit.record.counters import increments_of

    if table is None:
        return _default_kpi(run)
    if column is None:
        raise ModelError(f"run {run.run_id}: table {table} given without a column")
    df = getattr(run, table, None)
    if df is None:
        raise ModelError(f"run {run.run_id}: no table {table!r}")
    if column not in df:
        raise ModelError(f"run {run.run_id}: table {table} has no column {column!r}")
    if group is not None:
        df = df[df["group"] == group]
    s = df.groupby("ts_unix_s")[column].sum().sort_index().astype(float)
    if delta:
        s = increments_of(s).iloc[1:]  # the first sample has no interval before it
    s.name = column
    return s


def _default_kpi(run) -> pd.Series:
    from loadkit.model.udp import receive_drops

    req = run.requests
    service = ""
    if len(req) and "request_type" in req:
        counts = req.groupby("request_type")["requests_n"].sum()
        service = str(counts.idxmax()).upper() if len(counts) else ""
    if service == "DNS":
        label, drops = receive_drops(run)
        if len(drops):
            drops.name = f"{label} per interval"
            return drops
    if not len(req):
        return pd.Series(dtype="float64", name="failed requests per interval")
    s = kpi_series(run, "requests", "failures_n")
    s.name = "failed requests per interval"
    return s
