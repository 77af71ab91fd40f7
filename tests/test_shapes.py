"""Load shapes: tick() as a function of run time, and the knee detector."""

from __future__ import annotations

import pytest

from loadkit.errors import ProfileError
from loadkit.generate import shapes


class Steps(shapes.StepShape):
    steps = ((10, 5), (10, 50), (5, 20))


class Spikes(shapes.SpikeTrainShape):
    base_users = 10
    spike_users = 200
    spike_s = 2
    period_s = 30
    first_spike_s = 5
    duration_s = 100


class Day(shapes.DailyShape):
    night_users = 10
    peak_users = 110
    spike_users = 500
    spike_hour = 12.5
    spike_minutes = 30
    day_s = 240


def at(shape, t: float):
    shape.get_run_time = lambda: t  # tick() reads the run time from here
    return shape.tick()


def test_steps_hold_each_level_then_stop() -> None:
    s = Steps()
    assert [s.users_at(t) for t in (0, 9.9, 10, 19.9, 20, 24.9)] == [5, 5, 50, 50, 20, 20]
    assert s.users_at(25) is None
    assert at(s, 12) == (50, s.spawn_rate)
    assert at(s, 30) is None


def test_spike_train() -> None:
    s = Spikes()
    assert s.users_at(4.9) == 10
    assert s.users_at(5.0) == 200 and s.users_at(6.9) == 200
    assert s.users_at(7.0) == 10
    assert s.users_at(35.5) == 200
    assert s.users_at(100) is None


def test_daily_pattern_with_noon_spike() -> None:
    d = Day()
    hour_s = d.day_s / 24
    assert d.users_at(4 * hour_s) == 10  # night minimum at 04:00
    assert d.users_at(16 * hour_s) == 110  # peak at 16:00
    assert d.users_at(12.5 * hour_s + 1) == 500  # the 12:30 spike
    assert d.users_at(13.1 * hour_s) < 500
    assert 10 < d.users_at(10 * hour_s) < 110
    assert d.users_at(d.day_s) is None


def test_knee_detector_reports_the_best_interval_before_the_knee() -> None:
    k = shapes.KneeDetector(shapes.KneeCriteria(max_loss_ratio=0.05, max_p99_s=0.1, intervals_n=2))
    assert k.observe(1, 1000, 1000, 0.0, 0.001) is None
    assert k.observe(2, 2000, 1990, 0.005, 0.002) is None
    assert k.observe(3, 3000, 2500, 0.10, 0.002) is None  # one bad interval is not the knee
    assert k.observe(4, 3500, 2950, 0.01, 0.003) is None  # recovered
    assert k.observe(5, 4000, 2000, 0.5, 0.002) is None
    knee = k.observe(6, 4500, 1000, 0.01, 0.5)  # low loss, slow: latency
    assert knee is not None and knee.reason == "latency"
    assert knee.max_throughput_rps == 2950 and knee.offered_rps == 3500 and knee.loss_ratio == 0.01
    assert knee.stopped_at_s == 6
    assert k.observe(7, 5000, 0, 1.0, 1.0) is knee


def test_knee_detector_without_a_knee_and_bad_criteria() -> None:
    k = shapes.KneeDetector()
    k.observe(1, 100, 100, 0.0, 0.001)
    assert k.knee is None
    assert k.result(60).reason == "" and k.result(60).max_throughput_rps == 100
    with pytest.raises(ProfileError):
        shapes.KneeDetector(shapes.KneeCriteria(max_loss_ratio=0))


def test_ramp_to_knee_stops_on_failures_from_locust_stats() -> None:
    from locust.env import Environment

    class Ramp(shapes.RampToKnee):
        start_users = 1
        users_per_s = 10
        max_users = 500
        criteria = shapes.KneeCriteria(max_loss_ratio=0.1, max_p99_s=10.0, intervals_n=1)
        check_every_s = 1.0

    env = Environment(shape_class=None)
    env.create_local_runner()
    shape = Ramp()
    shape.runner = env.runner
    shape.reset_time()
    assert at(shape, 0.5) == (6, shape.spawn_rate)
    total = env.runner.stats.total
    total.num_requests = 1000
    assert at(shape, 1.0) == (11, shape.spawn_rate)  # no failures: keeps ramping
    total.num_requests, total.num_failures = 2000, 500
    assert at(shape, 2.0) is None  # 50 % of the interval failed: stop
    assert shape.knee.reason == "loss"
    assert shape.knee.max_throughput_rps == pytest.approx(1000)
