"""Collector parts on canned roots and real child processes: cgroups, wrap-safe deltas, groups,
events, degradation, the sampler loop, the HTTP endpoints and ``loadkit collect``."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loadkit.cli import main as cli_main
from loadkit.errors import CollectorError
from loadkit.observe import cgroups
from loadkit.observe.collector import Collector, CollectorConfig, Sample
from loadkit.observe.degrade import WarnOnce
from loadkit.observe.events import EventTracker
from loadkit.observe.exporter import Exporter, exposition, parse_listen
from loadkit.observe.groups import ProcessGroups, ProcInfo, parse_group_spec
from loadkit.observe.wrap import WRAP_32, CounterTracker
from loadkit.record.reader import read_events, read_table

CANNED = Path(__file__).parent / "data" / "proc"
ADDR = "127.0.5.1"


@pytest.fixture
def proc_root(tmp_path):
    """A writable copy of the canned /proc, so a test can move counters between samples."""
    root = tmp_path / "proc"
    shutil.copytree(CANNED, root)
    return root


def _set_udp(root: Path, **values: int) -> None:
    path = root / "net" / "snmp"
    lines = path.read_text().splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("Udp:"))
    names, nums = lines[i].split()[1:], lines[i + 1].split()[1:]
    for key, value in values.items():
        nums[names.index(key)] = str(value)
    lines[i + 1] = "Udp: " + " ".join(nums)
    path.write_text("\n".join(lines) + "\n")


def _make_cgroup_tree(root: Path) -> None:
    v1 = root / "memory" / "loadkit" / "proxy1"
    (v1 / "child").mkdir(parents=True)
    for d, usage, limit, failcnt, oom, procs in (
        (v1, 201326592, 268435456, 12, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "101\n102\n"),
        (v1 / "child", 1000, 9223372036854771712, 0, "oom_kill_disable 1\nunder_oom 1\noom_kill 0\n", "103\n"),
    ):
        (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (d / "memory.failcnt").write_text(f"{failcnt}\n")
        (d / "memory.oom_control").write_text(oom)
        (d / "cgroup.procs").write_text(procs)
    v2 = root / "loadkit" / "proxy2"
    v2.mkdir(parents=True)
    (v2 / "memory.current").write_text("67108864\n")
    (v2 / "memory.max").write_text("max\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n")
    (v2 / "cgroup.procs").write_text("201\n")


# -- cgroups -----------------------------------------------------------------------------------


def test_cgroup_v1_and_v2_readers(tmp_path):
    _make_cgroup_tree(tmp_path)
    d1, v = cgroups.resolve("/loadkit/proxy1", tmp_path)
    assert v == 1 and d1 == tmp_path / "memory" / "loadkit" / "proxy1"
    assert cgroups.resolve(d1, "/nonexistent") == (d1, 1)  # an absolute directory works as is
    m1 = cgroups.read_memory(d1, 1)
    assert (m1.memory_bytes, m1.limit_bytes, m1.failcnt_n, m1.oom_kills_n) == (201326592, 268435456, 12, 3)
    child = cgroups.read_memory(d1 / "child", 1)
    assert child.limit_bytes == 0 and child.under_oom and child.oom_kill_disabled  # unlimited -> 0
    assert cgroups.read_pids(d1) == {101, 102, 103}  # descendants included
    d2, v = cgroups.resolve("loadkit/proxy2", tmp_path)
    assert v == 2
    m2 = cgroups.read_memory(d2, 2)
    assert (m2.memory_bytes, m2.limit_bytes, m2.failcnt_n, m2.oom_kills_n) == (67108864, 0, 9, 2)
    assert cgroups.resolve("/loadkit/nothing", tmp_path) is None


# -- wrap-safe counters ------------------------------------------------------------------------


def test_counter_deltas_first_growth_wrap_and_restart():
    t = CounterTracker(wrap32={"drops"})
    assert t.update("s", {"drops": 10, "rcvbuf": 5}) == ({"drops": 10, "rcvbuf": 5}, {"drops": 0, "rcvbuf": 0})
    assert t.update("s", {"drops": 15, "rcvbuf": 9})[1] == {"drops": 5, "rcvbuf": 4}
    t.update("s", {"drops": WRAP_32 - 3, "rcvbuf": 9})
    total, delta = t.update("s", {"drops": 4, "rcvbuf": 9})  # 32-bit wrap: 3 to the top, 4 after
    assert delta["drops"] == 7 and total["drops"] == WRAP_32 - 3 + 7
    total, delta = t.update("s", {"drops": 4, "rcvbuf": 2})  # 64-bit counter went down: restart
    assert delta["rcvbuf"] == 2 and total["rcvbuf"] == 11  # still growing
    t.forget("s")
    assert t.update("s", {"drops": 100})[1] == {"drops": 0}


# -- group specs -------------------------------------------------------------------------------


def test_group_specs_parse():
    assert parse_group_spec("proxies=dovecot") == ("proxies", "dovecot", "", (), False)
    assert parse_group_spec("p1=cgroup:/loadkit/p1@11243,11210") == ("p1", "", "/loadkit/p1", (11243, 11210), False)
    assert parse_group_spec("d=cmdline:unbound -c .*@5353").full_cmdline
    assert parse_group_spec("m=user@example") .pattern == "user@example"  # '@' not followed by ports
    assert str(parse_group_spec("p1=cgroup:/x@1,2")) == "p1=cgroup:/x@1,2"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("dovecot", "NAME=PATTERN"),
        ("=dovecot", "NAME=PATTERN"),
        ("a b=dovecot", "may use only"),
        ("x=(", "not a regular expression"),
        ("x=cgroup:", "needs a path"),
        ("x=dovecot@0", "out of range"),
        ("x=dovecot@70000", "out of range"),
    ],
)
def test_bad_group_specs_are_one_line_errors(spec, words):
    with pytest.raises(CollectorError) as err:
        parse_group_spec(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_config_validation():
    for bad in (dict(interval_s=0.05), dict(interval_s=0), dict(duration_s=-1), dict(udp_ports=[0])):
        with pytest.raises(CollectorError):
            CollectorConfig(**bad).validate()
    with pytest.raises(CollectorError, match="twice"):
        CollectorConfig(groups=[parse_group_spec("a=x"), parse_group_spec("a=y")]).validate()


# -- process groups on real processes -----------------------------------------------------------


def _spawn_sleepers(n: int, tag: str) -> list[subprocess.Popen]:
    # exec -a gives the processes a distinctive argv[0] to match on
    return [subprocess.Popen(["bash", "-c", f"exec -a {tag} sleep 60"]) for _ in range(n)]


def _sample_until(groups: ProcessGroups, procs_n: int):
    """The group's row once it has ``procs_n`` members. A spawned sleeper joins once its shell has
    exec'd, which a loaded machine can delay well past a fixed sleep; the looks are spaced out
    (0.3 s, then doubling up to ~10 s in all) because the collector re-checks a young unmatched
    PID only a few times: polling fast would spend those before the exec."""
    for wait_s in (0.3, 0.3, 0.6, 1.2, 2.4, 4.8):
        time.sleep(wait_s)
        row = groups.sample(time.time(), "t", [])[0]
        if row.procs_n == procs_n:
            break
    return row


def _reap(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def test_pattern_group_counts_members_and_sees_exits():
    tag = f"lk-sleeper-{time.time_ns()}"
    procs = _spawn_sleepers(3, tag)
    try:
        warn = WarnOnce("t")
        groups = ProcessGroups([parse_group_spec(f"s={tag}")], warn)
        tracker = EventTracker("t")
        row = _sample_until(groups, 3)
        assert row.procs_n == 3 and row.rss_bytes > 0 and row.fds_n >= 9
        tracker.update(time.time(), groups.members)
        procs[0].kill()
        procs[0].wait(5)
        row = groups.sample(time.time(), "t", [])[0]
        assert row.procs_n == 2
        events = tracker.update(time.time(), groups.members)
        assert [(e.kind, e.detail["pid"]) for e in events] == [("process_exited", procs[0].pid)]
        assert events[0].detail["group_procs_n"] == 2
    finally:
        _reap(procs)


def test_process_caught_before_exec_is_rechecked():
    """A PID first seen as its parent's fork (before exec) joins the group once it execs."""
    tag = f"lk-late-{time.time_ns()}"
    p = subprocess.Popen(["bash", "-c", f"sleep 0.6; exec -a {tag} sleep 60"])
    try:
        time.sleep(0.2)
        groups = ProcessGroups([parse_group_spec(f"s={tag}")], WarnOnce("t"))
        assert groups.sample(time.time(), "t", [])[0].procs_n == 0
        # it execs ~0.6 s after it started, later on a loaded machine: look again after 0.8 s, then
        # 1 s and 2 s later. Only a few looks, spaced out, as the collector re-checks a young
        # unmatched PID only a few times (polling fast would spend them before the exec)
        for wait_s in (0.8, 1.0, 2.0):
            time.sleep(wait_s)
            procs_n = groups.sample(time.time(), "t", [])[0].procs_n
            if procs_n:
                break
        assert procs_n == 1
    finally:
        _reap([p])


