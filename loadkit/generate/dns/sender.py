"""The open-loop DNS sender: schedules, retries, many sources, UDP and TCP.

One :class:`DnsSender` per process sends prebuilt queries (:mod:`.wire`) when a schedule
(:mod:`.schedule`) says they are due, whatever the server does, and reads replies in a tight
non-blocking loop. It runs under gevent without depending on Locust:

* UDP uses gevent's *original* C socket (``_socket.socket``, which gevent does not patch) in
  non-blocking mode, one connected socket per (source address, port). ``send`` on a connected
  socket skips address parsing, and a closed server port shows up as ``ECONNREFUSED`` (the ICMP
  port unreachable). When nothing is due the loop waits cooperatively for a reply, a deadline or
  the next due query (``gevent.select`` on an epoll descriptor holding every socket), so other
  greenlets (Locust's stats, web UI) run and replies are still timestamped promptly.
* A reply is matched by socket (= source address and port) and ID, and classified from its raw
  bytes. Retries behave like a stub resolver: per-attempt timeout, ``retries_n`` more attempts,
  the timeout multiplied by ``backoff`` each time; every retry is counted as a retry, so offered
  load = original + retries.
* Results are tallied per interval (:class:`IntervalReport`), not per query, and handed to a
  callback (the Locust user turns them into Locust stats and generator metrics).
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import logging
import math
import random
import time
from collections import deque
from typing import Callable, NamedTuple, Sequence

import gevent
import gevent.select
import gevent.socket
from gevent import monkey

from loadkit.errors import ProfileError, TargetError
from loadkit.profile.targets import Target, check_source_address

from . import wire
from .histogram import LatencyHistogram
from .schedule import BurstTrain, Nothing, Schedule

log = logging.getLogger(__name__)

_epoll = monkey.get_original("select", "epoll")
_EPOLLIN = 0x001

#: receive buffer for all client sockets together, split between them (each gets between the
#: two bounds below): replies must not be dropped on our side while this process is briefly
#: descheduled at a high rate (about 1 KiB per reply on loopback)
CLIENT_RCVBUF_TOTAL_BYTES = 64 * 1024 * 1024
CLIENT_RCVBUF_MIN_BYTES = 256 * 1024
CLIENT_RCVBUF_MAX_BYTES = 16 * 1024 * 1024
#: setsockopt option that may exceed net.core.rmem_max (Linux, needs CAP_NET_ADMIN)
SO_RCVBUFFORCE = getattr(_socket, "SO_RCVBUFFORCE", 33)
#: most base-rate queries sent in one pass of the loop before replies are read again: small,
#: so a steady rate stays steady (a server's default 208 KiB receive buffer holds only about
#: 256 queries, and a catch-up block of 512 would itself be a burst)
MAX_BASE_BATCH = 48
#: most burst queries sent in one pass: a burst should leave as one block
MAX_BURST_BATCH = 2048
#: when the next query is due sooner than this, keep looping instead of waiting
SPIN_S = 0.0002

OUTCOME_FAILURE: dict[int, str] = {
    wire.SERVFAIL: "servfail",
    wire.REFUSED: "refused",
    wire.RCODE_OTHER: "rcode_other",
    wire.TRUNCATED: "truncated",
}


class BurstWindow(NamedTuple):
    """When one burst's queries really left this process (``DnsSender.bursts``)."""

    burst_index: int
    planned_start_unix_s: float
    first_sent_unix_s: float
    last_sent_unix_s: float
    sent_n: int
    #: answers (to any query) read from the burst's first send to the first read after its last
    #: one, and when that read ended: the server's drain rate inside the burst; -1 if unknown
    answered_in_window_n: int = -1
    answers_read_unix_s: float = 0.0

    @property
    def window_s(self) -> float:
        return self.last_sent_unix_s - self.first_sent_unix_s


class QtypeTally(NamedTuple):
    """Completed queries of one qtype in one interval."""

    qtype: str
    latencies: LatencyHistogram  #: every completed query (answers and failures), from first send
    failures: dict  #: failure class -> count


