"""Retry amplification, the retry loop's stable states, and the metastability verdict.

Clients that retry a lost query offer more than the original demand: amplification is
``offered / original``. The loop is kept per query, as a stub resolver behaves: a query sends
at most ``1 + retries`` attempts and stops at its first timely answer, so with a share ``p`` of
attempts lost (or answered too late) a query costs ``1 + p + … + p^retries`` attempts and

    offered = original × (1 + loss(offered) + … + loss(offered)^retries)

with ``loss(x)`` the share of an offered rate ``x`` that gets no timely answer (measured in the
run, or ``1 - capacity / x`` for a server, a rate limit or a firewall table that admits at most
``capacity``). A *metastable* failure is a second stable state of that loop at the original
demand: the trigger (a burst, a slow period) pushed offered load up, and once it is gone the
retries alone hold it there (Bronson et al., "Metastable Failures in Distributed Systems", HotOS
2021). :func:`retry_loop_states` finds the loop's stable states by iterating it from the low and
the high side (a cobweb); the firewall model (:mod:`loadkit.model.firewall`) uses the same code.

Kept per query, the loop has a consequence a per-drop count hides: in a steady state every
timely answer ends a distinct query, so what is answered in time is at most the original
demand. Anything that still answers ``capacity`` queries in time once overloaded (a rate limit,
a firewall table, a server whose queue stays short) therefore has no second state while the
original demand is below that capacity: its backlog drains, slowly if the margin is thin. A
second state needs *waste* that grows with load: work spent on attempts whose answer comes too
late or never (a queue longer than the clients' timeout, a goodput collapse under overload).

The verdict after a trigger is judged against the run's own pre-trigger baseline (goodput and
amplification; a path that always loses 20 % and retries it is healthy at 1.25×), only on
intervals that carried traffic and only once original demand is back to that baseline:

- ``stable``: the trigger did not degrade goodput or amplification;
- ``recovers``: every interval from some point after the trigger is healthy again;
- ``not_recovered``: not healthy by the end of the window, but the retries are still falling
  (the trend says how fast), or the fitted loop has no second state;
- ``metastable``: not healthy, not falling, and the loop has a second stable state;
- ``demand_not_back``: original demand never returned to baseline, so nothing can be judged.

Inputs are the generator counters ``dns.original_sent``, ``dns.retry_sent`` and ``dns.answered``,
read through :mod:`loadkit.record.counters`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from loadkit.errors import ModelError
from loadkit.model._result import Result
from loadkit.record import counters
from loadkit.record.reader import RunData

VERDICTS = ("stable", "recovers", "not_recovered", "metastable", "demand_not_back")
#: a drain that would take more than this many times the judged window to get back to the
#: baseline is taken as flat (a plateau, not a slow recovery)
DRAIN_HORIZON = 10
#: how far below a measured state's offered rate the loop still counts as reaching it
STATE_TOLERANCE = 0.05

ORIGINAL, RETRY = counters.offered_parts("dns")  # the DNS generator's counter names
ANSWERED = "dns.answered"


def retry_amplification(run: RunData, *, prefix: str = "dns") -> pd.DataFrame:
    """Per interval: ``original_qps``, ``retry_qps``, ``offered_qps``, ``answered_qps``,
    ``amplification`` (offered / original) and ``goodput_ratio`` (answered / offered).

    Indexed by ``ts_unix_s`` (end of the interval).
    """
    original, retry = counters.offered_parts(prefix)  # offered = originals + retries
    names = {original: "original", retry: "retry", f"{prefix}.answered": "answered"}
    if not counters.has_metric(run, original):
        raise ModelError(f"run {run.run_id} has no '{prefix}.original_sent' counter in generator/: "
                         "record a run with the DNS generator's counters")
    d = counters.counter_frame(run, [m for m in names if counters.has_metric(run, m)]).rename(columns=names)
    if len(d) < 1:
        raise ModelError(f"run {run.run_id} has {len(d) + 1} counter samples; need >= 2")
    for col in ("original", "retry", "answered"):
        if col not in d:
            d[col] = 0.0
    dt = d["interval_s"].to_numpy(dtype=float)
    out = pd.DataFrame(index=d.index)
    out.index.name = "ts_unix_s"
    out["interval_s"] = dt
    out["original_qps"] = d["original"].to_numpy() / dt
    out["retry_qps"] = d["retry"].to_numpy() / dt
    out["offered_qps"] = out["original_qps"] + out["retry_qps"]
    out["answered_qps"] = d["answered"].to_numpy() / dt
    out["amplification"] = out["offered_qps"] / out["original_qps"].where(out["original_qps"] > 0)
    out["goodput_ratio"] = out["answered_qps"] / out["offered_qps"].where(out["offered_qps"] > 0)
    return out


# --------------------------------------------------------------------------------------------
# the retry loop, kept per query: offered = original × (1 + loss + … + loss^retries)
# --------------------------------------------------------------------------------------------


def attempts_per_query(p: float, retries_n: int) -> float:
    """Attempts a query costs when each is lost with probability ``p``: ``1 + p + … + p^retries``."""
    return float(sum(p ** k for k in range(int(retries_n) + 1)))


def offered_cap_qps(original_qps: float, retries_n: int, retry_budget: float | None = None) -> float:
    """The most the clients can offer at ``original_qps``: every query at its last attempt,
    ``original × (1 + retries_n)``, and under a retry budget ``F`` at most ``original × (1 + F)``
    (None or 0: no budget, as for the generator). Never below the original demand."""
    cap = float(original_qps) * (1 + int(retries_n))
    if retry_budget and math.isfinite(retry_budget):
        cap = min(cap, float(original_qps) * (1.0 + float(retry_budget)))
    return max(cap, float(original_qps))


def capacity_loss(capacity_qps: float) -> Callable[[float], float]:
    """``loss(x)`` of anything that admits at most ``capacity_qps``: ``max(0, 1 - capacity / x)``."""
    return lambda x: max(0.0, 1.0 - capacity_qps / x) if x > 0 else 0.0


def measured_loss(offered_qps: np.ndarray, answered_qps: np.ndarray, bins: int = 12) -> Callable[[float], float]:
    """``loss(x)`` from a run's intervals: the lost share per band of offered rate, made
    non-decreasing in ``x`` (more load never loses less in this model), interpolated inside the
    measured range and extended beyond it as a capacity equal to the highest rate answered."""
    x = np.asarray(offered_qps, dtype=float)
    a = np.asarray(answered_qps, dtype=float)
    ok = np.isfinite(x) & np.isfinite(a) & (x > 0)
    x, a = x[ok], np.minimum(a[ok], x[ok])
    if not len(x):
        raise ModelError("no interval with traffic to measure loss against offered rate")
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)))
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, max(len(edges) - 2, 0))
    xs = np.array([x[idx == b].mean() for b in np.unique(idx)])
    ls = np.array([1.0 - a[idx == b].sum() / x[idx == b].sum() for b in np.unique(idx)])
    order = np.argsort(xs)
    xs, ls = xs[order], np.maximum.accumulate(np.clip(ls[order], 0.0, 1.0))
    top = float(xs[-1] * (1.0 - ls[-1]))

    def loss(v: float) -> float:
        if v > xs[-1]:
            return max(float(ls[-1]), 1.0 - top / v)
        return float(np.interp(v, xs, ls))

    return loss


@dataclass
class LoopStates(Result):
    """The retry loop's stable states at one original demand (:func:`retry_loop_states`)."""

    kind = "retry_loop"

    original_qps: float
    retries_n: int  #: the clients' retry limit: a query sends at most 1 + retries_n attempts
    low_offered_qps: float  #: where the loop settles from the original demand alone
    high_offered_qps: float  #: where it settles from the trigger's peak
    cap_qps: float  #: the most the clients can offer (every query at its last attempt, or a retry budget)
    second_stable_state: bool  #: the high state is a different one: the loop sustains itself

    @property
    def low_amplification(self) -> float:
        return self.low_offered_qps / self.original_qps

    @property
    def high_amplification(self) -> float:
        return self.high_offered_qps / self.original_qps

    def summary(self) -> str:
        if self.second_stable_state:
            return (f"two stable states at {self.original_qps:,.0f}/s of original demand: "
                    f"{self.low_amplification:.2f}× and {self.high_amplification:.2f}× (with up to {self.retries_n} "
                    "retries a query, the loss at the high one holds it once a trigger reaches it)")
        return (f"one stable state at {self.original_qps:,.0f}/s of original demand "
                f"({self.low_amplification:.2f}×): the retries drain once the trigger is gone")


