"""The sender against small in-process fake servers, for behaviour unbound cannot be made to
show on demand: chosen RCODEs, truncation, dropping first attempts, a closed port, silence."""

from __future__ import annotations

import os
import socket as stdsocket
import time

import dns.message
import gevent
import gevent.socket
import pytest

from loadkit.errors import ProfileError
from loadkit.generate.dns import schedule, wire
from loadkit.generate.dns.retry import RetryBudget
from loadkit.generate.dns.sender import DnsSender, SenderOptions, source_addresses
from loadkit.profile.targets import check_target

NAMES = [f"h{i:04d}.lab.test." for i in range(200)]


def raw_reply(query: bytes, rcode: int = 0, tc: bool = False) -> bytes:
    """The query turned into a reply header-wise (QR set, RCODE, optionally TC)."""
    flags2 = query[2] | 0x80 | (0x02 if tc else 0)
    return query[:2] + bytes([flags2, 0x80 | rcode]) + query[4:]


class FakeServer:
    """UDP (and TCP) on 127.0.0.1:<free port>, answering by ``policy(query, source) -> bytes|None``."""

    def __init__(self, policy, tcp_policy=None) -> None:
        self.policy = policy
        self.tcp_policy = tcp_policy
        for _ in range(50):  # a UDP port whose TCP twin is free too
            self.udp = gevent.socket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM)
            self.udp.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 4 << 20)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            if tcp_policy is None:
                break
            self.tcp = gevent.socket.socket(stdsocket.AF_INET, stdsocket.SOCK_STREAM)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.tcp.close()
                self.udp.close()
        self.sources: set[str] = set()
        self.received = 0
        self.greenlets = [gevent.spawn(self._serve_udp)]
        if tcp_policy is not None:
            self.tcp.listen(128)
            self.greenlets.append(gevent.spawn(self._serve_tcp))

    def _serve_udp(self) -> None:
        while True:
            data, addr = self.udp.recvfrom(4096)
            self.received += 1
            self.sources.add(addr[0])
            reply = self.policy(data, addr)
            if reply is not None:
                self.udp.sendto(reply, addr)

    def _serve_tcp(self) -> None:
        while True:
            conn, _ = self.tcp.accept()
            gevent.spawn(self._tcp_conn, conn)

    def _tcp_conn(self, conn) -> None:
        with conn:
            n = int.from_bytes(conn.recv(2), "big")
            query = b""
            while len(query) < n:
                query += conn.recv(n - len(query))
            reply = self.tcp_policy(query)
            conn.sendall(len(reply).to_bytes(2, "big") + reply)

    def close(self) -> None:
        gevent.killall(self.greenlets)
        self.udp.close()
        if self.tcp_policy is not None:
            self.tcp.close()


@pytest.fixture
def fake():
    servers = []

    def make(policy, tcp_policy=None) -> FakeServer:
        servers.append(FakeServer(policy, tcp_policy))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def qname(query: bytes) -> str:
    return dns.message.from_wire(query).question[0].name.to_text()


def run(port: int, pool=None, **kw) -> DnsSender:
    kw.setdefault("timeout_s", 0.2)
    kw.setdefault("max_duration_s", 0.5)
    sender = DnsSender(check_target(f"127.0.0.1:{port}", 53), pool or wire.QueryPool(NAMES, [("A", 1.0)]), **kw)
    sender.open()
    try:
        sender.run()
    finally:
        sender.close()
    return sender


def collecting(sender_kwargs: dict) -> dict:
    """Failure counts by class over every interval report (installs the callback)."""
    seen: dict[str, int] = {}

    def on_interval(report) -> None:
        for t in report.qtypes:
            for k, v in t.failures.items():
                seen[k] = seen.get(k, 0) + v

    sender_kwargs["on_interval"] = on_interval
    return seen