def test_fast_sampling_does_not_spend_the_rechecks_before_a_late_exec():
    """Sampled every 50 ms, a PID that execs 0.6 s after its fork is still looked at when it does
    (a fixed three looks were spent in the first 0.15 s, and it was never counted)."""
    tag = f"lk-fast-{time.time_ns()}"
    p = subprocess.Popen(["bash", "-c", f"sleep 0.6; exec -a {tag} sleep 60"])
    try:
        groups = ProcessGroups([parse_group_spec(f"s={tag}")], WarnOnce("t"))
        deadline = time.monotonic() + 1.8  # within the 2 s a young PID is looked at again
        procs_n = 0
        while time.monotonic() < deadline and not procs_n:
            procs_n = groups.sample(time.time(), "t", [])[0].procs_n
            time.sleep(0.05)
        assert procs_n == 1
    finally:
        _reap([p])


def test_vanishing_and_denied_processes_never_stop_sampling(monkeypatch):
    tag = f"lk-flaky-{time.time_ns()}"
    procs = _spawn_sleepers(2, tag)
    try:
        warn = WarnOnce("t")
        groups = ProcessGroups([parse_group_spec(f"s={tag}")], warn)
        assert _sample_until(groups, 2).procs_n == 2
        victim = procs[0].pid
        real = ProcessGroups._read_stat

        def flaky(self, pid):
            if pid == victim:  # /proc/PID gone between listing and reading
                raise FileNotFoundError(f"/proc/{pid}/stat")
            return real(self, pid)

        monkeypatch.setattr(ProcessGroups, "_read_stat", flaky)
        assert groups.sample(time.time(), "t", [])[0].procs_n == 1  # vanished mid-sample

        def denied(self, pid):
            raise PermissionError(f"/proc/{pid}/stat")

        monkeypatch.setattr(ProcessGroups, "_read_stat", denied)
        row = groups.sample(time.time(), "t", [])[0]
        groups.sample(time.time(), "t", [])
        assert row.procs_n >= 1 and row.rss_bytes == 0
        assert [e.detail["key"] for e in warn.take()] == ["access_denied:s"]  # once, not per sample
    finally:
        _reap(procs)


