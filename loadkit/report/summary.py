"""The capacity report's summary as typed records: what ``summary.json`` holds.

:func:`loadkit.report.analysis.summarize` builds one :class:`ReportSummary`; the notebook renders
it and a release pipeline reads ``summary.json`` (``ReportSummary.to_json()``). Every field is
named with its unit; a figure the runs cannot support is ``null`` and the reason is in ``notes``
or in a row's ``caveat``.

``summary.json`` keys (units in the names: ``_s`` seconds, ``_unix_s`` seconds since the epoch,
``_n`` a count, ``_qps`` queries per second, ``_bytes``, ``_pct`` percent, ``_sessions``
concurrent sessions, ``_queries`` queries in one burst):

- ``release``, ``baseline_release``, ``generated_unix_s``
- ``verdict``: ``PASS`` | ``WARN`` | ``FAIL``; ``verdict_reasons``: why (FAIL reasons first);
  ``verdict_notes``: things that are not a failure but a reader must know (a designed abort)
- ``runs`` / ``baseline_runs``: one :class:`RunRow` per run (``outcome`` is ``completed``,
  ``aborted as designed``, ``aborted``, ``interrupted`` or ``failed``)
- ``gates``: one :class:`GateRow` per recorded gate (``outcome`` ``pass`` | ``fail`` |
  ``not evaluated`` | ``aborted as designed``)
- ``mail``: one :class:`MailCapacity` per (service, scenario, lab setup): headroom in sessions
- ``dns_capacity``: one :class:`DnsCapacity` per DNS scenario: queries per burst or queries/s
- ``dns``: one :class:`DnsRun` per DNS run: offered/answered/dropped, retries, burst figures
- ``latency``: one :class:`LatencyRow` per (run, request type, name); ``latency_label`` says
  how the percentiles were computed
- ``anomalies``: one :class:`AnomalyRow` per run
- ``models``: one :class:`ModelRow` per model answer: predicted beside measured, with its caveat
- ``changes`` / ``regressions``: :class:`Change` rows against the baseline, scenario by scenario
- ``notes``: why a figure is missing
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from loadkit.model._result import _plain  # the one converter of records to JSON values

VERDICTS = ("PASS", "WARN", "FAIL")

#: run outcomes; "aborted as designed" is an abort the profile's own threshold was set to reach
OUTCOME_COMPLETED = "completed"
OUTCOME_DESIGNED_ABORT = "aborted as designed"
OUTCOME_ABORTED = "aborted"


class _Row:
    """``to_dict()`` for the summary's records (JSON-ready, no NaN)."""

    def to_dict(self) -> dict:
        return _plain(self)


@dataclass
class RunRow(_Row):
    """One run as the report names it (from its manifest)."""

    run_id: str
    scenario: str
    release: str
    status: str  #: the manifest's status
    outcome: str  #: status, with a designed abort told apart (OUTCOME_*)
    outcome_detail: str  #: the abort reason in words, "" otherwise
    service: str  #: "DNS", "IMAP", "POP3" or "IMAP+POP3"
    setup: str  #: scenario and lab setup; runs of different setups are never merged
    started_unix_s: float
    duration_s: float | None
    targets: list[str]
    versions: dict[str, str]
    path: str
    #: the run's Locust HTML report, copied beside the capacity report: its path relative to the
    #: report's directory ("" when the run has none, e.g. a run recorded without --html)
    locust_html: str = ""


@dataclass
class GateRow(_Row):
    run_id: str
    name: str
    passed: bool | None
    value: float | None
    limit: float | None
    detail: str
    outcome: str  #: "pass", "fail", "not evaluated" or "aborted as designed"


@dataclass
class MailCapacity(_Row):
    """Headroom of one mail service in one setup (:func:`loadkit.model.fit_headroom`)."""

    service: str  #: "IMAP", "POP3" or "IMAP+POP3" (sessions of both protocols summed)
    scenario: str
    setup: str
    run_ids: list[str]
    forecast_peak_sessions: float | None  #: from --forecast-peak-sessions or [gates]
    first_failure_sessions: float | None
    first_failure_proxy: str
    all_fail_sessions: float | None
    all_fail_ci95_sessions: list[float]
    cascade_all_fail: bool | None
    headroom_pct: float | None  #: (first failure / forecast - 1) * 100; None without a forecast
    admission_limit_total_sessions: float | None
    admission_limit_per_proxy_sessions: list[float]
    proxies_needed_for_forecast_n: int | None
    max_fraction_observed: float | None  #: largest total observed / first failure (extrapolation)
    recommendation: str
    model_summary: str
    #: sessions held just before a run's first OOM kill (None: no run fell over)
    measured_first_failure_sessions: float | None = None
    n_minus_1_sessions: float | None = None  #: N+1: what the others survive with one proxy down
    n_minus_1_proxy_down: str = ""
    admission_limit_sum_sessions: float | None = None  #: sum of the per-proxy admission limits
    caveats: list[str] = field(default_factory=list)  #: the model's caveats, in words
    proxies: list[dict] = field(default_factory=list)  #: ProxyFit.to_dict() per proxy


