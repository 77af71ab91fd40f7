"""Generator events: the channel itself, and DNS bursts reaching the run record from a real
``locust -f locustfiles/dns_burst.py`` run, standalone and with two worker processes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest
from conftest import own_master
from locust.env import Environment

from loadkit.errors import ProfileError
from loadkit.generate import wiring
from loadkit.generate.event_channel import GeneratorEvents, events_for
from loadkit.record.reader import load_manifest, read_events
from loadkit.record.writer import RunWriter
from loadkit.schema import EVENT_KINDS, Event

REPO = Path(__file__).resolve().parents[1]
LOCUST = str(Path(sys.executable).with_name("locust"))
BURST = str(REPO / "locustfiles" / "dns_burst.py")

# A DNS responder in its own interpreter (not gevent): answers every query NOERROR with no
# records, prints its port, exits by itself after 90 s.
RESPONDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", 0))
s.settimeout(0.5)
print(s.getsockname()[1], flush=True)
end = time.monotonic() + 90
while time.monotonic() < end:
    try:
        q, addr = s.recvfrom(4096)
    except socket.timeout:
        continue
    if len(q) >= 12:
        s.sendto(q[:2] + bytes([q[2] | 0x80, 0x80]) + q[4:], addr)
"""


# -- the channel ----------------------------------------------------------------------------------


def test_emit_then_drain_empties_the_channel_in_order() -> None:
    ch = GeneratorEvents()
    a = ch.emit("burst", "dns", {"sent_n": 3}, ts_unix_s=10.0)
    b = ch.emit("burst", "dns", {"sent_n": 4})
    assert isinstance(a, Event) and a.ts_unix_s == 10.0 and b.ts_unix_s > 10.0
    assert ch.drain() == [a, b]
    assert ch.drain() == []


def test_an_undrained_channel_keeps_the_newest_and_counts_the_dropped() -> None:
    ch = GeneratorEvents(max_pending=3)
    for i in range(5):
        ch.emit("burst", "dns", {"burst_index": i})
    assert [e.detail["burst_index"] for e in ch.drain()] == [2, 3, 4]
    assert ch.dropped_n == 2


def test_worker_events_ride_on_report_to_master_and_are_merged_on_the_master() -> None:
    worker_env, master_env = Environment(), Environment()
    events_for(worker_env).emit("burst", "dns", {"sent_n": 100, "worker_index": 1}, ts_unix_s=5.0)
    events_for(master_env).emit("burst", "dns", {"sent_n": 7}, ts_unix_s=4.0)
    data: dict = {}
    worker_env.events.report_to_master.fire(client_id="w-1", data=data)
    assert events_for(worker_env).drain() == []  # sent once, not again in the next report
    master_env.events.worker_report.fire(client_id="w-1", data=data)
    got = events_for(master_env).drain()
    assert [(e.ts_unix_s, e.detail["sent_n"]) for e in got] == [(4.0, 7), (5.0, 100)]
    assert got[1].detail["worker"] == "w-1" and got[1].kind == "burst" and got[1].source == "dns"
    # an empty channel adds nothing to the report
    empty: dict = {}
    worker_env.events.report_to_master.fire(client_id="w-1", data=empty)
    assert empty == {}


def test_a_drained_burst_event_reads_back_from_the_run_record(tmp_path: Path) -> None:
    ch = GeneratorEvents()
    sent = ch.emit("burst", "dns", {"sent_n": 200, "window_s": 0.01}, ts_unix_s=12.5)
    writer = RunWriter(tmp_path)
    writer.add_many(ch.drain())
    writer.flush()
    assert read_events(tmp_path) == [sent._asdict()]
    assert sent.kind in EVENT_KINDS  # a kind the schema documents


# -- the Locust wiring every generator shares -------------------------------------------------------


class _Runner:
    """Stand-ins named like Locust's runners (wiring tells them apart by class name)."""


class WorkerRunner(_Runner):
    def __init__(self, index: int) -> None:
        self.worker_index = index


class MasterRunner(_Runner):
    def __init__(self, workers_n: int) -> None:
        self.worker_count = workers_n


def test_the_master_tells_workers_their_count_and_each_takes_its_share() -> None:
    master = Environment(parsed_options=argparse.Namespace())
    master.runner = MasterRunner(3)
    wiring.tell_workers_their_count(master)
    sent = vars(master.parsed_options)  # what the spawn message carries to the workers
    shares = []
    for index in range(3):
        worker = Environment(parsed_options=argparse.Namespace(**sent))
        worker.runner = WorkerRunner(index)
        shares.append(wiring.worker_share(worker))
    assert shares == [(0, 3), (1, 3), (2, 3)]
    # a worker whose master said nothing makes the whole load; a standalone process too
    untold = Environment(parsed_options=argparse.Namespace())
    untold.runner = WorkerRunner(1)
    assert wiring.worker_share(untold) == (0, 1)
    assert wiring.worker_share(Environment()) == (0, 1)


