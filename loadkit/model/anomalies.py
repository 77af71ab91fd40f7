"""Anomalies in a KPI series: spikes, a daily rhythm of spikes, level shifts, and how late
polling at a coarser interval would have noticed.

Spikes are points far above a rolling median, measured in robust standard deviations (1.4826 ×
MAD of the whole series' deviations), grouped into events. A spike that recurs at the same time of
day on several days (the 12:30 spike that was visible for weeks) is reported as a daily period.
Change points are level shifts of the median-filtered series found by binary segmentation with a
BIC-like penalty. Detection delay: a KPI polled every P seconds reports the mean over each
P-second bucket at its end; the delay is from the first spike's start to the first bucket end whose
mean crosses the same threshold, or None if that polling never sees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loadkit.errors import ModelError
from loadkit.model._result import Result

DEFAULT_POLLING_S = (3600, 900, 60)


@dataclass
class Spike(Result):
    kind = "spike"

    start_unix_s: float
    peak_unix_s: float
    end_unix_s: float
    peak_value: float
    score: float  #: peak deviation from the rolling median in robust standard deviations

    def summary(self) -> str:
        t = pd.Timestamp(self.peak_unix_s, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M:%S")
        return f"spike at {t} UTC peak {self.peak_value:.4g} ({self.score:.1f} σ)"


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
        t = pd.Timestamp(self.ts_unix_s, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M:%S")
        return f"level {self.level_before:.4g} → {self.level_after:.4g} at {t} UTC"


@dataclass
class AnomalyResult(Result):
    kind = "anomalies"

    spikes: list[Spike]
    daily_period: DailyPeriod | None
    change_points: list[ChangePoint]
    #: polling interval (s) -> seconds from the first spike's start to detection; None = never
    detection_delay_s: dict[int, float | None]
    threshold: float  #: value above which a point (or a polled mean) counts as anomalous
    sample_interval_s: float
    points_n: int
    name: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{len(self.spikes)} spikes"]
        if self.daily_period is not None:
            parts.append(self.daily_period.summary())
        parts.append(f"{len(self.change_points)} level shifts")
        if self.detection_delay_s:
            delays = []
            for p, d in sorted(self.detection_delay_s.items(), reverse=True):
                label = f"{p // 3600} h" if p % 3600 == 0 else (f"{p // 60} min" if p % 60 == 0 else f"{p} s")
                delays.append(f"{label}: " + ("never" if d is None else f"{d:.0f} s"))
            parts.append("detected after " + ", ".join(delays) + " polling")
        head = f"{self.name}: " if self.name else ""
        return head + "; ".join(parts)


def _to_unix(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
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


def find_anomalies(series: pd.Series, *, z_threshold: float = 6.0, window_s: float = 3600.0,
                   polling_s: tuple[int, ...] = DEFAULT_POLLING_S, day_tolerance_s: float = 600.0,
                   min_days: int = 2, change_min_s: float | None = None, name: str = "") -> AnomalyResult:
    """Spikes, a daily period of spikes, change points and polling detection delays in ``series``.

    ``series`` is indexed by a DatetimeIndex (naive = UTC) or unix seconds. ``window_s`` is the
    rolling-median window that defines "normal" around each point; ``change_min_s`` the shortest
    level segment (default 4 × window).
    """
    if not isinstance(series, pd.Series):
        raise ModelError("find_anomalies needs a pandas Series indexed by time")
    t, v = _to_unix(series)
    if len(v) < 20:
        raise ModelError(f"series {name or series.name!r} has {len(v)} points; need >= 20 to tell normal from anomalous")
    step = float(np.median(np.diff(t)))
    if step <= 0:
        raise ModelError("series has duplicate timestamps only; cannot find a sample interval")
    win = max(5, int(round(window_s / step)) | 1)
    base = _rolling_median(v, win)
    dev = v - base
    mad = float(np.median(np.abs(dev - np.median(dev))))
    sigma = 1.4826 * mad
    if sigma <= 0:
        nz = np.abs(dev[dev != 0])
        sigma = float(np.min(nz)) if len(nz) else 1.0
    score = dev / sigma
    level = float(np.median(v))
    threshold = level + z_threshold * sigma

    # spikes: runs of points above the threshold, merged when closer than 2 samples
    above = score > z_threshold
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

    daily = _daily_period(spikes, t, day_tolerance_s, min_days)

    # level shifts of the median-filtered series (spikes removed), penalty ~ BIC for a mean shift
    min_len = max(3, int(round((change_min_s or 4 * window_s) / step)))
    smooth = _rolling_median(v, max(5, min(win, min_len) | 1))
    penalty = 2.0 * math.log(len(v)) * sigma**2 * 4.0
    cps_idx = _binary_segmentation(smooth, penalty=penalty, min_size=min_len)
    bounds = [0, *cps_idx, len(v)]
    cps = []
    for a, cp, b in zip(bounds[:-2], bounds[1:-1], bounds[2:]):
        before, after = float(np.median(v[a:cp])), float(np.median(v[cp:b]))
        if abs(after - before) > z_threshold * sigma / 2:
            cps.append(ChangePoint(ts_unix_s=float(t[cp]), level_before=before, level_after=after))

    delays: dict[int, float | None] = {}
    if spikes:
        first = spikes[0].start_unix_s
        for p in polling_s:
            if p < step:
                continue
            bucket = np.floor(t / p) * p
            means = pd.Series(v).groupby(bucket).mean()
            ends = means.index.to_numpy(dtype=float) + p
            hit = np.flatnonzero((means.to_numpy() > threshold) & (ends > first))
            delays[int(p)] = float(ends[hit[0]] - first) if len(hit) else None
    return AnomalyResult(spikes=spikes, daily_period=daily, change_points=cps, detection_delay_s=delays,
                         threshold=threshold, sample_interval_s=step, points_n=int(len(v)),
                         name=name or str(series.name or ""))


def _daily_period(spikes: list[Spike], t: np.ndarray, tol_s: float, min_days: int) -> DailyPeriod | None:
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


def kpi_series(run, table: str, column: str, *, group: str | None = None, delta: bool = False) -> pd.Series:
    """A KPI column of a run's samples as a Series by unix seconds (``delta``: per-interval increase)."""
    df = getattr(run, table)
    if column not in df:
        raise ModelError(f"run {run.run_id}: table {table} has no column {column!r}")
    if group is not None:
        df = df[df["group"] == group]
    s = df.groupby("ts_unix_s")[column].sum().sort_index().astype(float)
    if delta:
        s = s.diff().clip(lower=0).dropna()
    s.name = column
    return s
