"""The firewall loop kept per query: only waste (admitted attempts answered too late) holds the table full."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from loadkit.errors import LoadkitError, ModelError
from loadkit.lab import firewall_replay
from loadkit.model.firewall import (
    FirewallResult,
    attempts_per_query,
    firewall_model,
    timely_goodput_qps,
    waste_loop,
    waste_share,
)


def test_attempts_and_timely_goodput():
    assert attempts_per_query(0.5, 2) == pytest.approx(1.75)
    assert attempts_per_query(1.0, 2) == 3.0 and attempts_per_query(0.0, 5) == 1.0
    # the table admits 1,300/s; the server answers 1,200/s, in time while its queue waits 0.2 s
    assert timely_goodput_qps(3000, 1300, 1200, 0.2, 1.0) == (1300, 1200)
    # the same overload with a queue that waits 2 s: every answer comes after the stub gave up
    assert timely_goodput_qps(3000, 1300, 1200, 2.0, 1.0) == (1300, 0.0)
    # not overloaded: a long queue never forms
    assert timely_goodput_qps(1000, 1300, 1200, 2.0, 1.0) == (1000, 1000)


@pytest.mark.parametrize("retries_n", [1, 2, 5])
def test_without_waste_a_full_table_cannot_hold_itself_full(retries_n):
    # every admitted attempt answered in time: a full table answers min(A, C) > demand, so the
    # clients' backlog drains whatever the retries, the table size or the server's capacity
    for demand, admits, capacity in itertools.product([20, 500, 9000], [1.2, 3, 50], [1.1, 2, 1000]):
        size, timeout = demand * admits * 30, 30.0
        res = waste_loop(demand, size, timeout, retries_n=retries_n, capacity_qps=demand * capacity,
                         queue_delay_s=0.2, stub_timeout_s=1.0)
        assert not res.sustains, res.summary()
        assert res.high_offered_qps == pytest.approx(demand, rel=1e-3)
        assert res.high_goodput_qps == pytest.approx(demand, rel=1e-3)


def test_late_answers_hold_the_full_table_and_what_each_mitigation_does():
    base = dict(retries_n=2, capacity_qps=1200, queue_delay_s=2.0, stub_timeout_s=1.0)
    stuck = waste_loop(1000, 1300, 1.0, **base)
    assert stuck.sustains and stuck.high_table_full, stuck.summary()
    assert stuck.high_offered_qps == pytest.approx(3000) and stuck.high_goodput_qps == 0.0
    assert stuck.high_waste_share == 1.0 and stuck.low_offered_qps == pytest.approx(1000)
    assert "past the stub's 1 s timeout" in stuck.reason
    # a retry budget keeps offered load under what the table admits: drains
    assert not waste_loop(1000, 1300, 1.0, retry_budget=0.05, **base).sustains
    # a table that admits no more than the server serves keeps the server's queue short: drains
    assert not waste_loop(1000, 1100, 1.0, **base).sustains
    # a queue shorter than the stub's timeout: every admitted attempt is answered in time
    assert not waste_loop(1000, 1300, 1.0, **{**base, "queue_delay_s": 0.5}).sustains
    # a shorter UDP timeout admits more, so it overloads the server more: no help here
    assert waste_loop(1000, 1300, 0.5, **base).sustains
    # a larger table no longer fills, but the server's own retry storm remains: no help either
    big = waste_loop(1000, 4000, 1.0, **base)
    assert big.sustains and not big.high_table_full and "own retry storm" in big.reason
    with pytest.raises(ModelError, match="> 0"):
        waste_loop(0, 1300, 1.0)


def test_firewall_model_carries_the_prediction_and_survives_json():
    res = firewall_model(1000, 1300, 1.0, retries_n=2, capacity_qps=1200, queue_delay_s=2.0, stub_timeout_s=1.0)
    assert res.predicted_verdict == "metastable" and "predicted metastable" in res.summary()
    assert FirewallResult.from_json(res.to_json()) == res
    calm = firewall_model(20, 13000, 60, retries_n=2, capacity_qps=15000, queue_delay_s=0.017, stub_timeout_s=1.0)
    assert calm.predicted_verdict == "recovers"
    # per-query ports: retries make no new flows, so the table sees the original demand alone and
    # never fills; the server's own storm remains (its queue outlasts the stub's timeout) ...
    pq = firewall_model(1000, 1300, 1.0, retries_n=2, capacity_qps=1200, queue_delay_s=2.0, stub_timeout_s=1.0,
                        port_policy="per-query")
    assert pq.predicted_verdict == "metastable" and not pq.waste.high_table_full
    assert "own retry storm" in pq.waste.reason, pq.summary()
    # ... and goes with a queue shorter than the timeout
    assert firewall_model(1000, 1300, 1.0, retries_n=2, capacity_qps=1200, queue_delay_s=0.5, stub_timeout_s=1.0,
                          port_policy="per-query").predicted_verdict == "recovers"
    # no server capacity given: never saturated, no waste, so a full table drains
    default = firewall_model(1000, 1300, 1.0)
    assert default.retries_n == 2 and default.predicted_verdict == "recovers"
    assert "not known" in default.waste.reason


def _frames(entries, drops, offered, answered):
    fw = pd.DataFrame({"entries_n": entries, "drops_n": drops}, index=[float(t) for t in range(0, 10 * len(entries), 10)])
    ends = [float(t) for t in range(1, 10 * (len(entries) - 1) + 1)]
    amp = pd.DataFrame({"interval_s": 1.0, "offered_qps": offered, "answered_qps": answered}, index=ends)
    return amp, fw


def test_waste_share_is_measured_only_where_the_full_table_admitted():
    full = [100, 100, 100]
    # offered 10/s, dropped 5/s, none answered: every admitted attempt wasted
    amp, fw = _frames(full, [0, 50, 100], 10.0, 0.0)
    share, points = waste_share(amp, fw, 100)
    assert share == pytest.approx(1.0) and points == 20
    # the same with every admitted attempt answered: no waste
    amp, fw = _frames(full, [0, 50, 100], 10.0, 5.0)
    assert waste_share(amp, fw, 100)[0] == pytest.approx(0.0)
    # a table that admits (almost) nothing: no share to speak of
    amp, fw = _frames(full, [0, 99, 198], 10.0, 0.0)
    assert waste_share(amp, fw, 100)[0] is None
    # never full: nothing measured
    amp, fw = _frames([10, 20, 30], [0, 0, 0], 10.0, 10.0)
    assert waste_share(amp, fw, 100) == (None, 0)


def test_the_replay_cases_and_their_predictions():
    cases = firewall_replay.cases()
    assert [c.label for c in cases] == ["as shipped", "larger buffer", "shorter UDP timeout", "larger table",
                                        "retry budget"]
    shipped = firewall_replay.lab_settings(cases[0])
    assert shipped["firewall_sessions"] == 13000 and shipped["dns_rcvbuf_bytes"] == 0
    assert firewall_replay.lab_settings(cases[3])["firewall_sessions"] == 40000
    # the lab's unbound answers about 15,000/s at its CPU floor: the full table's 217 admissions a
    # second are all answered in time, so the model predicts no second state for any case
    for case in cases:
        assert firewall_replay.predict(case, capacity_qps=15000).predicted_verdict == "recovers"


def test_the_holding_scenarios_predictions_from_its_parameters():
    # the shipped loop that holds itself and its cases, predicted before any run from the lab's
    # settings, the clients' options and a capacity as unbound at 0.02 core measured (2,400-2,900)
    from loadkit.lab import firewall_replay as replay

    predicted = {c.label: replay.predict(c, capacity_qps=2600).predicted_verdict for c in replay.cases("holds")}
    assert predicted == {"as shipped": "metastable", "default buffer": "recovers", "table admits less": "recovers",
                         "retry budget": "recovers", "larger table": "metastable",
                         "shorter UDP timeout": "metastable"}, predicted
    # the shipped file is a valid profile, aimed at the default lab's firewalled port, with its lab
    from loadkit.profile.profile import load_profile

    profile = load_profile(replay.HOLDS)
    assert profile.lab_hints["firewall_sessions"] == 12000 and profile.lab_hints["dns_cpu"] == 0.02
    assert profile.targets["dns"] == "127.0.0.1:5354"
    shipped = replay.predict(replay.cases("holds")[0], capacity_qps=2600)
    assert shipped.waste.high_table_full and "more than the server's 2,600/s" in shipped.waste.reason
    with pytest.raises(LoadkitError, match="'drains' or 'holds'"):
        replay.cases("other")
