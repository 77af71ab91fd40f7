"""IMAP servers that fail in each way a storm meets give classed failures, never a traceback."""

from __future__ import annotations

import pytest

from loadkit.generate import bridge
from loadkit.generate.mail.classify import Timeouts
from loadkit.generate.mail.imap import ImapSession, ImapSpec
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
    "bye_greeting": ("connect+greeting", "bye_greeting"),
    "reject_login": ("LOGIN", "auth_rejected"),
    "silent_after_login": ("SELECT", "timeout_select"),
    "drop_after_login": ("hold", "eof_after_login"),
}


@pytest.mark.parametrize("behaviour", sorted(EXPECTED))
def test_fault_gives_its_class_and_no_traceback(behaviour: str, tmp_path) -> None:
    accounts = write_accounts(tmp_path)
    with FakeMailServer("imap", behaviour) as fake:
        out = storm(
            "imap", fake.address,
            opts(accounts, fetch_n=0, dwell_s=5.0, reconnect=RETRY),
            users=3, seconds=2.5,
        )
    name, cls = EXPECTED[behaviour]
    assert out["errors"], out
    assert set(out["errors"]) == {(name, cls)}, out["errors"]
    assert out["exceptions"] == {}
    assert tracebacks(out["records"]) == []
    assert out["gauges"].get("imap.held_sessions", 0) == 0


def test_well_behaved_server_runs_every_phase_without_failure(tmp_path) -> None:
    accounts = write_accounts(tmp_path)
    with FakeMailServer("imap", "ok") as fake:
        out = storm(
            "imap", fake.address, opts(accounts, dwell_s=0.5), users=10, seconds=2.5,
            during=lambda env: metrics_for(env).gauges(),
        )
    assert out["errors"] == {}
    for name in ("connect+greeting", "LOGIN", "SELECT", "FETCH", "LOGOUT"):
        assert out["requests"].get(name, 0) > 0, (name, out["requests"])
    assert out["counters"]["imap.logins"] >= 10
    assert out["during"]["imap.held_sessions"] > 0
    assert out["gauges"]["imap.held_sessions"] == 0
    assert tracebacks(out["records"]) == []


def test_idle_holds_sessions_until_the_end(tmp_path) -> None:
    accounts = write_accounts(tmp_path)
    held: list[float] = []

    def all_held(env) -> bool:
        # polled until all 8 hold a session (a loaded machine logs them in later than 1 s), then
        # once more: a session held a moment does not count as held until the end
        held.append(metrics_for(env).gauges().get("imap.held_sessions", 0))
        return held[-2:] == [8, 8]

    with FakeMailServer("imap", "ok") as fake:
        out = storm("imap", fake.address, opts(accounts, dwell_s=None), users=8, seconds=20.0, until=all_held)
    assert out["errors"] == {}
    assert out["requests"]["IDLE"] == 8  # each user entered IDLE once and stayed there
    assert held[-2:] == [8, 8], held
    assert out["gauges"]["imap.held_sessions"] == 0
    assert tracebacks(out["records"]) == []


def test_session_phases_are_timed_on_the_loop_and_classed() -> None:
    # a silent server: SELECT must end at its own deadline, not the library's
    with FakeMailServer("imap", "silent_after_login") as fake:
        t = Timeouts(1, 1, 1, 0.3, 1, 1)
        session = ImapSession(ImapSpec("127.0.0.1", fake.port, timeouts=t))
        results = bridge.run(session.open("u", "p"), timeout=10)
    assert [r.name for r in results] == ["connect+greeting", "LOGIN", "SELECT"]
    assert [repr(r.failure) for r in results] == ["None", "None", "timeout_select"]
    # not before its own 0.3 s deadline; had only the library's applied, bridge.run would have timed out
    assert results[-1].elapsed_s >= 0.3


def test_refused_server_does_not_spin(tmp_path) -> None:
    # immediate reconnect against a refusing server: the retry floor bounds the attempts
    accounts = write_accounts(tmp_path)
    policy = ReconnectPolicy(kind="immediate", min_delay_s=0.1)
    with FakeMailServer("imap", "refuse") as fake:
        out = storm("imap", fake.address, opts(accounts, reconnect=policy), users=20, seconds=2.0)
    attempts = out["requests"]["connect+greeting"]
    assert attempts > 20
    assert attempts <= 20 * (2.0 / 0.1 + 2)
    assert tracebacks(out["records"]) == []


def test_retry_rate_cap_bounds_a_process(tmp_path) -> None:
    accounts = write_accounts(tmp_path)
    policy = ReconnectPolicy(kind="immediate", min_delay_s=0.0)
    with FakeMailServer("imap", "refuse") as fake:
        out = storm(
            "imap", fake.address, opts(accounts, reconnect=policy, max_retry_rate_per_s=50.0),
            users=20, seconds=2.0,
        )
    assert out["requests"]["connect+greeting"] <= 50 * 2.0 + 20 + 10


def test_give_up_stops_the_user(tmp_path) -> None:
    accounts = write_accounts(tmp_path)
    policy = ReconnectPolicy(kind="fixed", delay_s=0.05, min_delay_s=0.05, give_up_n=3)
    with FakeMailServer("imap", "reject_login") as fake:
        out = storm("imap", fake.address, opts(accounts, reconnect=policy), users=4, seconds=2.0)
    assert out["requests"]["LOGIN"] == 12  # 4 users x 3 attempts, then they stopped
    assert out["counters"]["imap.gave_up"] == 4
    assert out["exceptions"] == {}



def test_temporary_refusal_is_not_an_auth_rejection() -> None:
    from loadkit.generate.mail.classify import Phase, ServerReply, classify

    assert repr(classify(ServerReply("NO", "[AUTHENTICATIONFAILED] Authentication failed."), Phase.LOGIN)) == "auth_rejected"
    assert repr(classify(ServerReply("NO", "[UNAVAILABLE] Temporary authentication failure."), Phase.LOGIN)) == "no"
    assert repr(classify(ServerReply("-ERR", "[SYS/TEMP] try later"), Phase.LOGIN)) == "no"
    assert repr(classify(ServerReply("-ERR", "[AUTH] Authentication failed."), Phase.LOGIN)) == "auth_rejected"
    assert repr(classify(ServerReply("BYE", "Shutting down"), Phase.GREETING)) == "bye_greeting"
    assert repr(classify(ServerReply("BAD", "junk"), Phase.SELECT)) == "bad"