class IntervalReport(NamedTuple):
    """What happened in one interval (handed to ``DnsSender.on_interval``)."""

    ts_unix_s: float  #: end of the interval
    interval_s: float
    qtypes: list  #: [QtypeTally], one per qtype of the pool
    counters: dict  #: metric name -> increase during the interval (``dns.original_sent`` ...)
    outstanding_n: int  #: queries sent and not yet answered, timed out or given up
    bursts: list  #: [BurstWindow] of bursts completed during the interval
    answers: LatencyHistogram  #: successful answers only, all qtypes


def source_addresses(count: int, first: str = "127.1.0.1") -> list[str]:
    """``count`` distinct loopback addresses from ``first`` upwards (skipping .0 and .255)."""
    if count < 1:
        raise ProfileError(f"number of source addresses {count} must be >= 1")
    try:
        ip = ipaddress.ip_address(first)
    except ValueError:
        raise ProfileError(f"first source address {first!r} is not an IP address") from None
    out = []
    while len(out) < count:
        if ip.version == 4 and ip.packed[-1] in (0, 255):
            ip += 1
            continue
        if not ip.is_loopback:
            raise ProfileError(
                f"{count} source addresses from {first} leave the loopback range (127.0.0.0/8)"
            )
        out.append(str(ip))
        ip += 1
    return out


