"""Open-loop schedules: bursts of N in T ms, constant and Poisson rates, ramps, worker shares."""

from __future__ import annotations

import math

import pytest

from loadkit.errors import ProfileError
from loadkit.generate.dns import schedule


def test_burst_of_n_in_t_ms_every_p_seconds() -> None:
    b = schedule.BurstTrain(size_n=2000, window_s=0.010, period_s=5.0, first_s=2.0)
    assert b.due(1.999) == 0
    assert b.due(2.0) == 1
    assert b.due(2.005) == pytest.approx(1001, abs=1)  # half the window: half the burst
    assert b.due(2.010) == 2000
    assert b.due(6.99) == 2000  # nothing between bursts
    assert b.due(7.0) == 2001
    assert b.due(7.5) == 4000
    # time_of inverts due: query i is due exactly when due() passes i
    for i in (0, 1, 999, 1999, 2000, 3999):
        t = b.time_of(i)
        assert b.due(t) >= i + 1
        assert b.due(t - 1e-7) <= i
    assert b.time_of(1999) - b.time_of(0) < 0.010
    assert b.burst_of(1999) == 0 and b.burst_of(2000) == 1


def test_burst_with_zero_window_is_all_due_at_once_and_count_limits_it() -> None:
    b = schedule.BurstTrain(10000, 0.0, 1.0, first_s=0.5, count=2)
    assert b.due(0.5) == 10000
    assert b.due(1.5) == 20000
    assert b.due(100.0) == 20000
    assert b.time_of(20000) == math.inf


def test_constant_rate() -> None:
    c = schedule.ConstantRate(1000)
    assert c.due(0.0) == 1
    assert c.due(1.0) == 1001
    assert c.time_of(500) == pytest.approx(0.5)
    assert schedule.ConstantRate(0).due(10) == 0


def test_poisson_rate_mean_and_monotonic() -> None:
    p = schedule.PoissonRate(2000, seed=4)
    assert p.due(10.0) == pytest.approx(20000, rel=0.03)
    times = [p.time_of(i) for i in range(1000)]
    assert times == sorted(times)
    assert p.due(times[10]) == 11


def test_linear_ramp_counts_the_integral() -> None:
    r = schedule.LinearRamp(1000, 3000, 10.0)
    assert r.rate_at(5.0) == pytest.approx(2000)
    assert r.due(10.0) == 20000  # mean rate 2000 over 10 s
    assert r.due(11.0) == 23000  # then holds 3000
    for i in (0, 10, 9999, 19999, 21000):
        t = r.time_of(i)
        assert r.due(t + 1e-9) >= i + 1 > r.due(t - 1e-6)


def test_shares_split_rates_bursts_without_multiplying() -> None:
    c = schedule.ConstantRate(1000)
    assert sum(c.share(i, 3).rate_qps for i in range(3)) == pytest.approx(1000)
    b = schedule.BurstTrain(2001, 0.01, 5.0)
    assert [b.share(i, 2).size_n for i in range(2)] == [1001, 1000]
    r = schedule.LinearRamp(100, 1000, 10)
    assert r.share(1, 4).end_qps == 250


@pytest.mark.parametrize(
    "make",
    [
        lambda: schedule.ConstantRate(-1),
        lambda: schedule.PoissonRate(float("nan")),
        lambda: schedule.BurstTrain(-1, 0.01, 5),
        lambda: schedule.BurstTrain(10, 0.01, 0),
        lambda: schedule.BurstTrain(10, 6.0, 5.0),
        lambda: schedule.LinearRamp(10, 20, 0),
    ],
)
def test_bad_schedules_are_profile_errors(make) -> None:
    with pytest.raises(ProfileError):
        make()


def test_rate_curve_integrates_and_inverts() -> None:
    curve = schedule.RateCurve(lambda t: 1000.0 if t < 2 else (0.0 if t < 3 else (500.0 if t < 4 else None)))
    assert curve.due(1.0) == pytest.approx(1000, abs=1)
    assert curve.due(2.5) == pytest.approx(2000, abs=1)  # nothing during the zero stretch
    assert curve.due(4.0) == pytest.approx(2500, abs=1)
    assert curve.due(100.0) == curve.due(4.0)  # the curve ended
    assert 3.0 <= curve.time_of(2100) < 3.3
    assert curve.time_of(2600) == math.inf
    for i in (0, 500, 1999, 2001, 2400):
        t = curve.time_of(i)
        assert curve.due(t + 1e-9) >= i + 1 > curve.due(t - 1e-4)
    assert curve.share(0, 4).due(1.0) == pytest.approx(250, abs=1)


def test_shape_rate_follows_a_daily_shape_with_its_noon_spike() -> None:
    from loadkit.generate.shapes import DailyShape

    class Day(DailyShape):
        night_users, peak_users, spike_users = 10, 100, 400
        spike_hour, spike_minutes, day_s = 12.5, 30, 240

    curve = schedule.shape_rate(Day(), peak_qps=4000)
    assert curve.peak_qps == 4000 and curve.share(1, 2).peak_qps == 2000
    hour = 10.0  # 24 h in 240 s
    spike_s = 12.5 * hour
    in_spike = curve.due(spike_s + 2) - curve.due(spike_s + 1)
    night = curve.due(4 * hour + 1) - curve.due(4 * hour)
    assert in_spike == pytest.approx(4000, rel=0.02)  # the spike is the peak
    assert night == pytest.approx(100, rel=0.05)  # 10 of 400 users
    assert curve.time_of(10**9) == math.inf  # one day, then it ends