def test_rcodes_are_classified_and_nxdomain_is_success_only_when_meant(fake) -> None:
    rcode_of = {"h0000": 0, "h0001": 3, "h0002": 2, "h0003": 5, "h0004": 4}

    def policy(q, _addr):
        label = qname(q).split(".")[0]
        if label.startswith("nx-"):
            return raw_reply(q, 3)
        return raw_reply(q, rcode_of.get(label, 0))

    server = fake(policy)
    names = list(rcode_of)
    pool = wire.QueryPool([n + ".lab.test." for n in names], [("A", 1.0)], nxdomain_share=0.2, size=500, seed=1)
    kw: dict = {}
    seen = collecting(kw)
    s = run(server.port, pool, base=schedule.ConstantRate(1000), max_queries_n=500, max_duration_s=2.0, **kw)
    t = s.totals
    assert t["dns.original_sent"] == 500 and t["dns.answered"] == 500
    nx_meant = sum(1 for q in pool.queries if q.kind == wire.KIND_NXDOMAIN)
    assert t["dns.rcode.nxdomain"] > nx_meant  # meant ones plus the h0001 ones
    assert seen.keys() == {"nxdomain_unexpected", "servfail", "refused", "rcode_other"}
    assert sum(seen.values()) == 500 - t["dns.rcode.noerror"] - nx_meant
    assert s.answer_latency.count == t["dns.rcode.noerror"] + nx_meant


def test_retries_are_counted_as_retries(fake) -> None:
    attempts: dict[str, int] = {}

    def drop_first(q, _addr):
        name = qname(q)
        attempts[name] = attempts.get(name, 0) + 1
        return raw_reply(q) if attempts[name] > 1 else None

    server = fake(drop_first)
    pool = wire.QueryPool(NAMES, [("A", 1.0)], size=200, seed=2)  # 200 distinct names, each once
    # the retry's answer must beat the retry's own timeout (0.5 s) though this process also runs
    # the fake server: 50 ms had been a stall's worth on a loaded machine, and a third attempt
    s = run(server.port, pool, base=schedule.ConstantRate(1000), max_queries_n=200, timeout_s=0.25, retries_n=2,
            backoff=2.0, max_duration_s=3.0)
    t = s.totals
    assert t["dns.original_sent"] == 200
    assert t["dns.retry_sent"] == 200  # each dropped once, answered on the retry
    assert t["dns.answered"] == 200 and t.get("dns.timeouts", 0) == 0
    assert server.received == 400  # offered = original + retries
    # answer latency runs from the first send, so it includes the first attempt's 250 ms timeout
    assert s.answer_latency.percentile_s(0.5) >= 0.25


def test_silent_server_gets_the_scheduled_load_anyway(fake) -> None:
    server = fake(lambda q, a: None)
    kw: dict = {}
    seen = collecting(kw)
    s = run(server.port, base=schedule.ConstantRate(2000), max_duration_s=0.5, timeout_s=0.1, retries_n=1, **kw)
    t = s.totals
    # open loop: rate x duration originals, whatever the server does (a closed loop waiting out
    # each 0.1 s timeout would send far fewer); a pass that comes late to the end still sends what
    # fell due before it (a stall there once cut this to 700-900)
    assert 990 <= t["dns.original_sent"] <= 1001
    assert t["dns.retry_sent"] > 0
    assert seen["timeout"] == t["dns.timeouts"] > 0
    assert t.get("dns.answered", 0) == 0


def test_truncated_reply_is_retried_over_tcp(fake) -> None:
    server = fake(lambda q, a: raw_reply(q, tc=True), tcp_policy=lambda q: raw_reply(q))
    s = run(server.port, base=schedule.ConstantRate(200), max_queries_n=50, max_duration_s=1.0)
    t = s.totals
    assert t["dns.rcode.truncated"] == 50
    assert t["dns.tcp_fallback"] == 50 and t["dns.retry_sent"] == 50
    assert t["dns.rcode.noerror"] == 50  # the TCP answers
    assert s.answer_latency.count == 50


def test_truncated_without_fallback_is_a_failure(fake) -> None:
    server = fake(lambda q, a: raw_reply(q, tc=True))
    kw: dict = {}
    seen = collecting(kw)
    run(server.port, base=schedule.ConstantRate(200), max_queries_n=20, tcp_fallback=False, **kw)
    assert seen == {"truncated": 20}


def test_closed_port_is_icmp_unreachable_not_timeout() -> None:
    probe = stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    kw: dict = {}
    seen = collecting(kw)
    s = run(port, base=schedule.ConstantRate(200), max_queries_n=40, timeout_s=1.0, **kw)
    assert seen.get("icmp_unreachable", 0) > 0
    assert "timeout" not in seen
    assert sum(seen.values()) == 40
    assert s.totals["dns.icmp_unreachable"] == seen["icmp_unreachable"]
    assert s.totals.get("dns.answered", 0) == 0


