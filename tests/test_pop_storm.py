"""POP3 storms against the lab: within capacity, and past it with the OOM killer on."""

from __future__ import annotations

from pathlib import Path

import gevent
import pytest

from loadkit.generate.mail.users import ReconnectPolicy
from loadkit.generate.metrics import metrics_for
from mailrun import opts, storm, tracebacks
from test_imap_storm import OVERLOAD_CLASSES, MiB, run_locustfile

pytestmark = pytest.mark.lab


def test_storm_within_capacity_succeeds_with_a_row_per_phase(lab, tmp_path: Path) -> None:
    proc, rows = run_locustfile("pop_storm.py", lab.pop3, str(lab.accounts_file), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for name in ("connect+greeting", "PASS", "STAT", "UIDL", "QUIT"):
        assert int(rows[name]["Request Count"]) > 0, name
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) < 0.05 * int(total["Request Count"])
    assert int(rows["PASS"]["Request Count"]) >= 150


@pytest.mark.slow
def test_storm_past_capacity_shows_the_proxies_failure_classes(make_lab) -> None:
    status = make_lab(proxies=3, proxy_memory_bytes=64 * MiB, accounts=500)
    held: list[float] = []
    sampler: list = []

    def sample(env) -> bool:
        if not sampler:
            def loop() -> None:
                while True:
                    held.append(metrics_for(env).gauges().get("pop3.held_sessions", 0))
                    gevent.sleep(0.25)

            sampler.append(gevent.spawn(loop))
        return False

    host, port = status.pop3
    accounts = Path(status.accounts_file)
    out = storm(
        "pop3", f"{host}:{port}",
        opts(accounts, dwell_s=60.0, fetch_n=0, reconnect=ReconnectPolicy(kind="fixed", delay_s=0.5, min_delay_s=0.2),
             timeouts=opts(accounts).timeouts._replace(connect_s=5, greeting_s=5, login_s=5, select_s=5)),
        users=400, seconds=14, spawn_rate=100, until=sample,
    )
    for g in sampler:
        g.kill()
    classes = {cls for (_name, cls) in out["errors"]}
    assert classes <= OVERLOAD_CLASSES, classes
    assert classes & {"eof_before_greeting", "eof_during_login", "eof_after_login"}
    assert 0 < max(held) < 400
    assert out["exceptions"] == {}
    assert tracebacks(out["records"]) == []
