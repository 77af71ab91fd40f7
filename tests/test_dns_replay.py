"""DNS replay against the real lab: recordings made by real tools (tcpdump, unbound's own query log
and dnstap through fstrm_capture) replay with their timing, clients, transports and copies.

Timing is judged by the replayed inter-arrival distribution, captured again by tcpdump on the wire,
against the original's: the two-sample Kolmogorov-Smirnov statistic of the gaps between queries
must stay below ``KS_MAX`` (0.3: a loaded 2-core CI machine delays some sends by milliseconds,
and 0.06-0.19 were measured at load averages of 8-14; a replay that ignored the timing scores
0.63 sending evenly spaced and near 1 sending everything at once, on the Poisson recordings
used here). Speed and scale are checked by counts and spans with
generous margins, never by a timing race.
"""

from __future__ import annotations

import collections
import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import gevent
import numpy as np
import pytest
from scipy.stats import ks_2samp

from loadkit.generate.dns import replay, schedule, wire
from loadkit.generate.dns.replay_input import read_queries
from loadkit.generate.dns.sender import DnsSender
from loadkit.profile.targets import check_target

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent
#: largest two-sample KS statistic of replayed against recorded inter-arrival gaps (see above)
KS_MAX = 0.3
#: the same at twice the speed: the gaps are half as long, so the same milliseconds of scheduling
#: noise weigh twice as much (0.16-0.26 measured; still well below the 0.63 of evenly spaced sends)
KS_MAX_FAST = 0.4
needs_tcpdump = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")


class Tcpdump:
    """tcpdump writing the DNS queries to ``address:port`` on loopback to ``path``."""

    def __init__(self, path: Path, address: str, port: int) -> None:
        self.path = path
        self.err = path.with_suffix(".log")
        self.proc = subprocess.Popen(
            # queries only (the replies are not replayed), a large buffer, immediate delivery (else
            # the packets of the last buffer block are lost when tcpdump stops)
            ["tcpdump", "-i", "lo", "-U", "--immediate-mode", "-B", "65536", "-s", "1024", "-n", "-Z", "root",
             "-w", str(path), f"dst host {address} and dst port {port}"],
            stdout=subprocess.DEVNULL, stderr=self.err.open("w"),
        )
        deadline = time.monotonic() + 10
        while "listening on" not in self.err.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"tcpdump did not start: {self.err.read_text()}")
            time.sleep(0.05)

    def stop(self) -> Path:
        if self.proc.poll() is None:
            # a loaded machine runs tcpdump late: stop once its file has stopped growing
            size, deadline = -1, time.monotonic() + 5
            while time.monotonic() < deadline and self.path.stat().st_size != size:
                size = self.path.stat().st_size
                time.sleep(0.3)
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=10)
        return self.path


def _send(lab, protocol: str, rate_qps: float, duration_s: float, sources: list[str]) -> DnsSender:
    host, port = lab.dns
    pool = wire.QueryPool(wire.load_names(lab.names_file)[:500], [("A", 3.0), ("AAAA", 1.0)], size=500, seed=7)
    sender = DnsSender(check_target(f"{host}:{port}", 53), pool, base=schedule.PoissonRate(rate_qps, seed=11),
                       sources=sources, protocol=protocol, timeout_s=1.0, max_duration_s=duration_s,
                       max_queries_n=int(rate_qps * duration_s * 2) + 10)
    sender.open()
    return sender


def _run_all(*senders: DnsSender) -> None:
    greenlets = [gevent.spawn(s.run) for s in senders]
    try:
        gevent.joinall(greenlets, raise_error=True)
    finally:
        for s in senders:
            s.close()


def _gaps(times: list[float]) -> np.ndarray:
    t = np.sort(np.asarray(times))
    return np.diff(t)


@pytest.fixture(scope="module")
def capture(lab, tmp_path_factory) -> Iterator[Path]:
    """A tcpdump capture of a short dns_burst-like run against the lab: Poisson queries at 400 q/s
    for 2 s from 4 sources over UDP, and 20 q/s over TCP from one more."""
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed")
    path = tmp_path_factory.mktemp("capture") / "lab.pcap"
    host, port = lab.dns
    dump = Tcpdump(path, host, port)
    try:
        udp = _send(lab, "udp", 400, 2.0, [f"127.9.0.{i}" for i in range(1, 5)])
        tcp = _send(lab, "tcp", 20, 2.0, ["127.9.0.9"])
        _run_all(udp, tcp)
    finally:
        dump.stop()
    yield path


def _replay(lab, path: Path, **kw) -> tuple[replay.ReplaySender, replay.ReplayPlan]:
    host, port = lab.dns
    p = replay.plan(replay.ReplaySettings(host=f"{host}:{port}", file=str(path), **kw))
    sender = replay.build_sender(p)
    sender.open()
    try:
        sender.run()
    finally:
        sender.close()
    return sender, p


