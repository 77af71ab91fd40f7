"""Open-loop send schedules: how many queries are due by a time, whatever the replies do.

A schedule answers two questions for the sender: :meth:`due` — how many queries should have
left by ``t`` seconds after the start — and :meth:`time_of` — when query number ``i`` (0-based)
is due, so the sender can sleep until then. Replies never enter: a slow or dropping server
does not lower the offered load (no coordinated omission).

Rates and burst sizes are for the whole test; :meth:`share` gives one worker's part
(worker ``index`` of ``count``), so distributed mode splits the load instead of multiplying it.
"""

from __future__ import annotations

import bisect
import math
import random
from typing import Callable, Protocol

from loadkit.errors import ProfileError


#: float slack so that ``due(time_of(i)) > i`` despite rounding
_EPS = 1e-6


class Schedule(Protocol):
    def due(self, t_s: float) -> int: ...

    def time_of(self, i: int) -> float: ...

    def share(self, index: int, count: int) -> "Schedule": ...


def _split(n: int, index: int, count: int) -> int:
    """Worker ``index``'s part of ``n`` items dealt round-robin to ``count`` workers."""
    return n // count + (1 if index < n % count else 0)


class ConstantRate:
    """``rate_qps`` evenly spaced queries per second, starting at t=0."""

    def __init__(self, rate_qps: float) -> None:
        if not rate_qps >= 0 or math.isinf(rate_qps):
            raise ProfileError(f"rate {rate_qps} qps must be a number >= 0")
        self.rate_qps = float(rate_qps)

    def due(self, t_s: float) -> int:
        if t_s < 0 or self.rate_qps == 0:
            return 0
        return int(t_s * self.rate_qps + _EPS) + 1

    def time_of(self, i: int) -> float:
        return math.inf if self.rate_qps == 0 else i / self.rate_qps

    def share(self, index: int, count: int) -> ConstantRate:
        return ConstantRate(self.rate_qps / count)


class PoissonRate:
    """Queries at exponentially distributed gaps with mean ``1/rate_qps`` (a Poisson process)."""

    def __init__(self, rate_qps: float, seed: int | None = None) -> None:
        if not rate_qps >= 0 or math.isinf(rate_qps):
            raise ProfileError(f"rate {rate_qps} qps must be a number >= 0")
        self.rate_qps = float(rate_qps)
        self._seed = seed
        self._rng = random.Random(seed)
        self._times: list[float] = []
        self._next = 0.0

    def _extend_to(self, i: int) -> None:
        while len(self._times) <= i:
            self._next += self._rng.expovariate(self.rate_qps)
            self._times.append(self._next)

    def time_of(self, i: int) -> float:
        if self.rate_qps == 0:
            return math.inf
        self._extend_to(i)
        return self._times[i]

    def due(self, t_s: float) -> int:
        if self.rate_qps == 0 or t_s < 0:
            return 0
        # arrivals are generated lazily in order; bisect over what exists
        while not self._times or self._times[-1] <= t_s:
            self._extend_to(len(self._times) + 256)
        lo, hi = 0, len(self._times)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._times[mid] <= t_s:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def share(self, index: int, count: int) -> PoissonRate:
        seed = None if self._seed is None else self._seed * 1000 + index
        return PoissonRate(self.rate_qps / count, seed)


class LinearRamp:
    """Offered rate rising linearly from ``start_qps`` to ``end_qps`` over ``duration_s``, then
    holding ``end_qps`` (resperf's ramp)."""

    def __init__(self, start_qps: float, end_qps: float, duration_s: float) -> None:
        if not (start_qps >= 0 and end_qps >= 0):
            raise ProfileError(f"ramp rates {start_qps}..{end_qps} qps must be >= 0")
        if not duration_s > 0:
            raise ProfileError(f"ramp duration {duration_s} s must be > 0")
        self.start_qps = float(start_qps)
        self.end_qps = float(end_qps)
        self.duration_s = float(duration_s)

    def rate_at(self, t_s: float) -> float:
        if t_s >= self.duration_s:
            return self.end_qps
        return self.start_qps + (self.end_qps - self.start_qps) * max(t_s, 0.0) / self.duration_s

    def _cum(self, t_s: float) -> float:
        d = self.duration_s
        if t_s <= d:
            return self.start_qps * t_s + (self.end_qps - self.start_qps) * t_s * t_s / (2 * d)
        return self._cum(d) + self.end_qps * (t_s - d)

    def due(self, t_s: float) -> int:
        if t_s < 0:
            return 0
        return int(self._cum(t_s) + _EPS)

    def time_of(self, i: int) -> float:
        # invert the cumulative count: solve _cum(t) = i + 1 (the instant due() reaches i + 1)
        target = i + 1
        d, a, b = self.duration_s, self.start_qps, (self.end_qps - self.start_qps) / self.duration_s
        if target <= self._cum(d):
            if abs(b) < 1e-12:
                return target / a if a > 0 else math.inf
            disc = a * a + 2 * b * target
            return (-a + math.sqrt(max(disc, 0.0))) / b
        if self.end_qps == 0:
            return math.inf
        return d + (target - self._cum(d)) / self.end_qps

    def share(self, index: int, count: int) -> LinearRamp:
        return LinearRamp(self.start_qps / count, self.end_qps / count, self.duration_s)


