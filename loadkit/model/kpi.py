"""Production KPIs: a series' daily pattern, its spikes, and what polling every 1 h / 15 min /
1 min would have seen of them.

Incident 2's daily 12:30 spikes were visible for weeks in a KPI polled hourly. This model reads a
series loadkit did not record (see :mod:`loadkit.model.kpi_source`) and answers three questions:

- **The daily pattern.** For each time-of-day slot (the sample interval), the median over days
  (``typical``); the baseline is that profile smoothed by a circular rolling median over
  ``window_s`` (3 × the longest spike to be found, as in :func:`loadkit.model.find_anomalies`), so a
  spike that recurs every day at the same minute stays *out* of the baseline: a daily habit of
  the traffic is learned, a daily 10-minute spike is not. Each day's baseline is scaled to that
  day's level (busy and quiet days).
- **Spikes.** A point's score is its deviation from the baseline in robust standard deviations:
  1.4826 × MAD of the residuals in its hour of the day, shrunk toward the whole series' spread
  and floored at a quarter of it (a quiet night is not all spikes), estimated again without the
  points that stood out (a daily spike fills a sixth of its hour and would widen it). A count
  (whole numbers) has a spread of at least one event. Runs above ``z`` are spikes (runs closer
  than ``merge_gap_s`` are one), and spikes at the same time on several days are a daily period
  (the groupings of :mod:`loadkit.model.anomalies`, one copy).
- **Polling.** A KPI polled every P seconds shows one value per P: the mean over the interval
  (``mode="mean"``: a counter's rate, ``increase(x[P]) / P``) or the value at the poll instant
  (``mode="sample"``: a gauge). That polled series gets the same treatment at its own
  resolution (its daily pattern, its own spread), and a spike counts as seen when a poll that
  covers it stands out; the detection delay runs from the spike's start to that poll. An hourly
  mean dilutes a 10-minute spike six times and day-to-day variation of hourly means hides it.

Timestamps are unix seconds. Times of day, days and poll boundaries are UTC, or local with
``utc_offset_s`` (incident 2's "12:30" is a local time; polls follow the local clock). A series shorter than two days has no
pattern to learn across days: the baseline is then its own smoothed curve, and the result says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loadkit.errors import ModelError
from loadkit.model._result import Result
from loadkit.model.anomalies import (DEFAULT_POLLING_S, DailyPeriod, Spike, daily_period, find_spikes, interval_label,
                                     to_unix)

DAY_S = 86400.0
#: the residuals' spread is estimated per this much of the day (or 4 polls, if longer)
SPREAD_BIN_S = 3600.0
#: a bin's spread is at least this fraction of the whole series' spread
SPREAD_FLOOR_FRACTION = 0.25
#: the least spread of a series of whole numbers (counts)
COUNT_MIN_SPREAD = 1.0
#: weight of the whole series' spread in each bin's, in residuals
SPREAD_PRIOR_N = 20
#: fewer polls than this at an interval and nothing is said about it
MIN_POLLS = 12
POLL_MODES = ("mean", "sample")


def delay_text(delay_s: float) -> str:
    """A detection delay in seconds, to the precision a sub-second poller needs."""
    return f"{delay_s:.0f} s" if abs(delay_s) >= 10 else f"{delay_s:.2g} s"


def zone_label(utc_offset_s: float) -> str:
    """``UTC`` or ``UTC+09:00``: the clock the times of day are on."""
    if not utc_offset_s:
        return "UTC"
    m = int(round(abs(utc_offset_s) / 60.0))
    return f"UTC{'+' if utc_offset_s > 0 else '-'}{m // 60:02d}:{m % 60:02d}"


def _hhmm(seconds_of_day: float) -> str:
    m = int(round(seconds_of_day / 60.0)) % 1440
    return f"{m // 60:02d}:{m % 60:02d}"


@dataclass
class PollingView(Result):
    """What a poller every ``interval_s`` would have seen of the series' spikes."""

    kind = "kpi_polling"

    interval_s: float  #: a float: sub-second and 90 s pollers are intervals too
    mode: str  #: "mean" (a counter's rate over the interval) or "sample" (a gauge at the poll)
    polls_n: int
    #: per spike of the review (same order): seconds from its start to the first poll that
    #: covers it and stands out; None = no poll showed it
    delays_s: list[float | None]
    peak_score: float  #: the highest score a poll covering a spike reached (robust σ); nan: none
    false_alarms_n: int  #: polls that stand out but cover no spike
    note: str = ""  #: why nothing is said at this interval ("" when something is)

    @property
    def detected_n(self) -> int:
        return sum(d is not None for d in self.delays_s)

    @property
    def median_delay_s(self) -> float | None:
        d = [x for x in self.delays_s if x is not None]
        return float(np.median(d)) if d else None

    def summary(self) -> str:
        head = f"{interval_label(self.interval_s)} polling"
        if self.note:
            return f"{head}: {self.note}"
        n = len(self.delays_s)
        text = f"{head} ({self.mode}): {self.detected_n} of {n} spikes seen"
        if self.detected_n:
            text += f", median delay {delay_text(self.median_delay_s)}"
        if n and self.detected_n < n and math.isfinite(self.peak_score):
            text += f" (strongest poll over a spike {self.peak_score:.1f} σ)"
        if self.false_alarms_n:
            text += f", {self.false_alarms_n} polls stand out with no spike under them"
        return text