def retry_loop_states(original_qps: float, retries_n: int, loss: Callable[[float], float], *,
                      peak_offered_qps: float, cap_qps: float | None = None, max_iter: int = 4000,
                      rel_tol: float = 1e-9, separation: float = 0.1) -> LoopStates:
    """Stable states of ``x = original × attempts_per_query(loss(x), retries_n)``: iterate the
    loop from the original demand and from ``peak_offered_qps`` (the trigger's); each run of the
    map settles on the nearest stable state on its side. Two different end points (more than
    ``separation`` apart, relative) are two stable states: the loop can hold the high one without
    the trigger. Offered load is at most :func:`offered_cap_qps` (every query at its last
    attempt) and at most ``cap_qps`` (a retry budget's cap, or what the clients were seen to reach).
    Damped iteration (half a step): the plain map can oscillate around a steep loss curve."""
    if original_qps <= 0:
        raise ModelError(f"original demand {original_qps} must be > 0 queries/s")
    if retries_n < 0:
        raise ModelError(f"retries {retries_n} must be >= 0")
    cap = offered_cap_qps(original_qps, retries_n)
    if cap_qps is not None and math.isfinite(cap_qps):
        cap = max(min(cap, float(cap_qps)), float(original_qps))

    def step(x: float) -> float:
        p = min(1.0, max(0.0, loss(x))) if x > 0 else 0.0
        return min(cap, original_qps * attempts_per_query(p, retries_n))

    def settle(x: float) -> float:
        for _ in range(max_iter):
            nxt = 0.5 * x + 0.5 * step(x)
            if abs(nxt - x) <= rel_tol * max(x, 1.0):
                return nxt
            x = nxt
        return x

    low = settle(float(original_qps))
    high = settle(min(cap, max(float(peak_offered_qps), original_qps)))
    second = high > low * (1.0 + separation)
    return LoopStates(float(original_qps), int(retries_n), low, high, cap, bool(second))


