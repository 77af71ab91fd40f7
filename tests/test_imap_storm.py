"""IMAP storms against the lab: within capacity, past it, and past it with the OOM killer off."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from loadkit.generate.mail.users import ReconnectPolicy
from loadkit.generate.metrics import metrics_for
from mailrun import opts, storm, tracebacks

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[1]
LOCUST = str(Path(sys.executable).with_name("locust"))
MiB = 1024 * 1024

#: what dovecot proxies behind haproxy really do when they run out of memory
OVERLOAD_CLASSES = {
    "eof_before_greeting", "eof_during_login", "eof_after_login", "conn_reset", "conn_refused",
    "timeout_greeting", "timeout_login", "timeout_select", "timeout_fetch", "timeout_connect",
    "bye_greeting",  # "* BYE" from a proxy that is shutting down
    "no",  # "NO [UNAVAILABLE] Temporary authentication failure": its auth process is stuck
}


def stats_rows(prefix: Path) -> dict[str, dict]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def run_locustfile(locustfile: str, endpoint, accounts: str, tmp_path: Path, extra=()) -> tuple:
    host, port = endpoint
    prefix = tmp_path / "storm"
    proc = subprocess.run(
        [LOCUST, "-f", str(ROOT / "locustfiles" / locustfile), "--headless", "-u", "150", "-r", "50",
         "-t", "12s", "--csv", str(prefix), "--host", f"{host}:{port}", "--mail-accounts", accounts,
         *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    return proc, stats_rows(prefix)


def test_storm_within_capacity_succeeds_with_a_row_per_phase(lab, tmp_path: Path) -> None:
    proc, rows = run_locustfile("imap_storm.py", lab.imap, str(lab.accounts_file), tmp_path)
    assert "Traceback" not in proc.stderr
    for name in ("connect+greeting", "LOGIN", "SELECT", "LOGOUT"):
        assert int(rows[name]["Request Count"]) > 0, name
    total = rows["Aggregated"]
    # within capacity, but a loaded machine can time out a login or a health check of the proxies
    # now and then: a few failures in thousands of sessions are tolerated, and the exit status
    # says whether there were any (Locust exits 1 then)
    failures = int(total["Failure Count"])
    assert failures < 0.05 * int(total["Request Count"])
    assert proc.returncode == (1 if failures else 0), proc.stderr[-3000:]
    assert int(rows["LOGIN"]["Request Count"]) >= 150  # every user logged in at least once


def _sample_held(env, samples: list) -> None:
    while True:
        samples.append(metrics_for(env).gauges().get("imap.held_sessions", 0))
        gevent.sleep(0.25)


def _storm_with_samples(status, users, rate, seconds, policy, until=None):
    samples: list[float] = []
    watcher: list = []

    def start_sampling(env) -> bool:
        if not watcher:
            watcher.append(gevent.spawn(_sample_held, env, samples))
        return until() if until is not None else False

    host, port = status.imap
    accounts = Path(status.accounts_file)
    timeouts = opts(accounts).timeouts._replace(
        connect_s=5, greeting_s=5, login_s=5, select_s=5, logout_s=5)
    out = storm(
        "imap", f"{host}:{port}",
        opts(accounts, dwell_s=None, fetch_n=0, reconnect=policy, timeouts=timeouts),
        users=users, seconds=seconds, spawn_rate=rate, until=start_sampling,
    )
    for g in watcher:
        g.kill()
    return out, samples


@pytest.mark.slow
def test_storm_past_capacity_shows_the_proxies_failure_classes(make_lab, tmp_path: Path) -> None:
    # 3 proxies x 64 MiB hold about 150 IMAP sessions in all; 400 clients in IDLE overrun them
    status = make_lab(proxies=3, proxy_memory_bytes=64 * MiB, accounts=500)
    out, held = _storm_with_samples(
        status, users=400, rate=100, seconds=14,
        policy=ReconnectPolicy(kind="fixed", delay_s=0.5, min_delay_s=0.2),
    )
    classes = {cls for (_name, cls) in out["errors"]}
    assert classes, out["requests"]
    assert classes <= OVERLOAD_CLASSES, classes
    # the proxies close sessions they cannot hold: before the greeting or after the login
    assert classes & {"eof_before_greeting", "eof_during_login", "eof_after_login"}
    # held sessions level off below the offered 400 (or collapse), they never reach it
    assert max(held) > 0
    assert max(held) < 400
    assert out["exceptions"] == {}
    assert tracebacks(out["records"]) == []


@pytest.mark.slow
def test_storm_past_capacity_without_oom_killer_takes_every_proxy_down(make_lab, tmp_path: Path) -> None:
    status = make_lab(proxies=3, proxy_memory_bytes=64 * MiB, accounts=700, oom_kill=False)
    lab = make_lab.labs[-1]
    proxies = []

    def gone(p) -> bool:
        # exited, or frozen at its limit (no OOM killer to free memory) and taken out of
        # service by haproxy: either way no client is served by it any more
        return not p.up or (p.haproxy_state or "").upper().startswith("DOWN")

    t_start = time.monotonic()

    def all_gone() -> bool:
        proxies[:] = lab.status().proxies
        return time.monotonic() - t_start > 8 and all(gone(p) for p in proxies)

    # keep storming for at least 8 s and until every proxy is gone, at most 45 s
    out, held = _storm_with_samples(
        status, users=600, rate=300, seconds=45,
        policy=ReconnectPolicy(kind="immediate", min_delay_s=0.1), until=all_gone,
    )
    # all three out of service at once: the cascade of the incident
    assert all(gone(p) for p in proxies), [p.to_dict() for p in proxies]
    # whether a frozen master also exits varies with the kernel's timing (both seen on the same
    # machine), so it is reported, not asserted: out of service is what the clients see
    print("proxies exited:", sorted(p.name for p in proxies if not p.up),
          "down in haproxy:", sorted(p.name for p in proxies if p.up))
    classes = {cls for (_name, cls) in out["errors"]}
    assert classes and classes <= OVERLOAD_CLASSES, classes
    # the held count collapses once the proxies are gone (how many were held before they froze
    # varies: 300 arrivals a second can fill 64 MiB before a sample sees one held)
    print("held sessions: peak", max(held), "last", held[-1])
    assert held[-1] == 0 or held[-1] < max(held)
    assert tracebacks(out["records"]) == []
