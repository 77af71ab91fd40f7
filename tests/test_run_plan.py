"""`loadkit run` checks its own options and resolves every target once (run.runner.plan_run).

Without --workers there is no master, so no master bind is checked: a profile whose allowlist
does not name 127.0.0.1 runs in one process. With workers a loopback bind needs no allowlist
entry (only this host can reach it); another address must be in the allowlist, and the advice
given when it is not can be followed.
"""

from __future__ import annotations

import socketserver
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from loadkit.cli import main
from loadkit.errors import ProfileError, TargetNotAllowed
from loadkit.profile.profile import load_profile
from loadkit.record.reader import load_run
from loadkit.run import runner

HERE = Path(__file__).parent
TINY = HERE / "locustfiles" / "tiny.py"
ADDRESS = "127.0.51.1"  # a loopback address outside the profile's allowlist's 127.0.0.1


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(200)
        self.request.sendall(b"ok\n")


@pytest.fixture
def echo() -> Iterator[socketserver.ThreadingTCPServer]:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer((ADDRESS, 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def narrow_profile(tmp_path: Path, port: int) -> Path:
    """A profile whose allowlist is its target's /24 only (127.0.0.1 is outside it)."""
    p = tmp_path / "narrow.toml"
    p.write_text(f"""
[run]
scenario = "narrow"
duration = "2s"
stop_timeout = "1s"
[targets]
echo = "{ADDRESS}:{port}"
allowlist = ["127.0.51.0/24"]
[load]
locustfile = "{TINY}"
host = "echo"
users = 2
""")
    return p


def test_a_one_process_run_needs_no_allowlist_entry_for_a_master(tmp_path: Path, echo) -> None:
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "loadkit", "run", str(narrow_profile(tmp_path, echo.server_address[1])),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [run_dir] = list(out.iterdir())
    run = load_run(run_dir)
    assert run.manifest["status"] == "completed" and run.requests["requests_n"].sum() > 0


def test_the_master_bind_is_checked_only_with_workers_and_the_advice_can_be_followed(tmp_path: Path) -> None:
    p = load_profile(narrow_profile(tmp_path, 7))
    assert runner.plan_run(p).master_bind == runner.DEFAULT_MASTER_BIND
    assert runner.plan_run(p, workers=2).master_bind == "127.0.0.1"  # loopback: only this host
    with pytest.raises(TargetNotAllowed) as refused:
        runner.plan_run(p, workers=1, master_bind="192.0.2.7")
    assert "or bind 0.0.0.0" in str(refused.value)
    assert runner.plan_run(p, workers=1, master_bind="0.0.0.0").master_bind == "0.0.0.0"  # as advised
    with pytest.raises(ProfileError, match="need --workers N"):
        runner.plan_run(p, master_bind="0.0.0.0")
    with pytest.raises(ProfileError, match="--workers must be 0 or more"):
        runner.plan_run(p, workers=-1)


def test_loadkit_run_resolves_targets_and_checks_the_bind_once(tmp_path: Path, monkeypatch) -> None:
    calls = {"resolve": 0, "bind": 0}
    real_resolve, real_bind = runner.resolve_targets, runner.check_master_bind

    def counting_resolve(profile):
        calls["resolve"] += 1
        return real_resolve(profile)

    def counting_bind(*a, **kw):
        calls["bind"] += 1
        return real_bind(*a, **kw)

    seen = {}

    def fake_run(self):  # everything up to starting Locust, which this test does not need
        seen["targets"] = self.plan.targets
        return runner.RunResult(tmp_path, "completed")

    monkeypatch.setattr(runner, "resolve_targets", counting_resolve)
    monkeypatch.setattr(runner, "check_master_bind", counting_bind)
    monkeypatch.setattr(runner.Runner, "run", fake_run)
    p = narrow_profile(tmp_path, 7)
    assert main(["run", str(p), "--out", str(tmp_path / "runs"), "--workers", "2"]) == 0
    assert calls == {"resolve": 1, "bind": 1}
    assert str(seen["targets"]["echo"]) == f"{ADDRESS}:7"


def test_each_protocol_target_reaches_its_users_as_a_target_option(tmp_path: Path) -> None:
    p = tmp_path / "mail.toml"
    p.write_text(f"""
[run]
scenario = "mail"
duration = "2s"
[targets]
imap = "127.0.0.1"
pop3 = "127.0.0.1:2110"
[load]
locustfile = "{TINY}"
users = 1
options = {{ mail-tls = "tls" }}
""")
    plan = runner.plan_run(load_profile(p))
    args = runner.user_args(plan.profile, plan.targets)
    # no port: the protocol's standard port, the implicit-TLS one with mail-tls = "tls"
    assert args[:4] == ["--target", "imap=127.0.0.1:993", "--target", "pop3=127.0.0.1:2110"]
    assert "--host" not in args