@dataclass
class KpiReview(Result):
    """A KPI series' daily pattern, spikes, daily period and polling views, with its evidence."""

    kind = "kpi_review"

    name: str
    source: str
    points_n: int
    sample_interval_s: float
    start_unix_s: float
    end_unix_s: float
    days_n: int  #: distinct days (on the review's clock) with samples
    coverage: float  #: samples present / samples expected at the sample interval (gaps lower it)
    z_threshold: float
    window_s: float  #: the baseline's smoothing window over the time of day
    pattern_low: float  #: the baseline's lowest value over the day
    pattern_high: float
    pattern_peak_time: str  #: "HH:MM" (on the review's clock) of the baseline's highest value
    spread: float  #: the whole series' robust spread around the baseline
    spikes: list[Spike]
    daily_period: DailyPeriod | None
    polling: list[PollingView]
    notes: list[str] = field(default_factory=list)
    daily_start_time: str = ""  #: "HH:MM" at which the daily period's spikes start
    #: the clock of times of day (pattern, daily period): seconds east of UTC (0 = UTC)
    utc_offset_s: float = 0.0

    @property
    def has_pattern(self) -> bool:
        """Does the daily pattern rise above the noise (its range more than twice the spread)?
        The summary, the table and the JSON all say what this says."""
        return self.pattern_high - self.pattern_low > 2 * self.spread

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["has_pattern"] = self.has_pattern
        for view, d in zip(self.polling, data["polling"]):  # the derived figures, for JSON readers
            d.update(detected_n=view.detected_n, median_delay_s=view.median_delay_s, summary=view.summary())
        return data

    def summary(self) -> str:
        span_d = (self.end_unix_s - self.start_unix_s) / DAY_S
        parts = [f"{self.points_n} points over {span_d:.1f} days every {self.sample_interval_s:g} s "
                 f"({self.coverage:.0%} present)"]
        if self.has_pattern:
            parts.append(f"daily pattern {self.pattern_low:.4g}–{self.pattern_high:.4g}, "
                         f"peak at {self.pattern_peak_time} {zone_label(self.utc_offset_s)}")
        else:
            parts.append(f"no daily pattern beyond the noise ({self.spread:.3g})")
        spikes = f"{len(self.spikes)} spikes"
        if self.daily_period is not None:
            d = self.daily_period
            start = f" (starting {self.daily_start_time})" if self.daily_start_time else ""
            spikes += f", daily at {d.time_of_day} {zone_label(self.utc_offset_s)}{start} on {d.days_n} of {d.days_observed_n} days"
        parts.append(spikes)
        parts += [v.summary() for v in self.polling]
        head = f"{self.name}: " if self.name else ""
        return head + "; ".join(parts)


def _robust_sigma(x: np.ndarray, fallback: bool = True) -> float:
    """1.4826 × MAD. A series that is mostly constant (MAD 0: a drop counter at 0 with the odd
    1) falls back, with ``fallback``, to the spread that puts its 99th percentile at 2.33 σ, as
    for a normal one (so the odd 1 is not a spike), then to the mean absolute deviation (a flat
    line with one excursion: any departure counts)."""
    if not len(x):
        return 0.0
    dev = x - np.median(x)
    s = 1.4826 * float(np.median(np.abs(dev)))
    if s > 0 or not fallback:
        return s
    q = float(np.quantile(dev, 0.99) - np.quantile(dev, 0.01)) / (2 * 2.326)
    return q if q > 0 else 1.2533 * float(np.mean(np.abs(dev)))


