"""Retry amplification, the retry loop's stable states and the metastability verdict, on
simulated runs and on the adversarial inputs that fooled a threshold rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loadkit.errors import ModelError
from loadkit.model import LoopStates, MetastabilityResult, metastability, retry_amplification, retry_loop_states
from loadkit.model.retries import capacity_loss, measured_loss
from loadkit.partfiles import PartWriter
from loadkit.record.reader import load_run
from loadkit.schema import RUN_LAYOUT, GeneratorMetric

T0 = 1_764_000_000.0


def write_rates(run_dir, original, retry, answered, *, events=(), interval_s=1.0):
    """A run whose generator counters follow the given per-interval rates (queries/s)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_LAYOUT["manifest"]).write_text(json.dumps(dict(
        run_id=run_dir.name, scenario="dns_trigger", release="synthetic", status="completed", started_unix_s=T0,
        ended_unix_s=T0 + len(original) * interval_s, profile={}, targets=[], versions={}, host={}, lab={}, gates=[])))
    gen = PartWriter(run_dir / RUN_LAYOUT["generator"])
    c = np.zeros(3)
    gen.extend([GeneratorMetric(T0, m, "counter", 0.0) for m in ("dns.original_sent", "dns.retry_sent", "dns.answered")])
    for k, rates in enumerate(zip(original, retry, answered)):
        c += np.array(rates) * interval_s
        ts = T0 + (k + 1) * interval_s
        gen.extend([GeneratorMetric(ts, "dns.original_sent", "counter", float(c[0])),
                    GeneratorMetric(ts, "dns.retry_sent", "counter", float(c[1])),
                    GeneratorMetric(ts, "dns.answered", "counter", float(c[2]))])
    gen.flush()
    (run_dir / RUN_LAYOUT["events"]).write_text("".join(json.dumps(e) + "\n" for e in events))
    return load_run(run_dir)


def simulate(run_dir, *, collapse: bool, base_qps=1000.0, trigger_qps=4000.0, capacity_qps=2500.0,
             retries_per_drop=0.5, before_s=30, trigger_s=20, after_s=60, events=()):
    """Offered = original + retries of the previous second's drops; the server answers up to its
    capacity, which collapses to 30 % under overload when ``collapse`` (drops that cost work)."""
    rng = np.random.default_rng(3)
    orig, retry, ans = [], [], []
    pending, overloaded = 0.0, False
    for k in range(before_s + trigger_s + after_s):
        o = (trigger_qps if before_s <= k < before_s + trigger_s else base_qps) * (1 + rng.normal(0, 0.01))
        offered = o + pending
        cap = capacity_qps * (0.3 if collapse and overloaded else 1.0)
        a = min(offered, cap)
        overloaded = offered - a > 0.05 * offered
        orig.append(o), retry.append(pending), ans.append(a)
        pending = (offered - a) * retries_per_drop
    run = write_rates(run_dir, orig, retry, ans, events=events)
    return run, T0 + before_s, T0 + before_s + trigger_s


def test_amplification_matches_the_simulation(tmp_path):
    run, start, end = simulate(tmp_path / "run", collapse=False)
    amp = retry_amplification(run)
    assert amp[amp.index <= start]["amplification"].to_numpy() == pytest.approx(1.0)
    # 4000/s against 2500/s, half the drops retried: drops settle at 3000/s, offered 5500 -> 1.375×
    late = amp[(amp.index > start + 10) & (amp.index <= end)]
    assert late["amplification"].median() == pytest.approx(1.375, rel=0.02)
    assert late["answered_qps"].median() == pytest.approx(2500, rel=0.01)


def test_recovery_and_metastability_on_the_simulation(tmp_path):
    run, start, end = simulate(tmp_path / "ok", collapse=False)
    ok = metastability(run, end)
    assert ok.verdict == "recovers" and 0 <= ok.recovery_s <= 3.0
    run, start, end = simulate(tmp_path / "stuck", collapse=True)
    stuck = metastability(run, end)
    assert stuck.verdict == "metastable", stuck.summary()
    assert stuck.loop is not None and stuck.loop.second_stable_state
    assert stuck.post_amplification > 1.2 and stuck.post_goodput_ratio < 0.8 and stuck.recovery_s is None
    run, start, end = simulate(tmp_path / "calm", collapse=False, trigger_qps=2000.0)
    assert metastability(run, end).verdict == "stable"


