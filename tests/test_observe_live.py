"""The Locust-facing collector: local sampling and remote pulls into a sink, status line, web tab."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import gevent
import gevent.monkey
import pytest
from locust.env import Environment

from loadkit.errors import CollectorError
from loadkit.observe.collector import Collector, CollectorConfig
from loadkit.observe.exporter import Exporter
from loadkit.plugin.live_collector import attach_collector, live_collector_of
from loadkit.schema import Event, GroupSample, SystemSample

CANNED = Path(__file__).parent / "data" / "proc"
ADDR = "127.0.5.1"


def wait_until(predicate, timeout_s: float = 15.0) -> None:
    """Yield to the hub until ``predicate()`` holds (a busy shared machine samples late)."""
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        gevent.sleep(0.05)


class Sink:
    def __init__(self):
        self.records = []
        self.rows = []

    def __call__(self, record, table=None):
        if table is None:
            self.records.append(record)
        else:
            self.rows.append((table, record))

    def of(self, kind):
        return [r for r in self.records if isinstance(r, kind)]


def test_local_collector_feeds_the_sink_on_the_load_clock():
    env = Environment()
    sink = Sink()
    live = attach_collector(env, groups={"me": "python"}, udp_ports=[5353], interval_s=0.2, sink=sink)
    try:
        assert live_collector_of(env) is live
        t0 = time.time()
        wait_until(lambda: len(sink.of(GroupSample)) >= 2)
    finally:
        env.events.quitting.fire(environment=env)  # Locust's shutdown stops the collector
    groups = sink.of(GroupSample)
    assert len(groups) >= 2 and all(g.group == "me" for g in groups)
    assert all(t0 - 1 <= g.ts_unix_s <= time.time() for g in groups)  # time.time() clock
    assert len(sink.of(SystemSample)) == len(groups)
    nets = [row for table, row in sink.rows if table == "net"]
    assert len(nets) == len(groups) and "udp_rcvbuf_errors_n_delta" in nets[0]
    n = len(groups)
    gevent.sleep(0.5)
    assert len(sink.of(GroupSample)) == n  # stopped
    assert "me " in live.status_line() and "rcvbuf_err +" in live.status_line()


def test_sampling_runs_off_the_hub_and_sinks_run_on_it():
    """/proc reads happen in a native pool thread (the load's greenlets keep running meanwhile);
    the sink is called back in the hub's thread, so the recorder needs no locking."""
    native_id = gevent.monkey.get_original("threading", "get_native_id")
    hub_thread = native_id()
    sampled_in, sunk_in = [], []
    env = Environment()
    live = attach_collector(env, groups=["me=python"], interval_s=0.1, sink=lambda *a, **k: sunk_in.append(native_id()), start=False)
    live.local.add_sink(lambda s: sampled_in.append(native_id()))
    live.start()
    try:
        wait_until(lambda: len(sampled_in) >= 2 and len(sunk_in) >= 2)
    finally:
        live.stop()
    assert sampled_in and hub_thread not in set(sampled_in)
    assert sunk_in and set(sunk_in) == {hub_thread}


@pytest.fixture
def remote(tmp_path):
    root = tmp_path / "proc"
    shutil.copytree(CANNED, root)
    c = Collector(CollectorConfig(proc_root=str(root), interval_s=0.1, host="target-1", udp_ports=[5353]))
    exp = Exporter(c, ADDR, 0).start()
    c.start()
    try:
        yield c, exp
    finally:
        c.stop()
        exp.stop()


def test_remote_snapshots_are_pulled_once_each_with_events(remote):
    collector, exporter = remote
    env = Environment()
    sink = Sink()
    live = attach_collector(env, urls=[exporter.url], interval_s=0.05, sink=sink)
    try:
        wait_until(lambda: len(sink.of(SystemSample)) >= 2)
        collector.warn.warn("remote-test", "a remote warning")
        # until the warning has come through, then a few pulls more: none may bring it again
        wait_until(lambda: [e for e in sink.of(Event) if e.detail.get("key") == "remote-test"])
        pulled = len(sink.of(SystemSample))
        wait_until(lambda: len(sink.of(SystemSample)) >= pulled + 3)
    finally:
        live.stop()
    systems = sink.of(SystemSample)
    assert systems and all(s.host == "target-1" for s in systems)
    stamps = [s.ts_unix_s for s in systems]
    assert stamps == sorted(set(stamps))  # pulled faster than sampled: no duplicate rows
    warnings = [e for e in sink.of(Event) if e.detail.get("key") == "remote-test"]
    assert len(warnings) == 1
    sockets = [row for table, row in sink.rows if table == "sockets"]
    assert sockets and sockets[0]["drops_n"] in (17, 150873, 1)


def test_unreachable_remote_warns_once_and_keeps_trying():
    env = Environment()
    sink = Sink()
    live = attach_collector(env, urls=[f"http://{ADDR}:9"], interval_s=0.05, timeout_s=0.2, sink=sink)
    try:
        wait_until(lambda: live.remotes[0].failures_n >= 3)
    finally:
        live.stop()
    assert live.remotes[0].failures_n >= 2
    assert len([e for e in sink.of(Event) if e.kind == "warning"]) == 1


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(urls=["http://192.0.2.1:9108"]), "outside the allowlist"),
        (dict(urls=["https://127.0.0.1:9108"]), "only http://"),
        (dict(groups=["nonsense"]), "NAME=PATTERN"),
        (dict(udp_ports=[5353], interval_s=0.01), "interval"),
        (dict(), "needs groups"),
    ],
)
def test_bad_settings_are_collector_errors(kwargs, words):
    with pytest.raises(CollectorError, match=words):
        attach_collector(Environment(), start=False, **kwargs)


