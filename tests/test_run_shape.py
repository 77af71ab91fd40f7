"""``[load] shape`` and ``--master-bind``: a profile's load shape drives a real ``loadkit run``.

The runs use the tiny echo locustfile against a loopback server (as tests/test_run.py does);
the assertions read the users gauge and DNS counters the run record holds per interval, never
wall-clock speed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import psutil
import pytest
import test_run
from test_run import TINY, loadkit, only_run, wait_for

from loadkit.errors import ProfileError, TargetNotAllowed
from loadkit.generate import profile_shape
from loadkit.generate.shapes import DailyShape, RampToKnee, SpikeTrainShape, StepShape
from loadkit.profile.profile import SHAPE_KINDS, load_profile, resolve_targets
from loadkit.run import runner
from loadkit.record.reader import load_run

echo = test_run.echo  # the loopback TCP echo server fixture


def shaped_profile(tmp_path: Path, port: int, shape: str, duration: str = "8s", extra: str = "") -> Path:
    p = tmp_path / "shaped.toml"
    p.write_text(f"""
[run]
scenario = "shaped"
duration = "{duration}"
stop_timeout = "1s"
[targets]
echo = "127.0.0.1:{port}"
[load]
locustfile = "{TINY}"
host = "echo"
options = {{ wait-s = 0.05 }}
shape = {shape}
[record]
interval_s = 0.5
{extra}
""")
    return p


def users_over_time(run_dir: Path) -> list[tuple[float, int]]:
    """(seconds since the first row, users) from the run record's ``users`` gauge."""
    g = load_run(run_dir).generator
    g = g[g["metric"] == "users"].sort_values("ts_unix_s")
    t0 = float(g["ts_unix_s"].iloc[0])
    return [(float(t) - t0, int(v)) for t, v in zip(g["ts_unix_s"], g["value"])]


# -- the shape classes the profile shape builds --------------------------------------------------


def test_every_profile_shape_kind_has_a_class_with_those_parameters() -> None:
    assert set(SHAPE_KINDS) == set(profile_shape.KINDS)
    for kind, params in SHAPE_KINDS.items():
        cls = profile_shape.KINDS[kind]
        for key in params:
            assert key in ("max_loss_ratio", "max_p99_s", "intervals_n") or hasattr(cls, key), (kind, key)
    assert runner.PROFILE_SHAPE_ENV == profile_shape.ENV_VAR
    assert runner.PROFILE_SHAPE_FILE.is_file()


def test_profile_shapes_become_configured_shape_classes(tmp_path: Path) -> None:
    steps = profile_shape.shape_class({"kind": "steps", "steps": [[2.0, 1], [3.0, 4]], "spawn_rate": 7})()
    assert isinstance(steps, StepShape) and steps.spawn_rate == 7
    assert [steps.users_at(t) for t in (0, 1.9, 2.0, 4.9, 5.0)] == [1, 1, 4, 4, None]
    spikes = profile_shape.shape_class({"kind": "spike_train", "base_users": 2, "spike_users": 9,
                                        "spike_s": 1.0, "period_s": 4.0, "first_spike_s": 1.0,
                                        "run_time_s": 6.0})()
    assert isinstance(spikes, SpikeTrainShape)
    assert [spikes.users_at(t) for t in (0.5, 1.5, 2.5, 5.5, 6.0)] == [2, 9, 2, 9, None]
    daily = profile_shape.shape_class({"kind": "daily", "night_users": 1, "peak_users": 5,
                                       "spike_users": 20, "day_s": 24.0})()
    assert isinstance(daily, DailyShape) and daily.users_at(4.0) == 1 and daily.users_at(12.5) == 20
    knee = profile_shape.shape_class({"kind": "ramp_to_knee", "max_users": 10, "users_per_s": 2.0,
                                      "max_loss_ratio": 0.2, "max_p99_s": 0.5})()
    assert isinstance(knee, RampToKnee) and knee.criteria.max_loss_ratio == 0.2
    assert knee.criteria.max_p99_s == 0.5 and knee.users_at(2.0) == 5 and knee.users_at(100) == 10
    with pytest.raises(ProfileError):
        profile_shape.shape_class({"kind": "sawtooth"})