def test_constant_retries_on_a_lossy_path_are_the_baseline_not_metastability(tmp_path):
    # 20 % of every attempt is lost, each loss retried: 1.25× all along, nothing changes
    n = 90
    run = write_rates(tmp_path / "lossy", [1000.0] * n, [250.0] * n, [1000.0] * n)
    res = metastability(run, T0 + 50, trigger_start_unix_s=T0 + 30)
    assert res.verdict == "stable", res.summary()
    assert res.baseline_amplification == pytest.approx(1.25)
    assert res.loop is not None and not res.loop.second_stable_state
    assert res.loop.low_amplification == pytest.approx(1.25, rel=0.02)


def test_healthy_recovery_followed_by_idle_seconds_recovers(tmp_path):
    run, start, end = simulate(tmp_path / "run", collapse=False, after_s=20)
    amp = retry_amplification(run)
    a = amp[["original_qps", "retry_qps", "answered_qps"]].to_numpy()
    idle = np.vstack([a, np.zeros((3, 3))])  # the load stopped 3 s before the record did
    run = write_rates(tmp_path / "idle", idle[:, 0], idle[:, 1], idle[:, 2])
    res = metastability(run, end)
    assert res.verdict == "recovers", res.summary()


def _drain(tmp_path, name, after_s):
    # after the trigger, retries fall slowly and steadily: 3× down to 1× over 300 s
    before, trig = 30, 10
    orig = [1000.0] * (before + trig + after_s)
    retry = [0.0] * before + [2000.0] * trig + [2000.0 * max(0.0, 1 - k / 300) for k in range(after_s)]
    ans = [1000.0] * before + [1500.0] * trig + [1000.0 * (1 - 0.5 * max(0.0, 1 - k / 300)) for k in range(after_s)]
    return write_rates(tmp_path / name, orig, retry, ans), T0 + before + trig


def test_slow_steady_drain_is_not_recovered_yet_and_falling(tmp_path):
    run, end = _drain(tmp_path, "d60", 60)
    res = metastability(run, end)
    assert res.verdict == "not_recovered" and res.trend == "falling", res.summary()
    assert "not recovered within the window" in res.summary() and "falling" in res.summary()
    # a longer window sees the end of it
    run, end = _drain(tmp_path, "d400", 400)
    assert metastability(run, end).verdict == "recovers"


def test_demand_never_back_to_baseline_says_so(tmp_path):
    orig = [1000.0] * 30 + [4000.0] * 10 + [2500.0] * 30  # the trigger's demand stays up
    retry = [0.0] * 30 + [1000.0] * 10 + [500.0] * 30
    ans = [1000.0] * 30 + [2500.0] * 40
    res = metastability(write_rates(tmp_path / "run", orig, retry, ans), T0 + 40)
    assert res.verdict == "demand_not_back" and "never returned to its baseline" in res.summary()


def test_trigger_from_burst_events_without_trigger_end(tmp_path):
    # a burst_retry_storm-like run: bursts, then none; no phase events, no --trigger-end
    bursts = [{"ts_unix_s": T0 + t, "kind": "burst", "source": "dns",
               "detail": {"burst_index": i, "first_sent_unix_s": T0 + t, "last_sent_unix_s": T0 + t + 0.01,
                          "window_s": 0.01, "sent_n": 2000}} for i, t in enumerate((5.2, 10.2, 15.2))]
    orig = [1000.0] * 30
    retry = [0.0] * 6 + [300.0] + [0.0] * 4 + [300.0] + [0.0] * 4 + [300.0] + [0.0] * 13
    ans = [1000.0] * 30
    res = metastability(write_rates(tmp_path / "run", orig, retry, ans, events=bursts))
    assert res.trigger_source == "burst events"
    assert res.trigger_start_unix_s == T0 + 5.2 and res.trigger_end_unix_s == pytest.approx(T0 + 15.21)
    assert res.verdict in ("recovers", "stable")
    assert MetastabilityResult.from_json(res.to_json()) == res


