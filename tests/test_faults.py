"""Faults: what a run record and the lab look like after something breaks mid-run.

- the Locust process that records the run is SIGKILLed: the record holds every flushed interval,
  ``loadkit runs show`` marks it incomplete and ``loadkit report`` refuses it (exit 2, one line);
- the run directory's disk fills up (a small tmpfs this test mounts): one line, exit 2, the parts
  written before intact;
- a Locust worker is SIGKILLed in a mail storm against the lab: a ``worker_lost`` event, and the
  run goes on with the other worker;
- a proxy's dovecot master dies and the lab's supervisor restarts it: exit and start events in the
  record, and the samples go on;
- unbound is killed in the middle of a DNS burst run: the queries left unanswered are classed as
  timeouts, and the run ends by its time bound.

Every process killed here is one the test started (the runner's Locust child, a lab of its own).
"""

from __future__ import annotations

import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pyarrow.parquet as pq
import pytest

from loadkit.cli import main as cli_main
from loadkit.record.reader import load_run
from loadkit.schema import RUN_LAYOUT

HERE = Path(__file__).parent
ROOT = HERE.parent
TINY = HERE / "locustfiles" / "tiny.py"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(200)
        self.request.sendall(b"ok\n")


@pytest.fixture
def echo_port() -> Iterator[int]:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


#: ``[collect] allow_missing = true`` is ``--collect-allow-missing``: a group that matches nothing at
#: start (a service that comes later) records 0 instead of refusing the run
GHOST_GROUP = ('[collect]\ngroups = { ghost = "cmdline:no-such-service-[0-9]{9}" }\n'
               "allow_missing = true\ninterval_s = 0.5\n")


def tiny_profile(tmp_path: Path, port: int, duration: str = "60s", extra: str = "") -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(f"""
[run]
scenario = "tiny"
release = "faults"
duration = "{duration}"
stop_timeout = "2s"
[targets]
echo = "127.0.0.1:{port}"
[load]
locustfile = "{TINY}"
host = "echo"
users = 2
spawn_rate = 2
options = {{ wait-s = 0.05 }}
{extra}
""")
    return p