def test_piggyback_sends_each_key_and_merges_it_on_the_master() -> None:
    worker, master = Environment(), Environment()
    merged: list = []
    pending = {"a": [1, 2], "b": []}
    for key in ("a", "b"):
        wiring.piggyback(worker, key, lambda key=key: pending[key], lambda cid, p: None)
        wiring.piggyback(master, key, lambda: None, lambda cid, p, key=key: merged.append((key, cid, p)))
    data: dict = {}
    worker.events.report_to_master.fire(client_id="w-7", data=data)
    assert data == {"a": [1, 2]}  # an empty payload is not sent
    master.events.worker_report.fire(client_id="w-7", data=data)
    assert merged == [("a", "w-7", [1, 2])]
    # registering a key again replaces its pair rather than sending it twice
    wiring.piggyback(worker, "a", lambda: [3], lambda cid, p: None)
    again: dict = {}
    worker.events.report_to_master.fire(client_id="w-7", data=again)
    assert again == {"a": [3]}


def test_a_user_error_is_one_loadkit_line_and_its_exit_status(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        wiring.exit_on_user_error(ProfileError("--dns-rate 'x' is not a number"))
    assert exited.value.code == 2
    assert capsys.readouterr().err == "loadkit: error: --dns-rate 'x' is not a number\n"


# -- a real locust run ------------------------------------------------------------------------------


@pytest.fixture
def responder() -> int:
    proc = subprocess.Popen([sys.executable, "-c", RESPONDER], stdout=subprocess.PIPE, text=True)
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.kill()  # the responder we started
        proc.wait(timeout=10)


def run_burst(tmp_path: Path, port: int, run_id: str, *extra: str) -> Path:
    names = tmp_path / "names.txt"
    names.write_text("".join(f"host{i}.lab.test\n" for i in range(50)))
    args = [LOCUST, "-f", BURST, "--headless", "-t", "6s", "--host", f"127.0.0.1:{port}",
            "--record-dir", str(tmp_path / "runs"), "--run-id", run_id, "--only-summary",
            "--dns-names-file", str(names), "--dns-rate", "100", "--dns-burst-size", "200",
            "--dns-burst-ms", "10", "--dns-first-burst", "0.5", "--dns-burst-period", "1",
            "--dns-retries", "0", "--dns-timeout", "0.5", *extra]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        gevent.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    assert proc.returncode in (0, 1), err[-3000:]
    return tmp_path / "runs" / run_id


def burst_events(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir) if e["kind"] == "burst"]


def check_within_run(run_dir: Path, bursts: list[dict]) -> None:
    manifest = load_manifest(run_dir)
    assert manifest["status"] == "completed"
    # a plain locust -f run records the generator's options as its command line set them (the
    # retry models read the retry limit and timeout from there)
    options = manifest["profile"]["load"]["options"]
    assert options["dns-retries"] == 0 and options["dns-timeout"] == 0.5 and options["dns-rate"] == 100
    assert options["dns-port-policy"] == "fixed"  # a default the command line left as it was
    for e in bursts:
        d = e["detail"]
        assert e["source"] == "dns" and e["ts_unix_s"] == d["first_sent_unix_s"]
        assert manifest["started_unix_s"] <= d["first_sent_unix_s"] <= d["last_sent_unix_s"]
        assert d["last_sent_unix_s"] <= manifest["ended_unix_s"]
        assert d["window_s"] == pytest.approx(d["last_sent_unix_s"] - d["first_sent_unix_s"])
        assert d["planned_start_unix_s"] >= manifest["started_unix_s"]


def test_one_process_records_every_burst_with_its_real_window(tmp_path: Path, responder: int) -> None:
    run_dir = run_burst(tmp_path, responder, "single")
    bursts = burst_events(run_dir)
    # bursts planned every second from 0.5 s of a 6 s test: at least the first two have fully
    # left, with seconds to spare for a loaded machine's late start
    assert len(bursts) >= 2, bursts
    assert [e["detail"]["burst_index"] for e in bursts] == list(range(len(bursts)))
    complete = [e for e in bursts if e["detail"]["sent_n"] == 200]
    assert len(complete) >= 2 and all(e["detail"]["sent_n"] <= 200 for e in bursts)
    assert {(e["detail"]["worker_index"], e["detail"]["workers_n"]) for e in bursts} == {(0, 1)}
    check_within_run(run_dir, bursts)


def test_two_worker_processes_each_record_their_share_of_each_burst(tmp_path: Path, responder: int) -> None:
    run_dir = run_burst(tmp_path, responder, "workers", "--processes", "2", *own_master())
    bursts = burst_events(run_dir)
    by_worker: dict[int, list[dict]] = {}
    for e in bursts:
        assert e["detail"]["workers_n"] == 2
        by_worker.setdefault(e["detail"]["worker_index"], []).append(e["detail"])
    assert sorted(by_worker) == [0, 1], bursts
    for details in by_worker.values():
        assert len(details) >= 2, details
        assert sorted(d["burst_index"] for d in details) == list(range(len(details)))
        # each worker sends half of every burst of 200
        assert sum(d["sent_n"] == 100 for d in details) >= 2 and all(d["sent_n"] <= 100 for d in details)
    # the two workers' events are told apart by their Locust client id too
    assert len({e["detail"]["worker"] for e in bursts}) == 2
    check_within_run(run_dir, bursts)
