"""Retry amplification and metastability after a trigger.

Clients that retry a dropped query offer more than the original demand: amplification is
``offered / original = (original + retries) / original``. A metastable failure is one where the
retries alone keep the server overloaded after the trigger (a burst, a slow period) is gone: the
demand is back to normal but goodput is not. A system that recovers drains the retries within a
few timeouts.

Inputs are the generator counters ``dns.original_sent``, ``dns.retry_sent`` and ``dns.answered``
(cumulative, summed over workers; see :mod:`loadkit.generate.metrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from loadkit.errors import ModelError
from loadkit.model._result import Result
from loadkit.record.reader import RunData

VERDICTS = ("stable", "recovers", "metastable")

ORIGINAL = "dns.original_sent"
RETRY = "dns.retry_sent"
ANSWERED = "dns.answered"


def retry_amplification(run: RunData, *, prefix: str = "dns") -> pd.DataFrame:
    """Per interval: ``original_qps``, ``retry_qps``, ``offered_qps``, ``answered_qps``,
    ``amplification`` (offered / original) and ``goodput_ratio`` (answered / offered).

    Indexed by ``ts_unix_s`` (end of the interval).
    """
    g = run.generator
    names = {f"{prefix}.original_sent": "original", f"{prefix}.retry_sent": "retry",
             f"{prefix}.answered": "answered"}
    g = g[g["metric"].isin(list(names)) & (g["kind"] == "counter")]
    if not len(g) or f"{prefix}.original_sent" not in set(g["metric"]):
        raise ModelError(f"run {run.run_id} has no '{prefix}.original_sent' counter in generator/: "
                         "record a run with the DNS generator's counters")
    wide = (g.pivot_table(index="ts_unix_s", columns="metric", values="value", aggfunc="sum")
            .sort_index().rename(columns=names))
    for col in ("original", "retry", "answered"):
        if col not in wide:
            wide[col] = 0.0
    wide = wide.ffill().fillna(0.0)
    if len(wide) < 2:
        raise ModelError(f"run {run.run_id} has {len(wide)} counter samples; need >= 2")
    dt = np.diff(wide.index.to_numpy(dtype=float))
    d = wide[["original", "retry", "answered"]].diff().iloc[1:].clip(lower=0)
    out = pd.DataFrame(index=wide.index[1:])
    out.index.name = "ts_unix_s"
    out["interval_s"] = dt
    out["original_qps"] = d["original"].to_numpy() / dt
    out["retry_qps"] = d["retry"].to_numpy() / dt
    out["offered_qps"] = out["original_qps"] + out["retry_qps"]
    out["answered_qps"] = d["answered"].to_numpy() / dt
    out["amplification"] = out["offered_qps"] / out["original_qps"].where(out["original_qps"] > 0)
    out["goodput_ratio"] = out["answered_qps"] / out["offered_qps"].where(out["offered_qps"] > 0)
    return out


@dataclass
class MetastabilityResult(Result):
    """What happened after the trigger ended: nothing to recover from, recovery, or a stuck state."""

    kind = "metastability"

    verdict: str  #: "stable", "recovers" or "metastable"
    trigger_start_unix_s: float
    trigger_end_unix_s: float
    recovery_s: float | None  #: trigger end -> first interval of lasting health; None unless "recovers"
    baseline_goodput_ratio: float
    trigger_goodput_ratio: float
    trigger_amplification: float
    post_goodput_ratio: float  #: over the last part of the run after the trigger
    post_amplification: float
    post_window_s: float

    def summary(self) -> str:
        if self.verdict == "stable":
            return (f"stable: the trigger did not degrade goodput (answered/offered "
                    f"{self.trigger_goodput_ratio:.2f}, amplification {self.trigger_amplification:.2f}×)")
        if self.verdict == "recovers":
            return (f"recovers {self.recovery_s:.1f} s after the trigger ended (during it: answered/offered "
                    f"{self.trigger_goodput_ratio:.2f}, amplification {self.trigger_amplification:.2f}×)")
        return (f"metastable: {self.post_window_s:.0f} s after the trigger ended, retries still hold it "
                f"down (amplification {self.post_amplification:.2f}×, answered/offered "
                f"{self.post_goodput_ratio:.2f} vs {self.baseline_goodput_ratio:.2f} before)")


def _trigger_window(amp: pd.DataFrame, run: RunData) -> tuple[float, float]:
    """Trigger start/end from events (kind ``phase`` with ``detail.phase`` "trigger_start" /
    "trigger_end"), else from the original (not retried) rate: the span where it is above the
    midpoint of its range."""
    start = end = None
    for ev in run.events:
        phase = (ev.get("detail") or {}).get("phase") or ev.get("kind")
        if phase == "trigger_start":
            start = float(ev["ts_unix_s"])
        elif phase == "trigger_end":
            end = float(ev["ts_unix_s"])
    if start is not None and end is not None:
        return start, end
    orig = amp["original_qps"]
    lo, hi = float(orig.quantile(0.1)), float(orig.max())
    if hi <= lo * 1.2:
        raise ModelError(f"run {run.run_id}: no trigger found (original rate never rises 20 % above its "
                         "base); pass the trigger end time (--trigger-end)")
    above = orig > 0.5 * (lo + hi)
    ts = orig.index.to_numpy(dtype=float)
    dts = amp["interval_s"].to_numpy()
    idx = np.flatnonzero(above.to_numpy())
    return float(ts[idx[0]] - dts[idx[0]]), float(ts[idx[-1]])


def metastability(run: RunData, trigger_end_unix_s: float | None = None, *,
                  trigger_start_unix_s: float | None = None, goodput_tolerance: float = 0.1,
                  amplification_tolerance: float = 0.2, hold_s: float | None = None,
                  min_post_s: float = 5.0, prefix: str = "dns") -> MetastabilityResult:
    """Verdict on a trigger-then-remove run.

    An interval is healthy when answered/offered is within ``goodput_tolerance`` of the baseline
    before the trigger and amplification is below ``1 + amplification_tolerance``. "stable": the
    trigger itself was healthy; "recovers": after the trigger ended, health returns and lasts to
    the end of the run (``recovery_s`` is when it returned); "metastable": the end of the run is
    still unhealthy with the original demand back to normal. The run must go on for at least
    ``min_post_s`` after the trigger (longer than the clients' retry horizon), else retries still
    in flight would pass for a stuck state and :class:`ModelError` is raised.
    """
    amp = retry_amplification(run, prefix=prefix)
    if trigger_end_unix_s is None:
        start, end = _trigger_window(amp, run)
    else:
        end = float(trigger_end_unix_s)
        marked = [float(ev["ts_unix_s"]) for ev in run.events
                  if (ev.get("detail") or {}).get("phase") == "trigger_start"]
        start = max((t for t in marked if t <= end), default=None)
    if trigger_start_unix_s is not None:
        start = trigger_start_unix_s
    ts = amp.index.to_numpy(dtype=float)
    if start is None:
        start = float(ts[0] - amp["interval_s"].iloc[0])
    before = amp[ts <= start]
    in_trigger = (ts > start) & (ts <= end)
    if not in_trigger.any() and (ts > start).any():
        # an instant trigger (one burst): judge it on the interval that holds it
        in_trigger = ts == ts[ts > start][0]
    during = amp[in_trigger]
    after = amp[ts > end]
    post_s = float(ts[-1] - end)
    if len(after) < 3 or post_s < min_post_s:
        raise ModelError(f"run {run.run_id}: {post_s:.1f} s ({len(after)} intervals) after the trigger "
                         f"ended; need >= {min_post_s:g} s and 3 intervals to judge recovery (run "
                         "longer after the trigger, or lower --min-post)")

    def ratio(frame: pd.DataFrame, num: str, den: str) -> float:
        n, d = float(frame[num].mul(frame["interval_s"]).sum()), float(frame[den].mul(frame["interval_s"]).sum())
        return n / d if d > 0 else math.nan

    base_good = ratio(before, "answered_qps", "offered_qps") if len(before) else 1.0
    if not math.isfinite(base_good):
        base_good = 1.0
    good_floor = base_good * (1.0 - goodput_tolerance)
    amp_ceiling = 1.0 + amplification_tolerance
    healthy = ((amp["goodput_ratio"].fillna(0.0) >= good_floor)
               & (amp["amplification"].fillna(np.inf) <= amp_ceiling)).to_numpy()
    trig_good = ratio(during, "answered_qps", "offered_qps") if len(during) else math.nan
    trig_amp = ratio(during, "offered_qps", "original_qps") if len(during) else math.nan
    # judge the end of the run on its last third (at least 3 intervals), unless told how long
    after_ts = ts[ts > end]
    if hold_s is None:
        tail_n = max(3, len(after_ts) // 3)
        tail = after.iloc[-tail_n:]
    else:
        tail = after[after.index.to_numpy(dtype=float) >= after_ts[-1] - hold_s]
    post_good = ratio(tail, "answered_qps", "offered_qps")
    post_amp = ratio(tail, "offered_qps", "original_qps")
    window = float(after_ts[-1] - end)
    common = dict(trigger_start_unix_s=float(start), trigger_end_unix_s=float(end),
                  baseline_goodput_ratio=base_good, trigger_goodput_ratio=trig_good,
                  trigger_amplification=trig_amp, post_goodput_ratio=post_good,
                  post_amplification=post_amp, post_window_s=window)
    during_healthy = healthy[in_trigger]
    if len(during_healthy) and during_healthy.all():
        return MetastabilityResult(verdict="stable", recovery_s=None, **common)
    after_healthy = healthy[ts > end]
    tail_healthy = post_good >= good_floor and post_amp <= amp_ceiling
    if not tail_healthy:
        return MetastabilityResult(verdict="metastable", recovery_s=None, **common)
    # first interval after which every interval to the end is healthy
    bad = np.flatnonzero(~after_healthy)
    first_ok = 0 if not len(bad) else bad[-1] + 1
    if first_ok >= len(after_healthy):
        return MetastabilityResult(verdict="metastable", recovery_s=None, **common)
    rec_end = after_ts[first_ok] - amp["interval_s"].to_numpy()[ts > end][first_ok]
    return MetastabilityResult(verdict="recovers", recovery_s=max(0.0, float(rec_end - end)), **common)
