"""The firewall session-table model: Little's law occupancy, fill time, and the retry loop through
a full table, on synthetic numbers and on a simulated run with a ``firewall`` sample table."""

from __future__ import annotations

import json
import math
from collections import deque

import pytest

from loadkit.errors import ModelError
from loadkit.model.firewall import (
    FirewallResult,
    admitted_flow_qps,
    fill_time_s,
    firewall_loss,
    firewall_model,
    fit_firewall,
    new_flow_qps,
    occupancy,
)
from loadkit.partfiles import PartWriter
from loadkit.record.reader import load_run
from loadkit.schema import RUN_LAYOUT, GeneratorMetric, SocketSample

T0 = 1_764_000_000.0


def test_littles_law_occupancy_and_fill_time():
    assert occupancy(1000, 30) == 30_000
    assert occupancy(1000, 30, 20_000) == 20_000
    assert fill_time_s(1000, 30, 20_000) == pytest.approx(20.0)
    assert math.isinf(fill_time_s(1000, 30, 50_000))  # entries expire before it fills
    # the incident's table: 500,000 entries at a 30 s UDP timeout admit 16,667 new flows/s
    assert admitted_flow_qps(500_000, 30) == pytest.approx(16_666.7, rel=1e-4)
    assert new_flow_qps(100, 250, "per-attempt") == 250 and new_flow_qps(100, 250, "per-query") == 100
    with pytest.raises(ModelError, match="port policy"):
        new_flow_qps(1, 1, "random")
    with pytest.raises(ModelError, match="size > 0"):
        admitted_flow_qps(0, 30)


def test_the_loop_through_the_table_fixed_points():
    # 10,000/s of queries fill 300,000 of 500,000 entries: room to spare
    calm = firewall_model(10_000, 500_000, 30, retries_n=2)
    assert calm.predicted_occupancy_n == pytest.approx(300_000)
    assert calm.fill_amplification == pytest.approx(16_666.7 / 10_000, rel=1e-4)
    # kept per query, with a server that answers all it is sent in time, a full table still
    # answers its 16,667 admissions a second, more than the demand: it drains after the trigger,
    # however many times the clients retry
    for retries in (2, 5, 20):
        res = firewall_model(10_000, 500_000, 30, retries_n=retries)
        assert not res.loop.second_stable_state and res.predicted_verdict == "recovers", res.summary()
    # the table admits more than the server serves (12,000/s) and the server's full queue holds
    # answers 2 s, past the stub's 1 s: every admitted attempt is wasted and the table stays full
    waste = dict(capacity_qps=12_000, queue_delay_s=2.0, stub_timeout_s=1.0)
    storm = firewall_model(10_000, 500_000, 30, retries_n=2, **waste)
    assert storm.loop.second_stable_state and storm.loop.high_offered_qps == pytest.approx(30_000)
    assert storm.waste.high_table_full and "sustains itself" in storm.summary()
    assert FirewallResult.from_json(storm.to_json()) == storm
    # a smaller table (11,000 admissions a second, under the server's 12,000) keeps the server's
    # queue from filling: the firewall protects the server, and the loop drains
    assert firewall_model(10_000, 330_000, 30, retries_n=2, **waste).predicted_verdict == "recovers"
    # a shorter timeout admits 50,000/s: the table no longer fills, the server's own storm remains
    short = firewall_model(10_000, 500_000, 10, retries_n=2, **waste)
    assert short.predicted_verdict == "metastable" and not short.waste.high_table_full
    # per-query ports: retries reuse their query's flow, so only demand reaches the table
    assert firewall_loss(500_000, 30, "per-query", 10_000)(40_000) == 0.0
    assert not firewall_model(10_000, 500_000, 30, retries_n=2, port_policy="per-query").loop.second_stable_state