class BurstTrain:
    """Bursts of ``size_n`` queries spread evenly over ``window_s`` (0: as fast as possible),
    one every ``period_s`` seconds, the first at ``first_s``; ``count`` bursts (0: unlimited)."""

    def __init__(
        self, size_n: int, window_s: float, period_s: float, first_s: float = 0.0, count: int = 0
    ) -> None:
        if size_n < 0:
            raise ProfileError(f"burst size {size_n} must be >= 0")
        if window_s < 0:
            raise ProfileError(f"burst duration {window_s * 1000:g} ms must be >= 0")
        if not period_s > 0:
            raise ProfileError(f"burst period {period_s} s must be > 0")
        if window_s > period_s:
            raise ProfileError(f"burst duration {window_s:g} s is longer than the burst period {period_s:g} s")
        if first_s < 0:
            raise ProfileError(f"first burst at {first_s} s must be >= 0")
        self.size_n = int(size_n)
        self.window_s = float(window_s)
        self.period_s = float(period_s)
        self.first_s = float(first_s)
        self.count = int(count)

    def start_of(self, k: int) -> float:
        """Planned start of burst ``k`` (seconds from the test start)."""
        return self.first_s + k * self.period_s

    def burst_of(self, i: int) -> int:
        """Which burst query number ``i`` belongs to."""
        return i // self.size_n if self.size_n else 0

    def due(self, t_s: float) -> int:
        if self.size_n == 0 or t_s < self.first_s:
            return 0
        k = int((t_s - self.first_s) // self.period_s)  # bursts started before this one
        if self.count and k >= self.count:
            return self.count * self.size_n
        into = t_s - self.start_of(k)
        if self.window_s == 0 or into >= self.window_s:
            part = self.size_n
        else:
            part = min(self.size_n, int(into / self.window_s * self.size_n + _EPS) + 1)
        return k * self.size_n + part

    def time_of(self, i: int) -> float:
        if self.size_n == 0:
            return math.inf
        k, j = divmod(i, self.size_n)
        if self.count and k >= self.count:
            return math.inf
        return self.start_of(k) + (j / self.size_n) * self.window_s

    def share(self, index: int, count: int) -> BurstTrain:
        return BurstTrain(_split(self.size_n, index, count), self.window_s, self.period_s, self.first_s, self.count)


class RateCurve:
    """Offered rate following any function of time, ``rate_at(t) -> qps`` (``None``: the curve
    has ended), integrated in ``step_s`` slices. Used to make the DNS rate follow a load shape
    (steps, spike train, daily pattern with its noon spike), see :func:`shape_rate`."""

    def __init__(self, rate_at: Callable[[float], float | None], step_s: float = 0.01,
                 scale: float = 1.0, peak_qps: float = 0.0) -> None:
        if not step_s > 0:
            raise ProfileError(f"rate curve step {step_s} s must be > 0")
        self._rate_at = rate_at
        #: the highest rate of the curve when known (sizes the sender's sockets)
        self.peak_qps = peak_qps * scale
        self.step_s = float(step_s)
        self.scale = float(scale)
        self._cum = [0.0]  # queries due by k * step_s
        self._ended = False

    def _rate(self, t_s: float) -> float | None:
        r = self._rate_at(t_s)
        if r is None:
            return None
        if not r >= 0 or math.isinf(r):
            raise ProfileError(f"rate curve gave {r} qps at {t_s:.2f} s (must be a number >= 0)")
        return r * self.scale

    def _extend(self, k: int) -> None:
        cum = self._cum
        while len(cum) <= k and not self._ended:
            r = self._rate((len(cum) - 0.5) * self.step_s)
            if r is None:
                self._ended = True
                break
            cum.append(cum[-1] + r * self.step_s)

    def due(self, t_s: float) -> int:
        if t_s <= 0:
            return 0
        k = int(t_s / self.step_s)
        self._extend(k + 1)
        cum = self._cum
        if k + 1 >= len(cum):
            return int(cum[-1] + _EPS)
        frac = (t_s - k * self.step_s) / self.step_s
        return int(cum[k] + (cum[k + 1] - cum[k]) * frac + _EPS)

    def time_of(self, i: int) -> float:
        target = i + 1
        cum = self._cum
        # extend until the curve reaches the target; a long zero stretch is fine, the end is not
        while cum[-1] < target and not self._ended:
            self._extend(len(cum) + 1000)
        if cum[-1] < target:
            return math.inf
        k = bisect.bisect_left(cum, target) - 1  # cum[k] < target <= cum[k + 1]
        k = max(k, 0)
        rise = cum[k + 1] - cum[k]
        return (k + (target - cum[k]) / rise) * self.step_s if rise > 0 else (k + 1) * self.step_s

    def share(self, index: int, count: int) -> RateCurve:
        return RateCurve(self._rate_at, self.step_s, self.scale / count, self.peak_qps / self.scale if self.scale else 0.0)


def shape_rate(shape: object, peak_qps: float, horizon_s: float = 86400.0) -> RateCurve:
    """A rate that follows a load shape's ``users_at(t)``, scaled so the shape's peak is
    ``peak_qps``: a daily pattern of users becomes a daily pattern of queries."""
    users_at = getattr(shape, "users_at")
    peak = 0
    t = 0.0
    while t < horizon_s:  # the shape's peak, sampled every 0.1 s until it ends
        u = users_at(t)
        if u is None:
            break
        peak = max(peak, u)
        t += 0.1
    if peak <= 0:
        raise ProfileError(f"load shape {type(shape).__name__} never has any users")
    return RateCurve(lambda t_s: None if (u := users_at(t_s)) is None else u * peak_qps / peak,
                     peak_qps=peak_qps)


class Nothing:
    """No queries (a part that is turned off)."""

    def due(self, t_s: float) -> int:
        return 0

    def time_of(self, i: int) -> float:
        return math.inf

    def share(self, index: int, count: int) -> Nothing:
        return self