SERVER = """
import socket, sys, time
srv = socket.create_server(("{addr}", 0))
print(srv.getsockname()[1], flush=True)
conns = []
srv.settimeout(20)
while len(conns) < {n}:
    conns.append(srv.accept()[0])
time.sleep(30)
"""


def test_sessions_are_established_connections_on_the_groups_ports():
    n = 4
    tag = f"lk-server-{time.time_ns()}"
    code = f"# {tag}\n" + SERVER.format(addr=ADDR, n=n)
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    clients = []
    try:
        port = int(server.stdout.readline())
        import socket

        clients = [socket.create_connection((ADDR, port)) for _ in range(n)]
        from loadkit.observe import procfs

        groups = ProcessGroups([parse_group_spec(f"srv=cmdline:{tag}@{port}")], WarnOnce("t"))
        # a connection is the server's once it has accepted it, which a loaded machine can delay
        deadline = time.monotonic() + 20
        while True:
            row = groups.sample(time.time(), "t", procfs.read_tcp_sockets())[0]
            if row.sessions_n == n or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert row.procs_n == 1
        assert row.sessions_n == n and row.tcp_established_n == n
        assert row.tcp_other_n == 1  # the listener
    finally:
        for c in clients:
            c.close()
        server.kill()
        server.wait(5)