def test_web_ui_gets_a_target_tab_and_json_route(monkeypatch):
    monkeypatch.setattr("sys.argv", ["locust"])  # the web UI parses Locust's own options
    env = Environment()
    env.create_local_runner()
    web_ui = env.create_web_ui(ADDR, 0)
    try:
        gevent.sleep(0.1)
        port = web_ui.server.server_port
        base = f"http://{ADDR}:{port}"
        urllib.request.urlopen(base + "/stats/requests", timeout=5).read()  # UI already in use
        live = attach_collector(env, groups={"me": "python"}, interval_s=0.1)
        wait_until(lambda: bool(live.latest))
        stats = json.loads(urllib.request.urlopen(base + "/stats/requests", timeout=5).read())
        tab = [e for e in stats["extended_stats"] if e["key"] == "loadkit-target"]
        assert tab and any(r["what"] == "me processes" for r in tab[0]["data"])
        doc = json.loads(urllib.request.urlopen(base + "/loadkit/collector", timeout=5).read())
        assert doc["local"]["groups"][0]["group"] == "me"
        assert {"title": "Target", "key": "loadkit-target"} in web_ui.template_args["extended_tabs"]
        live.stop()
    finally:
        web_ui.stop()
        env.runner.quit()


LOCUSTFILE = '''
from locust import User, constant, events, task

from loadkit.plugin import live_collector
from loadkit.plugin.live_collector import attach_collector

# the status line every 0.5 s, not 2 s: a loaded machine starts the users late, and the first
# 2 s line could miss a -t 5s run
live_collector.STATUS_INTERVAL_S = 0.5


@events.test_start.add_listener
def _attach(environment, **_kw):
    attach_collector(environment, groups={"me": "python"}, udp_ports=[5353], interval_s=0.5)


class Idle(User):
    wait_time = constant(0.5)

    @task
    def nothing(self):
        pass
'''


def test_headless_locust_prints_the_target_line(tmp_path):
    """A real headless Locust run shows the collector's line with its own status output."""
    import subprocess
    import sys

    lf = tmp_path / "idle_locustfile.py"
    lf.write_text(LOCUSTFILE)
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(lf), "--headless", "-u", "1", "-r", "1", "-t", "5s"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    lines = [ln for ln in out.splitlines() if "target: [" in ln]
    assert lines, out[-2000:]
    assert "me " in lines[-1] and "rcvbuf_err +" in lines[-1]


def test_target_tab_shows_cgroup_figures_only_for_groups_in_a_cgroup():
    env = Environment()
    live = attach_collector(env, groups={"me": "python"}, interval_s=1.0, start=False)
    try:
        sample = live.local.sample()
        plain = GroupSample(sample.system.ts_unix_s, sample.host, "unbound", 1, 50 * 2**20, 0, 0, 0.0, 3,
                            0, 0, 0, 0, 0, 0, 0)
        in_cgroup = plain._replace(group="p1", cgroup_memory_bytes=64 * 2**20, cgroup_limit_bytes=256 * 2**20)
        live.latest["local"] = sample._replace(groups=(plain, in_cgroup))
        rows = {r["what"]: r["value"] for r in live.table_rows()}
    finally:
        live.stop()
    assert rows["unbound RSS MiB"] == 50.0
    assert not any(what.startswith("unbound cgroup") or what == "unbound OOM kills" for what in rows)
    assert rows["p1 cgroup memory MiB"] == 64.0 and rows["p1 cgroup limit MiB"] == 256.0
    assert rows["p1 OOM kills"] == 0