def test_many_sources_each_get_their_own_address(fake) -> None:
    server = fake(lambda q, a: raw_reply(q))
    sources = source_addresses(50, "127.1.3.250")  # crosses .255/.0, which are skipped
    assert "127.1.4.0" not in sources and "127.1.3.255" not in sources and len(set(sources)) == 50
    s = run(server.port, base=schedule.ConstantRate(2000), max_queries_n=500, sources=sources)
    assert server.sources == set(sources)
    assert s.totals["dns.answered"] == 500


def test_burst_window_is_recorded(fake) -> None:
    server = fake(lambda q, a: raw_reply(q))
    s = run(server.port, bursts=schedule.BurstTrain(300, 0.02, 10.0, first_s=0.05, count=1))
    assert len(s.bursts) == 1
    b = s.bursts[0]
    assert b.sent_n == 300
    assert b.window_s > 0.0  # a real window, measured (how long it took is not the test's business)
    assert b.first_sent_unix_s >= b.planned_start_unix_s - 0.001
    # answers read while the burst left, up to the read right after it (the drain inside it)
    assert 0 <= b.answered_in_window_n <= 300
    assert b.answers_read_unix_s >= b.last_sent_unix_s


def test_source_addresses_stay_on_loopback() -> None:
    with pytest.raises(ProfileError, match="loopback"):
        source_addresses(10, "127.255.255.250")


def test_options_are_fields_of_one_record() -> None:
    # the sender takes options as checked elsewhere (users.plan); an unknown one is an error
    pool = wire.QueryPool(NAMES, [("A", 1.0)], size=10)
    target = check_target("127.0.0.1:53", 53)
    sender = DnsSender(target, pool, SenderOptions(timeout_s=0.3, retries_n=2), backoff=3.0)
    assert sender.attempt_timeouts_s == pytest.approx([0.3, 0.9, 2.7])
    with pytest.raises(ValueError):
        DnsSender(target, pool, timeot_s=1.0)


def test_stop_leaves_unfinished_queries_not_failures(fake) -> None:
    # a server that never answers: queries in flight at the stop would have been retried, and
    # a stopped run sends no retry, so they are unfinished, not timeouts
    server = fake(lambda q, a: None)
    kw: dict = {}
    seen = collecting(kw)
    sender = DnsSender(check_target(f"127.0.0.1:{server.port}", 53), wire.QueryPool(NAMES, [("A", 1.0)]),
                       base=schedule.ConstantRate(400), timeout_s=1.0, retries_n=2, max_duration_s=5.0, **kw)
    sender.open()
    runner = gevent.spawn(sender.run)
    gevent.sleep(0.25)  # well before any first attempt's 1 s timeout
    sender.stop()
    runner.join(timeout=5)
    sender.close()
    t = sender.totals
    assert runner.dead and t["dns.original_sent"] > 20
    assert seen == {}
    assert t.get("dns.timeouts", 0) == 0 and t.get("dns.retry_sent", 0) == 0
    assert t["dns.unfinished"] == t["dns.original_sent"]


def test_final_attempt_timeouts_in_the_drain_are_still_timeouts(fake) -> None:
    # no retries: every attempt is the last one, so its timeout is a real failure, stop or not
    server = fake(lambda q, a: None)
    kw: dict = {}
    seen = collecting(kw)
    sender = DnsSender(check_target(f"127.0.0.1:{server.port}", 53), wire.QueryPool(NAMES, [("A", 1.0)]),
                       base=schedule.ConstantRate(400), timeout_s=0.2, retries_n=0, max_duration_s=5.0, **kw)
    sender.open()
    runner = gevent.spawn(sender.run)
    gevent.sleep(0.3)
    sender.stop()
    runner.join(timeout=5)
    sender.close()
    t = sender.totals
    assert seen["timeout"] == t["dns.timeouts"] == t["dns.original_sent"]
    assert t.get("dns.unfinished", 0) == 0


