"""Headroom model: known memory-per-session recovered; first failure, cascade and CI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadkit.errors import ModelError
from loadkit.model import HeadroomResult, cascade, fit_headroom, huber_line
from loadkit.record.reader import load_run
from model_synth import MiB, write_headroom_run


def test_recovers_per_session_memory_and_all_fail_point(tmp_path):
    truth = write_headroom_run(tmp_path / "run")  # 3 × (30 MiB + 1.2 MiB/session), 256 MiB
    res = fit_headroom(load_run(tmp_path / "run"), forecast_peak_sessions=400)
    assert len(res.proxies) == 3
    for fit in res.proxies:
        base, per, limit = truth[fit.name]
        # tolerance: 2 % on the slope, 2 MiB on the base (noise 0.5 MiB, 3 outliers at +50 %)
        assert fit.bytes_per_session == pytest.approx(per, rel=0.02)
        assert fit.base_bytes == pytest.approx(base, abs=2 * MiB)
        assert fit.memory_source == "cgroup"
        assert fit.limit_bytes == limit
    true_cap = (256 - 30) / 1.2  # sessions per proxy at the limit
    # equal shares: all three reach the limit together; tolerance 3 %
    assert res.cascade_all_fail
    assert res.all_fail_sessions == pytest.approx(3 * true_cap, rel=0.03)
    assert res.first_failure_sessions == pytest.approx(res.all_fail_sessions, rel=1e-6)
    lo, hi = res.all_fail_ci95
    assert lo < res.all_fail_sessions < hi
    assert lo <= 3 * true_cap * 1.03 and hi >= 3 * true_cap * 0.97
    # admission limit keeps memory under 90 % of the limit
    for fit in res.proxies:
        mem = fit.base_bytes + fit.bytes_per_session * fit.admission_limit_sessions
        assert mem == pytest.approx(0.9 * fit.limit_bytes, rel=1e-9)
    assert res.headroom_pct == pytest.approx((res.first_failure_sessions / 400 - 1) * 100)
    assert res.proxies_needed_for_forecast == math.ceil(400 / min(f.admission_limit_sessions for f in res.proxies))
    assert res.summary().startswith("all 3 proxies fall over at ≈ ")
    assert "95 % CI" in res.summary()
    # extrapolation is visible: ramp went to ~100 of ~188 per proxy
    assert 0.4 < res.max_fraction_observed < 0.7


def test_summed_rss_is_never_used(tmp_path):
    # without a cgroup the model falls back to PSS (the synthetic RSS is 6× the charge)
    proxies = {f"p{i}": (30 * MiB, 1.2 * MiB, 0) for i in (1, 2)}
    write_headroom_run(tmp_path / "run", proxies=proxies, outliers=0)
    res = fit_headroom(load_run(tmp_path / "run"), limit_bytes=256 * MiB)
    for fit in res.proxies:
        assert fit.memory_source == "pss"
        assert fit.bytes_per_session == pytest.approx(1.2 * MiB, rel=0.03)
    with pytest.raises(ModelError, match="limit_bytes"):
        fit_headroom(load_run(tmp_path / "run"))


def test_weighted_policy_and_cascade_that_stops(tmp_path):
    # a big proxy and two small ones; weights 1:1:1 make the small ones fail first, and the big one
    # survives their reconnects until the total grows further
    proxies = {"big": (30 * MiB, 1.0 * MiB, 1024 * MiB), "s1": (30 * MiB, 1.0 * MiB, 130 * MiB),
               "s2": (30 * MiB, 1.0 * MiB, 130 * MiB)}
    write_headroom_run(tmp_path / "run", proxies=proxies, outliers=0, noise_bytes=0.1 * MiB)
    res = fit_headroom(load_run(tmp_path / "run"))
    assert res.first_failure_sessions == pytest.approx(300, rel=0.02)  # 3 × 100 sessions
    assert res.first_failure_proxy in ("s1", "s2")
    assert not res.cascade_all_fail
    assert res.all_fail_sessions == pytest.approx(994, rel=0.02)  # the big one alone: (1024-30)/1
    assert res.cascade_order[-1] == "big"
    assert res.summary().startswith("first proxy (s")
    # weights 8:1:1 send most sessions to the big proxy: the small ones fail at 10 × 100
    w = fit_headroom(load_run(tmp_path / "run"), policy="weighted", weights={"big": 8, "s1": 1, "s2": 1})
    assert w.first_failure_sessions == pytest.approx(1000, rel=0.02)
    assert w.cascade_all_fail  # the big one then holds 994 < 1000: it falls too
    with pytest.raises(ModelError, match="needs weights"):
        fit_headroom(load_run(tmp_path / "run"), policy="weighted")
    with pytest.raises(ModelError, match="unknown proxies"):
        fit_headroom(load_run(tmp_path / "run"), weights={"nope": 1})
    with pytest.raises(ModelError, match="policy"):
        fit_headroom(load_run(tmp_path / "run"), policy="random")


def test_cascade_reconnect_overhead_tips_survivors():
    caps = np.array([100.0, 120.0, 120.0])
    shares = np.full(3, 1 / 3)
    # at 300 sessions proxy 0 fails; survivors then hold 150 each > 120: all fall
    assert cascade(300.0, caps, shares) == [0, 1, 2]
    caps = np.array([100.0, 200.0, 200.0])
    assert cascade(300.0, caps, shares) == [0]  # survivors hold 150 < 200
    # half the lost clients hold a second half-open login while reconnecting: 175 < 200 still
    assert cascade(300.0, caps, shares, reconnect_overhead=0.5) == [0]
    assert cascade(300.0, caps, shares, reconnect_overhead=2.0) == [0, 1, 2]  # 250 > 200


def test_huber_line_ignores_outliers():
    rng = np.random.default_rng(0)
    x = np.arange(50, dtype=float)
    y = 5.0 + 2.0 * x + rng.normal(0, 0.1, 50)
    y[[5, 17, 33]] += 80.0
    beta, cov = huber_line(x, y)
    assert beta[1] == pytest.approx(2.0, abs=0.02)  # OLS would be pulled well off
    assert beta[0] == pytest.approx(5.0, abs=0.3)
    assert 0 < math.sqrt(cov[1, 1]) < 0.02


def test_json_round_trip(tmp_path):
    write_headroom_run(tmp_path / "run")
    res = fit_headroom(load_run(tmp_path / "run"), forecast_peak_sessions=500)
    back = HeadroomResult.from_json(res.to_json())
    assert back == res
    assert back.summary() == res.summary()
    assert isinstance(back.all_fail_ci95, tuple)


def test_too_little_data_is_a_model_error(tmp_path):
    write_headroom_run(tmp_path / "run", max_sessions=10, step=10, samples_per_step=1, outliers=0)
    with pytest.raises(ModelError, match="need >= 5 samples"):
        fit_headroom(load_run(tmp_path / "run"))
    with pytest.raises(ModelError, match="no runs"):
        fit_headroom([])
