"""Headroom model: known memory-per-session recovered; first failure, cascade and CI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadkit.errors import ModelError
from loadkit.model import HeadroomResult, cascade, fit_headroom, headroom_points, huber_line
from loadkit.record.reader import load_run
from model_synth import T0, MiB, write_headroom_run


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


# ------------------------------------------------------------------------------------------------
# issue 11 item 5 / issue 17 item 13: each defect on its adversarial input
# ------------------------------------------------------------------------------------------------

CAP = (256 - 30) / 1.2  # sessions per synthetic proxy at its 256 MiB limit


def test_proxy_without_a_limit_is_never_dropped(tmp_path):
    # one proxy has a cgroup limit, two run without one: all three hold sessions
    proxies = {"p1": (30 * MiB, 1.2 * MiB, 256 * MiB), "p2": (30 * MiB, 1.2 * MiB, 0),
               "p3": (30 * MiB, 1.2 * MiB, 0)}
    write_headroom_run(tmp_path / "run", proxies=proxies, outliers=0)
    run = load_run(tmp_path / "run")
    with pytest.raises(ModelError, match="proxy p2 has no cgroup limit.*--limit-bytes"):
        fit_headroom(run)
    res = fit_headroom(run, limit_bytes=256 * MiB)
    assert [f.name for f in res.proxies] == ["p1", "p2", "p3"]
    assert [f.limit_source for f in res.proxies] == ["cgroup", "given", "given"]
    assert res.all_fail_sessions == pytest.approx(3 * CAP, rel=0.03)  # not 1 × CAP
    assert any("no cgroup limit recorded for p2, p3" in c for c in res.caveats)


def test_oom_kill_in_an_earlier_run_does_not_exclude_a_later_clean_run(tmp_path):
    write_headroom_run(tmp_path / "a", oom_kills_start=0, oom_at_sessions=60, run_id="a")
    # the cumulative counter stays at 1 for proxy1 all through the second, clean run
    write_headroom_run(tmp_path / "b", oom_kills_start=1, run_id="b", t0=T0 + 10_000, seed=5)
    runs = [load_run(tmp_path / "a"), load_run(tmp_path / "b")]
    pts = headroom_points(runs)
    b = pts[pts["run_id"] == "b"]
    assert b["in_fit"].all()  # compared with run b's own first sample
    a = pts[(pts["run_id"] == "a") & (pts["proxy"] == "proxy1")]
    assert not a.loc[a["sessions_n"] >= 62, "in_fit"].any()  # after run a's kill
    res = fit_headroom(runs)
    assert res.measured_first_failure_sessions == pytest.approx(3 * 50, abs=6)  # held before the kill
    assert "measured: first OOM kill" in res.summary()


def test_runs_from_different_labs_are_refused(tmp_path):
    write_headroom_run(tmp_path / "big", run_id="big")  # 3 × 256 MiB
    small = {f"proxy{i}": (10 * MiB, 1.2 * MiB, 64 * MiB) for i in (1, 2)}
    write_headroom_run(tmp_path / "small", proxies=small, run_id="small", max_sessions=30, step=3)
    with pytest.raises(ModelError, match=r"big \(3 proxies × 256 MiB\) and small \(2 proxies × 64 MiB\)"
                                         r" come from different labs"):
        fit_headroom([load_run(tmp_path / "big"), load_run(tmp_path / "small")])


def test_identical_proxies_are_pooled_and_the_interval_covers_the_truth(tmp_path):
    # the smallest of three noisy capacities is biased low; pooled, 3 × one line is not
    covered, errors = 0, []
    for seed in range(12):
        write_headroom_run(tmp_path / f"r{seed}", seed=seed, noise_bytes=2 * MiB, outliers=0)
        res = fit_headroom(load_run(tmp_path / f"r{seed}"), ci_draws=300, seed=seed)
        assert all(f.pooled for f in res.proxies)
        lo, hi = res.all_fail_ci95
        covered += lo <= 3 * CAP <= hi
        errors.append(res.all_fail_sessions / (3 * CAP) - 1)
    assert abs(float(np.mean(errors))) < 0.01  # min of three would be about 1.5 % low
    assert covered >= 10


def test_interval_grows_with_extrapolation_and_covers_a_curved_fall_over(tmp_path):
    # memory grows slightly faster than linearly: a fit on the first half misses the fall-over
    write_headroom_run(tmp_path / "run", max_sessions=100, curvature=0.06, noise_bytes=0.3 * MiB,
                       outliers=0)
    res = fit_headroom(load_run(tmp_path / "run"))
    s = np.arange(0, 400, 0.01)
    truth = 3 * s[np.argmax(30 + 1.2 * s * (1 + 0.06 * s / 100) >= 256)]
    assert res.all_fail_sessions > truth * 1.03  # the straight line over-predicts
    lo, hi = res.all_fail_ci95
    assert lo <= truth <= hi
    assert "fitted on up to 5" in res.summary() or "fitted on up to 4" in res.summary()
    assert "fitted on up to" in res.to_dict()["summary"]
    assert 0.4 < res.to_dict()["max_fraction_observed"] < 0.7
    assert any(c.startswith("extrapolated: fitted on up to") for c in res.caveats)


def test_sandwich_standard_errors_match_the_spread_of_huber_slopes():
    rng = np.random.default_rng(11)
    x = np.repeat(np.arange(0, 100, 10, dtype=float), 5)
    slopes, ses = [], []
    for _ in range(400):
        # heavy-ish tails: where the weighted-least-squares covariance comes out too small
        y = 5.0 + 2.0 * x + rng.standard_t(3, x.size) * 3.0
        beta, cov = huber_line(x, y)
        slopes.append(beta[1])
        ses.append(math.sqrt(cov[1, 1]))
    assert float(np.median(ses)) == pytest.approx(float(np.std(slopes)), rel=0.12)


def test_admission_totals_match_their_documentation(tmp_path):
    proxies = {"big": (30 * MiB, 1.0 * MiB, 1024 * MiB), "s1": (30 * MiB, 1.0 * MiB, 130 * MiB),
               "s2": (30 * MiB, 1.0 * MiB, 130 * MiB)}
    write_headroom_run(tmp_path / "run", proxies=proxies, outliers=0, noise_bytes=0.1 * MiB)
    res = fit_headroom(load_run(tmp_path / "run"), policy="weighted", weights={"big": 8, "s1": 1, "s2": 1})
    admits = {f.name: f.admission_limit_sessions for f in res.proxies}
    shares = {f.name: f.share for f in res.proxies}
    assert res.admission_limit_total_sessions == pytest.approx(min(admits[n] / shares[n] for n in admits))
    assert res.admission_limit_sum_sessions == pytest.approx(sum(admits.values()))
    # at the entrance limit no proxy passes its admission limit, and one reaches it
    loads = {n: shares[n] * res.admission_limit_total_sessions for n in admits}
    assert all(loads[n] <= admits[n] * (1 + 1e-9) for n in admits)
    # 8:1:1 at a forecast 10 % under the first failure: 4 proxies in that pattern, not 11
    fc = 0.9 * res.first_failure_sessions
    res = fit_headroom(load_run(tmp_path / "run"), policy="weighted", weights={"big": 8, "s1": 1, "s2": 1},
                       forecast_peak_sessions=fc)
    assert res.headroom_pct == pytest.approx(11.1, abs=0.2)
    assert res.proxies_needed_for_forecast == math.ceil(3 * fc / res.admission_limit_total_sessions) == 4


def test_proxies_needed_with_weights_the_heaviest_proxy_decides(tmp_path):
    write_headroom_run(tmp_path / "run", outliers=0)  # three equal proxies
    run = load_run(tmp_path / "run")
    equal = fit_headroom(run, forecast_peak_sessions=300)
    admit = equal.proxies[0].admission_limit_sessions
    assert equal.proxies_needed_for_forecast == math.ceil(300 / admit)
    w = fit_headroom(run, policy="weighted", weights={"proxy1": 8, "proxy2": 1, "proxy3": 1},
                     forecast_peak_sessions=0.9 * admit / 0.8)
    # proxy1 gets 80 %: it reaches its admission limit at admit / 0.8 in total
    heavy = w.proxies[0].admission_limit_sessions
    assert heavy == pytest.approx(admit, rel=0.01)
    assert w.admission_limit_total_sessions == pytest.approx(heavy / 0.8, rel=1e-6)
    assert w.proxies_needed_for_forecast == 3  # 3 × 0.9: the fleet as it is, nearly full


def test_n_plus_1_with_the_proxy_whose_loss_hurts_most_down(tmp_path):
    write_headroom_run(tmp_path / "eq", outliers=0)
    eq = fit_headroom(load_run(tmp_path / "eq"))
    assert eq.n_minus_1_sessions == pytest.approx(2 / 3 * eq.all_fail_sessions, rel=1e-6)
    lo, hi = eq.n_minus_1_ci95
    assert lo <= eq.n_minus_1_sessions <= hi
    assert "down (N+1) the others survive up to ≈ " in eq.summary()
    proxies = {"big": (30 * MiB, 1.0 * MiB, 1024 * MiB), "s1": (30 * MiB, 1.0 * MiB, 130 * MiB),
               "s2": (30 * MiB, 1.0 * MiB, 130 * MiB)}
    write_headroom_run(tmp_path / "w", proxies=proxies, outliers=0, noise_bytes=0.1 * MiB)
    w = fit_headroom(load_run(tmp_path / "w"), policy="weighted", weights={"big": 8, "s1": 1, "s2": 1})
    # big down: s1 and s2 take half each and fail at 2 × 100; s1 down leaves big + s2 at 900
    assert w.n_minus_1_proxy_down == "big"
    assert w.n_minus_1_sessions == pytest.approx(200, rel=0.02)
    back = HeadroomResult.from_json(w.to_json())
    assert back.n_minus_1_sessions == w.n_minus_1_sessions


def test_a_limited_group_without_sessions_is_named_not_dropped_silently(tmp_path):
    proxies = {"p1": (30 * MiB, 1.2 * MiB, 256 * MiB), "p2": (30 * MiB, 1.2 * MiB, 256 * MiB),
               "spare": (30 * MiB, 0.0, 256 * MiB)}
    write_headroom_run(tmp_path / "run", proxies=proxies, outliers=0)
    run = load_run(tmp_path / "run")
    run.groups.loc[run.groups["group"] == "spare", "sessions_n"] = 0
    res = fit_headroom(run)
    assert [f.name for f in res.proxies] == ["p1", "p2"]
    assert any(c.startswith("spare had a memory limit but held no sessions") for c in res.caveats)
