"""`loadkit run` against the real lab: the shipped scenarios, and an abort before any OOM kill."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadkit.record.catalog import list_runs
from loadkit.record.reader import load_run

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ROOT = Path(__file__).parent.parent
#: the firewall scenarios need a lab with its firewall: tests/test_lab_firewall.py runs
#: retry_storm_firewall; retry_storm_firewall_holds (a 0.02-core lab, 70 s) is run by
#: benchmarks/firewall_replay.py --scenario holds, and tests/test_firewall_waste.py loads it as a
#: profile and checks the verdicts its parameters predict
SCENARIOS = sorted(p for p in (ROOT / "scenarios").glob("*.toml")
                   if p.stem not in ("retry_storm_firewall", "retry_storm_firewall_holds"))
MiB = 1024 * 1024

#: a shortened duration per scenario so the suite stays modest on a shared machine
SHORT = {"smoke": "6s", "burst_retry_storm": "8s", "many_small_sources": "6s", "proxies_fall_over": "90s"}


def for_lab(text: str, lab) -> str:
    """A shipped scenario pointed at a test lab: its address, cgroups and files instead of the
    defaults of `loadkit lab up` (the scenario text is otherwise unchanged)."""
    address = lab.dns.host
    lab_id = re.sub(r"[^0-9A-Za-z]+", "-", f"{address}-{lab.imap.port}").strip("-")
    text = text.replace("127.0.0.1:", f"{address}:").replace("127-0-0-1-1143", lab_id)
    text = text.replace('"locustfiles/', f'"{ROOT}/locustfiles/')
    text = text.replace("\\\\.loadkit/lab/conf", re.escape(str(Path(lab.dir) / "conf")).replace("\\", "\\\\"))
    # the shared lab has no CPU quota, so no measured capacity: a rate relative to it gets a figure
    text = re.sub(r'"([0-9.]+) capacity"', lambda m: f"{float(m.group(1)) * 4000:g}", text)
    if "dns_burst.py" in text:
        text = text.replace("options = { ", f'options = {{ dns-names-file = "{lab.names_file}", ', 1)
    else:
        text = text.replace("options = { ", f'options = {{ mail-accounts = "{lab.accounts_file}", ', 1)
    return text


def loadkit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadkit", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_each_scenario_runs_against_the_lab_and_leaves_a_complete_record(
    scenario: Path, lab, tmp_path: Path
) -> None:
    profile = tmp_path / scenario.name
    profile.write_text(for_lab(scenario.read_text(), lab))
    out = tmp_path / "runs"
    res = loadkit("run", str(profile), "--out", str(out), "--duration", SHORT[scenario.stem],
                  "--release", "test", "--lab-dir", lab.dir)
    assert res.returncode in (0, 1), res.stderr  # 1: a gate failed or the run aborted (the finding)
    [run_dir] = list(out.iterdir())
    run = load_run(run_dir)
    assert run.complete and run.manifest["status"] in ("completed", "aborted")
    assert run.manifest["scenario"] == scenario.stem and run.manifest["release"] == "test"
    assert run.manifest["lab"]["dir"] == lab.dir  # the target is the lab: its status is kept
    assert run.requests["requests_n"].sum() > 0
    assert len(run.groups) > 0, "collector samples recorded"
    assert [e["kind"] for e in run.events].count("gate") == len(run.manifest["gates"]) > 0
    assert (run_dir / "locust" / "report.html").exists()
    listed = list_runs(out, scenario=scenario.stem, release="test")
    assert list(listed["run_id"]) == [run.run_id]
    if scenario.stem == "proxies_fall_over":  # sessions on every proxy, memory rising with them
        assert set(run.groups["group"]) == {"proxy1", "proxy2", "proxy3"}
        assert run.groups["sessions_n"].max() > 50
    if scenario.stem in ("burst_retry_storm", "smoke", "many_small_sources"):
        assert len(run.sockets) > 0 and "dns.original_sent" in set(run.generator["metric"])


def test_imap_storm_stops_at_90_percent_before_any_oom_kill(make_lab, tmp_path: Path) -> None:
    lab = make_lab(proxies=3, proxy_memory_bytes=64 * MiB)
    if not lab.cgroups.enabled:
        pytest.skip(f"no memory cgroups here: {lab.cgroups.reason}")
    before = {p.name: p.oom_kills or 0 for p in lab.proxies}
    groups = ", ".join(f'{p.name} = "cgroup:{p.cgroup}@{p.imap.port},{p.pop3.port}"' for p in lab.proxies)
    profile = tmp_path / "storm.toml"
    profile.write_text(f"""