def _baseline(t: np.ndarray, v: np.ndarray, slot_s: float, window_s: float) -> tuple[np.ndarray, pd.DataFrame]:
    """Each point's baseline, and the profile by time-of-day slot (typical, baseline)."""
    nslots = max(1, int(math.ceil(DAY_S / slot_s)))
    slot = np.floor((t % DAY_S) / slot_s).astype(int) % nslots
    typical = pd.Series(v).groupby(slot).median().reindex(range(nslots)).to_numpy(dtype=float)
    k = max(3, int(round(window_s / slot_s))) | 1
    k = min(k, nslots if nslots % 2 else nslots - 1)
    pad = k // 2
    # the day is a circle: 23:50 is next to 00:10
    ext = np.concatenate([typical[nslots - pad:], typical, typical[:pad]]) if pad else typical
    smooth = pd.Series(ext).rolling(max(k, 1), center=True, min_periods=1).median().to_numpy()
    base = smooth[pad:pad + nslots]
    profile = pd.DataFrame({"typical": typical, "baseline": base},
                           index=pd.Index(np.arange(nslots) * slot_s, name="seconds_of_day"))
    return base[slot], profile


#: a day needs this many samples for a level of its own (fewer: the pattern's level)
MIN_DAY_POINTS = 10


def _day_levels(t: np.ndarray, v: np.ndarray, base: np.ndarray) -> np.ndarray:
    """The baseline scaled to each day's level: traffic is busier on some days than others
    (weekdays, holidays), and a pattern at the median day's level would call a busy day's
    afternoon a spike and hide a quiet day's spike. Scaled by the median ratio when the baseline
    is positive (traffic scales), shifted by the median difference otherwise (counts near 0)."""
    day = np.floor(t / DAY_S).astype(np.int64)
    ratio = bool(np.all(base > 0))
    rel = v / base if ratio else v - base
    level = pd.Series(rel).groupby(day).agg(["median", "size"])
    neutral = 1.0 if ratio else 0.0
    per_day = level["median"].where(level["size"] >= MIN_DAY_POINTS, neutral)
    f = per_day.reindex(day).to_numpy(dtype=float)
    return base * f if ratio else base + f


def _spread(t: np.ndarray, r: np.ndarray, bin_s: float, use: np.ndarray,
            floor: float = 0.0) -> tuple[np.ndarray, float]:
    """Each point's robust spread (its bin of the day), and the whole series', from the
    residuals ``r[use]``; none below ``floor``."""
    whole = max(_robust_sigma(r[use]), floor)
    if whole <= 0:
        whole = 1.0  # every residual is 0: nothing stands out whatever the unit
    nbins = max(1, int(math.ceil(DAY_S / bin_s)))
    b = np.floor((t % DAY_S) / bin_s).astype(int) % nbins
    per_bin = np.full(nbins, whole)
    for i in range(nbins):
        x = r[use & (b == i)]
        if len(x) >= 5:  # fewer: too few residuals for a spread of their own
            # shrunk toward the whole series' spread as if it were SPREAD_PRIOR_N residuals: a
            # MAD of a dozen hourly polls is too unsteady to judge them by alone
            own = _robust_sigma(x, fallback=False)
            if own <= 0:  # mostly constant here: the whole series' spread, fallbacks and all
                continue
            shrunk = math.sqrt((len(x) * own**2 + SPREAD_PRIOR_N * whole**2) / (len(x) + SPREAD_PRIOR_N))
            per_bin[i] = max(shrunk, SPREAD_FLOOR_FRACTION * whole)
    return per_bin[b], whole


