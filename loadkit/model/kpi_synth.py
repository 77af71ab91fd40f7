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

from loadkit.model.anomalies import interval_label

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


#: series unlike the happy path, each with the daily start time the review should report
#: (None: no daily spike); arguments of :func:`synthetic_kpi`
VALIDATION_CASES: dict[str, tuple[dict, str | None]] = {
    "daily 12:30": ({}, "12:30"),
    "noisy": (dict(noise=120.0, spike_height=1500.0), "12:30"),
    "flat, no pattern": (dict(daily_amplitude=0.0, day_factor=0.0), "12:30"),
    "flat and quiet": (dict(daily_amplitude=0.0, day_factor=0.0, wander=0.0), "12:30"),
    "partial (gaps)": (dict(gaps=[(0.10, 0.25), (0.60, 0.66)]), "12:30"),
    "spike at 03:15": (dict(spike_at="03:15"), "03:15"),
    "3 of 7 days": (dict(spike_days=[1, 3, 4]), "12:30"),
    "no spike": (dict(spike_at=None), None),
    "15 s samples": (dict(step_s=15.0), "12:30"),
}


def match_spikes(found: Sequence, injected: Sequence[tuple[float, float]]) -> tuple[int, int]:
    """(injected spikes that a found spike overlaps, found spikes that overlap no injected one);
    ``found`` holds objects with ``start_unix_s`` and ``end_unix_s``."""
    def hit(s, a, b):
        return s.start_unix_s <= b and s.end_unix_s >= a
    return (sum(any(hit(s, a, b) for s in found) for a, b in injected),
            sum(not any(hit(s, a, b) for a, b in injected) for s in found))


def present_spikes(syn: SyntheticKpi) -> list[tuple[float, float]]:
    """The injected spikes with at least one sample left (not wholly inside a gap)."""
    idx = syn.series.index
    return [(a, b) for a, b in syn.spikes if bool(((idx >= a) & (idx <= b)).any())]


def validation_table(seeds: Sequence[int] = range(20), cases: dict | None = None) -> pd.DataFrame:
    """Injected against detected, summed over ``seeds`` for each case: the spikes found and
    falsely found, the daily start time right, and per polling interval the spikes seen and the
    polls that stand out with no spike under them (false alarms)."""
    from loadkit.model.kpi import review_kpi

    rows = []
    for name, (kwargs, start) in (cases or VALIDATION_CASES).items():
        row = {"case": name, "series": 0, "injected": 0, "found": 0, "false": 0, "start_right": 0}
        for seed in seeds:
            syn = synthetic_kpi(seed=seed, **kwargs)
            present = present_spikes(syn)
            r = review_kpi(syn.series)
            found, false = match_spikes(r.spikes, present)
            row["series"] += 1
            row["injected"] += len(present)
            row["found"] += found
            row["false"] += false
            row["start_right"] += int(r.daily_start_time == (start or ""))
            for v in r.polling:
                label = interval_label(v.interval_s)
                row[f"seen {label}"] = row.get(f"seen {label}", 0) + v.detected_n
                row[f"false alarms {label}"] = row.get(f"false alarms {label}", 0) + v.false_alarms_n
        rows.append(row)
    return pd.DataFrame(rows).set_index("case")
