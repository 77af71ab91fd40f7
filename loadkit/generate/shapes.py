"""Load shapes for any locustfile: steps, a spike/burst train, a daily pattern with a noon
spike, and a ramp that stops at the knee.

Each shape is plain data plus one :meth:`tick` (Locust's ``LoadTestShape`` contract): it returns
``(users, spawn_rate)`` for the current run time, or ``None`` to end the test. Shapes are pure
functions of time (and, for :class:`RampToKnee`, of the statistics it is shown), so they are unit
tested without running Locust: pass ``run_time_s`` to :meth:`users_at`.

To use one, subclass it in a locustfile and set the fields::

    class Shape(StepShape):
        steps = ((30, 100), (30, 200), (30, 400))

Open-loop DNS load does not come from users, so in a locustfile with the DNS users the base
query rate follows the shape instead: ``users_at(t)`` scaled so the shape's peak is
``--dns-rate`` (see :func:`loadkit.generate.dns.schedule.shape_rate`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

from locust import LoadTestShape

from loadkit.errors import ProfileError


class _Shape(LoadTestShape):
    abstract = True
    spawn_rate: float = 50.0
    """users started (or stopped) per second when the user count changes"""

    def users_at(self, run_time_s: float) -> int | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def tick(self) -> tuple[int, float] | None:
        users = self.users_at(self.get_run_time())
        if users is None:
            return None
        return users, self.spawn_rate


class StepShape(_Shape):
    """Hold each ``(duration_s, users)`` step in turn, then stop."""

    abstract = True
    steps: Sequence[tuple[float, int]] = ((30.0, 10), (30.0, 20), (30.0, 40))
    """``(duration in seconds, users)`` per step"""

    def users_at(self, run_time_s: float) -> int | None:
        elapsed = 0.0
        for duration_s, users in self.steps:
            elapsed += duration_s
            if run_time_s < elapsed:
                return int(users)
        return None


class SpikeTrainShape(_Shape):
    """``base_users`` with a spike to ``spike_users`` for ``spike_s`` every ``period_s``,
    the first at ``first_spike_s``; the test ends after ``duration_s``."""

    abstract = True
    base_users: int = 10
    spike_users: int = 100
    spike_s: float = 5.0
    period_s: float = 60.0
    first_spike_s: float = 10.0
    duration_s: float = 300.0
    spawn_rate: float = 1000.0
    """fast, so a spike arrives as a spike"""

    def users_at(self, run_time_s: float) -> int | None:
        if run_time_s >= self.duration_s:
            return None
        if run_time_s >= self.first_spike_s:
            into = (run_time_s - self.first_spike_s) % self.period_s
            if into < self.spike_s:
                return int(self.spike_users)
        return int(self.base_users)


class DailyShape(_Shape):
    """A day compressed into ``day_s`` seconds: a sinusoidal daily curve between
    ``night_users`` (at 04:00) and ``peak_users`` (at 16:00), plus a spike to ``spike_users``
    at ``spike_hour`` (12.5 = 12:30, the lunchtime spike that was visible for weeks before the
    DNS incident) lasting ``spike_minutes``. Runs ``days`` days."""

    abstract = True
    night_users: int = 10
    peak_users: int = 100
    spike_users: int = 300
    spike_hour: float = 12.5
    spike_minutes: float = 10.0
    day_s: float = 240.0
    """seconds of test per simulated day"""
    days: int = 1

    def hour_at(self, run_time_s: float) -> float:
        return (run_time_s % self.day_s) / self.day_s * 24.0

    def users_at(self, run_time_s: float) -> int | None:
        if run_time_s >= self.day_s * self.days:
            return None
        hour = self.hour_at(run_time_s)
        if self.spike_hour <= hour < self.spike_hour + self.spike_minutes / 60.0:
            return int(self.spike_users)
        # cosine with its minimum at 04:00 and maximum at 16:00
        level = (1 - math.cos((hour - 4.0) / 24.0 * 2 * math.pi)) / 2
        return int(round(self.night_users + (self.peak_users - self.night_users) * level))


class KneeCriteria(NamedTuple):
    """When a ramp has passed the knee: loss or latency above a limit for ``intervals_n``
    consecutive intervals."""

    max_loss_ratio: float = 0.05
    max_p99_s: float = 0.1
    intervals_n: int = 2


class KneePoint(NamedTuple):
    """The result of a ramp-to-knee run (resperf's "maximum throughput")."""

    max_throughput_rps: float  #: highest completed-and-successful rate seen in one interval
    offered_rps: float  #: offered rate in that interval
    loss_ratio: float  #: loss in that interval
    stopped_at_s: float  #: run time when the criteria fired (inf: never)
    reason: str  #: "loss", "latency" or "" when the ramp ended without reaching the knee


class KneeDetector:
    """Feed it per-interval figures; it says when the knee was passed and what the peak was.

    Used by :class:`RampToKnee` (from Locust's stats) and by the DNS flood's rate ramp (from the
    sender's interval reports)."""

    def __init__(self, criteria: KneeCriteria = KneeCriteria()) -> None:
        if not 0 < criteria.max_loss_ratio <= 1:
            raise ProfileError(f"knee loss limit {criteria.max_loss_ratio} must be in (0, 1]")
        if not criteria.max_p99_s > 0:
            raise ProfileError(f"knee p99 latency limit {criteria.max_p99_s} s must be > 0")
        if criteria.intervals_n < 1:
            raise ProfileError(f"knee interval count {criteria.intervals_n} must be >= 1")
        self.criteria = criteria
        self._bad = 0
        self._best: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.knee: KneePoint | None = None

    def observe(
        self, run_time_s: float, offered_rps: float, good_rps: float, loss_ratio: float, p99_s: float
    ) -> KneePoint | None:
        """One interval; returns the knee once the criteria have fired (then keeps returning it)."""
        if self.knee is not None:
            return self.knee
        reason = ""
        if loss_ratio > self.criteria.max_loss_ratio:
            reason = "loss"
        elif p99_s > self.criteria.max_p99_s:
            reason = "latency"
        if reason:
            self._bad += 1
        else:
            self._bad = 0
            if good_rps > self._best[0]:
                self._best = (good_rps, offered_rps, loss_ratio)
        if self._bad >= self.criteria.intervals_n:
            self.knee = KneePoint(*self._best, stopped_at_s=run_time_s, reason=reason)
        return self.knee

    def result(self, run_time_s: float = math.inf) -> KneePoint:
        """The knee, or the best interval seen when the ramp ended first."""
        return self.knee or KneePoint(*self._best, stopped_at_s=run_time_s, reason="")


class RampToKnee(_Shape):
    """Users rise linearly from ``start_users`` by ``users_per_s``; the test stops when failures
    or the 99th percentile pass :attr:`criteria` (read from Locust's stats each tick), or at
    ``max_users``/``max_s``. ``knee`` holds the result."""

    abstract = True
    start_users: int = 1
    users_per_s: float = 5.0
    max_users: int = 1000
    max_s: float = 600.0
    criteria: KneeCriteria = KneeCriteria()
    check_every_s: float = 2.0

    def reset_time(self) -> None:
        super().reset_time()
        self.detector = KneeDetector(self.criteria)
        self._last_check = (0.0, 0, 0)
        self.knee: KneePoint | None = None

    def users_at(self, run_time_s: float) -> int | None:
        if run_time_s >= self.max_s:
            return None
        return min(self.max_users, int(self.start_users + self.users_per_s * run_time_s))

    def tick(self) -> tuple[int, float] | None:
        run_time = self.get_run_time()
        if not hasattr(self, "detector"):
            self.reset_time()
        last_t, last_n, last_f = self._last_check
        if self.runner is not None and run_time - last_t >= self.check_every_s:
            total = self.runner.stats.total
            n, f = total.num_requests, total.num_failures
            dt = run_time - last_t
            done, failed = n - last_n, f - last_f
            loss = failed / done if done else 0.0
            p99_s = (total.get_current_response_time_percentile(0.99) or 0) / 1000.0
            self._last_check = (run_time, n, f)
            self.knee = self.detector.observe(run_time, done / dt, (done - failed) / dt, loss, p99_s)
            if self.knee is not None:
                return None
        users = self.users_at(run_time)
        return None if users is None else (users, self.spawn_rate)