@dataclass
class DnsCapacity(_Row):
    """Capacity of the DNS service in one scenario: per burst when the runs offered bursts,
    else per second."""

    scenario: str
    setup: str
    run_ids: list[str]
    mode: str  #: "burst" (figures in queries per burst) or "rate" (queries/s)
    burst_queries: float | None  #: the burst the profile offered (not a forecast)
    burst_window_s: float | None
    largest_burst_without_loss_queries: float | None
    is_lower_bound: bool  #: nothing was dropped: capacity is at least the figure
    #: a collector counted the server's drops (False: the figures are the model's alone, from the
    #: answers, and whether bursts overflowed is not known)
    drops_counted: bool
    forecast_peak_burst_queries: float | None  #: only from [gates] forecast_peak_burst_queries
    forecast_peak_qps: float | None  #: only from --forecast-peak-qps or [gates] forecast_peak_qps
    drop_onset_qps: float | None  #: lowest offered rate of an interval with drops
    peak_offered_qps: float | None
    headroom_pct: float | None  #: against the forecast; None without one
    rcvbuf_needed_bytes: int | None
    rate_limit_qps: float | None
    recommendation: str
    source: str


@dataclass
class DnsRun(_Row):
    """What one DNS run offered, got answered and lost."""

    run_id: str
    scenario: str
    offered_queries_n: float | None
    original_queries_n: float | None
    retry_queries_n: float | None
    answered_queries_n: float | None
    unanswered_queries_n: float | None
    drops_n: float | None  #: receive-buffer drops of the target socket (or the host: drops_source)
    drops_source: str
    host_rcvbuf_errors_n: float | None  #: Udp RcvbufErrors of the whole host during the run
    drop_ratio: float | None  #: drops_n / offered_queries_n
    retry_amplification_mean: float | None
    retry_amplification_max: float | None
    peak_offered_qps: float | None
    bursts_n: int | None
    burst_queries: float | None  #: the largest burst the generator recorded sending, else the profile's
    burst_window_s: float | None  #: the time it took to send (recorded), else the profile's
    largest_burst_without_loss_queries: float | None
    largest_burst_is_lower_bound: bool
    rcvbuf_needed_bytes: int | None
    buffer_datagrams_n: int | None
    rcvbuf_bytes: float | None
    service_rate_qps: float | None  #: the drain rate measured inside bursts; None when not measured
    drop_onset_qps: float | None
    udp_burst_summary: str
    burst_window_planned_s: float | None = None  #: the window the profile asked for (dns-burst-ms)


@dataclass
class LatencyRow(_Row):
    run_id: str
    scenario: str
    service: str
    name: str
    requests_n: int
    failures_n: int
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    max_s: float | None  #: the slowest request of any interval
    p99_source: str = ""  #: how the percentiles were computed (analysis.PERCENTILE_SOURCES)


@dataclass
class AnomalyRow(_Row):
    run_id: str
    series: str
    spikes: list[dict]
    daily_period: str | None
    change_points_n: int
    detection_delay_s: dict[str, float | None]
    summary: str
    source: str


@dataclass
class ModelRow(_Row):
    """One model answer: what it predicts beside what the run measured, and how far to trust it."""

    model: str  #: "headroom", "udp burst", "retries", "anomalies", "usl", ...
    scenario: str
    run_ids: list[str]
    question: str
    predicted: str  #: the model's answer in words with its unit
    measured: str  #: what the run measured of the same thing ("not measured: …" otherwise)
    caveat: str  #: extrapolation, lower bound, not significant … in words ("" when none)
    predicted_value: float | None = None
    measured_value: float | None = None
    unit: str = ""


@dataclass
class Change(_Row):
    service: str
    scenario: str
    metric: str
    unit: str
    baseline: float
    current: float
    change: float | None
    change_unit: str  #: "%" of the baseline value, or "pp" (percentage points)
    regression: bool
    improvement: bool


@dataclass
class ReportSummary(_Row):
    """Everything the report says (see the module docstring for the keys)."""

    release: str
    baseline_release: str | None
    generated_unix_s: float
    verdict: str = "PASS"
    verdict_reasons: list[str] = field(default_factory=list)
    verdict_notes: list[str] = field(default_factory=list)
    runs: list[RunRow] = field(default_factory=list)
    baseline_runs: list[RunRow] = field(default_factory=list)
    gates: list[GateRow] = field(default_factory=list)
    mail: list[MailCapacity] = field(default_factory=list)
    dns_capacity: list[DnsCapacity] = field(default_factory=list)
    dns: list[DnsRun] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    latency_label: str = ""
    anomalies: list[AnomalyRow] = field(default_factory=list)
    models: list[ModelRow] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regression]

    def to_dict(self) -> dict:
        data = _plain(self)
        data["regressions"] = [c.to_dict() for c in self.regressions]
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> "ReportSummary":
        """Read ``summary.json`` back (the notebook does, when ``loadkit report`` wrote it)."""
        rows = {"runs": RunRow, "baseline_runs": RunRow, "gates": GateRow, "mail": MailCapacity,
                "dns_capacity": DnsCapacity, "dns": DnsRun, "latency": LatencyRow,
                "anomalies": AnomalyRow, "models": ModelRow, "changes": Change}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key, row_type in rows.items():
            kwargs[key] = [_row(row_type, d) for d in data.get(key) or []]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "ReportSummary":
        return cls.from_dict(json.loads(text))


def _row(row_type: type, data: dict) -> Any:
    names = {f.name for f in dataclasses.fields(row_type)}
    return row_type(**{k: v for k, v in data.items() if k in names})
