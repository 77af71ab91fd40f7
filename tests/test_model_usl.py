"""USL, latency knee and Little's law on synthetic data with known parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

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
    if res.kappa == 0:
        assert math.isinf(res.n_star)
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