class Silent:
    """A loopback UDP port that is bound (so no ICMP comes back) and never answers; what arrived
    is read afterwards: ``(source port, query name)`` per datagram."""

    def __init__(self) -> None:
        self.sock = stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM)
        self.sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def received(self) -> list[tuple[int, str]]:
        self.sock.setblocking(False)
        got = []
        try:
            while True:
                data, addr = self.sock.recvfrom(4096)
                got.append((addr[1], qname(data)))
        except BlockingIOError:
            pass
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def silent():
    s = Silent()
    yield s
    s.close()


def open_fds() -> int:
    gevent.sleep(0.001)  # the gevent hub opens its own descriptors on first use
    return len(os.listdir("/proc/self/fd"))


def ports_by_name(received) -> dict[str, list[int]]:
    by_name: dict[str, list[int]] = {}
    for port, name in received:
        by_name.setdefault(name, []).append(port)
    return by_name


@pytest.mark.parametrize("policy", ["per-attempt", "per-query", "fixed"])
def test_port_policy_decides_the_source_port_of_each_retry(silent, policy) -> None:
    pool = wire.QueryPool(NAMES, [("A", 1.0)], size=200, seed=3)  # 200 distinct names, each once
    fds_before = open_fds()
    s = run(silent.port, pool, base=schedule.ConstantRate(2000), max_queries_n=60, timeout_s=0.05,
            retries_n=2, backoff=1.0, ports_per_source=3, port_policy=policy, max_duration_s=2.0)
    assert open_fds() == fds_before  # every per-attempt socket closed on its timeout
    assert s.totals["dns.retry_sent"] == 120
    by_name = ports_by_name(silent.received())
    assert len(by_name) == 60 and all(len(p) == 3 for p in by_name.values())
    all_ports = {p for ports in by_name.values() for p in ports}
    if policy == "per-attempt":
        # three attempts, three source ports: each retry is a new firewall session
        assert all(len(set(p)) == 3 for p in by_name.values())
        assert len(all_ports) > 100
    elif policy == "per-query":
        assert all(len(set(p)) == 1 for p in by_name.values())
        assert len(all_ports) == 3
    else:
        assert len(all_ports) == 3  # retries go out on the fixed sockets: no new sessions


def test_per_attempt_sockets_are_bounded(silent) -> None:
    # at most 10 retry sockets at once: the rest of the retries use the fixed sockets, counted
    s = run(silent.port, base=schedule.ConstantRate(2000), max_queries_n=100, timeout_s=0.2, retries_n=1,
            port_policy="per-attempt", max_attempt_sockets=10, max_duration_s=2.0)
    t = s.totals
    assert t["dns.retry_sent"] == 100
    assert t["dns.attempt_socket_limit"] >= 80
    retry_ports = {p for p, _ in silent.received()}
    assert len(retry_ports) <= 1 + 10 + 10  # the fixed socket, then at most 10 open at a time, reused


def test_retry_budget_caps_retries_at_a_share_of_originals(silent) -> None:
    s = run(silent.port, base=schedule.ConstantRate(1000), timeout_s=0.05, retries_n=3, backoff=1.0,
            retry_budget=0.2, max_duration_s=1.0)
    t = s.totals
    orig, retries = t["dns.original_sent"], t["dns.retry_sent"]
    assert orig > 500
    assert retries <= 0.2 * orig + 5
    assert retries >= 0.15 * orig  # the budget is used, not just refused
    # without the budget every query would have been retried: most were refused a retry
    assert t["dns.retry_suppressed"] > 0.5 * orig
    assert len(silent.received()) == orig + retries


def test_retry_budget_window_slides() -> None:
    budget = RetryBudget(0.5, window_s=1.0, slots_n=10)
    budget.add_originals(0.0, 10)
    assert sum(budget.allow_retry(0.05) for _ in range(10)) == 5
    # 2 s later the first originals have left the window: no credit until new ones come
    assert not budget.allow_retry(2.0)
    budget.add_originals(2.0, 4)
    assert sum(budget.allow_retry(2.1) for _ in range(10)) == 2


# -- TCP streams: re-sends on a new connection ------------------------------------------------------