def test_retry_loop_states_fixed_points():
    # kept per query: anything that still answers 2,500/s in time when overloaded has one state
    # at 1,000/s of demand, however many retries (every timely answer ends a query)
    for retries in (1, 2, 5, 20):
        one = retry_loop_states(1000, retries, capacity_loss(2500), peak_offered_qps=6000)
        assert not one.second_stable_state, (retries, one)
        assert one.low_offered_qps == pytest.approx(1000) and one.high_offered_qps == pytest.approx(1000, rel=0.01)
        assert one.cap_qps == pytest.approx(1000 * (1 + retries))  # every query at its last attempt
    # a server whose timely goodput collapses to 750/s once offered more than 1,500/s (work spent
    # on answers that come too late): with 3 retries the loop holds x = 1000 (1 + p + p^2 + p^3),
    # p = 1 - 750 / x, near 2,560/s, a second state; the demand alone stays at 1,000/s
    def collapse(x: float) -> float:
        return 0.0 if x <= 1500 else 1.0 - 750.0 / x

    two = retry_loop_states(1000, 3, collapse, peak_offered_qps=6000)
    assert two.second_stable_state and two.low_offered_qps == pytest.approx(1000)
    p = 1 - 750 / two.high_offered_qps
    assert two.high_offered_qps == pytest.approx(1000 * (1 + p + p * p + p ** 3), rel=1e-6)
    assert 2400 < two.high_offered_qps < 2700 and "two stable states" in two.summary()
    assert LoopStates.from_json(two.to_json()) == two
    # without retries there is no loop: the same server drains
    assert not retry_loop_states(1000, 0, collapse, peak_offered_qps=6000).second_stable_state
    # a retry budget of 5 % caps offered load at 1,050/s, under the collapse: one state
    assert not retry_loop_states(1000, 3, collapse, peak_offered_qps=6000, cap_qps=1050).second_stable_state
    # a constant 20 % loss, two retries: 1 + 0.2 + 0.04 = 1.24 attempts a query
    flat = retry_loop_states(1000, 2, lambda x: 0.2, peak_offered_qps=5000)
    assert flat.low_offered_qps == pytest.approx(1240) and not flat.second_stable_state
    with pytest.raises(ModelError, match="original demand"):
        retry_loop_states(0, 1, lambda x: 0.0, peak_offered_qps=1)


def test_measured_loss_is_monotone_and_extends_as_a_capacity():
    x = np.array([500, 1000, 2000, 3000, 4000.0])
    a = np.array([500, 1000, 1900, 2000, 2000.0])
    loss = measured_loss(x, a, bins=4)
    assert loss(500) == pytest.approx(0.0, abs=0.01)
    assert all(loss(v) <= loss(v + 100) + 1e-12 for v in range(500, 8000, 250))
    assert loss(8000) == pytest.approx(1 - 2000 / 8000, abs=0.02)


def test_too_short_or_no_counters_is_a_model_error(tmp_path):
    run, start, end = simulate(tmp_path / "run", collapse=False, after_s=2)
    with pytest.raises(ModelError, match="after the trigger"):
        metastability(run, end)
    (tmp_path / "empty").mkdir()
    empty = write_rates(tmp_path / "empty", [], [], [])
    import shutil

    shutil.rmtree(tmp_path / "empty" / RUN_LAYOUT["generator"])
    empty = load_run(tmp_path / "empty")
    with pytest.raises(ModelError, match="dns.original_sent"):
        retry_amplification(empty)