class DnsSender:
    """Open-loop DNS load from one process. See the module docstring.

    ``base`` and ``bursts`` are this process's share already. ``max_duration_s`` and
    ``max_queries_n`` bound every run (a safety cap on top of the Locust run time).
    """

    def __init__(
        self,
        target: Target,
        pool: wire.QueryPool,
        *,
        base: Schedule | None = None,
        bursts: BurstTrain | None = None,
        protocol: str = "udp",
        timeout_s: float = 2.0,
        retries_n: int = 0,
        backoff: float = 2.0,
        tcp_fallback: bool = True,
        sources: Sequence[str] = ("127.0.0.1",),
        ports_per_source: int = 1,
        interval_s: float = 0.5,
        max_duration_s: float = 3600.0,
        max_queries_n: int = 10**9,
        tcp_max_inflight: int = 500,
        on_interval: Callable[[IntervalReport], None] | None = None,
    ) -> None:
        if protocol not in ("udp", "tcp"):
            raise ProfileError(f"protocol {protocol!r} must be udp or tcp")
        if not timeout_s > 0:
            raise ProfileError(f"timeout {timeout_s} s must be > 0")
        if retries_n < 0:
            raise ProfileError(f"retries {retries_n} must be >= 0")
        if not backoff >= 1.0:
            raise ProfileError(f"retry backoff {backoff} must be >= 1")
        if ports_per_source < 1:
            raise ProfileError(f"ports per source {ports_per_source} must be >= 1")
        if not interval_s > 0:
            raise ProfileError(f"stats interval {interval_s} s must be > 0")
        if not sources:
            raise ProfileError("no source address")
        for src in sources:
            check_source_address(src)
        self.target = target
        self.pool = pool
        self.base: Schedule = base or Nothing()
        self.burst_train: BurstTrain | None = bursts if bursts and bursts.size_n else None
        self.protocol = protocol
        self.timeout_s = float(timeout_s)
        self.retries_n = int(retries_n)
        self.backoff = float(backoff)
        self.tcp_fallback = tcp_fallback
        self.sources = list(sources)
        self.ports_per_source = ports_per_source
        self.interval_s = interval_s
        self.max_duration_s = max_duration_s
        self.max_queries_n = max_queries_n
        self.tcp_max_inflight = tcp_max_inflight
        self.on_interval = on_interval
        #: attempt k waits timeout_s * backoff**k
        self.attempt_timeouts_s = [self.timeout_s * self.backoff**k for k in range(self.retries_n + 1)]

        self.bursts: list[BurstWindow] = []
        #: cumulative counters since start (same names as the interval counters)
        self.totals: dict[str, int] = {}
        #: cumulative latency of successful answers, all qtypes
        self.answer_latency = LatencyHistogram()
        self._socks: list = []
        self._outs: list[dict] = []
        self._ep = None
        self._stop = False
        self._tcp_inflight = 0
        self._new_tally()
        self.started_unix_s = 0.0
        self.ended_unix_s = 0.0

    # -- sockets ----------------------------------------------------------------------------
    def open(self) -> None:
        """Create and bind every socket (before the first packet, so errors come early)."""
        family = _socket.AF_INET6 if ":" in self.target.address else _socket.AF_INET
        dest = (self.target.address, self.target.port)
        n_sockets = len(self.sources) * self.ports_per_source
        rcvbuf = min(CLIENT_RCVBUF_MAX_BYTES, max(CLIENT_RCVBUF_MIN_BYTES, CLIENT_RCVBUF_TOTAL_BYTES // n_sockets))
        self._ep = _epoll()
        try:
            for src in self.sources:
                if (":" in src) != (family == _socket.AF_INET6):
                    raise ProfileError(f"source address {src} and target {self.target} are not the same IP version")
                for _ in range(self.ports_per_source):
                    s = _socket.socket(family, _socket.SOCK_DGRAM)
                    try:
                        _set_rcvbuf(s, rcvbuf)
                        s.bind((src, 0))
                        s.connect(dest)
                    except OSError as err:
                        s.close()
                        raise TargetError(f"cannot bind a DNS client socket to {src}: {err.strerror}") from err
                    s.setblocking(False)
                    self._ep.register(s.fileno(), _EPOLLIN)
                    self._socks.append(s)
                    self._outs.append({})
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for s in self._socks:
            s.close()
        self._socks = []
        if self._ep is not None:
            self._ep.close()
            self._ep = None

    def stop(self) -> None:
        """Ask :meth:`run` to stop sending (it then drains replies and returns)."""
        self._stop = True

    # -- accounting -------------------------------------------------------------------------
    def _new_tally(self) -> None:
        n = len(self.pool.qtypes)
        # index qtype*2 + failed: raw latencies, one list append per completed query (a
        # histogram add costs ten times more); bucketed in bulk when the interval is flushed
        self._lats: list[list[float]] = [[] for _ in range(2 * n)]
        self._fails: list[dict[str, int]] = [{} for _ in range(n)]
        self._counts: dict[str, int] = {}
        self._done_bursts: list[BurstWindow] = []

    def _count(self, key: str, n: int = 1) -> None:
        self._counts[key] = self._counts.get(key, 0) + n

    def _fail(self, qi: int, failure_class: str, latency_s: float) -> None:
        self._lats[2 * qi + 1].append(latency_s)
        f = self._fails[qi]
        f[failure_class] = f.get(failure_class, 0) + 1

    def outstanding_n(self) -> int:
        return sum(len(o) for o in self._outs) + self._tcp_inflight

    def _flush(self, interval_s: float) -> IntervalReport:
        qtypes = []
        answers = LatencyHistogram()
        for qi, qtype in enumerate(self.pool.qtypes):
            ok, failed = LatencyHistogram(), LatencyHistogram()
            ok.add_many(self._lats[2 * qi])
            failed.add_many(self._lats[2 * qi + 1])
            self.answer_latency.merge(ok)
            answers.merge(ok)
            both = LatencyHistogram()
            both.merge(ok)
            both.merge(failed)
            qtypes.append(QtypeTally(qtype, both, dict(self._fails[qi])))
        counts = dict(self._counts)
        for k, v in counts.items():
            self.totals[k] = self.totals.get(k, 0) + v
        report = IntervalReport(
            time.time(), interval_s, qtypes, counts, self.outstanding_n(), self._done_bursts, answers
        )
        self._new_tally()
        if self.on_interval is not None:
            try:
                self.on_interval(report)
            except Exception:  # a reporting bug must not stop the offered load
                log.exception("DNS interval report failed")
        return report

    # -- TCP --------------------------------------------------------------------------------
    def _tcp_query(self, tail: bytes, kind: int, qi: int, t_first: float, src: str, fallback: bool) -> None:
        """One query over TCP in its own greenlet (protocol tcp, or a TC=1 reply's retry).
        ``_spawn_tcp`` has counted it in flight already."""
        family = _socket.AF_INET6 if ":" in self.target.address else _socket.AF_INET
        sock = gevent.socket.socket(family, _socket.SOCK_STREAM)
        try:
            with gevent.Timeout(self.timeout_s, False):
                try:
                    sock.bind((src, 0))
                    sock.connect((self.target.address, self.target.port))
                    qid = random.getrandbits(16)
                    msg = wire.ID_BYTES[qid] + tail
                    sock.sendall(len(msg).to_bytes(2, "big") + msg)
                    head = _recv_exact(sock, 2)
                    reply = _recv_exact(sock, int.from_bytes(head, "big"))
                except ConnectionRefusedError:
                    self._fail(qi, "conn_refused" if not fallback else "icmp_unreachable", time.perf_counter() - t_first)
                    return
                except OSError as err:
                    self._count("dns.send_errors")
                    self._fail(qi, "send_error", time.perf_counter() - t_first)
                    log.debug("DNS over TCP failed: %s", err)
                    return
                latency = time.perf_counter() - t_first
                self._count("dns.answered")
                self._reply_outcome(wire.classify(reply) if len(reply) >= 12 else wire.RCODE_OTHER, kind, qi, latency)
                return
            self._count("dns.timeouts")
            self._fail(qi, "timeout", time.perf_counter() - t_first)
        finally:
            sock.close()
            self._tcp_inflight -= 1

    def _spawn_tcp(self, tail: bytes, kind: int, qi: int, t_first: float, src: str, fallback: bool) -> None:
        if self._tcp_inflight >= self.tcp_max_inflight:
            self._count("dns.send_errors")
            self._fail(qi, "send_error", 0.0)
            return
        # counted in flight now, not when the greenlet first runs, so the drain waits for it
        self._tcp_inflight += 1
        gevent.spawn(self._tcp_query, tail, kind, qi, t_first, src, fallback)

    def _reply_outcome(self, code: int, kind: int, qi: int, latency: float) -> None:
        """Account one classified reply (slow path; the UDP loop inlines the common cases)."""
        self._count("dns.rcode." + wire.OUTCOME_NAMES[code])
        if code == wire.NOERROR or (code == wire.NXDOMAIN and kind != wire.KIND_NAME):
            self._lats[2 * qi].append(latency)
        elif code == wire.NXDOMAIN:
            self._fail(qi, "nxdomain_unexpected", latency)
        else:
            self._fail(qi, OUTCOME_FAILURE[code], latency)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        """Send until stopped, the caps are reached or every schedule is exhausted; then wait
        for replies to queries already sent (at most one full retry cycle) and flush."""
        if not self._socks:
            self.open()
        perf = time.perf_counter
        socks = self._socks
        outs = self._outs
        sends = [s.send for s in socks]
        recvs = [s.recv for s in socks]
        nsock = len(socks)
        fd_index = {s.fileno(): i for i, s in enumerate(socks)}
        poll = self._ep.poll
        ep_fd = self._ep.fileno()
        src_of = [self.sources[i // self.ports_per_source] for i in range(nsock)]
        next_id = [random.getrandbits(16) for _ in range(nsock)]
        queries = self.pool.queries
        nq = len(queries)
        qpos = random.randrange(nq)
        fresh_tail = self.pool.fresh_tail
        KIND_RANDOM = wire.KIND_RANDOM_SUBDOMAIN
        KIND_NAME = wire.KIND_NAME
        ID_BYTES = wire.ID_BYTES
        RCODE_OUTCOME = wire.RCODE_OUTCOME
        NOERROR, NXDOMAIN = wire.NOERROR, wire.NXDOMAIN
        use_tcp = self.protocol == "tcp"
        tcp_fallback = self.tcp_fallback
        timeouts = self.attempt_timeouts_s
        retries_n = self.retries_n
        # one FIFO of (deadline, socket, id, entry) per attempt number: deadlines within a FIFO
        # rise with send time, so expiry only looks at the heads
        pending = [deque() for _ in range(retries_n + 1)]
        lats = self._lats
        base, burst_train = self.base, self.burst_train
        base_sent = 0
        burst_sent = 0
        burst_first = -1.0
        burst_last = -1.0
        burst_cur = -1
        burst_cur_n = 0
        orig_sent = 0
        retry_sent = 0
        answered = 0
        answered_done = 0  # answers already folded into the interval tally
        burst_ans0 = 0  # answers read before the current burst's first send
        closing = None  # a burst just sent, waiting for the read pass that follows it
        late = 0
        rc_counts = [0] * len(wire.OUTCOME_NAMES)
        timed_out = 0
        si = 0
        t0 = perf()
        wall0 = time.time()
        self.started_unix_s = wall0
        end_t = t0 + self.max_duration_s
        max_q = self.max_queries_n
        next_flush = t0 + self.interval_s
        last_flush = t0
        sending = True
        drain_until = math.inf

        def commit_counts() -> None:
            # fold the loop's local counters into the interval tally
            nonlocal orig_sent, retry_sent, answered, late, timed_out, answered_done
            answered_done += answered
            c = self._counts
            for key, v in (
                ("dns.original_sent", orig_sent),
                ("dns.retry_sent", retry_sent),
                ("dns.answered", answered),
                ("dns.late_replies", late),
                ("dns.timeouts", timed_out),
            ):
                if v:
                    c[key] = c.get(key, 0) + v
            for code, v in enumerate(rc_counts):
                if v:
                    key = "dns.rcode." + wire.OUTCOME_NAMES[code]
                    c[key] = c.get(key, 0) + v
                    rc_counts[code] = 0
            orig_sent = retry_sent = answered = late = timed_out = 0

        def close_burst() -> None:
            nonlocal closing
            if burst_cur >= 0 and burst_cur_n:
                bw = BurstWindow(
                    burst_cur,
                    wall0 + burst_train.start_of(burst_cur),
                    wall0 + (burst_first - t0),
                    wall0 + (burst_last - t0),
                    burst_cur_n,
                )
                if closing is not None:
                    finish_burst()
                # kept until the next read pass has counted what came back during the burst
                closing = (bw, burst_ans0)
                log.info(
                    "burst %d: %d queries left in %.1f ms", bw.burst_index, bw.sent_n, bw.window_s * 1000
                )

        def finish_burst() -> None:
            nonlocal closing
            bw, ans0 = closing
            closing = None
            bw = bw._replace(answered_in_window_n=answered_done + answered - ans0,
                             answers_read_unix_s=wall0 + (perf() - t0))
            self.bursts.append(bw)
            self._done_bursts.append(bw)

        def icmp_refused(s: int, now: float) -> None:
            # ECONNREFUSED: an ICMP port unreachable came back for this socket; the port is
            # closed, so nothing sent on it will be answered
            out = outs[s]
            for entry in out.values():
                self._fail(entry[4], "icmp_unreachable", now - entry[0])
            self._count("dns.icmp_unreachable", len(out))
            out.clear()

        def send_one(tail: bytes, kind: int, qi: int, t_first: float, attempt: int) -> bool:
            # slow path for retries and id collisions; returns False when nothing was sent
            nonlocal si
            s = si
            si = si + 1 if si + 1 < nsock else 0
            out = outs[s]
            qid = next_id[s]
            for _ in range(64):
                if qid not in out:
                    break
                qid = (qid + 1) & 0xFFFF
            else:
                # 64 IDs in a row still outstanding on this socket: give more ports per source
                self._count("dns.send_errors")
                self._count("dns.ids_exhausted")
                self._fail(qi, "send_error", perf() - t_first)
                return False
            next_id[s] = (qid + 1) & 0xFFFF
            now = perf()
            try:
                sends[s](ID_BYTES[qid] + tail)
            except ConnectionRefusedError:
                icmp_refused(s, now)
                try:
                    sends[s](ID_BYTES[qid] + tail)
                except OSError:
                    self._count("dns.send_errors")
                    self._fail(qi, "send_error", now - t_first)
                    return False
            except OSError:
                # EAGAIN (socket send buffer full) or another local error: the query never left
                self._count("dns.send_errors")
                self._fail(qi, "send_error", now - t_first)
                return False
            entry = [t_first, attempt, tail, kind, qi]
            out[qid] = entry
            pending[attempt].append((now + timeouts[attempt], s, qid, entry))
            return True

        try:
            while True:
                now = perf()
                # ---- send what is due -------------------------------------------------------
                if sending:
                    if self._stop or now >= end_t:
                        sending = False
                    else:
                        rel = now - t0
                        n_base = base.due(rel) - base_sent
                        n_burst = burst_train.due(rel) - burst_sent if burst_train is not None else 0
                        room = max_q - (base_sent + burst_sent)
                        if n_base + n_burst >= room:
                            n_base = min(n_base, room)
                            n_burst = min(n_burst, room - n_base)
                            sending = room > n_base + n_burst
                        n = n_base + n_burst
                        if n_base > MAX_BASE_BATCH or n_burst > MAX_BURST_BATCH:
                            # behind schedule (a slow pass): catch up in chunks and read replies
                            # in between
                            n_burst = min(n_burst, MAX_BURST_BATCH)
                            n_base = min(n_base, MAX_BASE_BATCH)
                            n = n_base + n_burst
                        if n:
                            if n_burst:
                                k = burst_train.burst_of(burst_sent)
                                if k != burst_cur:
                                    close_burst()
                                    burst_cur, burst_cur_n, burst_first = k, 0, -1.0
                                    burst_ans0 = answered_done + answered
                            for j in range(n):
                                q = queries[qpos]
                                qpos += 1
                                if qpos == nq:
                                    qpos = 0
                                tail = q[0]
                                kind = q[1]
                                if kind == KIND_RANDOM:
                                    tail = fresh_tail(tail)
                                if use_tcp:
                                    t = perf()
                                    self._spawn_tcp(tail, kind, q[2], t, src_of[si], False)
                                    si = si + 1 if si + 1 < nsock else 0
                                else:
                                    s = si
                                    si = si + 1 if si + 1 < nsock else 0
                                    out = outs[s]
                                    qid = next_id[s]
                                    if qid in out:
                                        si = s
                                        t = perf()
                                        send_one(tail, kind, q[2], t, 0)
                                    else:
                                        next_id[s] = (qid + 1) & 0xFFFF
                                        t = perf()
                                        try:
                                            sends[s](ID_BYTES[qid] + tail)
                                            entry = [t, 0, tail, kind, q[2]]
                                            out[qid] = entry
                                            pending[0].append((t + timeouts[0], s, qid, entry))
                                        except BlockingIOError:
                                            self._count("dns.send_errors")
                                            self._count("dns.send_eagain")
                                            self._fail(q[2], "send_error", 0.0)
                                        except ConnectionRefusedError:
                                            icmp_refused(s, t)
                                            si = s
                                            send_one(tail, kind, q[2], t, 0)
                                        except OSError:
                                            self._count("dns.send_errors")
                                            self._fail(q[2], "send_error", 0.0)
                                if j == n_base and burst_first < 0:
                                    # burst queries go after the base ones of this pass
                                    burst_first = t
                            if n_burst:
                                burst_last = t
                                burst_cur_n += n_burst
                            orig_sent += n
                            base_sent += n_base
                            burst_sent += n_burst
                            if burst_train is not None and burst_cur >= 0 and burst_cur_n >= burst_train.size_n:
                                close_burst()
                                burst_cur, burst_cur_n = -1, 0
                    if not sending:
                        close_burst()
                        burst_cur, burst_cur_n = -1, 0
                        # wait for what is in flight: one full retry cycle when the schedule ran
                        # out, one attempt's timeout when stopped (no more retries are sent then)
                        drain_until = perf() + (max(timeouts) if self._stop else sum(timeouts)) + 0.01
                # ---- read replies -----------------------------------------------------------
                if nsock <= 8:
                    ready = range(nsock)
                else:
                    ready = [fd_index[fd] for fd, _ in poll(0)]
                for s in ready:
                    recv = recvs[s]
                    out = outs[s]
                    while True:
                        try:
                            r = recv(65535)
                        except BlockingIOError:
                            break
                        except ConnectionRefusedError:
                            icmp_refused(s, perf())
                            continue
                        t = perf()
                        if len(r) < 12:
                            late += 1
                            continue
                        entry = out.pop((r[0] << 8) | r[1], None)
                        if entry is None:
                            late += 1  # answer to a query already timed out (or not ours)
                            continue
                        answered += 1
                        code = 5 if r[2] & 2 else RCODE_OUTCOME[r[3] & 15]
                        rc_counts[code] += 1
                        lat = t - entry[0]
                        if code == NOERROR:
                            lats[2 * entry[4]].append(lat)
                        elif code == NXDOMAIN:
                            if entry[3] != KIND_NAME:
                                lats[2 * entry[4]].append(lat)
                            else:
                                self._fail(entry[4], "nxdomain_unexpected", lat)
                        elif code == wire.TRUNCATED and tcp_fallback:
                            # like a stub resolver: the same question again over TCP
                            retry_sent += 1
                            self._count("dns.tcp_fallback")
                            self._spawn_tcp(entry[2], entry[3], entry[4], entry[0], src_of[s], True)
                        else:
                            self._fail(entry[4], OUTCOME_FAILURE[code], lat)
                if closing is not None:
                    finish_burst()
                # ---- expire -----------------------------------------------------------------
                now = perf()
                for attempt, fifo in enumerate(pending):
                    while fifo and fifo[0][0] <= now:
                        _, s, qid, entry = fifo.popleft()
                        out = outs[s]
                        if out.get(qid) is not entry:
                            continue  # answered (or failed) already
                        del out[qid]
                        if attempt < retries_n and not self._stop:
                            retry_sent += 1
                            send_one(entry[2], entry[3], entry[4], entry[0], attempt + 1)
                        else:
                            timed_out += 1
                            self._fail(entry[4], "timeout", now - entry[0])
                # ---- interval -----------------------------------------------------------------
                if now >= next_flush:
                    commit_counts()
                    self._flush(now - last_flush)
                    last_flush = now
                    next_flush = now + self.interval_s
                    lats = self._lats
                if not sending:
                    if now >= drain_until or (self.outstanding_n() == 0):
                        break
                # ---- wait -------------------------------------------------------------------
                wake = min(next_flush, drain_until)
                if sending:
                    rel_next = base.time_of(base_sent)
                    if burst_train is not None:
                        rel_next = min(rel_next, burst_train.time_of(burst_sent))
                    if rel_next == math.inf:
                        sending = False  # every schedule is exhausted: drain next pass
                        drain_until = perf() + sum(timeouts) + 0.01
                    wake = min(wake, t0 + rel_next, end_t)
                for fifo in pending:
                    if fifo:
                        wake = min(wake, fifo[0][0])
                delay = wake - perf()
                if delay <= SPIN_S:
                    gevent.sleep(0)
                else:
                    # wakes on any reply (epoll descriptor readable) or the next due event
                    gevent.select.select([ep_fd], [], [], delay)
        finally:
            if closing is not None:
                finish_burst()
            commit_counts()
            unfinished = self.outstanding_n()
            if unfinished:
                self._count("dns.unfinished", unfinished)
            for out in outs:
                out.clear()
            self._flush(perf() - last_flush)
            self.ended_unix_s = time.time()

    def summary(self) -> str:
        t = self.totals
        orig = t.get("dns.original_sent", 0)
        retry = t.get("dns.retry_sent", 0)
        amp = (orig + retry) / orig if orig else 0.0
        rc = " ".join(f"{name}={t.get('dns.rcode.' + name, 0)}" for name in wire.OUTCOME_NAMES)
        return (
            f"sent={orig} retries={retry} amplification={amp:.3f} answered={t.get('dns.answered', 0)} "
            f"timeouts={t.get('dns.timeouts', 0)} {rc} late={t.get('dns.late_replies', 0)} "
            f"answer latency: {self.answer_latency.summary()}"
        )


def _set_rcvbuf(sock, size_bytes: int) -> None:
    # past net.core.rmem_max when allowed (root), else as much as the kernel grants
    try:
        sock.setsockopt(_socket.SOL_SOCKET, SO_RCVBUFFORCE, size_bytes)
    except PermissionError:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, size_bytes)


def _recv_exact(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed by the server")
        buf += chunk
    return buf
