"""A storm with sessions in flight ends cleanly on its time limit, SIGINT and SIGTERM.

Runs the real locustfile in a subprocess (``locust --headless``) against an in-process IMAP fake
that holds every session in IDLE, then stops it the three ways a user does; also when the
launcher ignores SIGINT (a background job: ``make test &``), which an exec'd process inherits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from mailfakes import FakeMailServer
from mailrun import write_accounts

ROOT = Path(__file__).resolve().parents[1]
LOCUST = str(Path(sys.executable).with_name("locust"))

NOISE = ("Traceback", "Task was destroyed", "exception was never retrieved", "Unhandled exception")


def _ignore_sigint() -> None:  # runs in the child before exec, as a background job's shell does
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _locust(locustfile: str, address: str, accounts: Path, extra: list[str],
            sigint_ignored: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [LOCUST, "-f", str(ROOT / "locustfiles" / locustfile), "--headless", "-u", "40", "-r", "40",
         "--host", address, "--mail-accounts", str(accounts), "--mail-dwell", "idle", *extra],
        cwd=accounts.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_ignore_sigint if sigint_ignored else None,
    )


def _wait_for_sessions(fake: FakeMailServer, n: int) -> None:
    deadline = time.monotonic() + 20
    while fake.connections_n < n and time.monotonic() < deadline:
        gevent.sleep(0.1)
    assert fake.connections_n >= n
    gevent.sleep(0.5)


def _wait(proc: subprocess.Popen, timeout_s: float) -> str:
    # gevent's subprocess lets the in-process fake keep serving while we wait
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        gevent.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        pytest.fail("locust did not exit in time")
    return proc.stdout.read()


@pytest.mark.parametrize("how", ["time_limit", "SIGINT", "SIGTERM"])
@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_clean_exit_with_sessions_in_flight(how: str, protocol: str, tmp_path: Path) -> None:
    accounts = write_accounts(tmp_path, 40)
    locustfile = "imap_storm.py" if protocol == "imap" else "pop_storm.py"
    with FakeMailServer(protocol, "ok") as fake:
        extra = ["-t", "3s"] if how == "time_limit" else ["-t", "60s"]
        proc = _locust(locustfile, fake.address, accounts, extra)
        if how != "time_limit":
            # wait until every user holds a session, then signal THIS process
            _wait_for_sessions(fake, 40)
            os.kill(proc.pid, getattr(signal, how))
        out = _wait(proc, 30)
    assert proc.returncode in (0, 1), out  # not killed by the signal itself
    for word in NOISE:
        assert word not in out, out
    kind = "IMAP" if protocol == "imap" else "POP3"
    assert f"{kind}     connect+greeting" in out  # the final stats were printed


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_sigint_stops_locust_whose_launcher_ignores_sigint(protocol: str, tmp_path: Path) -> None:
    """SIG_IGN for SIGINT survives exec; the plugin takes SIGINT back, and the record it writes
    is complete and says the run was cut short."""
    from loadkit.record.reader import load_run

    accounts = write_accounts(tmp_path, 40)
    locustfile = "imap_storm.py" if protocol == "imap" else "pop_storm.py"
    with FakeMailServer(protocol, "ok") as fake:
        proc = _locust(locustfile, fake.address, accounts,
                       ["-t", "60s", "--record-dir", str(tmp_path / "runs"), "--run-id", "bg"],
                       sigint_ignored=True)
        _wait_for_sessions(fake, 40)
        os.kill(proc.pid, signal.SIGINT)
        out = _wait(proc, 30)
    assert proc.returncode in (0, 1), out
    for word in NOISE:
        assert word not in out, out
    run = load_run(tmp_path / "runs" / "bg")
    assert run.complete and run.manifest["status"] == "interrupted", run.manifest
    assert run.requests["requests_n"].sum() >= 40
    assert [e["kind"] for e in run.events][-1] == "run_ended"


def test_loadkit_run_stops_on_sigint_when_its_launcher_ignores_it(tmp_path: Path) -> None:
    """``loadkit run`` in a background job: SIGINT still reaches it and the run ends as an
    interrupted, complete record (Locust is stopped with SIGTERM by the runner)."""
    from loadkit.record.reader import load_run

    accounts = write_accounts(tmp_path, 20)
    out = tmp_path / "runs"
    with FakeMailServer("imap", "ok") as fake:
        profile = tmp_path / "bg.toml"
        profile.write_text(f"""
[run]
scenario = "background"
release = "t1"
duration = "60s"
stop_timeout = "2s"
[targets]
imap = "{fake.address}"
[load]
locustfile = "{ROOT / 'locustfiles' / 'imap_storm.py'}"
host = "imap"
users = 20
spawn_rate = 20
options = {{ mail-accounts = "{accounts}", mail-dwell = "idle" }}
""")
        proc = subprocess.Popen([sys.executable, "-m", "loadkit", "run", str(profile), "--out", str(out)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_ignore_sigint)
        _wait_for_sessions(fake, 20)
        os.kill(proc.pid, signal.SIGINT)
        text = _wait(proc, 60)
    assert proc.returncode == 2, text  # interrupted
    [run_dir] = [d for d in out.iterdir() if d.is_dir()]
    run = load_run(run_dir)
    assert run.complete and run.manifest["status"] == "interrupted", run.manifest
    assert run.requests["requests_n"].sum() >= 20


def test_own_stop_signals_undoes_an_inherited_ignore() -> None:
    """The helper every entry point calls: checked in a child so this process keeps its handlers."""
    code = ("import signal\n"
            "from loadkit.stop_signals import own_stop_signals\n"
            "print(own_stop_signals(), signal.getsignal(signal.SIGINT) is signal.default_int_handler,"
            " signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)\n")
    out = subprocess.run(["sh", "-c", 'trap "" INT TERM; exec "$0" -c "$1"', sys.executable, code],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.strip() == "['SIGINT', 'SIGTERM'] True True"


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_locustfile_runs_a_single_user_for_debugging(protocol: str, tmp_path: Path) -> None:
    accounts = write_accounts(tmp_path, 2)
    locustfile = ROOT / "locustfiles" / ("imap_storm.py" if protocol == "imap" else "pop_storm.py")
    with FakeMailServer(protocol, "ok") as fake:
        proc = subprocess.Popen(
            [sys.executable, str(locustfile), "--host", fake.address, "--mail-accounts", str(accounts),
             "--mail-dwell", "0.2"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 20
        while fake.connections_n < 3 and time.monotonic() < deadline:
            gevent.sleep(0.1)
        gevent.sleep(0.3)
        proc.terminate()  # run_single_user runs until stopped; this is the process we started
        out = _wait(proc, 10)
    assert fake.connections_n >= 3, out
    login = "LOGIN" if protocol == "imap" else "PASS"
    assert login in out and "connect+greeting" in out, out
    assert "Traceback" not in out, out