def test_capture_replays_with_its_timing_clients_and_transports(lab, capture, tmp_path) -> None:
    recorded = list(read_queries(capture))
    assert len(recorded) > 500  # ~800 UDP + ~40 TCP queries
    tcp_recorded = sum(q.tcp for q in recorded)
    assert tcp_recorded >= 10  # the TCP client's queries, cut out of their streams
    host, port = lab.dns
    dump = Tcpdump(tmp_path / "replayed.pcap", host, port)
    try:
        sender, _ = _replay(lab, capture, first_source="127.9.1.1")
    finally:
        dump.stop()
    replayed = list(read_queries(dump.path))
    t = sender.totals
    assert t["dns.original_sent"] == len(recorded)
    assert t.get("dns.answered", 0) >= len(recorded) * 0.98  # retries and a loaded machine aside
    # every recorded client has its own source address: 5 clients -> 5 addresses, same query counts
    by_client = collections.Counter(q.client for q in recorded)
    by_source = collections.Counter(q.client for q in replayed)
    assert sorted(by_source.values()) == sorted(by_client.values())
    assert set(by_source) == {f"127.9.1.{i}" for i in range(1, 6)}
    # transports as recorded: the TCP client's queries left over TCP again
    assert sum(q.tcp for q in replayed) == tcp_recorded
    # the questions are the recorded ones (same qname/qtype/flags bytes)
    assert collections.Counter(q.tail for q in replayed) == collections.Counter(q.tail for q in recorded)
    udp_rec = [q.ts_unix_s for q in recorded if not q.tcp]
    udp_rep = [q.ts_unix_s for q in replayed if not q.tcp]
    ks = ks_2samp(_gaps(udp_rec), _gaps(udp_rep)).statistic
    print(f"KS statistic of inter-arrival gaps, replay x1 vs capture: {ks:.3f}; lateness {sender.lateness.summary()}")
    assert ks < KS_MAX
    assert sender.lateness.count == len(recorded)
    assert t["dns.replay_lateness_n"] == len(recorded)
    assert t["dns.replay_lateness_le_1s"] == len(recorded)  # the cumulative buckets end with all of them


def test_speed_and_scale(lab, capture, tmp_path) -> None:
    recorded = [q for q in read_queries(capture) if not q.tcp]
    host, port = lab.dns
    dump = Tcpdump(tmp_path / "fast.pcap", host, port)
    try:
        sender, p = _replay(lab, capture, speed=2.0, scale=2, protocol="udp", first_source="127.9.2.1")
    finally:
        dump.stop()
    replayed = list(read_queries(dump.path))
    n_all = len(list(read_queries(capture)))
    assert sender.totals["dns.original_sent"] == 2 * n_all
    assert len(replayed) == 2 * n_all  # every copy, all over UDP now
    assert len({q.client for q in replayed}) == 10  # 5 clients x 2 copies, each its own address
    span_rec = recorded[-1].ts_unix_s - recorded[0].ts_unix_s
    span_rep = max(q.ts_unix_s for q in replayed) - min(q.ts_unix_s for q in replayed)
    assert span_rep < span_rec / 2 * 1.2 + 0.3  # twice as fast (margin for a loaded machine)
    assert span_rep > span_rec / 2 * 0.8
    # one copy's gaps, times the speed, against the original's
    udp_clients = {q.client for q in recorded}
    copy0 = {p.addresses[p.clients[c]] for c in udp_clients}  # copy 0 of client c is address number c
    first_copy = [q.ts_unix_s for q in replayed if q.client in copy0]
    assert len(first_copy) == len(recorded)
    ks = ks_2samp(_gaps([q.ts_unix_s for q in recorded]), _gaps(first_copy) * 2).statistic
    print(f"KS statistic of inter-arrival gaps, replay x2 (x2 copies) vs capture: {ks:.3f}")
    assert ks < KS_MAX_FAST


LOCUST = str(Path(sys.executable).with_name("locust"))