def test_a_profile_shape_is_checked_and_sets_the_users(tmp_path: Path) -> None:
    p = shaped_profile(tmp_path, 7, '{ kind = "spike_train", base_users = 2, spike_users = 30, spike_s = "2s" }',
                       extra="[caps]\nmax_users = 40")
    prof = load_profile(p)
    assert prof.load.users == 30  # the shape's peak, checked against [caps] max_users
    assert prof.load.shape == {"kind": "spike_train", "base_users": 2, "spike_users": 30, "spike_s": 2.0}
    assert prof.to_dict()["load"]["shape"]["spike_s"] == 2.0
    p = shaped_profile(tmp_path, 7, '{ kind = "steps", steps = [["1s", 5], ["1s", 50]] }',
                       extra="[caps]\nmax_users = 40")
    with pytest.raises(ProfileError, match=r"shaped.toml: \[load\] shape peaks at 50 users, above \[caps\] max_users = 40"):
        load_profile(p)
    prof = load_profile(shaped_profile(tmp_path, 7, '{ kind = "steps", steps = [[1, 5]] }'))
    args = runner.locust_args(prof, resolve_targets(prof), tmp_path, "r", tmp_path)
    assert args[1].split(",")[0] == str(runner.PROFILE_SHAPE_FILE) and "-u" not in args


# -- real runs -------------------------------------------------------------------------------------


def _run(tmp_path: Path, p: Path, *extra: str) -> Path:
    out = tmp_path / "runs"
    proc = loadkit("run", str(p), "--out", str(out), *extra)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr
    return only_run(out)


def _assert_steps(series: list[tuple[float, int]]) -> None:
    values = [u for _, u in series]
    # the users went 1 -> 4 -> 2 in that order, each level held for more than one interval (a level
    # seen in one interval only is a step in passing: with workers, users stop one by one)
    held = [v for i, v in enumerate(values) if v and i + 1 < len(values) and values[i + 1] == v]
    levels = [v for i, v in enumerate(held) if i == 0 or v != held[i - 1]]
    assert levels[:3] == [1, 4, 2], series
    assert sum(v == 1 for v in values) >= 2 and sum(v == 4 for v in values) >= 2, series
    assert max(values) == 4, series  # never above the shape's peak


STEPS = '{ kind = "steps", steps = [["2s", 1], ["2s", 4], ["2s", 2]], spawn_rate = 50 }'


def test_a_steps_shape_drives_the_users_through_the_steps(tmp_path: Path, echo) -> None:
    run_dir = _run(tmp_path, shaped_profile(tmp_path, echo.server_address[1], STEPS, duration="20s"))
    run = load_run(run_dir)
    assert run.manifest["status"] == "completed"
    assert run.manifest["profile"]["load"]["shape"]["kind"] == "steps"
    _assert_steps(users_over_time(run_dir))
    # the shape ended the run after its 6 s, well before the 20 s duration (rows, not a clock)
    series = users_over_time(run_dir)
    assert series[-1][0] < 15, series
    assert len(echo.received) > 0


def test_the_run_duration_ends_a_longer_shape(tmp_path: Path, echo) -> None:
    shape = '{ kind = "steps", steps = [["1s", 1], ["60s", 3]] }'
    run_dir = _run(tmp_path, shaped_profile(tmp_path, echo.server_address[1], shape, duration="4s"))
    run = load_run(run_dir)
    assert run.manifest["status"] == "completed"
    series = users_over_time(run_dir)
    assert max(u for _, u in series) == 3 and series[-1][0] < 20, series


def test_a_steps_shape_drives_the_users_of_a_distributed_run(tmp_path: Path, echo) -> None:
    run_dir = _run(tmp_path, shaped_profile(tmp_path, echo.server_address[1], STEPS, duration="20s"),
                   "--workers", "2")
    assert load_run(run_dir).manifest["status"] == "completed"
    _assert_steps(users_over_time(run_dir))


# -- --master-bind ---------------------------------------------------------------------------------


def test_master_bind_is_checked_against_the_allowlist() -> None:
    assert runner.check_master_bind("127.0.0.5") == "127.0.0.5"
    assert runner.check_master_bind("0.0.0.0") == "0.0.0.0" and runner.check_master_bind("::") == "::"
    assert runner.check_master_bind("[::1]") == "::1"
    assert runner.check_master_bind("192.0.2.7", ["192.0.2.0/24"]) == "192.0.2.7"
    with pytest.raises(TargetNotAllowed, match="--master-bind 192.0.2.7 is outside the allowlist"):
        runner.check_master_bind("192.0.2.7")
    with pytest.raises(ProfileError, match="is not an IP address"):
        runner.check_master_bind("master.example")