def score_series(t: np.ndarray, v: np.ndarray, *, slot_s: float, window_s: float, z_threshold: float = 6.0,
                 bin_s: float = SPREAD_BIN_S) -> pd.DataFrame:
    """Baseline, spread and score of each point (t unix seconds, v values), with the profile by
    time of day in ``.attrs["profile"]`` and the whole spread in ``.attrs["spread"]``."""
    base, profile = _baseline(t, v, slot_s, window_s)
    base = _day_levels(t, v, base)
    resid = v - base
    bin_s = max(bin_s, slot_s)
    # a count (drops, errors per interval) moves by whole events: one more is not an anomaly
    floor = COUNT_MIN_SPREAD if bool(np.all(v == np.round(v))) else 0.0
    spread, whole = _spread(t, resid, bin_s, np.ones(len(v), dtype=bool), floor)
    # second pass without the points that stood out: a daily 10-minute spike is a sixth of its
    # hour's residuals and would otherwise widen that hour's spread and hide itself
    # (judged against the whole series' spread where a bin's own is wider: a bin a recurring
    # spike fills a quarter of would otherwise hide it from this pass too)
    calm = np.abs(resid) <= z_threshold * np.minimum(spread, whole)
    # (calm residuals that are all 0 leave the first pass: a flat line's one excursion is the
    # only scale it has)
    if calm.sum() >= 5 and max(_robust_sigma(resid[calm]), floor) > 0:
        spread, whole = _spread(t, resid, bin_s, calm, floor)
    df = pd.DataFrame({"value": v, "baseline": base, "spread": spread, "score": resid / spread},
                      index=pd.Index(t, name="ts_unix_s"))
    df.attrs["profile"] = profile
    df.attrs["spread"] = whole
    return df


def _arrays(series: pd.Series) -> tuple[np.ndarray, np.ndarray, float]:
    if not isinstance(series, pd.Series):
        raise ModelError("a KPI review needs a pandas Series indexed by time")
    t, v = to_unix(series)
    keep = np.isfinite(v)
    t, v = t[keep], v[keep]
    if len(v) < 20:
        raise ModelError(f"KPI series {series.name!r} has {len(v)} points; need >= 20 to tell normal from anomalous")
    d = np.diff(t)
    d = d[d > 0]
    if not len(d):
        raise ModelError(f"KPI series {series.name!r} has one timestamp only; cannot find a sample interval")
    return t, v, float(np.median(d))


def _polled(t: np.ndarray, v: np.ndarray, p: float, mode: str) -> pd.DataFrame:
    """One row per poll: ``poll_unix_s`` (when the value is known: the interval's end),
    ``value``, the span of samples it covers, and the interval's start ``bucket_unix_s``."""
    bucket = np.floor(t / p) * p
    g = pd.DataFrame({"t": t, "v": v}).groupby(bucket)
    if mode == "mean":
        vals = g["v"].mean()
        starts = vals.index.to_numpy(dtype=float)
        lo, hi = starts, starts + p
    else:  # the poll at the interval's end reads the latest sample
        last = g.last()
        vals = last["v"]
        lo = hi = last["t"].to_numpy(dtype=float)
        starts = vals.index.to_numpy(dtype=float)
    return pd.DataFrame({"poll_unix_s": starts + p, "value": vals.to_numpy(dtype=float),
                         "covers_from_unix_s": lo, "covers_to_unix_s": hi,
                         "bucket_unix_s": starts})


def polled_view(series: pd.Series, interval_s: float, mode: str = "mean", *, z_threshold: float = 6.0,
                longest_spike_s: float = 2400.0, utc_offset_s: float = 0.0) -> pd.DataFrame:
    """What a poller every ``interval_s`` sees: one row per poll (``poll_unix_s``, the interval's
    end, when the value is known), its ``value``, the samples it covers (``covers_from_unix_s``,
    ``covers_to_unix_s``), its baseline, spread, score and ``stands_out`` (score > z): the
    figure an operator would have had at that interval."""
    if mode not in POLL_MODES:
        raise ModelError(f"polling mode {mode!r} is not one of {', '.join(POLL_MODES)}")
    t, v, _ = _arrays(series)
    polls = _scored_polls(t + utc_offset_s, v, float(interval_s), mode, z_threshold, 3.0 * longest_spike_s)
    for col in ("poll_unix_s", "covers_from_unix_s", "covers_to_unix_s", "bucket_unix_s"):
        polls[col] -= utc_offset_s  # back to unix seconds
    return polls