# -- events -------------------------------------------------------------------------------------


def _info(pid, name, ppid=1, created=1000.0):
    return ProcInfo(pid, name, ppid, created)


def test_events_start_exit_restart_fold_and_oom():
    tr = EventTracker("h", restart_window_s=30, max_events_per_sample=3)
    master = _info(10, "dovecot")
    assert tr.update(100.0, {"p": {10: master}}) == []  # baseline: no events
    kids = {i: _info(i, "imap-login", ppid=10) for i in range(20, 22)}
    ev = tr.update(101.0, {"p": {10: master, **kids}})
    assert sorted(e.kind for e in ev) == ["process_started"] * 2  # children: not restarts
    ev = tr.update(102.0, {"p": {}})
    assert [e.kind for e in ev] == ["process_exited"] * 3  # 3 exits: at the fold threshold
    assert ev[-1].detail["group_procs_n"] == 0
    new_master = _info(11, "dovecot", created=1002.5)
    ev = tr.update(103.0, {"p": {11: new_master}})
    kinds = {e.kind: e for e in ev}
    assert set(kinds) == {"process_started", "process_restarted"}
    assert kinds["process_restarted"].detail["previous_pid"] == 10
    assert kinds["process_restarted"].detail["down_s"] == pytest.approx(1.0)
    many = {i: _info(i, "imap-login", ppid=11) for i in range(100, 110)}
    ev = tr.update(104.0, {"p": {11: new_master, **many}})
    assert len(ev) == 1 and ev[0].detail["count"] == 10 and ev[0].detail["names"] == {"imap-login": 10}
    ev = tr.update(105.0, {"p": {}})  # the master dies and takes its children with it
    assert [e.detail.get("pid") for e in ev] == [11, None]  # the master alone, the children folded
    assert ev[1].detail["count"] == 10


def test_events_fold_exact_threshold():
    tr = EventTracker("h", max_events_per_sample=2)
    tr.update(0.0, {"g": {1: _info(1, "a"), 2: _info(2, "a")}})
    assert len(tr.update(1.0, {"g": {}})) == 2  # at the threshold: one event each
    tr.update(2.0, {"g": {i: _info(i, "a") for i in range(3)}})
    assert len(tr.update(3.0, {"g": {}})) == 1  # above it: folded


def test_oom_kill_and_under_oom_events():
    from loadkit.observe.cgroups import CgroupMemory

    tr = EventTracker("h")
    base = CgroupMemory(1, 100, 200, 0, 0, False, False)
    assert tr.update(0.0, {}, {"p": base}) == []
    ev = tr.update(1.0, {}, {"p": base._replace(memory_bytes=199, oom_kills_n=2, failcnt_n=5)})
    assert [(e.kind, e.source, e.detail["count"]) for e in ev] == [("oom_kill", "p", 2)]
    assert ev[0].detail["cgroup_limit_bytes"] == 200 and ev[0].ts_unix_s == 1.0
    ev = tr.update(2.0, {}, {"p": base._replace(oom_kills_n=2, under_oom=True)})
    assert [e.kind for e in ev] == ["warning"] and ev[0].detail["under_oom"]
    assert tr.update(3.0, {}, {"p": None}) == []  # cgroup gone: no invented events


# -- the collector on a canned root -------------------------------------------------------------