def test_cli_refuses_a_master_bind_outside_the_allowlist(tmp_path: Path) -> None:
    p = shaped_profile(tmp_path, 7, STEPS)
    out = tmp_path / "runs"
    for extra, message in (
        (["--workers", "1", "--master-bind", "198.51.100.4"], "--master-bind 198.51.100.4 is outside the allowlist"),
        (["--master-bind", "0.0.0.0"], "need --workers N"),
    ):
        proc = subprocess.run([sys.executable, "-m", "loadkit", "run", str(p), "--out", str(out), *extra],
                              check=False, capture_output=True, text=True, timeout=60,
                              env={k: v for k, v in os.environ.items() if k != "LOADKIT_ALLOWLIST"})
        assert proc.returncode == 2
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("loadkit: error: ") and message in last
    assert not out.exists() or not any(out.iterdir())  # nothing was started


def _listening(pid: int, port: int) -> set[str]:
    """Addresses a process tree we started listens on at ``port``."""
    found = set()
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        found |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return found


@pytest.mark.parametrize("bind, expected", [("0.0.0.0", {"0.0.0.0", "::"}), ("127.0.0.9", {"127.0.0.9"})])
def test_the_master_listens_on_master_bind_and_workers_join(tmp_path: Path, echo, bind, expected) -> None:
    p = shaped_profile(tmp_path, echo.server_address[1], '{ kind = "steps", steps = [["3s", 2]] }',
                       duration="10s")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "runs"
    proc = loadkit("run", str(p), "--out", str(out), "--workers", "1", "--master-bind", bind,
                   "--master-port", str(port))
    try:
        seen = wait_for(lambda: _listening(proc.pid, port), timeout_s=30, what="the master listening")
        assert seen and seen <= expected, seen
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    run = load_run(only_run(out))
    assert run.manifest["status"] == "completed" and len(echo.received) > 0
    workers = run.generator[run.generator["metric"] == "workers"]["value"]
    assert workers.max() == 1  # the local worker joined the master on that address
    # others may join a master on every interface: the command for them is printed
    printed = f"--worker --master-host <this host> --master-port {port}" in stderr
    assert printed == (bind == "0.0.0.0") and ("LOADKIT_PROFILE_SHAPE='{" in stderr) == printed


# -- the DNS rate follows a profile shape ------------------------------------------------------------

DNS_BURST = Path(__file__).parents[1] / "locustfiles" / "dns_burst.py"


@pytest.fixture
def dns_responder() -> Iterator[tuple[str, int]]:
    """A loopback UDP responder answering every query with an empty NOERROR response."""
    import dns.message

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
                reply = dns.message.make_response(dns.message.from_wire(data)).to_wire()
                sock.sendto(reply, peer)
            except (OSError, ValueError, dns.exception.DNSException):
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()
    finally:
        stop.set()
        thread.join(timeout=2)
        sock.close()


def test_the_dns_rate_follows_a_profile_steps_shape(tmp_path: Path, dns_responder) -> None:
    names = tmp_path / "names.txt"
    names.write_text("".join(f"n{i}.lab.test.\n" for i in range(50)))
    host, port = dns_responder
    p = tmp_path / "dns.toml"
    p.write_text(f"""
[run]
scenario = "dns-shaped"
duration = "12s"
stop_timeout = "1s"
[targets]
dns = "{host}:{port}"
[load]
locustfile = "{DNS_BURST}"
host = "dns"
options = {{ dns-rate = 200, dns-burst-size = 0, dns-names-file = "{names}" }}
shape = {{ kind = "steps", steps = [["3s", 1], ["3s", 4]] }}
[record]
interval_s = 0.5
""")
    run_dir = _run(tmp_path, p)
    log = (run_dir / "locust" / "locust.log").read_text()
    assert "follows the load shape ProfileShape (peak 200 qps)" in log
    g = load_run(run_dir).generator
    sent = g[g["metric"] == "dns.original_sent"].sort_values("ts_unix_s")
    t = sent["ts_unix_s"].to_numpy()
    v = sent["value"].to_numpy()
    # 3 s at a quarter of the peak (50 qps) then 3 s at the peak (200 qps), then the shape ends
    # the run: 750 queries where 200 qps for the 12 s duration would be 2,400
    assert 700 <= v[-1] <= 800, sent
    # Judged by when the cumulative count reached its marks, not by rates in fixed windows: on a
    # loaded machine a sample can come late and an open-loop sender that fell behind catches up,
    # so a window's slope can straddle the step. The run's start is placed from the first sample
    # (read at the quarter rate). At the peak throughout, 700 queries would take 3.5 s; with the
    # quarter-rate step first they take 5.75 s, and a stall only makes that longer.
    start = t[0] - v[0] / 50.0
    reached_700 = float(t[np.argmax(v >= 700)])
    assert reached_700 - start > 4.5, sent
    # and the quarter rate came first: 150 queries by 3 s (the peak first would have sent 600); a
    # late first sample can only move this mark later, by up to the peak rate's worth
    assert float(np.interp(start + 3.0, t, v)) <= 400, sent