def test_cli_fit_retries_finds_the_trigger_in_the_burst_events(tmp_path, capsys):
    from loadkit.cli import main

    # like a run of scenarios/burst_retry_storm.toml: bursts with retries after each, then calm
    bursts = [{"ts_unix_s": T0 + t, "kind": "burst", "source": "dns",
               "detail": {"burst_index": i, "first_sent_unix_s": T0 + t, "last_sent_unix_s": T0 + t + 0.01,
                          "window_s": 0.01, "sent_n": 2000}} for i, t in enumerate((5.5, 10.5, 15.5))]
    orig = [1000.0] * 5 + [3000.0, 1000.0, 1000.0, 1000.0, 1000.0] * 3 + [1000.0] * 15
    retry = [0.0] * 5 + [0.0, 1700.0, 0.0, 0.0, 0.0] * 3 + [0.0] * 15
    ans = [1000.0] * 5 + [1300.0, 2700.0, 1000.0, 1000.0, 1000.0] * 3 + [1000.0] * 15
    write_rates(tmp_path / "storm", orig, retry, ans, events=bursts)
    assert main(["fit", "retries", str(tmp_path / "storm")]) == 0
    assert capsys.readouterr().out.startswith("recovers")


def test_a_burst_train_without_room_after_it_is_judged_between_bursts(tmp_path):
    # bursts every 5 s to the end of the run (like burst_retry_storm's 30 s): 1 s after the last
    times = (3.2, 8.2, 13.2, 18.2, 23.2, 28.2)
    bursts = [{"ts_unix_s": T0 + t, "kind": "burst", "source": "dns",
               "detail": {"burst_index": i, "first_sent_unix_s": T0 + t, "last_sent_unix_s": T0 + t + 0.01,
                          "window_s": 0.01, "sent_n": 3000}} for i, t in enumerate(times)]

    def train(tail_retry, tail_answered=1000.0):
        orig, retry, ans = [1000.0] * 3, [0.0] * 3, [1000.0] * 3
        for _ in times:  # burst second, retries of it, then calm (or not) to the next burst
            orig += [4000.0, 1000.0, 1000.0, 1000.0, 1000.0]
            retry += [0.0, 1500.0, 300.0, tail_retry, tail_retry]
            ans += [2500.0, 2500.0, 1300.0, tail_answered, tail_answered]
        return orig[:30], retry[:30], ans[:30]

    ok = metastability(write_rates(tmp_path / "ok", *train(0.0), events=bursts))
    assert ok.judged_on == "between bursts" and ok.verdict == "recovers", ok.summary()
    assert "recovers" in ok.summary() and "after each burst" in ok.summary()
    # at every gap's end 1,000/s of retries and only 600/s answered (70 % of 2,000/s lost): with 2
    # retries a query that costs 1 + 0.7 + 0.49 attempts, the load that loses so much holds itself
    stuck = metastability(write_rates(tmp_path / "stuck", *train(1000.0, 600.0), events=bursts))
    assert stuck.verdict == "metastable" and "between bursts" in stuck.summary(), stuck.summary()


