"""Generator-side counters and gauges that are not request statistics.

Offered vs original queries (retry amplification), drops, and the number of mail sessions held
right now are what make a burst or a storm legible, and Locust's request stats do not carry them.
Users update a per-process :class:`GeneratorMetrics`; in distributed mode each worker piggybacks
its values on Locust's ``report_to_master`` message and the master sums them, so the recorder
reads one merged view wherever it runs.

Counters are cumulative since the process started; gauges are a current value. Both are summed
over workers, but for gauges set by :meth:`GeneratorMetrics.set_max_gauge` (a largest lateness, a
burst's window), which take the largest worker's value: N workers' maxima do not add up. Updating is a dict operation, cheap enough for a per-batch call on the DNS hot
path (call it per batch, not per query).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from loadkit.generate.wiring import attach
from loadkit.schema import GeneratorMetric

_ENV_ATTR = "loadkit_metrics"
_REPORT_KEY = "loadkit_metrics"


class GeneratorMetrics:
    """Counters and gauges of one Locust process, plus (on a master) the workers' last reports."""

    def __init__(self) -> None:
        self._counters: dict[str, float] = defaultdict(float)
        self._gauges: dict[str, float] = {}
        #: gauges merged over workers by their maximum (the names travel with each worker's report)
        self._max_gauges: set[str] = set()
        # worker client_id -> (counters, gauges) last reported
        self._workers: dict[str, tuple[dict[str, float], dict[str, float]]] = {}

    # -- updates (users call these) -----------------------------------------------------------
    def add(self, metric: str, n: float = 1) -> None:
        """Increase counter ``metric`` by ``n``."""
        self._counters[metric] += n

    def set_gauge(self, metric: str, value: float) -> None:
        self._gauges[metric] = value

    def set_max_gauge(self, metric: str, value: float) -> None:
        """Set gauge ``metric``, a largest value so far: over workers it is the largest, not the sum."""
        self._gauges[metric] = value
        self._max_gauges.add(metric)

    def add_gauge(self, metric: str, delta: float) -> None:
        """Move gauge ``metric`` by ``delta`` (e.g. +1 when a session is held, -1 when closed)."""
        self._gauges[metric] = self._gauges.get(metric, 0.0) + delta

    # -- reads ----------------------------------------------------------------------------------
    def counters(self) -> dict[str, float]:
        """Counters summed over this process and every worker that ever reported."""
        return self._summed(self._counters, [c for c, _ in self._workers.values()])

    def gauges(self) -> dict[str, float]:
        """Gauges summed (or, for :meth:`set_max_gauge` ones, maximised) over this process and the
        workers still connected."""
        workers = [g for _, g in self._workers.values()]
        total = self._summed(self._gauges, workers)
        for metric in self._max_gauges & total.keys():
            total[metric] = max(g[metric] for g in (self._gauges, *workers) if metric in g)
        return total

    @staticmethod
    def _summed(own: dict[str, float], workers: list[dict[str, float]]) -> dict[str, float]:
        total = defaultdict(float, own)
        for values in workers:
            for k, v in values.items():
                total[k] += v
        return dict(total)

    def snapshot(self, ts_unix_s: float) -> list[GeneratorMetric]:
        rows = [GeneratorMetric(ts_unix_s, k, "counter", v) for k, v in sorted(self.counters().items())]
        rows += [GeneratorMetric(ts_unix_s, k, "gauge", v) for k, v in sorted(self.gauges().items())]
        return rows

    # -- distributed mode -----------------------------------------------------------------------
    def _report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"counters": dict(self._counters), "gauges": dict(self._gauges)}
        if self._max_gauges:
            report["max_gauges"] = sorted(self._max_gauges)
        return report

    def _merge_worker(self, client_id: str, data: dict[str, Any]) -> None:
        self._workers[client_id] = (dict(data.get("counters", {})), dict(data.get("gauges", {})))
        self._max_gauges.update(data.get("max_gauges", ()))

    def _forget_worker_gauges(self, client_id: str) -> None:
        # a lost worker's sessions are gone, its cumulative counters still happened
        if client_id in self._workers:
            self._workers[client_id] = (self._workers[client_id][0], {})


def metrics_for(environment: Any) -> GeneratorMetrics:
    """The :class:`GeneratorMetrics` of a Locust environment, created and wired on first use."""
    return attach(environment, _ENV_ATTR, _REPORT_KEY, GeneratorMetrics)


def forget_worker(environment: Any, client_id: str) -> None:
    """Drop a lost worker's gauges (its counters stay: the queries it sent were sent)."""
    metrics_for(environment)._forget_worker_gauges(client_id)