def test_collector_deltas_from_canned_root(proc_root, tmp_path):
    c = Collector(CollectorConfig(udp_ports=[5353], proc_root=str(proc_root), out_dir=tmp_path / "out", host="canned"))
    seen: list[Sample] = []
    c.add_sink(seen.append)
    s1 = c.sample()
    assert s1.net.udp_rcvbuf_errors_n == 150890 and s1.net_delta["udp_rcvbuf_errors_n"] == 0
    assert s1.net.tcp_listen_overflows_n == 42 and s1.net.conntrack_count_n == 4711
    assert s1.net.softnet_dropped_n == 12 and s1.net.udp_mem_pages == 57
    assert s1.net.udp6_rcvbuf_errors_n == 4
    assert s1.system.mem_available_bytes == 24261112 * 1024 and s1.system.swap_used_bytes == 1024 * 1024
    assert {(s.local_address, s.drops_n) for s in s1.sockets} == {("127.0.0.1", 17), ("127.0.3.1", 150873), ("::1", 1)}
    _set_udp(proc_root, RcvbufErrors=150990, InErrors=150991)
    udp = proc_root / "net" / "udp"
    udp.write_text(udp.read_text().replace(" 17        ", " 117       "))
    s2 = c.sample()
    assert s2.net_delta["udp_rcvbuf_errors_n"] == 100 and s2.net_delta["udp_in_errors_n"] == 100
    assert s2.socket_drops_delta[("127.0.0.1", 5353)] == 100
    assert seen == [s1, s2]
    c.close()
    net = read_table(tmp_path / "out", "net")
    assert list(net["udp_rcvbuf_errors_n_delta"]) == [0, 100]
    assert "tcp_listen_overflows_n" in net.columns and "softnet_dropped_n_delta" in net.columns
    socks = read_table(tmp_path / "out", "sockets")
    assert socks[socks.local_address == "127.0.0.1"]["drops_n_delta"].tolist() == [0, 100]
    assert len(read_table(tmp_path / "out", "system")) == 2


def test_missing_conntrack_and_unreadable_files_degrade_with_one_warning(proc_root, tmp_path):
    shutil.rmtree(proc_root / "sys")  # no conntrack module
    (proc_root / "net" / "netstat").unlink()
    (proc_root / "net" / "netstat").mkdir()  # unreadable: reading a directory fails
    c = Collector(CollectorConfig(proc_root=str(proc_root), out_dir=tmp_path / "out"))
    s1 = c.sample()
    s2 = c.sample()
    assert s1.net.conntrack_count_n == 0 and s1.net.conntrack_max_n == 0
    assert s1.net.tcp_listen_overflows_n == 0
    assert s2.net.udp_rcvbuf_errors_n == 150890  # the rest is still recorded
    keys = sorted(e.detail["key"] for e in s1.events)
    assert keys == ["conntrack", "netstat"] and s2.events == []
    c.close()
    assert sorted(e["detail"]["key"] for e in read_events(tmp_path / "out")) == ["conntrack", "netstat"]


def test_missing_cgroup_and_broken_sink_do_not_stop_the_loop(proc_root, tmp_path):
    cfg = CollectorConfig(
        groups=[parse_group_spec("gone=cgroup:/loadkit/never-made")],
        proc_root=str(proc_root),
        cgroup_root=str(tmp_path),
        interval_s=0.1,
        duration_s=2.0,  # long enough that a busy host's overrunning samples still give several
    )
    c = Collector(cfg)
    c.add_sink(lambda s: 1 / 0)
    c.run()
    assert c.samples_n >= 2
    assert c.latest.groups[0].cgroup_memory_bytes == 0
    assert "cgroup_missing:gone" in c.warn.keys


def test_collector_thread_duration_and_stop(proc_root):
    c = Collector(CollectorConfig(proc_root=str(proc_root), interval_s=0.1, duration_s=60))
    t0 = time.perf_counter()
    c.start()
    deadline = time.monotonic() + 20
    while c.samples_n < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    c.stop()
    elapsed_s = time.perf_counter() - t0
    assert not c.running
    # never more than the schedule allows in the time it ran (one at 0, then one per interval),
    # judged by the time measured: a loaded machine's sleep can overshoot by several intervals
    assert 3 <= c.samples_n <= elapsed_s / 0.1 + 2
    events, cursor = c.events_since(0)
    assert cursor == len(events)


# -- exporter -----------------------------------------------------------------------------------