def test_the_models_take_the_generators_defaults_for_options_a_run_did_not_record(tmp_path):
    import subprocess
    import sys

    from loadkit.model.retries import DNS_OPTION_DEFAULTS, dns_options

    # the generator's own defaults, read in a process of its own (importing Locust here, after
    # other tests imported ssl, would make gevent's late monkey-patching recurse)
    code = ("import json; from loadkit.generate.dns.users import DnsSettings as S; b = S(); "
            "print(json.dumps({'dns-retries': b.retries, 'dns-timeout': b.timeout_s, 'dns-backoff': b.backoff, "
            "'dns-port-policy': b.port_policy, 'dns-retry-budget': b.retry_budget}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert DNS_OPTION_DEFAULTS == json.loads(out.stdout.strip().splitlines()[-1])
    run, _, end = simulate(tmp_path / "run", collapse=False)
    opts = dns_options(run)  # the simulated run records no options
    assert (opts.retries_n, opts.timeout_s, opts.retry_budget) == (2, 1.0, None)
    assert opts.horizon_s == pytest.approx(7.0)  # 1 + 2 + 4 s
    res = metastability(run, end)
    assert any("generator's defaults taken (dns-retries = 2" in c for c in res.caveats), res.caveats
    # recorded options win; a budget of 0 is no budget (as for the generator), a positive one caps
    run.manifest["profile"] = {"load": {"options": {"dns-retries": 5, "dns-timeout": "0.5", "dns-retry-budget": 0}}}
    opts = dns_options(run)
    assert (opts.retries_n, opts.timeout_s, opts.retry_budget) == (5, 0.5, None)
    assert opts.defaulted == ("dns-backoff", "dns-port-policy")
    run.manifest["profile"]["load"]["options"]["dns-retry-budget"] = 0.1
    assert dns_options(run).retry_budget == pytest.approx(0.1)


def test_a_trigger_whose_own_interval_looks_healthy_but_is_followed_by_silence_recovers_not_stable(tmp_path):
    # a burst into a deep queue: its own interval is answered (what came before it), then every
    # answer comes past the clients' timeout for 10 s while the queue drains (a real unbound at 0.02
    # core behind a 16 MiB buffer did this for 30 s): not "stable", it recovers
    orig = [1000.0] * 40
    answered = [1000.0] * 11 + [0.0] * 10 + [1000.0] * 19
    run = write_rates(tmp_path / "deep", orig, [0.0] * 40, answered)
    res = metastability(run, T0 + 11, trigger_start_unix_s=T0 + 10)
    assert res.verdict == "recovers" and res.recovery_s == pytest.approx(10.0, abs=1.0), res.summary()


def test_a_plateau_with_a_negligible_fitted_slope_is_flat_not_a_slow_drain(tmp_path):
    # the holding firewall scenario on the lab: 4.00× ± 0.1 for a minute after the burst, nothing
    # answered; the noise fitted a significant slope of -0.002×/s (back in ~1,500 s): a plateau
    rng = np.random.default_rng(7)
    before, after = 20, 60
    orig = [1200.0] * (before + 1 + after)
    retry = [0.0] * before + [18000.0] + [3600.0 * (1 - 0.0005 * k) + rng.normal(0, 10) for k in range(after)]
    ans = [1200.0] * before + [1100.0] + [0.0] * after
    run = write_rates(tmp_path / "plateau", orig, retry, ans)
    run.manifest["profile"] = {"load": {"options": {"dns-retries": 3}}}  # 4 attempts a query at most
    res = metastability(run, T0 + before + 1, trigger_start_unix_s=T0 + before)
    assert res.verdict == "metastable" and res.trend == "flat", res.summary()
    assert any("taken as flat" in c for c in res.caveats), res.caveats


def test_a_state_at_the_clients_limit_holds_despite_the_counters_jitter(tmp_path):
    # every query at its last attempt (3 retries: 4×), nothing answered; the counters read 4.06×
    # (an original counted in the next interval), a touch above what 3 retries can offer
    before, after = 20, 40
    orig = [1000.0] * (before + 1 + after)
    retry = [0.0] * before + [15000.0] + [3060.0] * after
    ans = [1000.0] * before + [900.0] + [0.0] * after
    run = write_rates(tmp_path / "limit", orig, retry, ans)
    run.manifest["profile"] = {"load": {"options": {"dns-retries": 3}}}
    res = metastability(run, T0 + before + 1, trigger_start_unix_s=T0 + before)
    assert res.verdict == "metastable" and res.loop.second_stable_state, res.summary()
    assert res.loop.high_amplification == pytest.approx(4.0)


def _slow_plateau(run_dir, bursts_at_s, end_s):
    """1,200/s for 20 s, then after the first burst a plateau at about 4× with nothing answered,
    falling 2 q/s of retries a second (a fitted slope that would take half an hour to drain),
    with a burst at each of ``bursts_at_s``; the run ends at ``end_s``."""
    bursts = [{"ts_unix_s": T0 + t, "kind": "burst", "source": "dns",
               "detail": {"burst_index": i, "first_sent_unix_s": T0 + t, "last_sent_unix_s": T0 + t + 0.01,
                          "window_s": 0.01, "sent_n": 3000}} for i, t in enumerate(bursts_at_s)]
    orig, retry, ans = [], [], []
    for k in range(end_s):  # the interval (k, k + 1]
        burst = any(k <= t < k + 1 for t in bursts_at_s)
        orig.append(1200.0 + (3000.0 if burst else 0.0))
        plateau = k > bursts_at_s[0]
        retry.append(3600.0 - 2.0 * (k - bursts_at_s[0]) + (1.0 if k % 2 else -1.0) if plateau else 0.0)
        ans.append(0.0 if plateau else 1200.0)
    run = write_rates(run_dir, orig, retry, ans, events=bursts)
    run.manifest["profile"] = {"load": {"options": {"dns-retries": 3}}}  # 4 attempts a query at most
    return run


def test_a_slow_plateau_gets_one_judgement_between_bursts_and_after_the_trigger(tmp_path):
    # the same plateau judged after one burst (a long run after it) and between bursts (a train
    # that ends 1.5 s after its last burst): a fall that would take more than DRAIN_HORIZON
    # judged windows is flat in both, so both are metastable (the gaps' ends once read "falling",
    # so "not recovered", beside "metastable" after the trigger)
    after = metastability(_slow_plateau(tmp_path / "after", [20.2], 81))
    gaps = metastability(_slow_plateau(tmp_path / "gaps", [20.2, 30.2, 40.2, 50.2, 60.2, 70.2, 80.2], 82))
    assert after.judged_on == "after the trigger" and gaps.judged_on == "between bursts"
    for res in (after, gaps):
        assert res.verdict == "metastable" and res.trend == "flat", res.summary()
        assert res.trend_amplification_per_s < 0
        assert any("taken as flat" in c for c in res.caveats), res.caveats


@pytest.mark.parametrize("interval_s, trigger_start_s, span_s", [(2.0, None, 2.0), (1.0, 1.98, 1.0)])
def test_a_trigger_before_the_first_whole_interval_takes_its_baseline_from_the_partial_one(
        tmp_path, interval_s, trigger_start_s, span_s):
    from loadkit.record.synthetic import T0 as S0
    from loadkit.record.synthetic import write_retry_run

    # the first burst at 2 s: counters every 2 s have no whole interval before it (the first sample
    # has no interval length), and with a burst at 1.98 s neither do counters every 1 s; the base
    # load before it, 1,000/s into a server that answers 950/s, is still measured from the run's
    # start (the counters are cumulative from zero), not assumed lossless
    write_retry_run(tmp_path / "early", metastable=False, before_s=2, interval_s=interval_s, capacity_qps=950.0)
    run = load_run(tmp_path / "early")
    given = {"trigger_start_unix_s": S0 + trigger_start_s} if trigger_start_s else {}
    res = metastability(run, **given)
    assert not any("no traffic before the trigger" in c for c in res.caveats), res.caveats
    assert any("baseline goodput and amplification from the" in c for c in res.caveats), res.caveats
    # the demand from the busy intervals, not counts over a span whose start is not known (Locust
    # begins sending a second or more after the record starts)
    assert res.baseline_original_qps == pytest.approx(1000.0, rel=0.05)
    # the server answered its 950/s of it: the baseline is that lossy path, not goodput 1
    # (answered over offered, as every interval's goodput: about 950 of the ~1,000 a second sent)
    assert 0.90 < res.baseline_goodput_ratio < 0.96
    assert res.baseline_amplification == pytest.approx(1.0, abs=0.05)
    assert res.verdict == "recovers", res.summary()


def test_no_traffic_before_the_trigger_is_said_only_when_there_was_none(tmp_path):
    calm = [0.0] * 3 + [1000.0] * 40
    idle = write_rates(tmp_path / "idle", [0.0] * 3 + [4000.0] * 5 + [1000.0] * 35, [0.0] * 43, calm)
    res = metastability(idle, T0 + 8, trigger_start_unix_s=T0 + 3)
    assert any(c.startswith("no traffic before the trigger: baseline assumed lossless") for c in res.caveats)
    # a trigger inside the first interval: no sample before it, which is not "no traffic"
    busy = write_rates(tmp_path / "busy", [4000.0] * 5 + [1000.0] * 35, [0.0] * 40, [1000.0] * 40, interval_s=2.0)
    res = metastability(busy, T0 + 10, trigger_start_unix_s=T0 + 1)
    assert not any("no traffic before the trigger" in c for c in res.caveats), res.caveats
    assert any(c.startswith("no counter sample before the trigger") for c in res.caveats), res.caveats