def test_locustfile_records_the_replay_and_ends_with_it(lab, capture, tmp_path) -> None:
    from loadkit.record import counters
    from loadkit.record.reader import load_manifest, load_run

    n = len(list(read_queries(capture)))
    host, port = lab.dns
    t0 = time.monotonic()
    proc = subprocess.run(
        [LOCUST, "-f", str(ROOT / "locustfiles" / "dns_replay.py"), "--headless", "-t", "60s", "--only-summary",
         "--target", f"dns={host}:{port}", "--replay-file", str(capture), "--replay-speed", "4",
         "--replay-first-source", "127.9.3.1", "--record-dir", str(tmp_path / "runs"), "--run-id", "replay"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    took_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took_s < 45  # the 2 s recording at x4 ended the test long before -t 60s
    run_dir = tmp_path / "runs" / "replay"
    assert load_manifest(run_dir)["status"] == "completed"
    run = load_run(run_dir)
    assert counters.total(run, "dns.original_sent") == n
    assert counters.total(run, "dns.replay_lateness_n") == n
    assert counters.total(run, "dns.replay_lateness_le_1s") == n
    le_1ms = counters.total(run, "dns.replay_lateness_le_1ms")
    assert 0 <= le_1ms <= n and counters.total(run, "dns.replay_lateness_le_50us") <= le_1ms  # cumulative
    assert counters.total(run, "dns.answered") >= n * 0.98
    assert "DNS replay lateness" in proc.stderr


class FstrmCapture:
    """fstrm_capture listening on ``sock`` for dnstap frames and writing them to ``path``."""

    def __init__(self, exe: str, sock: Path, path: Path) -> None:
        self.sock, self.path = sock, path
        self.proc = subprocess.Popen([exe, "-t", "protobuf:dnstap.Dnstap", "-u", str(sock), "-w", str(path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> Path:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # it ends the file with a STOP frame
            self.proc.wait(timeout=10)
        return self.path


@pytest.fixture
def fstrm_capture(tmp_path) -> Iterator[FstrmCapture]:
    exe = shutil.which("fstrm_capture")
    if exe is None:
        pytest.skip("fstrm_capture (Debian package fstrm-bin) is not installed")
    capture = FstrmCapture(exe, tmp_path / "tap.sock", tmp_path / "tap.fstrm")
    try:
        yield capture
    finally:
        capture.stop()


def test_unbound_query_log_and_dnstap_replay(lab, make_lab, fstrm_capture, tmp_path) -> None:
    logging_lab = make_lab(dns_log_queries=True, dns_dnstap_socket=str(fstrm_capture.sock))
    sources = ["127.9.6.1", "127.9.6.2", "127.9.6.3"]
    sent = _send(logging_lab, "udp", 300, 2.0, sources)
    _run_all(sent)
    time.sleep(1.0)  # unbound's dnstap thread writes in the background
    lab_dir = Path(logging_lab.dir)
    make_lab.labs[-1].down()  # unbound flushes its dnstap stream and the log as it stops
    tap_file = fstrm_capture.stop()
    n = sent.totals["dns.original_sent"]
    from_log = [q for q in read_queries(lab_dir / "logs" / "unbound.log") if q.client in sources]
    from_tap = [q for q in read_queries(tap_file) if q.client in sources]
    assert len(from_log) == n and len(from_tap) == n  # every query, in both of unbound's own records
    tap_times = [q.ts_unix_s for q in from_tap]
    log_seconds = collections.Counter(int(q.ts_unix_s) for q in from_log)

    host, port = lab.dns
    dump = Tcpdump(tmp_path / "replayed.pcap", host, port)
    try:
        tap_sender, _ = _replay(lab, tap_file, first_source="127.9.4.1")
        # from the second of the first query of our sources (the lab's start-up probes come before)
        first_second = min(int(q.ts_unix_s) for q in from_log)
        since = datetime.datetime.fromtimestamp(first_second, datetime.timezone.utc).isoformat()
        log_sender, log_plan = _replay(lab, lab_dir / "logs" / "unbound.log", first_source="127.9.5.1", speed=2.0,
                                       window_from=since)
    finally:
        dump.stop()
    replayed = list(read_queries(dump.path))
    # the lab's own probe queries are in both records too: sent as one more client each
    assert tap_sender.totals["dns.original_sent"] >= n and log_sender.totals["dns.original_sent"] >= n
    tap_rep = sorted(q.ts_unix_s for q in replayed if q.client.startswith("127.9.4."))
    ks = ks_2samp(_gaps(tap_times), _gaps(tap_rep)).statistic
    print(f"KS statistic of inter-arrival gaps, dnstap replay vs dnstap: {ks:.3f}")
    assert ks < KS_MAX
    # the log has whole seconds: at x2 each logged second's queries leave within its half second
    ours = {log_plan.addresses[log_plan.clients[c]] for c in sources}
    log_rep = sorted(q.ts_unix_s for q in replayed if q.client in ours)
    assert len(log_rep) == n
    per_half = collections.Counter(int((t - log_rep[0]) * 2) for t in log_rep)
    for second, count in log_seconds.items():
        k = second - first_second
        assert abs(per_half.get(k, 0) - count) <= count * 0.25 + 10, (k, per_half, log_seconds)


def test_capture_replays_over_dot_one_connection_per_client(lab, capture) -> None:
    if lab.dot is None:
        pytest.skip("this lab serves no DNS over TLS")
    n = len(list(read_queries(capture)))
    host, port = lab.dot
    p = replay.plan(replay.ReplaySettings(host=f"{host}:{port}", file=str(capture), protocol="dot", speed=4.0,
                                          first_source="127.9.7.1"))
    sender = replay.build_sender(p)
    sender.open()
    try:
        sender.run()
    finally:
        sender.close()
    t = sender.totals
    assert t["dns.original_sent"] == n
    assert t.get("dns.answered", 0) >= n * 0.98
    # each recorded client keeps its own TLS connection, as Android's Private DNS does
    assert t.get("dns.tls_handshakes_full", 0) + t.get("dns.tls_handshakes_resumed", 0) >= len(p.clients)
    assert t.get("dns.stream_connects", 0) <= len(p.clients) * 2  # not one per query