def test_exporter_metrics_and_snapshot(proc_root):
    c = Collector(CollectorConfig(udp_ports=[5353], proc_root=str(proc_root), host="canned"))
    exp = Exporter(c, ADDR, 0).start()
    try:
        c.sample()
        text = urllib.request.urlopen(exp.url + "/metrics", timeout=5).read().decode()
        values = _sample_values(text)
        assert values[("node_netstat_Udp_RcvbufErrors", ())] == 150890
        assert values[("node_netstat_TcpExt_ListenOverflows", ())] == 42
        assert values[("node_nf_conntrack_entries", ())] == 4711
        assert "# TYPE node_netstat_Udp_InErrors untyped" in text
        assert values[("node_memory_MemAvailable_bytes", ())] == 24261112 * 1024
        drops = {k: v for k, v in values.items() if k[0] == "loadkit_udp_socket_drops_total"}
        assert [v for (_, labels), v in drops.items() if ("port", "5353") in labels and ("address", "127.0.0.1") in labels] == [17]
        snap = json.loads(urllib.request.urlopen(exp.url + "/snapshot?cursor=0", timeout=5).read())
        assert snap["sample"]["net"]["udp_rcvbuf_errors_n"] == 150890
        back = Sample.from_json(snap["sample"], snap["events"])
        assert back.net == c.latest.net and back.sockets == c.latest.sockets
        c.warn.warn("test", "a test warning")
        c.sample()
        snap2 = json.loads(urllib.request.urlopen(f"{exp.url}/snapshot?cursor={snap['cursor']}", timeout=5).read())
        assert [e["detail"]["key"] for e in snap2["events"]] == ["test"]
        assert snap2["cursor"] == snap["cursor"] + 1
    finally:
        exp.stop()


def test_exposition_labels_groups():
    from loadkit.schema import GroupSample

    c = Collector(CollectorConfig(proc_root=str(CANNED)))
    s = c.sample()
    g = GroupSample(s.ts_unix_s, "h", 'proxy"1', 3, 1, 0, 0, 0.0, 0, 0, 0, 2, 5 << 20, 256 << 20, 0, 1)
    values = _sample_values(exposition(s._replace(groups=[g])))
    assert values[("loadkit_group_cgroup_memory_bytes", (("group", 'proxy"1'),))] == 5 << 20
    assert values[("loadkit_group_cgroup_oom_kills_total", (("group", 'proxy"1'),))] == 1