def loadkit(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loadkit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def run_dir_of(out: Path) -> Path:
    runs = [d for d in out.iterdir() if d.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def parts(run_dir: Path, table: str = "requests") -> list[Path]:
    return sorted((run_dir / RUN_LAYOUT[table]).glob("part-*.parquet"))


def has_event(out: Path, kind: str) -> bool:
    """Has the (one) run under ``out`` recorded an event of ``kind`` yet?"""
    events = [p for d in (out.iterdir() if out.is_dir() else []) for p in [d / "events.jsonl"] if p.exists()]
    return any(f'"kind": "{kind}"' in line for p in events for line in p.open())


def one_error_line(stderr: str) -> str:
    """The command's user-facing error: exactly one ``loadkit: error:`` line, no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("loadkit: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()  # a process this test started
        proc.communicate(timeout=30)


# -- (a) the recording Locust process is killed ----------------------------------------------------


def test_killed_locust_leaves_an_incomplete_record_that_runs_show_marks_and_report_refuses(
        tmp_path: Path, echo_port: int, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    proc = loadkit("run", str(tiny_profile(tmp_path, echo_port, extra=GHOST_GROUP)), "--out", str(out))
    try:
        wait_for(lambda: out.is_dir() and any(out.iterdir()) and len(parts(run_dir_of(out))) >= 2
                 and parts(run_dir_of(out), "groups"), what="two flushed intervals and a sample")
        locust = [c for c in psutil.Process(proc.pid).children() if "locust" in " ".join(c.cmdline())]
        assert len(locust) == 1
        flushed = len(parts(run_dir_of(out)))
        locust[0].send_signal(signal.SIGKILL)  # the runner's child: it records the run
        _, stderr = proc.communicate(timeout=60)
    finally:
        stop_proc(proc)
    run_dir = run_dir_of(out)
    assert proc.returncode == 2
    line = one_error_line(stderr)
    assert "killed by signal 9 mid-run" in line and run_dir.name in line and "incomplete" in line
    run = load_run(run_dir)
    # every interval flushed before the kill is there; the record is marked incomplete
    assert len(parts(run_dir)) >= flushed and run.requests["requests_n"].sum() > 0
    assert not run.complete and run.manifest["ended_unix_s"] == 0
    assert run.manifest["status"] == "failed"  # closed by the runner, not by Locust
    # [collect] allow_missing: the group that matches nothing was sampled as 0, not refused
    ghost = run.groups[run.groups["group"] == "ghost"]
    assert len(ghost) > 0 and (ghost["procs_n"] == 0).all()
    # the commands in this process (their start-up is most of their cost)
    assert cli_main(["runs", "show", run_dir.name, "--dir", str(out)]) == 0
    assert "INCOMPLETE" in capsys.readouterr().out
    assert cli_main(["runs", "list", "--dir", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["complete"] is False
    code = cli_main(["report", "--release", "faults", "--runs", str(run_dir), "--out", str(tmp_path / "report")])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert run_dir.name in line and "incomplete" in line
    assert not (tmp_path / "report" / "index.html").exists()


# -- (c) the disk under the run directory fills up ---------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "loadkit-test", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # busy: detach it


def fill(mnt: Path) -> None:
    """Write zeros into ``mnt`` until the filesystem has no space left."""
    with open(mnt / "filler", "wb") as fh:
        chunk = b"\0" * 65536
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass


def test_a_full_disk_is_one_line_and_the_parts_written_before_stay_readable(
        tmp_path: Path, echo_port: int, small_disk: Path) -> None:
    out = small_disk / "runs"
    # a long run: it must end because the disk filled, not by its time
    proc = loadkit("run", str(tiny_profile(tmp_path, echo_port, duration="60s")), "--out", str(out))
    try:
        wait_for(lambda: out.is_dir() and any(out.iterdir()) and len(parts(run_dir_of(out))) >= 2,
                 what="two flushed intervals")
        run_dir = run_dir_of(out)
        before = {p: pq.read_table(p).num_rows for p in parts(run_dir)}
        fill(small_disk)
        filled_at = time.monotonic()
        _, stderr = proc.communicate(timeout=90)
    finally:
        stop_proc(proc)
    assert proc.returncode == 2 and time.monotonic() - filled_at < 30  # stopped, not run out
    line = one_error_line(stderr)
    assert "No space left on device" in line and run_dir.name in line
    # what was written before the disk filled is intact: the same parts, the same rows
    for part, rows in before.items():
        assert pq.read_table(part).num_rows == rows
    run = load_run(run_dir)
    assert len(run.requests) >= sum(before.values()) > 0
    assert not run.complete  # its end could not be written
    assert not list(run_dir.rglob("*.tmp"))  # no half-written part left taking space


# -- a collector group that is not there yet --------------------------------------------------------

def test_profile_allow_missing_must_be_a_boolean(tmp_path: Path) -> None:
    from loadkit.errors import ProfileError
    from loadkit.profile.profile import load_profile, resolve_targets
    from loadkit.run.runner import locust_args

    p = tiny_profile(tmp_path, 7, extra=GHOST_GROUP)
    prof = load_profile(p)
    assert prof.collect.allow_missing
    assert "--collect-allow-missing" in locust_args(prof, resolve_targets(prof), tmp_path, "r", tmp_path / "r")
    p.write_text(p.read_text().replace("allow_missing = true", 'allow_missing = "yes"'))
    with pytest.raises(ProfileError, match=r"\[collect\] allow_missing: must be true or false"):
        load_profile(p)


# -- against the lab ----------------------------------------------------------------------------------

MiB = 1024 * 1024
#: DNS failure classes a dead server can cause: queries in its buffer or in flight time out; later
#: ones find the port closed (ICMP port unreachable)
DEAD_SERVER_CLASSES = {"timeout", "icmp_unreachable"}


def mail_profile(tmp_path: Path, status, *, duration: str, users: int, options: str, collect: str = "") -> Path:
    p = tmp_path / "storm.toml"
    p.write_text(f"""
[run]
scenario = "faults_storm"
release = "faults"
duration = "{duration}"
stop_timeout = "1s"
[targets]
imap = "{status.imap}"
[load]
locustfile = "{ROOT / 'locustfiles' / 'imap_storm.py'}"
host = "imap"
users = {users}
spawn_rate = {users}
options = {{ mail-accounts = "{status.accounts_file}", {options} }}
{collect}
""")
    return p


def live(out: Path) -> dict:
    for path in out.glob("*/status.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
    return {}


def stop_run(proc: subprocess.Popen, timeout_s: float = 60) -> str:
    """SIGTERM the runner (a graceful stop: the record is closed as interrupted); its stderr."""
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=timeout_s)
    return stderr


def _teeth(series: list[float], high: float, low: float) -> int:
    """Times the series climbed to ``high`` or more, dropped to ``low`` or less and climbed to
    ``high`` again (one tooth of a sawtooth; the climb that ends a tooth starts the next)."""
    teeth, state = 0, "start"
    for v in series:
        if v >= high:
            if state == "fell":
                teeth += 1
            state = "high"
        elif state == "high" and v <= low:
            state = "fell"
    return teeth


@pytest.fixture(scope="module")
def fragile_lab(tmp_path_factory: pytest.TempPathFactory):
    """One lab for the tests below that break it (a lab up costs seconds): one proxy in a small
    memory cgroup with the OOM killer off, restarted by the supervisor a second after it falls.
    The test that kills unbound comes last in this file."""
    from conftest import free_lab_address

    from loadkit.lab import Lab, LabConfig

    settings = dict(proxies=1, proxy_memory_bytes=32 * MiB, oom_kill=False, accounts=200, dns_names=200,
                    proxy_restart_after_s=1.0)
    the_lab = Lab(LabConfig(dir=tmp_path_factory.mktemp("fragile-lab"), address=free_lab_address(settings),
                            **settings))
    try:
        yield the_lab.up()
    finally:
        the_lab.down()


def test_a_fallen_proxy_is_restarted_under_the_storm_and_the_sawtooth_is_recorded(tmp_path: Path, fragile_lab) -> None:
    """Incident 1's failed restarts: a proxy in a small memory cgroup with the OOM killer off falls
    over under a storm of held sessions, the lab's supervisor restarts it a second later, the storm
    fills it again, and it falls again. The run record has each exit and restart of its dovecot
    master as events and its sessions climbing and dropping (sampling goes on through restarts)."""
    status = fragile_lab
    if not status.cgroups.enabled:
        pytest.skip(f"no memory cgroups here: {status.cgroups.reason}")
    proxy = status.proxies[0]
    out = tmp_path / "runs"
    p = mail_profile(
        tmp_path, status, duration="90s", users=60,
        options=('mail-arrival = "rate:40", mail-dwell = "idle", mail-reconnect = "fixed", '
                 'mail-reconnect-delay = 0.3, mail-timeouts = "connect=2,greeting=2,login=2,select=2,fetch=2,logout=1"'),
        collect=f'[collect]\ngroups = {{ {proxy.name} = "cgroup:{proxy.cgroup}@{proxy.imap.port},{proxy.pop3.port}" }}\n'
                'interval_s = 0.25')
    proc = loadkit("run", str(p), "--out", str(out))
    from loadkit.lab import Lab

    the_lab = Lab.from_dir(status.dir)
    try:
        wait_for(lambda: (lambda p: p.restarts >= 2 and p.up)(the_lab.status().proxies[0]), timeout_s=75,
                 what="two restarts of the proxy")
        time.sleep(1.5)  # the collector sees the second master start
        stderr = stop_run(proc)
    finally:
        stop_proc(proc)
    assert proc.returncode == 2, stderr  # interrupted by this test
    run = load_run(run_dir_of(out))
    assert run.complete
    masters_exited = [e for e in run.events if e["kind"] == "process_exited" and e["source"] == proxy.name
                      and e["detail"].get("root") and e["detail"].get("name") == "dovecot"]
    restarted = [e for e in run.events if e["kind"] == "process_restarted" and e["source"] == proxy.name]
    assert len(masters_exited) >= 2 and len(restarted) >= 2, [e["kind"] for e in run.events][-40:]
    # sampling went on through the restarts: samples after the last one, with the new master in them
    g = run.groups[run.groups["group"] == proxy.name].sort_values("ts_unix_s")
    later = g[g["ts_unix_s"] > restarted[-1]["ts_unix_s"]]
    assert len(later) >= 1 and (later["procs_n"] >= 1).all()
    # the sawtooth: held sessions climb, drop with the proxy, climb again. At least one whole tooth:
    # on a loaded machine the proxy may fall again before its sessions are back above the mark
    # (CI once saw 22 -> 12 -> 5 -> 7 -> 0 -> 22), so the number of teeth is not the number of
    # restarts, which the events above count.
    assert _teeth(list(g["sessions_n"]), high=8, low=4) >= 1, list(g["sessions_n"])


def test_unbound_killed_mid_burst_gives_classed_failures_and_the_run_ends_on_time(tmp_path: Path, fragile_lab) -> None:
    """unbound freezes in the middle of the load (SIGSTOP, so queries are outstanding: a burst
    caught in its buffer) and is then killed: what it held times out (no retries here, so a
    timeout stays a timeout), later queries find the port closed, and the run ends on time.
    Last in this file: the lab has no DNS afterwards."""
    status = fragile_lab
    out = tmp_path / "runs"
    duration_s = 5
    # the first burst at 0.5 s: unbound is frozen once its event is recorded (~1 s later), while the
    # generator still sends, with seconds to spare for a loaded machine's late start
    p = tmp_path / "dns.toml"
    p.write_text(f"""
[run]
scenario = "faults_dns"
release = "faults"
duration = "{duration_s}s"
stop_timeout = "1s"
[targets]
dns = "{status.dns}"
[load]
locustfile = "{ROOT / 'locustfiles' / 'dns_burst.py'}"
host = "dns"
users = 1
spawn_rate = 1
options = {{ dns-names-file = "{status.names_file}", dns-rate = 300, dns-burst-size = 3000, dns-burst-ms = 200, dns-burst-period = 2, dns-first-burst = 0.5, dns-timeout = 0.5, dns-retries = 0 }}
""")
    proc = loadkit("run", str(p), "--out", str(out))
    try:
        wait_for(lambda: has_event(out, "burst"), timeout_s=60, what="the first burst")
        started = time.monotonic()
        unbound = status.component("unbound").pid  # the lab this module made started it
        os.kill(unbound, signal.SIGSTOP)
        time.sleep(0.7)  # a few hundred queries sent and not answered
        os.kill(unbound, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=duration_s + 60)
    finally:
        stop_proc(proc)
    waited_s = time.monotonic() - started
    assert proc.returncode in (0, 1), stderr  # the run ended by itself: completed
    run = load_run(run_dir_of(out))
    assert run.complete and run.manifest["status"] == "completed"
    # no hang: it ended by its own time bound (generous margin for a loaded machine)
    assert waited_s < duration_s + 20
    assert run.manifest["ended_unix_s"] - run.manifest["started_unix_s"] < duration_s + 25
    classes = run.failures.groupby("failure_class")["failures_n"].sum()
    assert classes.sum() > 0 and set(classes.index) <= DEAD_SERVER_CLASSES, classes.to_dict()
    assert classes.get("timeout", 0) > 0, classes.to_dict()