def write_firewall_run(run_dir, *, retries_per_drop: float, size_n=8000, timeout_s=10.0, base_qps=500.0,
                       trigger_qps=1500.0, before_s=30, trigger_s=15, after_s=60, max_amplification=4.0,
                       fluid=False, server_qps: float | None = None):
    """Clients behind a session table, one second at a time: every attempt is a new flow
    (per-attempt ports), a flow that finds the table full is dropped and retried
    ``retries_per_drop`` times in the next second (clients give up beyond ``max_amplification``).
    With ``server_qps`` the server behind the table serves that much through a 4 MiB receive
    buffer (about 8 s of queue): whenever the table admits more, every answer comes after the
    clients' 1 s timeout, so nothing is answered in time and all of it is retried."""
    run_dir.mkdir(parents=True, exist_ok=True)
    retries_n = int(max_amplification) - 1
    profile = {"load": {"options": {"dns-retries": retries_n, "dns-timeout": 1.0, "dns-port-policy": "per-attempt"}}}
    lab = {"dns": {"host": "127.0.0.1", "port": 5354, "capacity_qps": server_qps}} if server_qps else {}
    (run_dir / RUN_LAYOUT["manifest"]).write_text(json.dumps(dict(
        run_id=run_dir.name, scenario="retry_storm_firewall", release="synthetic", status="completed",
        started_unix_s=T0, ended_unix_s=T0 + before_s + trigger_s + after_s, profile=profile,
        targets=["udp://127.0.0.1:5354"], versions={},
        host={}, lab=lab, gates=[])))
    gen = PartWriter(run_dir / RUN_LAYOUT["generator"])
    fw = PartWriter(run_dir / "samples" / "firewall")
    if server_qps:
        socks = PartWriter(run_dir / RUN_LAYOUT["sockets"])
        socks.extend([SocketSample(T0 + k, "lab", 5354, 0, 0, 0, "127.0.0.1", 1, 4 * 2**20, T0 + k)
                      for k in range(0, before_s + trigger_s + after_s, 5)])
        socks.flush()
    entries = 0
    orig_c = retry_c = ans_c = drops_c = 0.0
    table: deque = deque()  # (expiry, entries)
    pending = 0.0
    events = []
    gen.extend([GeneratorMetric(T0, m, "counter", 0.0) for m in ("dns.original_sent", "dns.retry_sent", "dns.answered")])
    for k in range(before_s + trigger_s + after_s):
        now = T0 + k + 1
        if fluid:
            # a full table frees size/timeout entries a second, not in the cohorts that fixed
            # lifetimes in one-second steps release (which break the loop by themselves)
            entries -= entries / timeout_s
        else:
            while table and table[0][0] <= now:
                entries -= table.popleft()[1]
        o = trigger_qps if before_s <= k < before_s + trigger_s else base_qps
        retry = min(pending, o * (max_amplification - 1))
        offered = o + retry
        admitted = min(offered, size_n - entries)
        entries += admitted
        table.append((now + timeout_s, admitted))
        dropped = offered - admitted
        timely = admitted if not server_qps or admitted <= server_qps else 0.0
        pending = (offered - timely) * retries_per_drop
        orig_c, retry_c, ans_c, drops_c = orig_c + o, retry_c + retry, ans_c + timely, drops_c + dropped
        gen.extend([GeneratorMetric(now, "dns.original_sent", "counter", orig_c),
                    GeneratorMetric(now, "dns.retry_sent", "counter", retry_c),
                    GeneratorMetric(now, "dns.answered", "counter", ans_c)])
        fw.append({"ts_unix_s": now, "host": "lab", "firewall": "ip loadkit_fw_127_0_0_1_1143",
                   "entries_n": int(entries), "size_n": size_n, "drops_n": int(drops_c), "timeout_s": timeout_s})
        # another lab's firewall on the same host: full, dropping, and not the target's
        fw.append({"ts_unix_s": now, "host": "lab", "firewall": "ip loadkit_fw_127_9_9_1_1143",
                   "entries_n": 500, "size_n": 500, "drops_n": 100 * k, "timeout_s": 5.0})
    for phase, t in (("trigger_start", T0 + before_s), ("trigger_end", T0 + before_s + trigger_s)):
        events.append({"ts_unix_s": t, "kind": "phase", "source": "shape", "detail": {"phase": phase}})
    (run_dir / RUN_LAYOUT["events"]).write_text("".join(json.dumps(e) + "\n" for e in events))
    gen.flush()
    fw.flush()
    return load_run(run_dir)


def test_fit_firewall_on_a_run_that_recovers_and_one_that_stays_full(tmp_path):
    run = write_firewall_run(tmp_path / "one", retries_per_drop=1.0)
    if not len(getattr(run, "firewall", [])):
        pytest.skip("the run reader does not load samples/firewall yet")
    ok = fit_firewall(run)
    assert ok.size_n == 8000 and ok.timeout_s == 10 and ok.admitted_flow_qps == 800
    assert ok.predicted_occupancy_n == pytest.approx(5000, rel=0.02)  # 500/s × 10 s
    # Little's law on the last 10 s of new flows against the table's own count, before it filled
    assert ok.measured_max_entries_n == 8000 and ok.first_full_unix_s is not None
    assert ok.occupancy_error_pct is not None and ok.occupancy_error_pct <= 10.0
    assert not ok.loop.second_stable_state and ok.verdict == "recovers", ok.summary()
    # the same table in front of a server that serves 600/s, less than the 800/s a full table
    # admits, behind a queue longer than the clients' timeout: every admitted attempt is wasted
    stuck = fit_firewall(write_firewall_run(tmp_path / "two", retries_per_drop=1.0, fluid=True, server_qps=600))
    assert stuck.verdict == "metastable" and stuck.predicted_verdict == "metastable", stuck.summary()
    assert stuck.loop.second_stable_state and stuck.waste.high_table_full
    assert stuck.measured_waste_share is not None and stuck.measured_waste_share > 0.9
    assert "predicted" in stuck.summary() and "measured up to 8,000" in stuck.summary()