def _sample_values(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, read by Prometheus' own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_parse_listen():
    assert parse_listen("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_listen("[::1]:9") == ("::1", 9)
    with pytest.raises(CollectorError):
        parse_listen("localhost")


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--group", "nonsense"], "NAME=PATTERN"),
        (["--interval", "0.01"], "out of range"),
        (["--interval", "fast"], "not a number"),
        (["--udp-port", "5353,x"], "not a port"),
        (["--udp-port", "70000"], "UDP port 70000 is out of range"),
        (["--listen", "nowhere"], "HOST:PORT"),
        (["--duration", "0"], "positive"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, words, capsys):
    assert cli_main(["collect", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err


def test_cli_collect_writes_parquet_tables(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["collect", "--group", "me=python", "--udp-port", "5353", "--interval", "0.1",
            "--duration", "2", "--out", str(out), "--proc-root", str(CANNED), "--listen", f"{ADDR}:0",
            "--allow-missing"]  # the canned root holds no live process for 'me'
    assert cli_main(argv) == 0
    assert "samples" in capsys.readouterr().out
    net = read_table(out, "net")
    assert len(net) >= 5 and (net["udp_rcvbuf_errors_n"] == 150890).all()
    assert "udp_rcvbuf_errors_n_delta" in net.columns
    assert set(read_table(out, "groups")["group"]) == {"me"}


@pytest.mark.parametrize(
    "group, words",
    [
        ("p1=cgroup:/loadkit/no-such-proxy", "group p1: no memory cgroup /loadkit/no-such-proxy under"),
        ("dns=cmdline:no-such-daemon-[0-9]{9}", "group dns: no process matches 'no-such-daemon-[0-9]{9}'"),
        ("dns=no-such-daemon-x", "group dns: no process matches 'no-such-daemon-x'"),
    ],
)
def test_cli_collect_refuses_a_group_that_matches_nothing_at_start(group, words, tmp_path, capsys):
    out = tmp_path / "c"
    assert cli_main(["collect", "--group", group, "--interval", "0.1", "--duration", "0.3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "--allow-missing" in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was sampled or written
    # a service started after its collector: --allow-missing records zeros until it appears
    argv = ["collect", "--group", group, "--interval", "0.2", "--duration", "0.5", "--out", str(out), "--allow-missing"]
    assert cli_main(argv) == 0
    groups = read_table(out, "groups")
    assert len(groups) >= 1 and (groups["procs_n"] == 0).all()


def test_cli_collect_accepts_groups_that_match_a_process_and_a_cgroup(tmp_path, capsys):
    _make_cgroup_tree(tmp_path / "cg")
    argv = ["collect", "--group", "me=cmdline:pytest", "--group", "p1=cgroup:/loadkit/proxy1",
            "--cgroup-root", str(tmp_path / "cg"), "--interval", "0.1", "--duration", "0.3"]
    assert cli_main(argv) == 0, capsys.readouterr().err


def test_plugin_refuses_a_collect_group_that_matches_nothing(tmp_path):
    tiny = Path(__file__).parent / "locustfiles" / "tiny.py"
    argv = [sys.executable, "-m", "locust", "-f", str(tiny), "--headless", "-u", "1", "-r", "1", "-t", "2s",
            "--host", "127.0.0.1:9", "--collect-group", "p1=cgroup:/loadkit/no-such-proxy", "--only-summary"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("loadkit: error: group p1: no memory cgroup /loadkit/no-such-proxy")
    assert "--collect-allow-missing" in errors[0]
    proc = subprocess.run(argv + ["--collect-allow-missing"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode in (0, 1) and "loadkit: error" not in proc.stderr, proc.stderr[-2000:]


def _ignore_sigint() -> None:  # in the child before exec, as a background job's shell does
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT-ignored-by-launcher"])
def test_cli_collect_stops_cleanly_on_sigterm(how, tmp_path):
    out = tmp_path / "c"
    p = subprocess.Popen(
        [sys.executable, "-m", "loadkit", "collect", "--interval", "0.1", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint if how.startswith("SIGINT") else None,
    )
    try:
        deadline = time.monotonic() + 20
        while not (out / "samples" / "net").is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
        stdout, _ = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and "collected" in stdout
    # every sample it took is in the table, flushed at the end, not lost (how many it took in the
    # half second depends on the machine's load: judged by its own count, not by the clock)
    samples_n = int(stdout.split("collected ")[1].split()[0])
    assert samples_n >= 2 and len(read_table(out, "net")) == samples_n


# -- a real memory cgroup: charge, limit and an OOM kill ------------------------------------------

HOG = """
import sys, time
sys.stdin.readline()  # wait until moved into the cgroup
chunks = []
for _ in range(64):
    chunks.append(bytearray(4 << 20))  # 4 MiB, touched
    time.sleep(0.01)
time.sleep(30)
"""


@pytest.fixture
def memory_cgroup():
    base = Path(cgroups.CGROUP_ROOT) / "memory"
    if not (base / "memory.usage_in_bytes").exists() or not (base / "cgroup.procs").stat().st_mode & 0o200:
        pytest.skip("no writable cgroup v1 memory controller on this host")
    path = base / f"loadkit-test-{time.time_ns()}"
    try:
        path.mkdir()
    except OSError as err:
        pytest.skip(f"cannot create a memory cgroup here ({err})")
    try:
        yield path
    finally:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_real_cgroup_memory_and_oom_kill_event(memory_cgroup):
    (memory_cgroup / "memory.limit_in_bytes").write_text(str(48 << 20))
    c = Collector(CollectorConfig(groups=[parse_group_spec(f"hog=cgroup:{memory_cgroup}")], full_memory_interval_s=None))
    hog = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE, text=True)
    try:
        (memory_cgroup / "cgroup.procs").write_text(str(hog.pid))
        s0 = c.sample()
        assert s0.groups[0].procs_n == 1 and s0.groups[0].cgroup_limit_bytes == 48 << 20
        hog.stdin.write("go\n")
        hog.stdin.flush()
        assert hog.wait(30) == -signal.SIGKILL  # the kernel's OOM killer
        s1 = c.sample()
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait(5)
    g = s1.groups[0]
    assert g.procs_n == 0 and g.cgroup_oom_kills_n >= 1 and g.cgroup_failcnt_n > 0
    assert s1.group_delta["hog"]["cgroup_oom_kills_n"] == g.cgroup_oom_kills_n
    kinds = {e.kind: e for e in s1.events}
    assert kinds["oom_kill"].source == "hog" and kinds["oom_kill"].detail["cgroup_limit_bytes"] == 48 << 20
    assert kinds["process_exited"].detail["pid"] == hog.pid


def test_exposition_parses_as_prometheus_text(proc_root):
    # Prometheus's own parser (installed with jupyter_server), as a scraper would read it
    parser = pytest.importorskip("prometheus_client.parser")
    text_string_to_metric_families = parser.text_string_to_metric_families

    c = Collector(CollectorConfig(udp_ports=[5353], proc_root=str(proc_root), groups=[parse_group_spec("me=python")]))
    c.sample()
    families = {f.name: f for f in text_string_to_metric_families(exposition(c.latest, c))}
    assert families["node_netstat_Udp_RcvbufErrors"].samples[0].value == 150890
    assert families["node_netstat_TcpExt_ListenOverflows"].samples[0].value == 42
    # counters are exposed with _total, as Prometheus names them
    drops = families["loadkit_udp_socket_drops"].samples
    assert {(s.labels["address"], s.value) for s in drops} >= {("127.0.0.1", 17.0)}
    assert families["loadkit_group_processes"].samples[0].labels == {"group": "me"}


def test_restarted_master_is_an_event_on_real_processes():
    """A server process exits and a new one of the same name appears, not as a child of the
    group: ``process_restarted`` with the old PID and how long the group was without it."""
    tag = f"lk-master-{time.time_ns()}"
    first = _spawn_sleepers(1, tag)
    second: list[subprocess.Popen] = []
    try:
        groups = ProcessGroups([parse_group_spec(f"m={tag}")], WarnOnce("t"))
        tracker = EventTracker("t")
        assert _sample_until(groups, 1).procs_n == 1
        tracker.update(time.time(), groups.members)
        first[0].kill()
        first[0].wait(5)
        groups.sample(time.time(), "t", [])
        exited = tracker.update(time.time(), groups.members)
        assert [e.kind for e in exited] == ["process_exited"]
        second = _spawn_sleepers(1, tag)
        assert _sample_until(groups, 1).procs_n == 1
        ev = {e.kind: e for e in tracker.update(time.time(), groups.members)}
        assert set(ev) == {"process_started", "process_restarted"}
        assert ev["process_restarted"].detail["previous_pid"] == first[0].pid
        assert ev["process_restarted"].detail["pid"] == second[0].pid
        assert ev["process_restarted"].detail["down_s"] > 0
    finally:
        _reap(first + second)


def test_sigkill_loses_at_most_the_unflushed_chunk(tmp_path):
    """Parts are flushed every --flush-interval: after a SIGKILL every flushed part reads back."""
    out = tmp_path / "c"
    p = subprocess.Popen(
        [sys.executable, "-m", "loadkit", "collect", "--interval", "0.1", "--flush-interval", "0.3",
         "--proc-root", str(CANNED), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while len(list((out / "samples" / "net").glob("part-*.parquet"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        p.kill()  # SIGKILL: no chance to flush
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    parts = sorted((out / "samples" / "net").glob("part-*.parquet"))
    assert len(parts) >= 3
    net = read_table(out, "net")
    assert len(net) >= len(parts) and (net["udp_rcvbuf_errors_n"] == 150890).all()
    assert net["ts_unix_s"].is_monotonic_increasing


def test_cgroup_with_a_missing_file_warns_once_and_keeps_the_rest(tmp_path, proc_root):
    _make_cgroup_tree(tmp_path)
    (tmp_path / "memory" / "loadkit" / "proxy1" / "memory.failcnt").unlink()  # controller file gone
    cfg = CollectorConfig(
        groups=[parse_group_spec("p1=cgroup:/loadkit/proxy1"), parse_group_spec("p2=cgroup:/loadkit/proxy2")],
        cgroup_root=str(tmp_path),
        proc_root=str(proc_root),
    )
    c = Collector(cfg)
    s1, s2 = c.sample(), c.sample()
    p1, p2 = s2.groups
    assert p1.cgroup_memory_bytes == 0 and p1.cgroup_limit_bytes == 0
    assert p2.cgroup_memory_bytes == 67108864 and p2.cgroup_oom_kills_n == 2  # the other group is intact
    assert [e.detail["key"] for e in s1.events if e.kind == "warning"] == ["cgroup_read:p1"]
    assert not [e for e in s2.events if e.kind == "warning"]
