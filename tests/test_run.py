"""`loadkit run` end to end against a small loopback TCP server (no lab needed).

The tiny locustfile (tests/locustfiles/tiny.py) connects to the server, sends one line and reads
the reply; these tests check the run record, gates and exit codes, aborts, credentials,
SIGTERM/SIGKILL and distributed runs with a lost worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from loadkit.record.catalog import list_runs
from loadkit.record.reader import load_run, read_events

HERE = Path(__file__).parent
TINY = HERE / "locustfiles" / "tiny.py"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data = self.request.recv(200)
        self.server.received.append(data)  # type: ignore[attr-defined]
        self.request.sendall(b"ok\n")


@pytest.fixture
def echo() -> Iterator[socketserver.ThreadingTCPServer]:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def profile(tmp_path: Path, port: int, *, duration: str = "4s", users: int = 3, options: str = "",
            extra: str = "", target: str | None = None) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(f"""
[run]
scenario = "tiny"
release = "t1"
duration = "{duration}"
stop_timeout = "2s"
[targets]
echo = "{target or f'127.0.0.1:{port}'}"
[load]
locustfile = "{TINY}"
host = "echo"
users = {users}
spawn_rate = {users}
options = {{ {options} }}
{extra}
""")
    return p


def loadkit(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loadkit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def only_run(out: Path) -> Path:
    runs = [d for d in out.iterdir() if d.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def live_status(out: Path) -> dict:
    for path in out.glob("*/status.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
    return {}


def test_run_writes_a_complete_record_and_gates_pass(tmp_path: Path, echo) -> None:
    out = tmp_path / "runs"
    p = profile(tmp_path, echo.server_address[1], options="fail-every = 10",
                extra="[gates]\np99_latency_s = 2.0\nfailure_ratio = 0.2")
    proc = loadkit("run", str(p), "--out", str(out), "--release", "r42")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    run = load_run(only_run(out))
    m = run.manifest
    assert (m["status"], m["release"], m["scenario"]) == ("completed", "r42", "tiny")
    assert m["ended_unix_s"] > m["started_unix_s"] > 0
    assert m["targets"] == [f"tcp://127.0.0.1:{echo.server_address[1]}"]
    assert m["profile"]["load"]["users"] == 3 and m["versions"]["locust"]
    # per-interval rows add up to what the server saw; every 10th request failed by class
    total = int(run.requests["requests_n"].sum())
    assert total == len(echo.received) > 0
    assert set(run.failures["failure_class"]) == {"auth_rejected"}
    assert int(run.failures["failures_n"].sum()) == int(run.requests["failures_n"].sum()) == total // 10
    assert (run.requests["latency_p99_s"] >= run.requests["latency_p50_s"]).all()
    assert "tiny.sent" in set(run.generator["metric"])
    kinds = [e["kind"] for e in run.events]
    assert kinds[0] == "run_started" and "run_ended" in kinds and kinds.count("gate") == 2
    assert {g["name"]: g["passed"] for g in m["gates"]} == {"p99_latency_s": True, "failure_ratio": True}
    locust_dir = run.path / "locust"
    assert (locust_dir / "locust_stats.csv").exists() and (locust_dir / "report.html").exists()
    assert "gate failure_ratio" in stderr and "completed" in stderr
    listed = list_runs(out)
    assert list(listed["run_id"]) == [m["run_id"]] and listed["requests_n"][0] == total


def test_failed_gate_exits_1_and_is_recorded(tmp_path: Path, echo) -> None:
    out = tmp_path / "runs"
    p = profile(tmp_path, echo.server_address[1], duration="3s", options="fail-every = 2",
                extra="[gates]\nfailure_ratio = 0.1\nmin_headroom_pct = 10")
    proc = loadkit("run", str(p), "--out", str(out))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    m = load_run(only_run(out)).manifest
    gates = {g["name"]: g for g in m["gates"]}
    assert gates["failure_ratio"]["passed"] is False and gates["failure_ratio"]["value"] == pytest.approx(0.5, abs=0.05)
    assert gates["min_headroom_pct"]["passed"] is None  # not evaluated: no forecast, no proxies
    assert "not evaluated" in gates["min_headroom_pct"]["detail"]
    assert "FAIL" in stderr


def test_failure_ratio_breach_aborts_the_run(tmp_path: Path, echo) -> None:
    out = tmp_path / "runs"
    p = profile(tmp_path, echo.server_address[1], duration="60s", options="fail-every = 1",
                extra="[abort]\nfailure_ratio = 0.5\nmin_requests = 20")
    proc = loadkit("run", str(p), "--out", str(out))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    run = load_run(only_run(out))
    assert run.manifest["status"] == "aborted"
    aborts = [e for e in run.events if e["kind"] == "abort"]
    assert len(aborts) == 1 and aborts[0]["detail"]["reason"] == "failure_ratio"
    assert aborts[0]["detail"]["ratio"] >= 0.5
    # stopped long before the 60 s it was given, and no requests were recorded well after the abort
    assert run.manifest["ended_unix_s"] - run.manifest["started_unix_s"] < 30
    assert run.requests["ts_unix_s"].max() <= aborts[0]["ts_unix_s"] + 2 + 2  # 2 s + stop_timeout
    assert {g["name"]: g["passed"] for g in run.manifest["gates"]}["no_abort"] is False


def test_credentials_never_reach_the_record_or_the_output(tmp_path: Path, echo) -> None:
    secret = "Zebra-S3cret-91x"
    env_secret = "Env-0nly-Secret-77q"
    accounts = tmp_path / "accounts.csv"
    accounts.write_text(f"user,password\nuser0001,{secret}\n")
    out = tmp_path / "runs"
    p = profile(tmp_path, echo.server_address[1], duration="3s", options=f'accounts-file = "{accounts}"')
    proc = loadkit("run", str(p), "--out", str(out), env={**os.environ, "LOADKIT_TEST_PASSWORD": env_secret})
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert any(secret.encode() in r for r in echo.received)  # the password was really used
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and env_secret.encode() not in data, path
    assert secret not in stdout + stderr and env_secret not in stdout + stderr


def test_an_option_locust_does_not_know_is_one_line_and_exit_2(tmp_path: Path, echo) -> None:
    out = tmp_path / "runs"
    p = profile(tmp_path, echo.server_address[1], options="no-such-option = 3")
    proc = loadkit("run", str(p), "--out", str(out))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("loadkit: error: Locust does not know --no-such-option")
    assert last.endswith("check [load] options against the locustfile's options")
    assert echo.received == []
    assert load_run(only_run(out)).manifest["status"] == "failed"


class _SocketSpy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple] = []
        for name in ("connect", "connect_ex", "sendto", "send", "sendall"):
            original = getattr(socket.socket, name)

            def spy(sock, *args, _name=name, _orig=original):
                self.calls.append((_name, args))
                return _orig(sock, *args)

            monkeypatch.setattr(socket.socket, name, spy)

        def no_popen(*args, **kw):
            self.calls.append(("popen", args))
            raise AssertionError("a process was started for a refused profile")

        monkeypatch.setattr(subprocess, "Popen", no_popen)


def test_non_allowlisted_target_is_refused_with_nothing_sent(tmp_path: Path, monkeypatch, capsys) -> None:
    from loadkit.cli import main

    spy = _SocketSpy(monkeypatch)
    out = tmp_path / "runs"
    p = profile(tmp_path, 9, target="192.0.2.10:7")
    assert main(["run", str(p), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "outside the allowlist (127.0.0.0/8, ::1/128)" in err and "nothing was sent" in err
    assert spy.calls == []
    assert not out.exists()


def _snmp() -> str:
    return "import sys; print(open('/proc/net/snmp').read())"


@pytest.mark.skipif(subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0,
                    reason="unshare -n is not permitted here")
def test_refusal_inside_a_fresh_network_namespace_sends_zero_packets(tmp_path: Path) -> None:
    p = profile(tmp_path, 9, target="192.0.2.10:7")
    script = (
        f"{sys.executable} -m loadkit run {p} --out {tmp_path / 'runs'}; echo rc=$?; "
        "ip link set lo up 2>/dev/null; cat /proc/net/snmp"
    )
    res = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert "rc=2" in res.stdout, res.stderr
    assert "outside the allowlist" in res.stderr
    lines = [line.split() for line in res.stdout.splitlines() if line.startswith(("Ip:", "Udp:", "Tcp:"))]
    counters = {}
    for head, values in zip(lines[::2], lines[1::2]):
        for k, v in zip(head[1:], values[1:]):
            counters[f"{head[0]}{k}"] = int(v)
    assert counters["Ip:OutRequests"] == 0 and counters["Ip:OutNoRoutes"] == 0
    assert counters["Udp:OutDatagrams"] == 0 and counters["Tcp:ActiveOpens"] == 0


def test_sigterm_mid_run_leaves_a_complete_interrupted_record(tmp_path: Path, echo) -> None:
    out = tmp_path / "runs"
    p = profile(tmp_path, echo.server_address[1], duration="60s")
    proc = loadkit("run", str(p), "--out", str(out))
    try:
        wait_for(lambda: live_status(out).get("requests_n", 0) > 0, what="requests")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stderr
    run = load_run(only_run(out))
    assert run.complete and run.manifest["status"] == "interrupted"
    assert run.manifest["ended_unix_s"] > run.manifest["started_unix_s"]
    assert run.requests["requests_n"].sum() > 0
    assert any(e["kind"] == "run_ended" for e in run.events)
    assert (run.path / "locust" / "locust_stats.csv").exists()


def test_sigkill_leaves_every_flushed_interval_readable_and_no_load_behind(tmp_path: Path, echo) -> None:
    out = tmp_path / "runs"
    p = profile(tmp_path, echo.server_address[1], duration="60s")
    proc = loadkit("run", str(p), "--out", str(out))
    try:
        wait_for(lambda: len(list(out.glob("*/requests/part-*.parquet"))) >= 2, what="two flushed intervals")
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, "Locust outlived the runner"
    run_dir = only_run(out)
    parts = sorted((run_dir / "requests").glob("part-*.parquet"))
    run = load_run(run_dir)
    assert not run.complete and run.manifest["status"] == "running"
    assert len(run.requests) >= 2 and run.requests["requests_n"].sum() > 0
    assert len(parts) >= 2
    assert [e["kind"] for e in read_events(run_dir)][0] == "run_started"


def test_two_workers_give_one_record_and_a_lost_worker_is_an_event(tmp_path: Path, echo) -> None:
    out = tmp_path / "runs"
    p = profile(tmp_path, echo.server_address[1], duration="20s", users=4)
    proc = loadkit("run", str(p), "--out", str(out), "--workers", "2")
    try:
        wait_for(lambda: live_status(out).get("workers") == 2 and live_status(out).get("requests_n", 0) > 0,
                 timeout_s=60, what="two workers sending")
        workers = [c for c in psutil.Process(proc.pid).children()
                   if "--worker" in c.cmdline()]
        assert len(workers) == 2
        killed_at = time.time()
        os.kill(workers[0].pid, signal.SIGKILL)  # a worker we started
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    run = load_run(only_run(out))  # one merged record
    assert run.manifest["status"] == "completed"
    lost = [e for e in run.events if e["kind"] == "worker_lost"]
    assert len(lost) == 1 and lost[0]["ts_unix_s"] >= killed_at
    # the surviving worker kept the run going after the loss was noticed
    after = run.requests[run.requests["ts_unix_s"] > lost[0]["ts_unix_s"] + 1]
    assert after["requests_n"].sum() > 0
    # workers report every record interval (not Locust's 3 s), so most intervals have rows
    assert run.requests["ts_unix_s"].nunique() >= 0.6 * 20
    workers_gauge = run.generator[run.generator["metric"] == "workers"]["value"]
    assert workers_gauge.max() == 2 and (workers_gauge == 1).any()  # 0 once the run has ended


def test_samples_from_a_remote_collector_url_reach_the_record(tmp_path: Path, echo) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    collector = subprocess.Popen(
        [sys.executable, "-m", "loadkit", "collect", "--group", "echo=cmdline:pytest", "--interval", "0.5",
         "--duration", "60", "--listen", f"127.0.0.1:{port}", "--host-label", "target-1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def listening() -> bool:
            with socket.socket() as c:
                return c.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, what="the collector's endpoint")
        out = tmp_path / "runs"
        p = profile(tmp_path, echo.server_address[1], duration="4s",
                    extra=f'[collect]\nurls = ["http://127.0.0.1:{port}"]\ninterval_s = 0.5')
        proc = loadkit("run", str(p), "--out", str(out))
        _, stderr = proc.communicate(timeout=120)
    finally:
        collector.terminate()  # the collector we started
        collector.wait(timeout=10)
    assert proc.returncode == 0, stderr
    run = load_run(only_run(out))
    assert set(run.groups["host"]) == {"target-1"} and set(run.groups["group"]) == {"echo"}
    assert run.groups["procs_n"].max() >= 1 and len(run.system) > 0


def test_plain_locust_with_the_plugin_records_a_sigterm_as_interrupted(tmp_path: Path, echo) -> None:
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(TINY), "--headless", "-u", "2", "-r", "2", "-t", "60s",
         "--host", f"127.0.0.1:{echo.server_address[1]}", "--record-dir", str(out), "--run-id", "plain",
         "--scenario", "qa", "--release", "r7", "--only-summary"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: live_status(out).get("requests_n", 0) > 0, what="requests")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = load_run(out / "plain")
    assert (run.manifest["status"], run.manifest["scenario"], run.manifest["release"]) == ("interrupted", "qa", "r7")
    assert run.manifest["ended_unix_s"] > 0 and run.requests["requests_n"].sum() > 0


def test_a_web_ui_run_ended_by_its_run_time_is_completed_not_interrupted(tmp_path: Path, echo) -> None:
    """Without --headless and --autoquit Locust stays up after the test: stopping the process
    later must not turn a run that ended normally into an 'interrupted' one."""
    out = tmp_path / "runs"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        web_port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(TINY), "--autostart", "-u", "2", "-r", "2", "-t", "3s",
         "--web-host", "127.0.0.1", "--web-port", str(web_port),
         "--host", f"127.0.0.1:{echo.server_address[1]}", "--record-dir", str(out), "--run-id", "web"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        manifest = out / "web" / "manifest.json"
        wait_for(lambda: manifest.exists() and json.loads(manifest.read_text()).get("status") == "completed",
                 timeout_s=60, what="the record finished when the test stopped")
        assert proc.poll() is None  # Locust's web UI is still up
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = load_run(out / "web")
    assert run.manifest["status"] == "completed"
    # ended once, by the test's end; the later SIGTERM changed nothing
    assert [e["detail"]["status"] for e in run.events if e["kind"] == "run_ended"] == ["completed"]