def _scored_polls(t, v, p, mode, z, window_s) -> pd.DataFrame:
    polls = _polled(t, v, p, mode)
    sc = score_series(polls["bucket_unix_s"].to_numpy(), polls["value"].to_numpy(), slot_s=p,
                      window_s=max(window_s, 3 * p), z_threshold=z, bin_s=max(SPREAD_BIN_S, 4 * p))
    for col in ("baseline", "spread", "score"):
        polls[col] = sc[col].to_numpy()
    polls["stands_out"] = polls["score"] > z
    return polls


def judge_polling(t, v, spikes: list[Spike], p: float, step: float, mode: str, z: float,
                  window_s: float) -> PollingView:
    """What a poller every ``p`` seconds shows of ``spikes`` in the series ``(t, v)`` sampled every
    ``step``: the one judgement of detection delays (``kpi review`` and ``fit anomalies``)."""
    none = [None] * len(spikes)
    if p < step * 0.999:
        return PollingView(float(p), mode, 0, none, math.nan, 0,
                           note=f"finer than the series' {step:g} s samples: cannot say")
    polls = _scored_polls(t, v, p, mode, z, window_s)
    if len(polls) < MIN_POLLS:
        return PollingView(float(p), mode, len(polls), none, math.nan, 0,
                           note=f"only {len(polls)} polls in the series: too few to judge")
    lo = polls["covers_from_unix_s"].to_numpy()
    hi = polls["covers_to_unix_s"].to_numpy()
    at = polls["poll_unix_s"].to_numpy()
    score = polls["score"].to_numpy()
    out = polls["stands_out"].to_numpy()
    covers_any = np.zeros(len(polls), dtype=bool)
    delays: list[float | None] = []
    peak = -math.inf
    for sp in spikes:
        # a mean covers [lo, lo + p); a sample is one instant; the spike's last sample lasts a step
        cov = (lo <= sp.end_unix_s) & ((hi > sp.start_unix_s) if mode == "mean" else (hi >= sp.start_unix_s))
        covers_any |= cov
        if cov.any():
            peak = max(peak, float(score[cov].max()))
        hit = np.flatnonzero(cov & out)
        delays.append(float(at[hit[0]] - sp.start_unix_s) if len(hit) else None)
    return PollingView(float(p), mode, len(polls), delays, peak if math.isfinite(peak) else math.nan,
                       int((out & ~covers_any).sum()))


def daily_pattern(series: pd.Series, *, longest_spike_s: float = 2400.0, utc_offset_s: float = 0.0) -> pd.DataFrame:
    """The series' profile by time of day (index: seconds of the day on UTC + ``utc_offset_s``):
    ``typical`` (median over days of each slot) and ``baseline`` (that profile with spikes up to ``longest_spike_s``
    smoothed away)."""
    t, v, step = _arrays(series)
    return score_series(t + utc_offset_s, v, slot_s=step, window_s=3.0 * longest_spike_s).attrs["profile"]