# --------------------------------------------------------------------------------------------
# the verdict on a recorded run
# --------------------------------------------------------------------------------------------


@dataclass
class MetastabilityResult(Result):
    """What happened after the trigger ended, judged against the run's pre-trigger baseline."""

    kind = "metastability"

    verdict: str  #: one of :data:`VERDICTS`
    trigger_start_unix_s: float
    trigger_end_unix_s: float
    trigger_source: str  #: "given", "phase events", "burst events", "original rate"
    recovery_s: float | None  #: trigger end -> first interval of lasting health; None unless "recovers"
    baseline_original_qps: float
    baseline_goodput_ratio: float
    baseline_amplification: float
    trigger_goodput_ratio: float
    trigger_amplification: float
    post_goodput_ratio: float  #: over the last part of the run after the trigger
    post_amplification: float
    post_window_s: float  #: from the trigger's end to the last interval with traffic
    demand_back_s: float | None  #: trigger end -> original demand back to baseline
    trend: str | None  #: retries after the trigger: "falling", "flat", "rising"
    trend_amplification_per_s: float  #: slope of amplification over the judged intervals
    loop: LoopStates | None  #: the fitted retry loop at the baseline demand
    caveats: list[str] = field(default_factory=list)
    #: "after the trigger", or "between bursts" for a burst train with too little run after it
    judged_on: str = "after the trigger"

    def summary(self) -> str:
        base = (f"baseline goodput {self.baseline_goodput_ratio:.2f}, amplification "
                f"{self.baseline_amplification:.2f}×")
        loop = f"; loop: {self.loop.summary()}" if self.loop is not None else ""
        if self.verdict == "stable":
            text = (f"stable: the trigger did not degrade goodput (answered/offered {self.trigger_goodput_ratio:.2f}, "
                    f"amplification {self.trigger_amplification:.2f}×; {base})")
        elif self.verdict == "recovers":
            after = "each burst" if self.judged_on == "between bursts" else "the trigger ended"
            text = (f"recovers {self.recovery_s:.1f} s after {after} (during it: answered/offered "
                    f"{self.trigger_goodput_ratio:.2f}, amplification {self.trigger_amplification:.2f}×; {base})")
        elif self.verdict == "demand_not_back":
            text = (f"not judged: original demand never returned to its baseline "
                    f"{self.baseline_original_qps:,.0f}/s in the {self.post_window_s:.0f} s after the trigger")
        elif self.verdict == "not_recovered":
            eta = ""
            if self.trend == "falling" and self.trend_amplification_per_s < 0:
                eta = (f", at this rate back in about "
                       f"{(self.post_amplification - self.baseline_amplification) / -self.trend_amplification_per_s:.0f} s")
            window = (f"between bursts ({self.post_window_s:.0f} s apart; at the gaps' ends)"
                      if self.judged_on == "between bursts" else
                      f"within the window ({self.post_window_s:.0f} s after the trigger)")
            text = (f"not recovered {window}: amplification "
                    f"{self.post_amplification:.2f}×, answered/offered {self.post_goodput_ratio:.2f} ({base}); retries "
                    f"{self.trend} ({self.trend_amplification_per_s:+.4f}×/s){eta}")
        else:
            when = (f"at the end of every gap between bursts ({self.post_window_s:.0f} s apart)"
                    if self.judged_on == "between bursts" else f"{self.post_window_s:.0f} s after the trigger ended")
            text = (f"metastable: {when}, with demand back at baseline, "
                    f"retries still hold it down (amplification {self.post_amplification:.2f}×, answered/offered "
                    f"{self.post_goodput_ratio:.2f}; {base}); retries {self.trend}")
        text += loop
        if self.caveats:
            text += " [" + "; ".join(self.caveats) + "]"
        return text


def burst_spans(run: RunData) -> list[tuple[float, float]]:
    """(first query, last query) of each ``burst`` event, in time order (workers' shares merged)."""
    spans: dict[int, list[float]] = {}
    for ev in run.events:
        if ev.get("kind") == "burst":
            d = ev.get("detail") or {}
            first = float(d.get("first_sent_unix_s", ev["ts_unix_s"]))
            last = float(d.get("last_sent_unix_s", first + float(d.get("window_s") or 0.0)))
            span = spans.setdefault(int(d.get("burst_index", len(spans))), [first, last])
            span[0], span[1] = min(span[0], first), max(span[1], last)
    return sorted((a, b) for a, b in spans.values())