class StreamFake:
    """DNS over TCP on loopback: reads length-prefixed queries; the first connection is closed by
    the server once ``close_first_after`` queries came on it (then, with ``refuse_after``, nothing
    listens any more); connections from number ``answer_from`` on are answered."""

    def __init__(self, close_first_after: int = 0, refuse_after: bool = False, answer_from: int = 1) -> None:
        self.close_first_after, self.refuse_after, self.answer_from = close_first_after, refuse_after, answer_from
        self.srv = gevent.socket.socket(stdsocket.AF_INET, stdsocket.SOCK_STREAM)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.port = self.srv.getsockname()[1]
        self.conns: list = []
        self.received: list[int] = []  # queries per connection
        self.greenlets = [gevent.spawn(self._accept)]

    def _accept(self) -> None:
        try:
            while True:
                conn, _ = self.srv.accept()
                self.conns.append(conn)
                self.received.append(0)
                self.greenlets.append(gevent.spawn(self._serve, conn, len(self.conns) - 1))
        except OSError:
            return  # the listener was closed

    def _serve(self, conn, i: int) -> None:
        buf = b""
        try:
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                    n = int.from_bytes(buf[:2], "big")
                    query, buf = buf[2:2 + n], buf[2 + n:]
                    self.received[i] += 1
                    if i >= self.answer_from:
                        reply = raw_reply(query)
                        conn.sendall(len(reply).to_bytes(2, "big") + reply)
                    if i == 0 and self.received[0] == self.close_first_after:
                        if self.refuse_after:
                            self.srv.close()  # the client's reconnect is refused
                        conn.close()
                        return
        except OSError:
            return

    def drop_all(self) -> None:
        for conn in self.conns:
            conn.close()

    def close(self) -> None:
        gevent.killall(self.greenlets)
        self.srv.close()
        self.drop_all()


def tcp_sender(fake: StreamFake, **kw) -> tuple[DnsSender, dict]:
    seen = collecting(kw)
    kw.setdefault("max_queries_n", 10)
    sender = DnsSender(check_target(f"127.0.0.1:{fake.port}", 53), wire.QueryPool(NAMES, [("A", 1.0)]),
                       protocol="tcp", base=schedule.ConstantRate(1000), timeout_s=2.0, retries_n=2, backoff=1.0,
                       max_duration_s=5.0, **kw)
    sender.open()
    return sender, seen


def test_a_stream_resend_counts_as_a_retry_when_written_not_when_queued() -> None:
    # the server closes the connection with 5 queries pending, then refuses the reconnect: the
    # 5 were queued for a re-send that never left, so no retry was offered to the target
    fake = StreamFake(close_first_after=5, refuse_after=True)
    try:
        sender, seen = tcp_sender(fake, max_queries_n=5)
        gevent.spawn(sender.run).join(timeout=10)
        sender.close()
    finally:
        fake.close()
    t = sender.totals
    assert t["dns.original_sent"] == 5 and t["dns.stream_server_closes"] == 1
    assert t.get("dns.retry_sent", 0) == 0 and seen == {"conn_refused": 5}


def test_the_retry_budget_applies_to_stream_resends() -> None:
    # 10 queries lost with their connection, a budget of 0.2 x originals: 2 re-sent (and answered
    # on the new connection), 8 refused a re-send and failed with the connection
    fake = StreamFake(close_first_after=10)
    try:
        sender, seen = tcp_sender(fake, retry_budget=0.2)
        gevent.spawn(sender.run).join(timeout=10)
        sender.close()
    finally:
        fake.close()
    t = sender.totals
    assert t["dns.original_sent"] == 10
    assert (t["dns.retry_sent"], t["dns.retry_suppressed"], t["dns.answered"]) == (2, 8, 2)
    assert seen == {"conn_closed": 8} and fake.received[1:] == [2]


def test_a_stream_lost_after_the_stop_leaves_its_queries_unfinished() -> None:
    # a silent server: the run is stopped with 10 queries pending, then the server drops the
    # connection; they would have been re-sent, and a stopped run re-sends nothing: unfinished
    fake = StreamFake(answer_from=99)
    try:
        sender, seen = tcp_sender(fake)
        runner = gevent.spawn(sender.run)
        deadline = time.monotonic() + 10
        while sum(fake.received) < 10 and time.monotonic() < deadline:
            gevent.sleep(0.01)
        sender.stop()
        fake.drop_all()
        runner.join(timeout=10)
        sender.close()
    finally:
        fake.close()
    t = sender.totals
    assert runner.dead and t["dns.original_sent"] == 10 == sum(fake.received)
    assert seen == {} and t["dns.unfinished"] == 10 and t.get("dns.retry_sent", 0) == 0
