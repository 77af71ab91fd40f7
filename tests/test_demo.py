"""`make demo` (loadkit demo, python -m loadkit.demo): the profiles it writes, the whole demo
against a real lab, and that the lab comes down when the demo is stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from conftest import free_lab_address
from loadkit import demo
from loadkit.lab import Endpoint
from loadkit.profile.profile import load_profile

REPO = Path(__file__).resolve().parents[1]


def _status(tmp_path: Path):
    """A LabStatus-shaped object for profile generation (no lab needed)."""

    class Proxy:
        def __init__(self, n: int) -> None:
            self.name = f"proxy{n}"
            self.cgroup = f"/sys/fs/cgroup/loadkit/x/proxy{n}"
            self.imap = Endpoint("127.0.9.9", 11143 + 100 * n)
            self.pop3 = Endpoint("127.0.9.9", 11110 + 100 * n)

    class Status:
        dir = str(tmp_path / "demo-lab")
        dns = Endpoint("127.0.9.9", 5353)
        imap = Endpoint("127.0.9.9", 1143)
        names_file = str(tmp_path / "names.txt")
        accounts_file = str(tmp_path / "accounts.csv")
        proxies = [Proxy(1), Proxy(2), Proxy(3)]

    (tmp_path / "names.txt").write_text("a.lab.test.\n")
    (tmp_path / "accounts.csv").write_text("user,password\nuser0001,pw\n")
    return Status()


def test_demo_profiles_are_valid_and_point_at_the_demo_lab(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # locustfiles are found relative to the working directory
    status = _status(tmp_path)
    for name, profile in (("dns", demo.dns_profile(status)), ("storm", demo.storm_profile(status))):
        text = demo.dump_toml(profile)
        assert tomllib.loads(text) == profile  # the writer round-trips
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        loaded = load_profile(path)
        assert loaded.release == "demo"
        assert all("127.0.9.9" in str(t) for t in loaded.targets.values())
    storm = demo.storm_profile(status)
    assert "abort" not in storm  # the demo shows the fall-over itself
    assert storm["collect"]["groups"]["proxy2"] == "cgroup:/sys/fs/cgroup/loadkit/x/proxy2@11343,11310"
    assert storm["load"]["options"]["mail-arrival"].startswith("rate:")


def _lab_processes(lab_dir: Path) -> list[int]:
    """PIDs of processes whose command line names the lab directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(lab_dir) in cmd:
                pids.append(int(entry.name))
    return pids


@pytest.mark.lab
@pytest.mark.slow
def test_make_demo_produces_the_report_and_brings_the_lab_down(tmp_path):
    address = free_lab_address()
    env = dict(os.environ, LOADKIT_DEMO_ADDRESS=address, LOADKIT_DEMO_DIR=str(tmp_path))
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "loadkit.demo"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = tmp_path / "reports" / "demo"
    assert f"the report is at {report / 'index.html'}" in res.stdout
    assert "3 x 96 MiB" in res.stdout or "96 MiB each" in res.stdout  # says the proxies are small
    summary = json.loads((report / "summary.json").read_text())
    assert [m["service"] for m in summary["mail"]] == ["IMAP"] and len(summary["dns_capacity"]) == 1
    # the storm reached fall-over: proxies were OOM-killed and the model found where
    assert summary["mail"][0]["first_failure_sessions"] > 0
    assert summary["dns"][0]["drops_n"] > 0  # bursts overflowed the default buffer
    assert "IMAP: first proxy falls over at" in res.stdout and "DNS: largest burst without loss" in res.stdout
    assert "0 passed, 1 gate failed" not in res.stdout  # each run's outcome is said in words
    assert (report / "capacity_report.ipynb").exists() and (report / "index.html").exists()
    assert "lab down" in res.stdout
    assert not (tmp_path / ".loadkit" / "demo-lab" / "state.json").exists()
    assert _lab_processes(tmp_path / ".loadkit" / "demo-lab") == []
    # the 10-minute budget is watched, not asserted: tests never assert on wall-clock speed
    print(f"demo took {elapsed:.0f} s")