def trigger_window(run: RunData, amp: pd.DataFrame | None = None) -> tuple[float | None, float, str]:
    """(start, end, source) of the trigger: ``phase`` events ``trigger_start``/``trigger_end``;
    else the run's ``burst`` events (the first burst's first query to the last burst's last);
    else the span where the original rate is above the midpoint of its range."""
    start = end = None
    for ev in run.events:
        phase = (ev.get("detail") or {}).get("phase") or ev.get("kind")
        if phase == "trigger_start":
            start = float(ev["ts_unix_s"])
        elif phase == "trigger_end":
            end = float(ev["ts_unix_s"])
    if end is not None:
        return start, end, "phase events"
    spans = burst_spans(run)
    if spans:
        return spans[0][0], max(last for _, last in spans), "burst events"
    amp = retry_amplification(run) if amp is None else amp
    orig = amp["original_qps"]
    lo, hi = float(orig.quantile(0.1)), float(orig.max())
    if hi <= lo * 1.2:
        raise ModelError(f"run {run.run_id}: no trigger found (no phase or burst events, and the original rate "
                         "never rises 20 % above its base); pass the trigger end time (--trigger-end)")
    above = orig > 0.5 * (lo + hi)
    ts = orig.index.to_numpy(dtype=float)
    idx = np.flatnonzero(above.to_numpy())
    return float(ts[idx[0]] - amp["interval_s"].to_numpy()[idx[0]]), float(ts[idx[-1]]), "original rate"


def load_options(run: RunData) -> dict:
    """The load options the run's profile recorded (``[load] options``: the generator's flags;
    the recorder writes a plain ``locust -f`` run's from its command line)."""
    return ((run.manifest.get("profile") or {}).get("load") or {}).get("options") or {}


#: The DNS generator's defaults (``DnsSettings`` in ``loadkit.generate.dns.users``) for the
#: options the retry models read, for a run whose record lacks them (made before the recorder
#: wrote them, or by hand); a test checks they are the generator's.
DNS_OPTION_DEFAULTS: dict[str, Any] = {"dns-retries": 2, "dns-timeout": 1.0, "dns-backoff": 2.0,
                                       "dns-port-policy": "fixed", "dns-retry-budget": 0.0}


@dataclass(frozen=True)
class DnsOptions:
    """The DNS clients' retry behaviour in a run (:func:`dns_options`)."""

    retries_n: int  #: retries after the first attempt
    timeout_s: float  #: the first attempt's timeout
    backoff: float  #: each retry's timeout is the previous one's × this
    port_policy: str  #: "fixed", "per-query" or "per-attempt" source ports
    retry_budget: float | None  #: retries at most this share of the originals; None: no budget
    defaulted: tuple[str, ...] = ()  #: options the run did not record: the generator's defaults taken

    @property
    def horizon_s(self) -> float:
        """How long after its first send a query may still be retried."""
        return self.timeout_s * sum(self.backoff ** k for k in range(self.retries_n + 1))

    def caveat(self) -> str | None:
        if not self.defaulted:
            return None
        taken = ", ".join(f"{k} = {DNS_OPTION_DEFAULTS[k]}" for k in self.defaulted)
        return f"the run's profile does not record {', '.join(self.defaulted)}: the DNS generator's defaults taken ({taken})"


def dns_options(run: RunData) -> DnsOptions:
    """The run's DNS retry options, the generator's defaults for those it did not record. A retry
    budget of 0 is no budget, as for the generator."""
    recorded = load_options(run)
    values: dict[str, Any] = {}
    defaulted = []
    for key, default in DNS_OPTION_DEFAULTS.items():
        try:
            values[key] = type(default)(recorded[key])
        except (KeyError, TypeError, ValueError):
            values[key] = default
            defaulted.append(key)
    budget = values["dns-retry-budget"]
    return DnsOptions(retries_n=max(0, values["dns-retries"]), timeout_s=values["dns-timeout"],
                      backoff=values["dns-backoff"], port_policy=values["dns-port-policy"],
                      retry_budget=budget if budget > 0 else None, defaulted=tuple(defaulted))


def _ratio(frame: pd.DataFrame, num: str, den: str) -> float:
    n = float(frame[num].mul(frame["interval_s"]).sum())
    d = float(frame[den].mul(frame["interval_s"]).sum())
    return n / d if d > 0 else math.nan


def _trend(frame: pd.DataFrame) -> tuple[str, float]:
    """Slope of amplification over time (per second) and whether it is significantly falling."""
    if len(frame) < 3:
        return "unknown", 0.0
    t = frame.index.to_numpy(dtype=float)
    y = frame["amplification"].to_numpy(dtype=float)
    t = t - t.mean()
    slope = float((t * (y - y.mean())).sum() / (t * t).sum())
    resid = y - y.mean() - slope * t
    se = math.sqrt(float((resid ** 2).sum()) / max(len(y) - 2, 1) / float((t * t).sum()))
    if slope < 0 and (se == 0 or slope / se < -2.0):
        return "falling", slope
    if slope > 0 and (se == 0 or slope / se > 2.0):
        return "rising", slope
    return "flat", slope


