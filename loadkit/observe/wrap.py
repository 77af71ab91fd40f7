"""Wrap-safe cumulative counters and per-interval deltas, after psutil's ``wrap_numbers``.

Kernel counters only grow, except when they wrap (32-bit counters such as a socket's ``drops``
or ``softnet_stat``'s columns) or restart (a socket re-created, a cgroup removed and made again,
a counter read from a different host). A decrease is read as:

- a wrap, when the counter is declared 32-bit and its previous value was in the upper half of
  the range: ``delta = new + 2**32 - old``;
- otherwise a restart: ``delta = new`` (what has been counted since the restart).

Either way the corrected cumulative value keeps growing, so sums of deltas equal the corrected
total and a plot of it never steps down.
"""

from __future__ import annotations

from typing import Hashable, Mapping

WRAP_32 = 1 << 32


class CounterTracker:
    """Corrected cumulative values and deltas of named counters, one entry per key.

    ``update(key, {"RcvbufErrors": 7, ...})`` returns ``(cumulative, delta)`` dicts. The first
    update of a key has delta 0 for every counter: there is no previous sample to subtract.
    """

    def __init__(self, wrap32: frozenset[str] | set[str] = frozenset()) -> None:
        #: counter names that are 32-bit in the kernel and may wrap
        self.wrap32 = frozenset(wrap32)
        self._raw: dict[Hashable, dict[str, int]] = {}
        self._total: dict[Hashable, dict[str, int]] = {}

    def update(self, key: Hashable, raw: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
        prev_raw = self._raw.get(key)
        prev_total = self._total.get(key)
        total: dict[str, int] = {}
        delta: dict[str, int] = {}
        for name, value in raw.items():
            if prev_raw is None or name not in prev_raw:
                d, t = 0, value
            else:
                old = prev_raw[name]
                if value >= old:
                    d = value - old
                elif name in self.wrap32 and old >= WRAP_32 // 2 and old < WRAP_32:
                    d = value + WRAP_32 - old
                else:
                    d = value
                t = prev_total[name] + d
            total[name] = t
            delta[name] = d
        self._raw[key] = dict(raw)
        self._total[key] = total
        return total, delta

    def forget(self, key: Hashable) -> None:
        """Drop a key (a socket or cgroup that went away)."""
        self._raw.pop(key, None)
        self._total.pop(key, None)

    def keys(self) -> list[Hashable]:
        return list(self._raw)
