"""USL, latency knee and Little's law on synthetic data with known parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from loadkit.errors import ModelError
from loadkit.model import KneeResult, LittleResult, UslResult, fit_usl, fit_usl_run, latency_knee, littles_law_check, usl_throughput
from loadkit.record.reader import load_run
from model_synth import write_usl_run


def test_usl_recovers_known_parameters():
    sigma, kappa, lam = 0.05, 3e-4, 1200.0
    n = np.array([2, 4, 8, 16, 24, 32, 48, 64, 96, 128], dtype=float)  # X(1) deliberately not measured
    rng = np.random.default_rng(7)
    x = usl_throughput(n, sigma, kappa, lam) * (1 + rng.normal(0, 0.01, n.size))
    res = fit_usl(n, x)
    # tolerances (1 % noise): lambda 3 %, sigma 0.01 absolute, kappa 20 %, N* 10 %
    assert res.lambda_ == pytest.approx(lam, rel=0.03)
    assert res.sigma == pytest.approx(sigma, abs=0.01)
    assert res.kappa == pytest.approx(kappa, rel=0.2)
    assert res.n_star == pytest.approx(math.sqrt((1 - sigma) / kappa), rel=0.1)
    assert res.r_squared > 0.98
    assert all(0 < e < math.inf for e in res.stderrs.values())
    # the truth is within 3 standard errors
    assert abs(res.sigma - sigma) < 3 * res.sigma_stderr + 1e-3


def test_usl_no_coherency_gives_infinite_n_star_and_json_round_trip():
    n = np.array([1, 2, 4, 8, 16, 32, 64], dtype=float)
    x = usl_throughput(n, 0.1, 0.0, 100.0)
    res = fit_usl(n, x)
    assert res.kappa < 1e-6
    # no coherency cost measured: no peak is claimed, whatever tiny kappa the fit lands on
    assert not res.kappa_significant and math.isinf(res.n_star)
    assert "no retrograde region measured" in res.summary()
    back = UslResult.from_json(res.to_json())
    assert back.sigma == res.sigma and back.points_n == res.points_n
    assert (math.isinf(res.n_star) and math.isnan(back.n_star)) or back.n_star == res.n_star


def test_usl_refuses_fewer_than_six_levels():
    with pytest.raises(ModelError, match=">= 6 distinct"):
        fit_usl([1, 2, 4, 8, 16, 16, 16], [1, 2, 3, 4, 5, 5, 5])
    with pytest.raises(ModelError, match="differ in length"):
        fit_usl([1, 2], [1])


def test_usl_from_a_recorded_run(tmp_path):
    write_usl_run(tmp_path / "run", sigma=0.03, kappa=2e-4, lambda_=900.0)
    res = fit_usl_run(load_run(tmp_path / "run"))
    # requests_n is rounded to whole requests per 2 s interval: tolerances 5 % / 0.01 / 25 %
    assert res.lambda_ == pytest.approx(900.0, rel=0.05)
    assert res.sigma == pytest.approx(0.03, abs=0.01)
    assert res.kappa == pytest.approx(2e-4, rel=0.25)


def test_latency_knee_found_within_tolerance():
    c = np.arange(1, 101, dtype=float)
    # flat 10 ms until 60, then +2 ms per unit of load
    lat = 0.010 + 0.00002 * c + np.where(c > 60, 0.002 * (c - 60), 0.0)
    lat *= 1 + np.random.default_rng(3).normal(0, 0.01, c.size)
    res = latency_knee(c, lat)
    assert res.knee_concurrency == pytest.approx(60, abs=3)  # tolerance 3 units
    assert res.slope_after_s == pytest.approx(0.00202, rel=0.1)
    assert KneeResult.from_json(res.to_json()) == res
    with pytest.raises(ModelError):
        latency_knee([1, 2, 3], [1, 2, 3])


def test_littles_law_consistent_run_and_inconsistent_one(tmp_path):
    write_usl_run(tmp_path / "run")
    run = load_run(tmp_path / "run")
    ok = littles_law_check(run)
    assert ok.consistent and ok.ratio_median == pytest.approx(1.0, abs=0.05)
    assert LittleResult.from_json(ok.to_json()) == ok
    # with a 1 s think time the same run does not add up: users spent time the stats did not see
    bad = littles_law_check(run, think_time_s=1.0)
    assert not bad.consistent and bad.ratio_median < 0.5
    assert "INCONSISTENT" in bad.summary()


# ------------------------------------------------------------------------------------------------
# issue 11 item 4: weights, t intervals, N* only when kappa is measured
# ------------------------------------------------------------------------------------------------

LEVELS = np.array([1, 2, 4, 8, 12, 16, 24, 32, 48, 64], dtype=float)


def test_flat_data_reports_no_retrograde_region_not_a_peak():
    # throughput flat at every level, and a contention-only (Amdahl) curve: kappa not measurable
    rng = np.random.default_rng(0)  # before weights and a significance test: "peak at N* ≈ 6"
    flat = 800.0 * (1 + rng.normal(0, 0.02, LEVELS.size))
    amdahl = usl_throughput(LEVELS, 0.1, 0.0, 200.0) * (1 + rng.normal(0, 0.02, LEVELS.size))
    for x in (flat, amdahl):
        res = fit_usl(LEVELS, x)
        assert not res.kappa_significant
        assert math.isinf(res.n_star)
        assert "no retrograde region measured" in res.summary()
        assert "N* ≈" not in res.summary()
    back = UslResult.from_json(res.to_json())
    assert back.kappa_significant is False and math.isnan(back.n_star)


def test_falling_data_clamps_n_star_to_one():
    x = 1000.0 / LEVELS**0.5  # throughput falls from the first level
    res = fit_usl(LEVELS, x * (1 + np.random.default_rng(1).normal(0, 0.01, LEVELS.size)))
    assert res.kappa_significant
    assert res.n_star >= 1.0 and res.n_star_clamped
    assert res.n_star_ci95[0] >= 1.0
    assert "N* = 1 (clamped)" in res.summary()


def test_intervals_are_t_quantiles_and_n_star_has_one():
    sigma, kappa, lam = 0.05, 3e-4, 1200.0
    rng = np.random.default_rng(3)
    x = usl_throughput(LEVELS * 2, sigma, kappa, lam) * (1 + rng.normal(0, 0.03, LEVELS.size))
    res = fit_usl(LEVELS * 2, x)
    q = stats.t.ppf(0.975, LEVELS.size - 3)
    lo, hi = res.kappa_ci95
    assert (hi - lo) / 2 == pytest.approx(q * res.kappa_stderr, rel=1e-9)
    assert res.dof == LEVELS.size - 3
    assert res.kappa_significant
    nlo, nhi = res.n_star_ci95
    assert 1 <= nlo < res.n_star < nhi
    assert "95 % CI" in res.summary()


def test_relative_weights_give_kappa_intervals_that_cover():
    # 5 % multiplicative noise: unweighted, ±1.96 SE covered kappa about 77 % of the time
    sigma, kappa, lam = 0.02, 1e-3, 500.0
    rng = np.random.default_rng(2)
    n = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48], dtype=float)
    covered = 0
    for _ in range(200):
        x = usl_throughput(n, sigma, kappa, lam) * (1 + rng.normal(0, 0.05, n.size))
        lo, hi = fit_usl(n, x).kappa_ci95
        covered += lo <= kappa <= hi
    assert covered / 200 >= 0.9


def test_summary_puts_the_measured_peak_beside_the_model():
    n = np.array([1, 2, 4, 8, 16, 32, 64], dtype=float)
    x = usl_throughput(n, 0.05, 5e-4, 100.0)
    res = fit_usl(n, x)
    assert res.max_throughput_observed == pytest.approx(x.max())
    assert res.concurrency_at_max_observed == n[int(np.argmax(x))]
    assert f"measured max {x.max():.4g}/s at N = {n[int(np.argmax(x))]:.0f}" in res.summary()