def retries_per_loss(amp: pd.DataFrame, after_unix_s: float | None = None) -> float | None:
    """Retries sent per query lost (offered − answered): over the intervals after ``after_unix_s``
    when they lost anything (what the loop does without the trigger), else over the run; None
    when nothing was lost."""
    busy = amp[amp["offered_qps"] > 0]
    for frame in ((busy[busy.index.to_numpy(dtype=float) > after_unix_s],) if after_unix_s is not None else ()) + (busy,):
        dt = frame["interval_s"]
        lost = float(((frame["offered_qps"] - frame["answered_qps"]).clip(lower=0) * dt).sum())
        if lost > 0:
            return float((frame["retry_qps"] * dt).sum()) / lost
    return None


def fit_retry_loop(amp: pd.DataFrame, original_qps: float, *, retries_n: int | None = None,
                   peak_offered_qps: float | None = None, capacity_qps: float | None = None,
                   budget: float | None = None, state: pd.DataFrame | None = None,
                   baseline_loss: float = 0.0) -> LoopStates | None:
    """The retry loop of a run at ``original_qps``, with ``retries_n`` the clients' limit (else the
    generator's default) and ``budget`` a retry budget's share (offered at most ``original × (1 +
    budget)``; None or 0: no budget).

    ``loss(x)``: with ``state`` (the intervals of a state the run settled in, such as its end),
    the loss measured there from that state's offered rate up and ``baseline_loss`` below it: the
    loop through the two states the run showed, so a second stable state means the loss measured
    in that state makes the clients' retries alone offer what it was offered. Without it, the
    loss measured over all intervals (:func:`measured_loss`). At least ``1 - capacity / x`` when a
    capacity is known (a firewall table's admissions). None when the run lost nothing."""
    busy = amp[amp["offered_qps"] > 0]
    if not len(busy) or not ((busy["offered_qps"] - busy["answered_qps"]) > 0).any():
        return None
    if state is not None and len(state):
        dt = state["interval_s"]
        state_x = float((state["offered_qps"] * dt).sum() / dt.sum())
        state_loss = max(baseline_loss, 1.0 - _ratio(state, "answered_qps", "offered_qps"))

        def shape(x: float) -> float:
            # within 5 % of the state's offered rate: the counters jitter that much between
            # intervals, and a state at the clients' limit (every query at its last attempt) would
            # otherwise hold or not by that jitter alone
            return state_loss if x >= state_x * (1.0 - STATE_TOLERANCE) else baseline_loss
    else:
        shape = measured_loss(busy["offered_qps"].to_numpy(), busy["answered_qps"].to_numpy())
    if capacity_qps:
        at_capacity = capacity_loss(capacity_qps)

        def loss(x: float) -> float:
            return max(shape(x), at_capacity(x))
    else:
        loss = shape
    r = retries_n if retries_n is not None else int(DNS_OPTION_DEFAULTS["dns-retries"])
    peak = float(peak_offered_qps if peak_offered_qps is not None else busy["offered_qps"].max())
    return retry_loop_states(original_qps, r, loss, peak_offered_qps=peak,
                             cap_qps=offered_cap_qps(original_qps, r, budget))