[run]
scenario = "imap_abort"
duration = "120s"
[targets]
imap = "{lab.imap.host}:{lab.imap.port}"
[load]
locustfile = "{ROOT}/locustfiles/imap_storm.py"
host = "imap"
users = 400
spawn_rate = 100
options = {{ mail-accounts = "{lab.accounts_file}", mail-arrival = "rate:6", mail-dwell = "idle" }}
[collect]
groups = {{ {groups} }}
interval_s = 0.5
[abort]
cgroup_memory_fraction = 0.9
""")
    out = tmp_path / "runs"
    res = loadkit("run", str(profile), "--out", str(out))
    # the abort is the profile's own memory threshold, reached before any proxy fell over: the
    # run ends "aborted" and its no_abort gate passes as designed (the report's rule), exit 0
    assert res.returncode == 0, res.stderr
    [run_dir] = list(out.iterdir())
    run = load_run(run_dir)
    assert run.manifest["status"] == "aborted"
    no_abort = {g["name"]: g for g in run.manifest["gates"]}["no_abort"]
    assert no_abort["passed"] is True and no_abort["detail"].startswith("aborted as designed"), no_abort
    [abort] = [e for e in run.events if e["kind"] == "abort"]
    assert abort["detail"]["reason"] == "cgroup_memory_fraction" and abort["detail"]["fraction"] >= 0.9
    # the abort came within 2 s of the first sample at or over the threshold
    g = run.groups
    over = g[(g["cgroup_limit_bytes"] > 0) & (g["cgroup_memory_bytes"] >= 0.9 * g["cgroup_limit_bytes"])]
    assert abort["ts_unix_s"] - over["ts_unix_s"].min() <= 2.0
    # and no proxy was OOM-killed: not in the samples, not in the events, not in the cgroups now
    assert not [e for e in run.events if e["kind"] == "oom_kill"]
    for name, kills in before.items():
        assert g[g["group"] == name]["cgroup_oom_kills_n"].max() == kills
    after = make_lab.labs[-1].status()
    assert {p.name: p.oom_kills or 0 for p in after.proxies} == before
    assert all(p.up for p in after.proxies)


def test_distributed_dns_run_gives_one_record_with_summed_generator_counters(lab, tmp_path: Path) -> None:
    scenario = ROOT / "scenarios" / "smoke.toml"
    profile = tmp_path / "smoke.toml"
    profile.write_text(for_lab(scenario.read_text(), lab).replace("users = 1\nspawn_rate = 1", "users = 2\nspawn_rate = 2"))
    out = tmp_path / "runs"
    res = loadkit("run", str(profile), "--out", str(out), "--duration", "8s", "--workers", "2")
    assert res.returncode in (0, 1), res.stderr
    [run_dir] = list(out.iterdir())
    run = load_run(run_dir)
    assert run.manifest["status"] == "completed"
    g = run.generator
    assert g[g["metric"] == "workers"]["value"].max() == 2
    sent = g[g["metric"] == "dns.original_sent"]["value"].max()  # summed over both workers
    completed = run.requests["requests_n"].sum()
    assert completed > 0 and abs(sent - completed) <= 0.05 * sent


def test_imap_and_pop3_targets_of_a_second_lab_each_get_their_own_logins(make_lab, tmp_path: Path) -> None:
    """A profile naming a second lab on other ports, without [load] host, run from a directory
    that is not the repository: each class logs in at its own [targets] entry with that lab's
    accounts (found from the target, not the working directory)."""
    lab = make_lab(proxies=1, accounts=40, imap_port=2143, pop3_port=2110, dns_port=6353)
    profile = tmp_path / "mail.toml"
    profile.write_text(f"""
[run]
scenario = "second-lab"
duration = "6s"
[targets]
imap = "{lab.imap.host}:{lab.imap.port}"
pop3 = "{lab.pop3.host}:{lab.pop3.port}"
[load]
locustfile = ["{ROOT}/locustfiles/imap_storm.py", "{ROOT}/locustfiles/pop_storm.py"]
users = 4
spawn_rate = 4
options = {{ mail-dwell = "0.5" }}
""")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run([sys.executable, "-m", "loadkit", "run", str(profile), "--out", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=300, cwd=elsewhere)
    assert res.returncode in (0, 1), res.stderr
    [run_dir] = list((tmp_path / "runs").iterdir())
    run = load_run(run_dir)
    logins = run.requests[run.requests["name"].isin(["LOGIN", "PASS"])]
    by_type = logins.groupby("request_type")[["requests_n", "failures_n"]].sum()
    assert set(by_type.index) == {"IMAP", "POP3"}, by_type
    assert (by_type["requests_n"] > 0).all() and (by_type["failures_n"] == 0).all(), by_type
    assert run.failures.empty or not run.failures["failure_class"].isin(["conn_refused", "auth_rejected"]).any()
    assert run.manifest["lab"]["dir"] == lab.dir  # the lab's status found from the targets
