"""The change against a baseline release, scenario by scenario.

A figure is compared only with the same figure of the same scenario (and service, and request
name) in the baseline: a DNS p99 of a burst-storm run is never set against a smoke run's.
Scenarios the baseline lacks are named in the notes, not compared.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from .analysis import num
from .summary import Change, ReportSummary

#: a capacity figure (fall-over, admission limit, largest burst) that shrank by more than this is a regression
REGRESSION_CAPACITY_PCT = 5.0
#: headroom that shrank by more than this many percentage points is a regression
REGRESSION_HEADROOM_PP = 5.0
#: a p99 latency or a retry amplification that grew by more than this is a regression
REGRESSION_LATENCY_PCT = 20.0
#: a DNS drop ratio that grew by more than this many percentage points is a regression
REGRESSION_DROP_PP = 1.0


def change(service: str, scenario: str, metric: str, base: Any, cur: Any, unit: str, worse: str,
           limit: float, pp: bool) -> Change | None:
    """One figure's change; ``worse`` is "lower" or "higher"; ``pp``: in percentage points."""
    base, cur = num(base), num(cur)
    if base is None or cur is None:
        return None
    if pp:
        delta = cur - base
    else:
        delta = (cur - base) / abs(base) * 100 if base else (0.0 if cur == 0 else math.inf)
    regression = (delta < -limit) if worse == "lower" else (delta > limit)
    improvement = (delta > limit) if worse == "lower" else (delta < -limit)
    return Change(service=service, scenario=scenario, metric=metric, unit="pp" if pp and unit == "%" else unit,
                  baseline=base, current=cur, change=num(delta), change_unit="pp" if pp else "%",
                  regression=bool(regression), improvement=bool(improvement))


def _mail(cur: ReportSummary, base: ReportSummary) -> Iterable[Change | None]:
    by_key = {(m.service, m.scenario): m for m in reversed(base.mail)}  # the first setup wins
    for m in cur.mail:
        b = by_key.get((m.service, m.scenario))
        if b is None:
            continue
        args = (m.service, m.scenario)
        yield change(*args, "first failure", b.first_failure_sessions, m.first_failure_sessions, "sessions",
                     "lower", REGRESSION_CAPACITY_PCT, False)
        if not (m.cascade_all_fail and b.cascade_all_fail):  # else the same figure as the first failure
            yield change(*args, "all fall over", b.all_fail_sessions, m.all_fail_sessions, "sessions",
                         "lower", REGRESSION_CAPACITY_PCT, False)
        yield change(*args, "admission limit", b.admission_limit_total_sessions, m.admission_limit_total_sessions,
                     "sessions", "lower", REGRESSION_CAPACITY_PCT, False)
        yield change(*args, "headroom", b.headroom_pct, m.headroom_pct, "%", "lower", REGRESSION_HEADROOM_PP, True)


def _dns(cur: ReportSummary, base: ReportSummary) -> Iterable[Change | None]:
    caps = {d.scenario: d for d in reversed(base.dns_capacity)}
    for d in cur.dns_capacity:
        b = caps.get(d.scenario)
        if b is not None and d.mode == b.mode == "burst" and not (d.is_lower_bound or b.is_lower_bound):
            yield change("DNS", d.scenario, "largest burst without loss", b.largest_burst_without_loss_queries,
                         d.largest_burst_without_loss_queries, "queries", "lower", REGRESSION_CAPACITY_PCT, False)
    runs = {d.scenario: d for d in reversed(base.dns)}
    for d in cur.dns:
        b = runs.get(d.scenario)
        if b is None:
            continue
        if d.drop_ratio is not None and b.drop_ratio is not None:
            yield change("DNS", d.scenario, "drop ratio", b.drop_ratio * 100, d.drop_ratio * 100, "%", "higher",
                         REGRESSION_DROP_PP, True)
        yield change("DNS", d.scenario, "retry amplification max", b.retry_amplification_max,
                     d.retry_amplification_max, "×", "higher", REGRESSION_LATENCY_PCT, False)


def _latency(cur: ReportSummary, base: ReportSummary) -> Iterable[Change | None]:
    rows = {(r.scenario, r.service, r.name): r for r in reversed(base.latency)}
    for r in cur.latency:
        b = rows.get((r.scenario, r.service, r.name))
        if b is not None:
            yield change(r.service, r.scenario, f"p99 latency {r.name}", b.p99_s, r.p99_s, "s", "higher",
                         REGRESSION_LATENCY_PCT, False)


def compare(cur: ReportSummary, base: ReportSummary) -> list[Change]:
    """Figure-by-figure change from ``base`` to ``cur``, same scenario only, regressions marked."""
    out = [*_mail(cur, base), *_dns(cur, base), *_latency(cur, base)]
    return [c for c in out if c is not None]


def unmatched(cur: ReportSummary, base: ReportSummary) -> list[str]:
    """Notes naming the scenarios of this release the baseline has no run of."""
    base_scenarios = {r.scenario for r in base.runs}
    missing = sorted({r.scenario for r in cur.runs} - base_scenarios)
    return [f"baseline {base.release} has no run of scenario {s!r}: its figures are not compared"
            for s in missing]