def metastability(run: RunData, trigger_end_unix_s: float | None = None, *,
                  trigger_start_unix_s: float | None = None, min_post_s: float = 2.0,
                  goodput_tolerance: float = 0.1, amplification_tolerance: float = 0.1,
                  demand_tolerance: float = 0.2, hold_s: float | None = None, prefix: str = "dns",
                  capacity_qps: float | None = None) -> MetastabilityResult:
    """Did the run recover after its trigger, against its own pre-trigger baseline?

    The trigger comes from ``trigger_end_unix_s`` or the run's events (:func:`trigger_window`).
    Only intervals that carried traffic count. After the trigger, judging starts once original
    demand is within ``demand_tolerance`` of the baseline's; an interval is healthy when its
    goodput ratio is within ``goodput_tolerance`` of the baseline's and its amplification within
    ``amplification_tolerance`` of it. The end of the run is judged on its last third (at least
    3 intervals) unless ``hold_s`` says how long. A trigger before the first whole counter
    interval ends takes its baseline goodput and amplification from the counts before it
    (:func:`_partial_before`). :class:`ModelError` when fewer than ``min_post_s`` seconds and 3
    intervals follow the trigger.
    """
    amp = retry_amplification(run, prefix=prefix)
    start, end, source = _trigger(run, amp, trigger_end_unix_s)
    if trigger_start_unix_s is not None:
        start = float(trigger_start_unix_s)
    busy = amp[(amp["offered_qps"] > 0) & (amp["original_qps"] > 0)]  # idle intervals say nothing
    if not len(busy):
        raise ModelError(f"run {run.run_id}: no interval carried traffic")
    ts = busy.index.to_numpy(dtype=float)
    if start is None:
        start = float(ts[0] - busy["interval_s"].iloc[0])
    caveats: list[str] = []
    before = busy[ts <= start]
    in_trigger = (ts > start) & (ts <= end)
    if not in_trigger.any() and (ts > start).any():
        in_trigger = ts == ts[ts > start][0]  # an instant trigger: the interval that holds it
    starts = ts - busy["interval_s"].to_numpy(dtype=float)
    # an interval that ends after the trigger but began before it still holds some of it
    during, after = busy[in_trigger], busy[starts >= end - 1e-6]
    post_s = float(ts[-1] - end) if len(after) else 0.0
    gaps = []
    if (len(after) < 3 or post_s < min_post_s) and source == "burst events":
        # a burst train that leaves too little after its last burst: judge the gaps between bursts
        spans = burst_spans(run)
        gaps = [(a[1], b[0]) for a, b in zip(spans, spans[1:])]
    if (len(after) < 3 or post_s < min_post_s) and not gaps:
        raise ModelError(f"run {run.run_id}: {post_s:.1f} s ({len(after)} intervals with traffic) after the "
                         f"trigger ended at {end:.3f} ({source}); need >= {min_post_s:g} s and 3 intervals to "
                         "judge recovery (run longer after the trigger, or lower --min-post)")
    options = dns_options(run)
    if options.caveat():
        caveats.append(options.caveat())
    horizon = options.horizon_s
    if post_s < horizon and not gaps:
        caveats.append(f"the {post_s:.1f} s after the trigger are shorter than the clients' retry horizon "
                       f"({horizon:g} s): retries of the last queries may still be on their way")
    none_before = "no traffic before the trigger"
    if not len(before):  # no whole interval before the trigger: the partial one since the run's start
        before, none_before = _partial_before(run, start, prefix, caveats)
    base_orig, base_good, base_amp = _baseline(before, busy, caveats, none_before)
    good_floor = base_good * (1.0 - goodput_tolerance)
    amp_ceiling = base_amp * (1.0 + amplification_tolerance)
    healthy = ((busy["goodput_ratio"].fillna(0.0) >= good_floor)
               & (busy["amplification"].fillna(np.inf) <= amp_ceiling)).to_numpy()
    if capacity_qps is None:
        capacity_qps = _table_admissions(run, post_s, caveats)

    def loop_at(state: pd.DataFrame | None) -> LoopStates | None:
        return fit_retry_loop(busy, base_orig, retries_n=options.retries_n, capacity_qps=capacity_qps,
                              budget=options.retry_budget, state=state, baseline_loss=1.0 - base_good)

    loop = loop_at(None)
    common = dict(trigger_start_unix_s=float(start), trigger_end_unix_s=float(end), trigger_source=source,
                  baseline_original_qps=base_orig, baseline_goodput_ratio=base_good, baseline_amplification=base_amp,
                  trigger_goodput_ratio=_ratio(during, "answered_qps", "offered_qps") if len(during) else math.nan,
                  trigger_amplification=_ratio(during, "offered_qps", "original_qps") if len(during) else math.nan,
                  post_window_s=post_s, loop=loop, caveats=caveats)
    # stable: healthy through the trigger and after it (an instant burst's own interval can look
    # healthy while its queue holds every later answer past the clients' timeout)
    if in_trigger.any() and healthy[in_trigger].all() and healthy[starts >= end - 1e-6].all():
        return MetastabilityResult(verdict="stable", recovery_s=None, post_goodput_ratio=_ratio(after, "answered_qps", "offered_qps"),
                                   post_amplification=_ratio(after, "offered_qps", "original_qps"), demand_back_s=0.0,
                                   trend=None, trend_amplification_per_s=0.0, **common)
    if gaps:
        return _judge_gaps(busy, healthy, starts, gaps, post_s, horizon, common, loop_at)
    return _judge_after(after, healthy[starts >= end - 1e-6], end, base_orig, demand_tolerance, good_floor,
                        amp_ceiling, hold_s, common, loop_at)


def _trigger(run: RunData, amp: pd.DataFrame, end_unix_s: float | None) -> tuple[float | None, float, str]:
    """(start, end, source) of the run's trigger: from its events or original rate, or ending at
    ``end_unix_s`` (then starting at the last ``trigger_start`` phase before it, or where the
    original rate rose; None: the run's start)."""
    if end_unix_s is None:
        return trigger_window(run, amp)
    end = float(end_unix_s)
    marked = [float(ev["ts_unix_s"]) for ev in run.events if (ev.get("detail") or {}).get("phase") == "trigger_start"]
    start = max((t for t in marked if t <= end), default=None)
    if start is None:
        try:  # where the original rate rose, if it did: the baseline is before that
            found = trigger_window(run, amp)[0]
            start = found if found is not None and found < end else None
        except ModelError:
            start = None
    return start, end, "given"


