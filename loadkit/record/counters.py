"""The one reader of generator counters and gauges in a recorded run.

A run's ``generator`` table holds :class:`~loadkit.schema.GeneratorMetric` rows: at the end of
each interval, every counter's cumulative value (since the generator started) and every gauge's
current value, already summed over Locust workers by the master. Every model and the report read
them through this module, so they agree on three rules:

- **cumulative**: a counter's increment over an interval is the difference of two samples; the
  first sample's value counts from the start of the run (counters start at zero).
- **resets clipped**: a counter that went down was restarted (a worker rejoined, a process was
  restarted), so its increment is its new value, never negative (Prometheus' ``increase()`` rule).
- **summed**: several rows of one metric at one timestamp (several sources) are added.

Gauges are not differenced: a gauge series is its sampled values.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

COUNTER, GAUGE = "counter", "gauge"


def offered_parts(prefix: str = "dns") -> tuple[str, str]:
    """The counters whose sum is the load offered to a target: its original sends and its
    retries (``dns.original_sent`` + ``dns.retry_sent``). The retry models and the load side's
    ``/metrics`` both count offered load this way."""
    return f"{prefix}.original_sent", f"{prefix}.retry_sent"


def _rows(run, metric: str, kind: str) -> pd.Series:
    """``ts_unix_s`` -> value of one metric and kind, summed per timestamp, sorted by time."""
    g = run.generator
    if not len(g):
        return pd.Series(dtype="float64", name=metric)
    g = g[(g["metric"] == metric) & (g["kind"] == kind)]
    s = g.groupby("ts_unix_s")["value"].sum().sort_index().astype("float64")
    s.index = s.index.astype("float64")
    s.index.name = "ts_unix_s"
    s.name = metric
    return s


def metric_names(run, kind: str | None = None) -> list[str]:
    """The metrics a run recorded (optionally only counters or only gauges), sorted."""
    g = run.generator
    if not len(g):
        return []
    if kind is not None:
        g = g[g["kind"] == kind]
    return sorted(set(g["metric"]))


def has_metric(run, metric: str, kind: str = COUNTER) -> bool:
    return bool(len(_rows(run, metric, kind)))


def cumulative(run, metric: str) -> pd.Series:
    """A counter as recorded: its cumulative value at each sample (summed over sources)."""
    return _rows(run, metric, COUNTER)


def increments(run, metric: str) -> pd.Series:
    """A counter's increase during each interval, indexed by the interval's end (``ts_unix_s``).

    The first sample's increase is its value (the counter started at zero with the run); a drop
    is a reset, and the increase is then the new value. Empty when the run lacks the counter.
    """
    return increments_of(cumulative(run, metric))


def increments_of(values: pd.Series) -> pd.Series:
    """:func:`increments` for a cumulative series already in hand."""
    if not len(values):
        return values.astype("float64")
    v = values.to_numpy(dtype="float64")
    d = np.empty_like(v)
    d[0] = v[0]
    d[1:] = np.diff(v)
    reset = d < 0
    d[reset] = v[reset]
    return pd.Series(d, index=values.index, name=values.name)


def total(run, metric: str) -> float:
    """A counter's total increase over the run (0.0 when it was never recorded)."""
    return float(increments(run, metric).sum())


def rates(run, metric: str) -> pd.Series:
    """A counter's per-second rate over each interval, from the second sample on (the first has
    no interval length); indexed by the interval's end."""
    inc = increments(run, metric)
    if len(inc) < 2:
        return pd.Series(dtype="float64", name=metric)
    dt = np.diff(inc.index.to_numpy(dtype="float64"))
    out = inc.iloc[1:] / np.where(dt > 0, dt, np.nan)
    out.name = metric
    return out


def counter_frame(run, metrics: Iterable[str]) -> pd.DataFrame:
    """Several counters side by side on the union of their timestamps: per interval, each metric's
    increase (0 where it had no sample) plus ``interval_s``; the first timestamp is dropped
    because it has no interval length. Columns are the metric names."""
    metrics = list(metrics)
    wide = pd.concat({m: cumulative(run, m) for m in metrics}, axis=1).sort_index()
    if not len(wide):
        return pd.DataFrame(columns=[*metrics, "interval_s"], dtype="float64")
    # a counter missing at a timestamp had not moved since its previous sample
    wide = wide.ffill().fillna(0.0)
    out = pd.DataFrame({m: increments_of(wide[m]) for m in metrics}, index=wide.index)
    out["interval_s"] = np.concatenate([[np.nan], np.diff(wide.index.to_numpy(dtype="float64"))])
    out.index.name = "ts_unix_s"
    return out.iloc[1:]


def gauge(run, metric: str) -> pd.Series:
    """A gauge's sampled values (summed over sources per timestamp); empty when not recorded."""
    return _rows(run, metric, GAUGE)