def test_fit_firewall_without_the_table_is_a_model_error(tmp_path):
    run = write_firewall_run(tmp_path / "run", retries_per_drop=1.0)
    import shutil

    shutil.rmtree(tmp_path / "run" / "samples" / "firewall")
    with pytest.raises(ModelError, match="firewall"):
        fit_firewall(load_run(tmp_path / "run"))


def test_cli_fit_firewall(tmp_path, capsys):
    from loadkit.cli import main

    run = write_firewall_run(tmp_path / "run", retries_per_drop=1.0)
    if not len(getattr(run, "firewall", [])):
        pytest.skip("the run reader does not load samples/firewall yet")
    assert main(["fit", "firewall", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("table 8,000 × 10 s admits 800 new flows/s") and "run verdict: recovers" in printed
    # without a firewall table: one line, exit 2
    assert main(["fit", "firewall", str(tmp_path / "run"), "--port-policy", "per-query"]) == 0
    import shutil

    shutil.rmtree(tmp_path / "run" / "samples" / "firewall")
    assert main(["fit", "firewall", str(tmp_path / "run")]) == 2
    assert "no 'firewall' samples" in capsys.readouterr().err


def test_another_labs_firewall_is_not_the_targets(tmp_path):
    from loadkit.model.firewall import table_capacity

    run = write_firewall_run(tmp_path / "run", retries_per_drop=1.0)
    if not len(getattr(run, "firewall", [])):
        pytest.skip("the run reader does not load samples/firewall yet")
    assert table_capacity(run) == (800.0, 10.0)  # the table named after 127.0.0.1, not 127.9.9.1's
    manifest = tmp_path / "run" / RUN_LAYOUT["manifest"]
    data = json.loads(manifest.read_text())
    data["targets"] = ["udp://127.0.5.1:5353"]  # a target with no firewall in front of it
    manifest.write_text(json.dumps(data))
    assert table_capacity(load_run(tmp_path / "run")) is None


def test_fixed_sockets_make_no_new_flows_and_a_zero_budget_is_none():
    # a client on fixed sockets (the DNS generator's default) refreshes its few flows: the table
    # sees no new ones, whatever the retries
    assert new_flow_qps(100, 250, "fixed") == 0.0 and firewall_loss(10, 1, "fixed")(1e6) == 0.0
    fixed = firewall_model(10_000, 1_000, 1, retries_n=2, port_policy="fixed")
    assert fixed.predicted_occupancy_n == 0 and math.isinf(fixed.fill_amplification)
    assert fixed.predicted_verdict == "recovers"
    # a retry budget of 0 means no budget (the generator's reading), not "no retries at all"
    waste = dict(capacity_qps=12_000, queue_delay_s=2.0, stub_timeout_s=1.0)
    assert firewall_model(10_000, 500_000, 30, retries_n=2, retry_budget=0.0, **waste).predicted_verdict == "metastable"
    assert firewall_model(10_000, 500_000, 30, retries_n=2, retry_budget=0.05, **waste).predicted_verdict == "recovers"


def test_one_budget_cap_for_both_loops_and_the_end_points_are_the_loops():
    import dataclasses

    import pandas as pd

    from loadkit.model.firewall import WasteLoop, waste_loop
    from loadkit.model.retries import fit_retry_loop, offered_cap_qps

    # every query at its last attempt, within a retry budget (0 or None: none; never below demand)
    assert offered_cap_qps(1000, 2) == offered_cap_qps(1000, 2, 0.0) == offered_cap_qps(1000, 2, None) == 3000
    assert offered_cap_qps(1000, 2, 0.1) == pytest.approx(1100) and offered_cap_qps(1000, 2, 5.0) == 3000
    assert offered_cap_qps(1000, 0, 0.5) == 1000
    # the firewall's loop and the loop fitted on a run cap offered load the same way
    waste = dict(capacity_qps=1200, queue_delay_s=2.0, stub_timeout_s=1.0)
    for budget in (None, 0.3):
        fw = waste_loop(1000, 1300, 1.0, retries_n=2, retry_budget=budget, **waste)
        amp = pd.DataFrame({"interval_s": [1.0, 1.0], "offered_qps": [1000.0, 3000.0],
                            "answered_qps": [1000.0, 1200.0]})
        fitted = fit_retry_loop(amp, 1000, retries_n=2, capacity_qps=1200, budget=budget)
        assert fw.loop.cap_qps == fitted.cap_qps == pytest.approx(offered_cap_qps(1000, 2, budget))
    # the waste loop's offered end points are its loop's, not a stored copy that could drift
    assert {"low_offered_qps", "high_offered_qps"}.isdisjoint(f.name for f in dataclasses.fields(WasteLoop))
    fw = waste_loop(1000, 1300, 1.0, retries_n=2, **waste)
    assert (fw.low_offered_qps, fw.high_offered_qps) == (fw.loop.low_offered_qps, fw.loop.high_offered_qps)
    assert fw.sustains and f"{fw.loop.high_offered_qps:,.0f}/s offered" in fw.summary()
    again = WasteLoop.from_json(fw.to_json())
    assert again == fw and again.high_offered_qps == fw.loop.high_offered_qps