def _partial_before(run: RunData, start: float, prefix: str, caveats: list[str]) -> tuple[pd.DataFrame, str]:
    """The counters up to their last sample at or before the trigger, as one interval (columns of
    :func:`retry_amplification`), for a trigger that comes before the first whole interval ends (a
    burst 2 s into a run sampled every 2 s). The counters are cumulative from zero, so their counts
    give the goodput and the amplification; not a rate: when the load began within that span is not
    recorded (Locust starts a second or more after the record), so ``original_qps`` is left NaN
    and :func:`_baseline` takes the demand from the busy intervals. Empty, with what to say
    instead, when no sample precedes the trigger or none of it carried traffic."""
    original, retry = counters.offered_parts(prefix)
    inc = {m: counters.increments(run, m) for m in (original, retry, f"{prefix}.answered")}
    t = inc[original].index.to_numpy(dtype=float)
    upto = t[t <= start + 1e-6]
    started = run.manifest.get("started_unix_s")
    at_start = isinstance(started, (int, float)) and len(upto) and upto[-1] <= started  # counts nothing yet
    if not len(upto) or at_start:
        return pd.DataFrame(), "no counter sample before the trigger (it came within the run's first interval)"
    last = float(upto[-1])
    n = {m: float(s[s.index.to_numpy(dtype=float) <= last + 1e-6].sum()) for m, s in inc.items()}
    if n[original] <= 0:
        return pd.DataFrame(), "no traffic before the trigger"
    caveats.append(f"baseline goodput and amplification from the {n[original]:,.0f} queries before the trigger (no "
                   "whole counter interval before it); its demand from the median of the busy intervals")
    offered = n[original] + n[retry]
    row = {"interval_s": math.nan, "original_qps": math.nan, "retry_qps": math.nan, "offered_qps": math.nan,
           "answered_qps": math.nan, "amplification": offered / n[original],
           "goodput_ratio": n[f"{prefix}.answered"] / offered}
    return pd.DataFrame([row], index=pd.Index([last], name="ts_unix_s")), ""


def _baseline(before: pd.DataFrame, busy: pd.DataFrame, caveats: list[str],
              none_before: str = "no traffic before the trigger") -> tuple[float, float, float]:
    """(original q/s, goodput ratio, amplification) before the trigger; lossless when nothing
    came before it (``none_before`` says why)."""
    if not len(before):
        caveats.append(f"{none_before}: baseline assumed lossless (goodput 1, 1.00×)")
        return float(busy["original_qps"].median()), 1.0, 1.0
    if before["original_qps"].isna().all():  # a partial interval: counts without a rate
        good, amp = float(before["goodput_ratio"].iloc[-1]), float(before["amplification"].iloc[-1])
        orig = float(busy["original_qps"].median())
    else:
        good = _ratio(before, "answered_qps", "offered_qps")
        amp = _ratio(before, "offered_qps", "original_qps")
        orig = float(before["original_qps"].median())
    return orig, good if math.isfinite(good) else 1.0, amp if math.isfinite(amp) else 1.0


def _table_admissions(run: RunData, post_s: float, caveats: list[str]) -> float | None:
    """New flows a second the target's firewall table admits when full, if the run has one."""
    from loadkit.model.firewall import table_capacity  # firewall builds on this module

    table = table_capacity(run)
    if table is None:
        return None
    # a session table's loss depends on what it holds, not on the rate alone: its steady state
    # is a capacity of size / timeout new flows a second
    if post_s < table[1]:
        caveats.append(f"the firewall keeps a session {table[1]:g} s: {post_s:.0f} s after the trigger "
                       "cannot see its table drain")
    return table[0]


def _flat_unless_draining(trend: str, slope: float, excess: float, window_s: float, caveats: list[str]) -> str:
    """``trend``, or "flat" for a fall that would take more than :data:`DRAIN_HORIZON` judged
    windows (``window_s``) to bring amplification ``excess`` over the baseline back to it. Both
    judgements (after the trigger, between bursts) go through here, so one plateau gets one
    verdict whichever way the run is judged."""
    if trend == "falling" and excess > 0 and slope < 0 and excess / -slope > DRAIN_HORIZON * window_s:
        # significant but negligible: a plateau's noise can fit a slope of -0.002×/s, which would
        # take 25 windows to get back
        caveats.append(f"amplification falls {-slope:.4f}×/s: at that rate back in about {excess / -slope:.0f} s, "
                       f"more than {DRAIN_HORIZON} times the {window_s:.0f} s judged; taken as flat")
        return "flat"
    return trend


