"""Fine latency histograms with log buckets in microseconds.

Loopback DNS latencies are tens of microseconds, and Locust keeps whole milliseconds, so its
percentiles would all read 0 or 1 ms. Here a latency falls in bucket ``int(log2(us) * 16)``:
16 buckets per doubling, so a reported percentile is within about 4.4 % of the true value.
Histograms merge by adding counts (per interval, per worker) and travel as plain dicts.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

#: buckets per doubling of latency
BUCKETS_PER_OCTAVE = 16
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
        """The ``q`` quantile (0..1) in seconds: the geometric middle of its bucket, clamped to
        the observed min and max; 0.0 for an empty histogram."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} is outside 0..1")
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                low, high = bucket_bounds_us(b)
                mid_us = math.sqrt(low * high) if low > 0 else high / 2
                return min(max(mid_us / 1e6, self.min_s), self.max_s)
        return self.max_s

    def items_s(self) -> list[tuple[float, int]]:
        """``(representative latency in seconds, count)`` per non-empty bucket, ascending."""
        out = []
        for b in sorted(self.counts):
            low, high = bucket_bounds_us(b)
            mid_us = math.sqrt(low * high) if low > 0 else high / 2
            out.append((min(max(mid_us / 1e6, self.min_s), self.max_s), self.counts[b]))
        return out

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
            f"n={self.count} mean={self.mean_s * 1e6:.0f}us p50={self.percentile_s(0.5) * 1e6:.0f}us "
            f"p90={self.percentile_s(0.9) * 1e6:.0f}us p99={self.percentile_s(0.99) * 1e6:.0f}us "
            f"max={self.max_s * 1e6:.0f}us"
        )
