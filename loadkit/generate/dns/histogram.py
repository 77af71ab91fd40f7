"""Fine latency histograms with log buckets in microseconds.

Loopback DNS latencies are tens of microseconds, and Locust keeps whole milliseconds, so its
percentiles would all read 0 or 1 ms. Here a latency falls in bucket ``int(log2(us) * 16)``
(the run record's scheme, :func:`loadkit.schema.latency_bucket`): 16 buckets per doubling. A
percentile is reported as its bucket's **upper edge** (clamped to the largest latency seen), as
HdrHistogram does, so it never under-reports and is at most 2 ** (1/16) - 1 ≈ 4.4 % above the true
value: a 1.0005 s answer reads as at most 1.044 s, never as 0.98 s.
Histograms merge by adding counts (per interval, per worker) and travel as plain dicts.

:func:`fine_latency_for` is the per-process channel by which a generator's per-interval
histograms reach the run recorder (and, from workers, the master) without the generator knowing
the recorder.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from loadkit.generate.wiring import attach
from loadkit.schema import LATENCY_BUCKET_ERROR, LATENCY_BUCKETS_PER_OCTAVE, nearest_rank, percentile_edge_s

#: buckets per doubling of latency
BUCKETS_PER_OCTAVE = LATENCY_BUCKETS_PER_OCTAVE
#: the most a reported percentile exceeds the true value, relatively (about 4.4 %)
RELATIVE_ERROR = LATENCY_BUCKET_ERROR
_LOG2 = math.log2


def bucket_of(latency_us: float) -> int:
    """Bucket index of a latency in microseconds (everything below 1 µs is bucket 0)."""
    if latency_us <= 1.0:
        return 0
    return int(_LOG2(latency_us) * BUCKETS_PER_OCTAVE)


def bucket_bounds_us(index: int) -> tuple[float, float]:
    """``[low, high)`` of a bucket in microseconds."""
    low = 2.0 ** (index / BUCKETS_PER_OCTAVE) if index > 0 else 0.0
    return low, 2.0 ** ((index + 1) / BUCKETS_PER_OCTAVE)


class LatencyHistogram:
    """Counts of latencies by log bucket, with exact count, sum, min and max."""

    __slots__ = ("counts", "count", "sum_s", "min_s", "max_s")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.sum_s = 0.0
        self.min_s = math.inf
        self.max_s = 0.0

    def add(self, latency_s: float, n: int = 1) -> None:
        us = latency_s * 1e6
        b = 0 if us <= 1.0 else int(_LOG2(us) * BUCKETS_PER_OCTAVE)
        counts = self.counts
        counts[b] = counts.get(b, 0) + n
        self.count += n
        self.sum_s += latency_s * n
        if latency_s < self.min_s:
            self.min_s = latency_s
        if latency_s > self.max_s:
            self.max_s = latency_s

    def add_many(self, latencies_s: Sequence[float]) -> None:
        """Add many latencies at once (vectorised: the sender buffers an interval's latencies
        in a list and buckets them here)."""
        n = len(latencies_s)
        if n == 0:
            return
        a = np.asarray(latencies_s, dtype=np.float64)
        us = a * 1e6
        buckets = np.where(us <= 1.0, 0, np.log2(np.maximum(us, 1.0)) * BUCKETS_PER_OCTAVE).astype(np.int64)
        index, count = np.unique(buckets, return_counts=True)
        counts = self.counts
        for b, c in zip(index.tolist(), count.tolist()):
            counts[b] = counts.get(b, 0) + c
        self.count += n
        self.sum_s += float(a.sum())
        self.min_s = min(self.min_s, float(a.min()))
        self.max_s = max(self.max_s, float(a.max()))

    def merge(self, other: LatencyHistogram) -> None:
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c
        self.count += other.count
        self.sum_s += other.sum_s
        self.min_s = min(self.min_s, other.min_s)
        self.max_s = max(self.max_s, other.max_s)

    def clear(self) -> None:
        self.counts = {}
        self.count = 0
        self.sum_s = 0.0
        self.min_s = math.inf
        self.max_s = 0.0

    def __len__(self) -> int:
        return self.count

    @property
    def mean_s(self) -> float:
        return self.sum_s / self.count if self.count else 0.0

    def percentile_s(self, q: float) -> float:
        """The ``q`` quantile (0..1) in seconds: the **upper edge** of the bucket holding rank
        ``ceil(q * count)``, clamped to the largest latency seen; 0.0 for an empty histogram.

        Never below the true value and at most :data:`RELATIVE_ERROR` (2 ** (1/16) - 1, about
        4.4 %) above it."""
        rank = nearest_rank(q, max(1, self.count))
        if not self.count:
            return 0.0
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return percentile_edge_s(b, self.max_s)
        return self.max_s

    def items_s(self) -> list[tuple[float, int]]:
        """``(upper edge in seconds, clamped to the largest latency seen, count)`` per non-empty
        bucket, ascending: what Locust's statistics get, so they do not under-report either."""
        return [(percentile_edge_s(b, self.max_s), self.counts[b]) for b in sorted(self.counts)]

    def to_dict(self) -> dict:
        return {
            "counts": {str(b): c for b, c in self.counts.items()},
            "count": self.count,
            "sum_s": self.sum_s,
            "min_s": self.min_s if self.count else None,
            "max_s": self.max_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LatencyHistogram:
        h = cls()
        h.counts = {int(b): int(c) for b, c in data.get("counts", {}).items()}
        h.count = int(data.get("count", 0))
        h.sum_s = float(data.get("sum_s", 0.0))
        h.min_s = math.inf if data.get("min_s") is None else float(data["min_s"])
        h.max_s = float(data.get("max_s", 0.0))
        return h

    def summary(self) -> str:
        if not self.count:
            return "no samples"
        return (
            f"n={self.count} mean={self.mean_s * 1e6:.0f}us p50<={self.percentile_s(0.5) * 1e6:.0f}us "
            f"p90<={self.percentile_s(0.9) * 1e6:.0f}us p99<={self.percentile_s(0.99) * 1e6:.0f}us "
            f"max={self.max_s * 1e6:.0f}us (percentiles at bucket upper edges, "
            f"+{RELATIVE_ERROR * 100:.1f} % at most)"
        )


# -- per-interval histograms to the run recorder -------------------------------------------------

_ENV_ATTR = "loadkit_fine_latency"
_REPORT_KEY = "loadkit_fine_latency"


class FineLatency:
    """Fine histograms of one Locust process by ``(request_type, name)``, added each generator
    interval and taken by whoever records the run (:meth:`drain`, once per recorded interval).

    A generator adds the same requests here as it injects into Locust's statistics, in the same
    call, so a recorded interval's fine histogram and its Locust counts cover the same requests.
    Pending histograms are merged per name: a process nobody drains holds a few hundred buckets
    per name, not a growing list. Workers send theirs to the master with every stats report (the
    same message that carries the statistics), and the master merges them.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], LatencyHistogram] = {}

    def add(self, request_type: str, name: str, histogram: LatencyHistogram) -> None:
        if not histogram.count:
            return
        key = (str(request_type), str(name))
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = LatencyHistogram()
        pending.merge(histogram)

    def drain(self) -> dict[tuple[str, str], LatencyHistogram]:
        """Every pending histogram since the last drain; nothing is pending afterwards."""
        out, self._pending = self._pending, {}
        return out

    # -- distributed mode -----------------------------------------------------------------------
    def _report(self) -> list[dict]:
        return [{"request_type": t, "name": n, "histogram": h.to_dict()} for (t, n), h in self.drain().items()]

    def _merge_worker(self, client_id: str, rows: list[dict]) -> None:
        for row in rows:
            self.add(row["request_type"], row["name"], LatencyHistogram.from_dict(row["histogram"]))


def fine_latency_for(environment: Any) -> FineLatency:
    """The :class:`FineLatency` channel of a Locust environment, created and wired on first use
    (call it in ``init`` in every process, so a master merges its workers' from the first report)."""
    return attach(environment, _ENV_ATTR, _REPORT_KEY, FineLatency)