def _judge_gaps(busy: pd.DataFrame, healthy: np.ndarray, starts: np.ndarray, gaps: list, post_s: float,
                horizon: float | None, common: dict,
                loop_at: Callable[[pd.DataFrame | None], LoopStates | None]) -> MetastabilityResult:
    """The verdict on a burst train, from the gaps between its bursts: does each gap get back to
    health before the next burst, and do the gaps' ends drift (retries piling up)?"""
    ts = busy.index.to_numpy(dtype=float)
    ends_ok, end_amp, end_ts, recoveries, tail_rows = [], [], [], [], []
    for gap_start, gap_end in gaps:
        inside = np.flatnonzero((starts >= gap_start - 1e-6) & (ts <= gap_end + 1e-6))
        if not len(inside):
            continue
        h = healthy[inside]
        ends_ok.append(bool(h[-1]))
        end_amp.append(float(busy["amplification"].iloc[inside[-1]]))
        end_ts.append(float(ts[inside[-1]]))
        tail_rows.append(inside[-1])
        bad = np.flatnonzero(~h)
        if h[-1]:
            first_ok = 0 if not len(bad) else bad[-1] + 1
            recoveries.append(max(0.0, float(starts[inside[first_ok]] - gap_start)))
    caveats = common["caveats"]
    if not ends_ok:
        raise ModelError("the run's bursts come too close together for any interval to fall between them, and "
                         f"it leaves {post_s:.1f} s after the last: record at a shorter interval or run longer")
    caveats.append(f"judged between the bursts ({len(ends_ok)} gaps; {post_s:.1f} s after the last burst is too "
                   "short" + (f" for the clients' {horizon:g} s retry horizon)" if horizon else ")"))
    common["post_window_s"] = float(np.median([b - a for a, b in gaps]))
    common["judged_on"] = "between bursts"
    tail = busy.iloc[tail_rows]
    post_amp = _ratio(tail, "offered_qps", "original_qps")
    trend, slope = _trend(pd.DataFrame({"amplification": end_amp}, index=end_ts))
    # judged from the first gap's start to the last gap's end: the span the gaps' ends were seen over
    trend = _flat_unless_draining(trend, slope, post_amp - float(common["baseline_amplification"]),
                                  end_ts[-1] - gaps[0][0], caveats)
    out = dict(post_goodput_ratio=_ratio(tail, "answered_qps", "offered_qps"), post_amplification=post_amp,
               demand_back_s=None, trend=trend, trend_amplification_per_s=slope, **common)
    if all(ends_ok):
        return MetastabilityResult(verdict="recovers", recovery_s=max(recoveries), **out)
    loop = out["loop"] = loop_at(tail)  # the loop through the state the gaps end in
    if trend == "falling" or (loop is not None and not loop.second_stable_state) or sum(ends_ok) >= len(ends_ok) / 2:
        return MetastabilityResult(verdict="not_recovered", recovery_s=None, **out)
    return MetastabilityResult(verdict="metastable", recovery_s=None, **out)


def _judge_after(after: pd.DataFrame, healthy: np.ndarray, end: float, base_orig: float, demand_tolerance: float,
                 good_floor: float, amp_ceiling: float, hold_s: float | None, common: dict,
                 loop_at: Callable[[pd.DataFrame | None], LoopStates | None]) -> MetastabilityResult:
    """The verdict on the intervals after the trigger (those with traffic)."""
    ts = after.index.to_numpy(dtype=float)
    back = np.flatnonzero(np.abs(after["original_qps"].to_numpy() - base_orig) <= demand_tolerance * base_orig)
    if not len(back):
        return MetastabilityResult(verdict="demand_not_back", recovery_s=None, demand_back_s=None, trend=None,
                                   post_goodput_ratio=_ratio(after, "answered_qps", "offered_qps"),
                                   post_amplification=_ratio(after, "offered_qps", "original_qps"),
                                   trend_amplification_per_s=0.0, **common)
    judged, healthy = after.iloc[back[0]:], healthy[back[0]:]
    demand_back_s = max(0.0, float(ts[back[0]] - after["interval_s"].iloc[back[0]] - end))
    if hold_s is None:
        tail = judged.iloc[-max(3, len(judged) // 3):]
    else:
        tail = judged[judged.index.to_numpy(dtype=float) >= ts[-1] - hold_s]
    post_good = _ratio(tail, "answered_qps", "offered_qps")
    post_amp = _ratio(tail, "offered_qps", "original_qps")
    # the trend of the later half: the drain right after the trigger falls even into a stuck state
    trend, slope = _trend(judged.iloc[-max(5, len(judged) // 2):])
    window_s = float(ts[-1] - ts[back[0]]) + float(after["interval_s"].iloc[back[0]])
    trend = _flat_unless_draining(trend, slope, post_amp - float(common["baseline_amplification"]), window_s,
                                  common["caveats"])
    out = dict(post_goodput_ratio=post_good, post_amplification=post_amp, demand_back_s=demand_back_s,
               trend=trend, trend_amplification_per_s=slope, **common)
    bad = np.flatnonzero(~healthy)
    first_ok = 0 if not len(bad) else bad[-1] + 1
    if post_good >= good_floor and post_amp <= amp_ceiling and first_ok < len(healthy):
        rec_end = float(judged.index[first_ok]) - float(judged["interval_s"].iloc[first_ok])
        return MetastabilityResult(verdict="recovers", recovery_s=max(0.0, rec_end - end), **out)
    loop = out["loop"] = loop_at(tail)  # the loop through the state the run ended in
    if trend == "falling":
        return MetastabilityResult(verdict="not_recovered", recovery_s=None, **out)
    if loop is not None and not loop.second_stable_state:
        common["caveats"].append(f"still degraded, but the loss measured at the end, with at most {loop.retries_n} "
                                 "retries a query, cannot make the retries alone offer what was offered there: "
                                 "no second stable state, not metastable by that definition (a slower drain, or a "
                                 "changed server?)")
        return MetastabilityResult(verdict="not_recovered", recovery_s=None, **out)
    if loop is None:
        common["caveats"].append("no loss to fit the retry loop on: judged on the measurements alone")
    return MetastabilityResult(verdict="metastable", recovery_s=None, **out)