@pytest.mark.lab
@pytest.mark.slow
def test_sigterm_during_the_demo_brings_the_lab_down(tmp_path):
    address = free_lab_address()
    env = dict(os.environ, LOADKIT_DEMO_ADDRESS=address, LOADKIT_DEMO_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "loadkit.demo"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            if "1/3 DNS burst" in line or time.monotonic() > deadline:
                break
        time.sleep(3)  # the DNS run is under way
        assert _lab_processes(tmp_path / ".loadkit" / "demo-lab"), "lab not up"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        lines.append(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted; bringing the lab down" in text
    assert "lab down" in text
    assert _lab_processes(tmp_path / ".loadkit" / "demo-lab") == []
    assert not (tmp_path / ".loadkit" / "demo-lab" / "state.json").exists()


def test_a_taken_port_is_one_line_and_leaves_nothing_running(tmp_path):
    import socket

    address = free_lab_address()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((address, 5353))  # the demo lab's DNS port is taken
        env = dict(os.environ, LOADKIT_DEMO_ADDRESS=address, LOADKIT_DEMO_DIR=str(tmp_path))
        res = subprocess.run([sys.executable, "-m", "loadkit.demo"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("loadkit: error: ") and "5353" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert _lab_processes(tmp_path / ".loadkit" / "demo-lab") == []


def test_mail_outcome_reads_generator_counters_through_the_one_reader(tmp_path):
    """A login counter that restarted mid-run (a worker rejoined) still counts the logins before
    the restart, and held sessions of two sources at one time are added, as every model reads them."""
    from loadkit.record.reader import load_run
    from loadkit.record.synthetic import write_mail_run
    from loadkit.record.writer import RunWriter
    from loadkit.schema import GeneratorMetric

    run_dir = write_mail_run(tmp_path, duration_s=20, chunk_s=10, peak_sessions=100, seed=1)
    run = load_run(run_dir)
    logins = run.generator[run.generator["metric"] == "imap.logins"]
    last_ts, before_reset = float(logins["ts_unix_s"].max()), float(logins["value"].max())
    held = run.generator[run.generator["metric"] == "imap.held_sessions"]
    held_at_last = float(held[held["ts_unix_s"] == last_ts]["value"].iloc[0])
    w = RunWriter(run_dir)
    w.add_many([GeneratorMetric(last_ts + 1, "imap.logins", "counter", 7.0),  # restarted at 0
                GeneratorMetric(last_ts, "imap.held_sessions", "gauge", 1000.0)])  # a second source
    w.flush()
    out = demo.mail_outcome(run_dir)
    assert out["logins_n"] == int(before_reset + 7.0)
    assert out["max_held_sessions"] == int(held_at_last + 1000.0)


def _dns(drops: int, retries: int, failed: int) -> dict:
    return {"run": "r", "drops_n": drops, "retry_queries_n": retries, "failures_n": failed, "failures_by_class": {}}


def _mail(proxies: int, kills: int, cut: int) -> dict:
    return {"run": "r", "proxies_oom_killed": proxies, "oom_kills_n": kills,
            "failures_by_class": {"eof_after_login": cut} if cut else {}}


def test_the_incidents_table_shows_each_replay_its_spread_and_where_the_failure_showed():
    replays = [
        {"1": {"before": _mail(3, 500, 490), "after": _mail(0, 0, 0)},
         "3": {"before": _dns(40_000, 30_000, 100), "after": _dns(0, 0, 0)}},
        {"1": {"before": _mail(3, 480, 470), "after": _mail(0, 0, 0)},
         "3": {"before": _dns(20_000, 15_000, 50), "after": _dns(0, 0, 0)}},
        {"1": {"before": _mail(2, 300, 310), "after": _mail(1, 4, 2)},
         "3": {"before": _dns(0, 0, 0), "after": _dns(0, 0, 0)}},
    ]
    table = demo.incidents_table(replays)
    lines = table.splitlines()
    assert lines[0].startswith("| incident | run | figure | replay 1 | replay 2 | replay 3 | median [min–max]")
    shipped3 = table[table.index("| 3 | as shipped |"):]
    drops = next(line for line in shipped3.splitlines() if "drops at the server's socket" in line)
    assert "| 40,000 | 20,000 | 0 | 20,000 [0–40,000] |" in drops
    kills = next(line for line in lines if "login processes OOM-killed" in line and "300" in line)
    assert "480 [300–500]" in kills
    # incident 1 comes before 3; each run says in how many replays it showed the failure
    assert table.index("| 1 | as shipped |") < table.index("| 3 | as shipped |")
    assert "incident 1 as shipped: the failure in 3 of 3 replays" in table
    assert "incident 1 mitigated: the failure in 1 of 3 replays" in table
    assert "incident 3 as shipped: the failure in 2 of 3 replays" in table
    assert "incident 3 mitigated: the failure in 0 of 3 replays" in table


def test_incident_numbers_and_repeat_are_checked_in_one_line(capsys):
    from loadkit.cli import main

    for args, says in ((["incidents", "4"], "incident '4' does not exist: choose from 1, 2, 2b, 2c, 3"),
                       (["incidents", "--repeat", "0"], "--repeat 0: replay at least once"),
                       (["--repeat", "3"], "--repeat is for 'loadkit demo incidents'")):
        assert main(["demo", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("loadkit: error: ") and "\n" not in err and says in err


def test_incident_2c_counts_the_loop_holding_not_the_drops():
    # 2c's failure is a metastable verdict: its mitigated run drops new flows too, and drains
    held = {"verdict": "metastable", "goodput_below_half_s": 59.0, "firewall_drops_n": 128_062, "table_peak_n": 12_000}
    drained = {"verdict": "recovers", "goodput_below_half_s": 2.0, "firewall_drops_n": 12_826, "table_peak_n": 12_000}
    assert demo.failure_shown("2c", held) and not demo.failure_shown("2c", drained)
    assert demo.failure_shown("2b", drained)  # 2b's failure is the drops themselves
    table = demo.incidents_table([{"2c": {"before": held, "after": drained}}])
    assert "incident 2c as shipped: the failure in 1 of 1 replays" in table
    assert "incident 2c mitigated: the failure in 0 of 1 replays" in table
    assert "| 2c | as shipped | goodput < 1/2 after the trigger, s | 59 |" in table


def test_each_incidents_failure_is_data_in_its_table(monkeypatch):
    from loadkit.cli.demo import _INCIDENTS

    # the CLI's list of incident names is the table's, and every failure sign is known
    assert _INCIDENTS == tuple(demo.INCIDENTS)
    for incident in demo.INCIDENTS.values():
        assert incident.failure and set(incident.failure) <= set(demo.FAILURE_SIGNS), incident
    # an incident added to the table is judged by the failure written there, with no code of its
    # own: one whose failure is a metastable verdict does not count firewall drops that drained
    held = {"verdict": "metastable", "firewall_drops_n": 128_062}
    drained = {"verdict": "recovers", "firewall_drops_n": 12_826}
    monkeypatch.setitem(demo.INCIDENTS, "9", demo.Incident("a new loop", lambda *a: {}, ("verdict metastable",)))
    assert demo.failure_shown("9", held) and not demo.failure_shown("9", drained)
    monkeypatch.setitem(demo.INCIDENTS, "9", demo.Incident("a new flood", lambda *a: {}, ("firewall drops",)))
    assert demo.failure_shown("9", drained) and not demo.failure_shown("9", {"drops_n": 5})
    assert demo.failure_shown("1", {"oom_kills_n": 2}) and not demo.failure_shown("1", {"drops_n": 9})
