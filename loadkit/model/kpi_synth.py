"""Made-up KPI series with known spikes, to pin :func:`loadkit.model.kpi.review_kpi`.

A day/night cycle (peak at ``peak_hour`` UTC), Poisson-like noise (its spread grows with the
square root of the level), a level that varies from day to day and drifts within a day (``wander``,
a fraction of the level with about ``wander_tau_s`` of memory) as real traffic does (the reason an
hourly mean hides a short spike), optional gaps, and a spike of ``spike_height`` lasting
``spike_s`` at ``spike_at`` on each chosen day.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy.signal import lfilter

DAY_S = 86400.0


class SyntheticKpi(NamedTuple):
    """A series by unix seconds and the spikes put into it."""

    series: pd.Series
    spikes: list[tuple[float, float]]  #: (start_unix_s, end_unix_s) of each injected spike


def synthetic_kpi(*, days: int = 7, step_s: float = 60.0, start: str = "2026-01-05", level: float = 1000.0,
                  daily_amplitude: float = 600.0, peak_hour: float = 14.0, noise: float = 30.0,
                  day_factor: float = 0.04, wander: float = 0.03, wander_tau_s: float = 3600.0,
                  spike_at: str | None = "12:30", spike_s: float = 600.0,
                  spike_height: float = 800.0, spike_days: Sequence[int] | None = None,
                  gaps: Sequence[tuple[float, float]] = (), seed: int = 0, name: str = "kpi") -> SyntheticKpi:
    """``gaps`` are (from, to) fractions of the whole span with no samples; ``spike_days`` the
    day indices with a spike (default every day); ``noise`` the spread at ``level``."""
    rng = np.random.default_rng(seed)
    t0 = pd.Timestamp(start, tz="UTC").timestamp()
    t = t0 + np.arange(int(days * DAY_S / step_s)) * step_s
    hour = (t % DAY_S) / 3600.0
    day = np.floor((t - t0) / DAY_S).astype(int)
    scale = 1.0 + day_factor * rng.standard_normal(days)
    mean = (level + daily_amplitude * np.cos(2 * np.pi * (hour - peak_hour) / 24.0)) * scale[day]
    if wander:  # slow drift within a day (about an hour's memory), as real traffic has
        a = float(np.exp(-step_s / wander_tau_s))
        w = lfilter([1.0 - a], [1.0, -a], rng.standard_normal(len(t)))
        mean = mean * (1.0 + wander * w / max(float(np.std(w)), 1e-12))
    v = mean + noise * np.sqrt(np.clip(mean, 0, None) / level) * rng.standard_normal(len(t))
    spikes = []
    if spike_at is not None and spike_height:
        hh, mm = (int(x) for x in spike_at.split(":"))
        for d in (range(days) if spike_days is None else spike_days):
            s0 = t0 + d * DAY_S + hh * 3600 + mm * 60
            inside = (t >= s0) & (t < s0 + spike_s)
            v[inside] += spike_height
            spikes.append((s0, s0 + spike_s - step_s))
    keep = np.ones(len(t), dtype=bool)
    for a, b in gaps:
        keep &= ~((t >= t[0] + a * (t[-1] - t[0])) & (t < t[0] + b * (t[-1] - t[0])))
    s = pd.Series(np.clip(v, 0, None)[keep], index=pd.Index(t[keep], name="ts_unix_s"), name=name)
    return SyntheticKpi(s, spikes)