def review_kpi(series: pd.Series, *, z_threshold: float = 6.0, longest_spike_s: float = 2400.0,
               polling_s: tuple[float, ...] = DEFAULT_POLLING_S, mode: str = "mean",
               day_tolerance_s: float = 600.0, min_days: int = 2, merge_gap_s: float = 300.0,
               utc_offset_s: float = 0.0, name: str = "", source: str = "") -> KpiReview:
    """Daily pattern, spikes, daily period and what each polling interval would have seen.

    ``series`` is indexed by unix seconds or a DatetimeIndex (naive = UTC). ``longest_spike_s`` is
    the longest excursion still called a spike (the baseline window is three times it);
    ``mode`` says what a poll reads (see :data:`POLL_MODES`). Spikes less than ``merge_gap_s``
    (at least 3 samples) apart are one spike: noise dips a long spike below the threshold.
    ``utc_offset_s`` puts days, times of day and poll boundaries on a local clock (seconds east
    of UTC); timestamps in the result stay unix seconds.
    """
    if mode not in POLL_MODES:
        raise ModelError(f"polling mode {mode!r} is not one of {', '.join(POLL_MODES)}")
    if longest_spike_s <= 0 or z_threshold <= 0:
        raise ModelError(f"longest spike {longest_spike_s} s and z {z_threshold} must be > 0")
    t_unix, v, step = _arrays(series)
    t = t_unix + utc_offset_s  # the local clock, for everything that depends on the time of day
    window_s = 3.0 * longest_spike_s
    sc = score_series(t, v, slot_s=step, window_s=window_s, z_threshold=z_threshold)
    spikes = _merge(find_spikes(t, v, sc["score"].to_numpy(), z_threshold), max(3 * step, merge_gap_s))
    daily = daily_period(spikes, t, day_tolerance_s, min_days)
    daily_start = _daily_start(spikes, daily, day_tolerance_s)
    views = [judge_polling(t, v, spikes, float(p), step, mode, z_threshold, window_s) for p in polling_s]
    profile = sc.attrs["profile"]
    prof = profile["baseline"][profile["typical"].notna()]  # only times of day the series has
    days_n = int(len(np.unique(np.floor(t / DAY_S))))
    expected = (t[-1] - t[0]) / step + 1
    notes = _notes(days_n, len(v) / expected, spikes, longest_spike_s, step)
    spikes = [Spike(start_unix_s=s.start_unix_s - utc_offset_s, peak_unix_s=s.peak_unix_s - utc_offset_s,
                    end_unix_s=s.end_unix_s - utc_offset_s, peak_value=s.peak_value, score=s.score) for s in spikes]
    return KpiReview(
        name=name or str(series.name or ""), source=source, points_n=int(len(v)), sample_interval_s=step,
        start_unix_s=float(t_unix[0]), end_unix_s=float(t_unix[-1]), days_n=days_n,
        coverage=float(min(1.0, len(v) / expected)), z_threshold=z_threshold, window_s=window_s,
        pattern_low=float(prof.min()), pattern_high=float(prof.max()),
        pattern_peak_time=_hhmm(float(prof.idxmax())), spread=float(sc.attrs["spread"]),
        spikes=spikes, daily_period=daily, daily_start_time=daily_start, polling=views, notes=notes,
        utc_offset_s=float(utc_offset_s))


def _merge(spikes: list[Spike], gap_s: float) -> list[Spike]:
    out: list[Spike] = []
    for sp in spikes:
        if out and sp.start_unix_s - out[-1].end_unix_s <= gap_s:
            a = out[-1]
            top = a if a.score >= sp.score else sp
            out[-1] = Spike(start_unix_s=a.start_unix_s, peak_unix_s=top.peak_unix_s, end_unix_s=sp.end_unix_s,
                            peak_value=top.peak_value, score=top.score)
        else:
            out.append(sp)
    return out


def _daily_start(spikes: list[Spike], daily: DailyPeriod | None, tol_s: float) -> str:
    """The median time of day (``HH:MM``) at which the daily period's spikes start; "" without
    a period. The period itself is placed by the peaks; an operator asks when it begins."""
    if daily is None:
        return ""
    c = daily.seconds_of_day
    offs = [((s.start_unix_s % DAY_S) - c + DAY_S / 2) % DAY_S - DAY_S / 2 for s in spikes]
    near = [o for s, o in zip(spikes, offs)
            if abs(((s.peak_unix_s % DAY_S) - c + DAY_S / 2) % DAY_S - DAY_S / 2) <= tol_s]
    return _hhmm((c + float(np.median(near))) % DAY_S) if near else ""


def _notes(days_n: int, coverage: float, spikes: list[Spike], longest_spike_s: float, step: float) -> list[str]:
    """What the data cannot support, said in words next to the figures."""
    notes = []
    if days_n < 2:
        notes.append("one day of data: the baseline is that day's own smoothed curve, so a spike "
                     "that recurs daily cannot be told from a daily habit of the traffic")
    elif days_n < 5:
        notes.append(f"only {days_n} days: the baseline and the spreads rest on few days, so a slow "
                     "drift of one day can make coarse polls stand out with no spike under them")
    if coverage < 0.9:
        notes.append(f"only {coverage:.0%} of the expected samples are present: gaps leave polls "
                     "with fewer samples, and spikes inside gaps are not seen")
    if spikes and max(s.end_unix_s - s.start_unix_s + step for s in spikes) > longest_spike_s:
        notes.append(f"a spike lasts longer than the longest spike looked for ({longest_spike_s:g} s): "
                     "longer excursions join the baseline; raise longest_spike_s to see them whole")
    return notes
