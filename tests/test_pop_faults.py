"""POP3 servers that fail in each way a storm meets give classed failures, never a traceback."""

from __future__ import annotations

import pytest

from loadkit.generate.mail.classify import Timeouts
from loadkit.generate.mail.pop3 import Pop3Session, Pop3Spec
from loadkit.generate.mail.users import ReconnectPolicy
from loadkit.generate.metrics import metrics_for
from mailfakes import FakeMailServer
from mailrun import opts, storm, tracebacks, write_accounts

RETRY = ReconnectPolicy(kind="fixed", delay_s=0.2, min_delay_s=0.1)

# behaviour -> (request name that fails, failure class)
EXPECTED = {
    "refuse": ("connect+greeting", "conn_refused"),
    "reset": ("connect+greeting", "conn_reset"),
    "never_greet": ("connect+greeting", "timeout_greeting"),
    "bye_greeting": ("connect+greeting", "bye_greeting"),  # -ERR instead of a greeting
    "reject_login": ("PASS", "auth_rejected"),
    "silent_after_login": ("STAT", "timeout_select"),
    "drop_after_login": ("hold", "eof_after_login"),
}


@pytest.mark.parametrize("behaviour", sorted(EXPECTED))
def test_fault_gives_its_class_and_no_traceback(behaviour: str, tmp_path) -> None:
    accounts = write_accounts(tmp_path)
    with FakeMailServer("pop3", behaviour) as fake:
        out = storm("pop3", fake.address, opts(accounts, dwell_s=5.0, reconnect=RETRY), users=3, seconds=2.5)
    name, cls = EXPECTED[behaviour]
    assert set(out["errors"]) == {(name, cls)}, out["errors"]
    assert out["exceptions"] == {}
    assert tracebacks(out["records"]) == []
    assert out["gauges"].get("pop3.held_sessions", 0) == 0


def test_well_behaved_server_runs_every_phase_without_failure(tmp_path) -> None:
    accounts = write_accounts(tmp_path)
    with FakeMailServer("pop3", "ok") as fake:
        out = storm(
            "pop3", fake.address, opts(accounts, dwell_s=0.5), users=10, seconds=2.5,
            during=lambda env: metrics_for(env).gauges(),
        )
    assert out["errors"] == {}
    for name in ("connect+greeting", "PASS", "STAT", "UIDL", "RETR", "QUIT"):
        assert out["requests"].get(name, 0) > 0, (name, out["requests"])
    assert out["counters"]["pop3.logins"] >= 10
    assert out["during"]["pop3.held_sessions"] > 0
    assert out["gauges"]["pop3.held_sessions"] == 0


def test_retr_reads_the_whole_message_across_reads() -> None:
    with FakeMailServer("pop3", "ok") as fake:
        s = Pop3Session(Pop3Spec("127.0.0.1", fake.port, timeouts=Timeouts(1, 1, 1, 1, 1, 1)))
        results = s.open("u", "p")
        quit_ = s.quit()
    assert [r.name for r in results] == ["connect+greeting", "PASS", "STAT", "UIDL", "RETR"]
    assert all(r.ok for r in results) and quit_.ok
    assert s.messages_n == 3
    assert results[-1].response_length > 20  # headers and body, dot-terminator excluded


def test_refused_server_does_not_spin(tmp_path) -> None:
    accounts = write_accounts(tmp_path)
    policy = ReconnectPolicy(kind="immediate", min_delay_s=0.1)
    with FakeMailServer("pop3", "refuse") as fake:
        out = storm("pop3", fake.address, opts(accounts, reconnect=policy), users=20, seconds=2.0)
    attempts = out["requests"]["connect+greeting"]
    assert 20 < attempts <= 20 * (2.0 / 0.1 + 2)
