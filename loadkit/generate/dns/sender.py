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
  bytes (:func:`.wire.classify`, :data:`.wire.FAILURE_OF`). Retries behave like a stub resolver:
  per-attempt timeout, ``retries_n`` more attempts, the timeout multiplied by ``backoff`` each
  time, from the source port the port policy says (:mod:`.retry`), within an optional retry
  budget; every retry is counted as a retry, so offered load = original + retries.
* When the run is stopped no retry is sent; a query still waiting then (or whose attempt would
  have been retried) is *unfinished* (``dns.unfinished``), not a failure: the stop cut it short.
* Results are tallied per interval (:class:`IntervalReport`), not per query, and handed to a
  callback (the Locust user turns them into Locust stats and generator metrics).
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import logging
import math
import os
import random
import resource
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
from .retry import RetryBudget
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

#: sockets the per-attempt port policy may hold open at once (each retry's own socket, closed
#: on its answer or timeout); the open-file limit here is 20,000 per process
MAX_ATTEMPT_SOCKETS = 8192
#: descriptors kept free for everything else in the process (Locust, the collector, files)
FD_RESERVE = 512


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


class SenderOptions(NamedTuple):
    """How one :class:`DnsSender` sends. Checked once, at the user-input boundary
    (:func:`loadkit.generate.dns.users.plan` for the locustfiles); the sender takes them as given."""

    protocol: str = "udp"  #: udp, tcp or dot (each client its own connection: :mod:`.transport_tcp`)
    timeout_s: float = 2.0  #: first attempt's timeout
    retries_n: int = 0  #: attempts after the first
    backoff: float = 2.0  #: each retry waits this many times longer than the attempt before
    tcp_fallback: bool = True  #: a truncated (TC) UDP reply is asked again over TCP
    ports_per_source: int = 1  #: fixed sockets per source address
    port_policy: str = "fixed"  #: source port of a retry: per-attempt, per-query or fixed (:mod:`.retry`)
    retry_budget: float = 0.0  #: retries at most this many times the originals (0: no budget)
    retry_budget_window_s: float = 10.0  #: sliding window of the retry budget
    interval_s: float = 0.5  #: how often results are tallied and handed to ``on_interval``
    max_duration_s: float = 3600.0  #: safety cap on sending time
    max_queries_n: int = 10**9  #: safety cap on original queries
    tcp_max_inflight: int = 500  #: TCP queries in flight at once
    max_attempt_sockets: int = MAX_ATTEMPT_SOCKETS  #: per-attempt sockets open at once
    idle_timeout_s: float = 20.0  #: tcp/dot: a client closes its idle connection after this (0: never)
    tls_resume: bool = True  #: dot: a reconnect offers the last TLS session (resumption)
    tls_verify: bool = False  #: dot: verify the server's certificate


class Outstanding(NamedTuple):
    """One attempt of a query, sent and waiting: in ``DnsSender._outs[sock][qid]`` until its
    reply, and in its attempt number's expiry FIFO until ``deadline_s``."""

    t_first_s: float  #: perf_counter() of the query's first attempt (latency runs from there)
    deadline_s: float  #: perf_counter() when this attempt times out
    attempt: int  #: 0 for the original query
    sock: int  #: index of the socket this attempt left on
    qid: int  #: DNS ID of this attempt
    tail: bytes  #: wire query after the ID (kept for a retry)
    kind: int  #: wire.KIND_*: which reply counts as success
    qi: int  #: index of the query type (the Locust request name)


#: ``_new(Outstanding, (...))`` builds the record without the generated ``__new__``: a third of
#: the cost, and there is one record per query on the hot path
_new = tuple.__new__


class DnsSender:
    """Open-loop DNS load from one process. See the module docstring.

    ``base`` and ``bursts`` are this process's share already. ``options`` (or its fields as
    keywords) says how to send; ``max_duration_s`` and ``max_queries_n`` bound every run (a safety
    cap on top of the Locust run time).
    """

    def __init__(
        self,
        target: Target,
        pool: wire.QueryPool,
        options: SenderOptions | None = None,
        *,
        base: Schedule | None = None,
        bursts: BurstTrain | None = None,
        sources: Sequence[str] = ("127.0.0.1",),
        on_interval: Callable[[IntervalReport], None] | None = None,
        **option_fields,
    ) -> None:
        o = (options or SenderOptions())._replace(**option_fields)
        if not sources:
            raise ProfileError("no source address")
        for src in sources:
            check_source_address(src)  # safety, at the bind: only loopback (or allowlisted) sources
        self.options = o
        self.target = target
        self.pool = pool
        self.base: Schedule = base or Nothing()
        self.burst_train: BurstTrain | None = bursts if bursts and bursts.size_n else None
        self.protocol = o.protocol
        self.timeout_s = float(o.timeout_s)
        self.retries_n = int(o.retries_n)
        self.tcp_fallback = o.tcp_fallback
        self.sources = list(sources)
        self.ports_per_source = o.ports_per_source
        self.port_policy = o.port_policy
        self.interval_s = o.interval_s
        self.max_duration_s = o.max_duration_s
        self.max_queries_n = o.max_queries_n
        self.on_interval = on_interval
        #: attempt k waits timeout_s * backoff**k
        self.attempt_timeouts_s = [self.timeout_s * o.backoff**k for k in range(self.retries_n + 1)]
        self.max_attempt_sockets = o.max_attempt_sockets
        self.budget = RetryBudget(o.retry_budget, o.retry_budget_window_s) if o.retry_budget > 0 else None

        self.bursts: list[BurstWindow] = []
        #: cumulative counters since start (same names as the interval counters)
        self.totals: dict[str, int] = {}
        #: cumulative latency of successful answers, all qtypes
        self.answer_latency = LatencyHistogram()
        # one entry per socket slot, index-parallel; slots from n_fixed on are per-attempt
        # sockets (opened for one retry, closed on its answer or timeout, then reused)
        self._socks: list = []
        self._outs: list[dict[int, Outstanding]] = []
        self._sends: list = []
        self._recvs: list = []
        self._next_id: list[int] = []
        self._src_of: list[str] = []
        self._fd_index: dict[int, int] = {}
        self._free_slots: list[int] = []
        self._n_fixed = 0
        self._attempt_socks_n = 0
        self._ep = None
        self._stop = False
        self._tcp_inflight = 0
        self._streams = None  # tcp/dot: the clients' connections (transport_tcp.StreamPool)
        self._new_tally()
        self.started_unix_s = 0.0
        self.ended_unix_s = 0.0

    # -- sockets ----------------------------------------------------------------------------
    def _family(self) -> int:
        return _socket.AF_INET6 if ":" in self.target.address else _socket.AF_INET

    def _udp_socket(self, src: str, rcvbuf_bytes: int = 0):
        """A non-blocking UDP socket bound to ``src`` (ephemeral port), connected to the target."""
        s = _socket.socket(self._family(), _socket.SOCK_DGRAM)
        try:
            if rcvbuf_bytes:
                _set_rcvbuf(s, rcvbuf_bytes)
            s.bind((src, 0))
            s.connect((self.target.address, self.target.port))
        except OSError as err:
            s.close()
            raise TargetError(f"cannot bind a DNS client socket to {src}: {err.strerror}") from err
        s.setblocking(False)
        return s

    def _add_socket(self, s, src: str) -> int:
        """Register ``s`` in a free slot (or a new one); returns the slot index."""
        i = self._free_slots.pop() if self._free_slots else len(self._socks)
        if i == len(self._socks):
            for column in (self._socks, self._outs, self._sends, self._recvs, self._next_id, self._src_of):
                column.append(None)
            self._outs[i] = {}
        self._socks[i] = s
        self._sends[i] = s.send
        self._recvs[i] = s.recv
        self._next_id[i] = random.getrandbits(16)
        self._src_of[i] = src
        self._fd_index[s.fileno()] = i
        self._ep.register(s.fileno(), _EPOLLIN)
        return i

    def open(self) -> None:
        """Create and bind every fixed socket (before the first packet, so errors come early)."""
        family = self._family()
        n_sockets = len(self.sources) * self.ports_per_source
        rcvbuf = min(CLIENT_RCVBUF_MAX_BYTES, max(CLIENT_RCVBUF_MIN_BYTES, CLIENT_RCVBUF_TOTAL_BYTES // n_sockets))
        self._ep = _epoll()
        try:
            for src in self.sources:
                if (":" in src) != (family == _socket.AF_INET6):
                    raise ProfileError(f"source address {src} and target {self.target} are not the same IP version")
                for _ in range(self.ports_per_source):
                    self._add_socket(self._udp_socket(src, rcvbuf), src)
            self._n_fixed = len(self._socks)
            if self.protocol != "udp":
                self._streams = self._stream_pool()
            if self.port_policy == "per-attempt" and self.retries_n:
                self.max_attempt_sockets = _attempt_socket_room(self.options.max_attempt_sockets)
        except BaseException:
            self.close()
            raise

    def _stream_pool(self):
        """tcp/dot: one client per fixed socket slot (source address and port), each keeping its
        own connection, as stub resolvers over TCP and DoT do."""
        from .transport_dot import DotConnector
        from .transport_tcp import StreamOptions, StreamPool, StreamSink, TcpConnector

        o, t = self.options, self.target
        if self.protocol == "dot":
            connector = DotConnector(self._family(), t.address, t.port, resume=o.tls_resume, verify=o.tls_verify,
                                     server_name=t.host, count=self._count)
        else:
            connector = TcpConnector(self._family(), t.address, t.port)
        stream_options = StreamOptions(connect_timeout_s=self.timeout_s, query_timeout_s=sum(self.attempt_timeouts_s),
                                       retries_n=self.retries_n, idle_timeout_s=o.idle_timeout_s)
        sink = StreamSink(self._account_reply, self._fail, self._count, self._add_inflight, self._allow_retry)
        return StreamPool(connector, self._src_of[: self._n_fixed], stream_options, sink)

    def _add_inflight(self, n: int) -> None:
        self._tcp_inflight += n

    def _allow_retry(self, now: float) -> bool:
        """Whether the retry budget (if any) lets one more retry leave now; counts it when it does."""
        return self.budget is None or self.budget.allow_retry(now)

    def _open_attempt_socket(self, src: str) -> int:
        """A fresh socket for one retry (per-attempt policy), or -1 when too many are open."""
        if self._attempt_socks_n >= self.max_attempt_sockets:
            return -1
        try:
            s = self._udp_socket(src)
        except TargetError:
            return -1
        self._attempt_socks_n += 1
        return self._add_socket(s, src)

    def _close_attempt_socket(self, i: int) -> None:
        s = self._socks[i]
        if s is None:
            return
        fd = s.fileno()
        self._ep.unregister(fd)
        del self._fd_index[fd]
        s.close()
        self._socks[i] = None
        self._outs[i].clear()
        self._free_slots.append(i)
        self._attempt_socks_n -= 1

    def close(self) -> None:
        if self._streams is not None:
            self._streams.close()
            self._streams = None
        for s in self._socks:
            if s is not None:
                s.close()
        for column in (self._socks, self._outs, self._sends, self._recvs, self._next_id, self._src_of):
            column.clear()
        self._fd_index.clear()
        self._free_slots.clear()
        self._attempt_socks_n = 0
        if self._ep is not None:
            self._ep.close()
            self._ep = None

    def stop(self) -> None:
        """Ask :meth:`run` to stop sending (it then drains replies and returns)."""
        self._stop = True
        if self._streams is not None:
            self._streams.stopping = True

    # -- accounting -------------------------------------------------------------------------
    def _new_tally(self) -> None:
        n = len(self.pool.qtypes)
        # raw latencies, one list append per completed query (a histogram add costs ten times
        # more); bucketed in bulk when the interval is flushed
        self._ok_lats: list[list[float]] = [[] for _ in range(n)]
        self._fail_lats: list[list[float]] = [[] for _ in range(n)]
        self._fails: list[dict[str, int]] = [{} for _ in range(n)]
        self._counts: dict[str, int] = {}
        self._rc = [0] * len(wire.OUTCOME_NAMES)  # replies by outcome code
        self._done_bursts: list[BurstWindow] = []

    def _count(self, key: str, n: int = 1) -> None:
        self._counts[key] = self._counts.get(key, 0) + n

    def _fail(self, qi: int, failure_class: str, latency_s: float) -> None:
        self._fail_lats[qi].append(latency_s)
        f = self._fails[qi]
        f[failure_class] = f.get(failure_class, 0) + 1

    def outstanding_n(self) -> int:
        return sum(len(o) for o in self._outs) + self._tcp_inflight

    def _flush(self, interval_s: float) -> IntervalReport:
        qtypes = []
        answers = LatencyHistogram()
        for qi, qtype in enumerate(self.pool.qtypes):
            ok, failed = LatencyHistogram(), LatencyHistogram()
            ok.add_many(self._ok_lats[qi])
            failed.add_many(self._fail_lats[qi])
            self.answer_latency.merge(ok)
            answers.merge(ok)
            both = LatencyHistogram()
            both.merge(ok)
            both.merge(failed)
            qtypes.append(QtypeTally(qtype, both, dict(self._fails[qi])))
        for code, n in enumerate(self._rc):
            if n:
                self._count("dns.rcode." + wire.OUTCOME_NAMES[code], n)
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

    def _account_reply(self, reply: bytes, kind: int, qi: int, latency_s: float) -> None:
        """One reply outside the UDP read loop (TCP): the same classification and success rule."""
        code = wire.classify(reply) if len(reply) >= 12 else wire.RCODE_OTHER
        self._count("dns.answered")
        self._rc[code] += 1
        failure = wire.FAILURE_OF[kind][code]
        if failure is None:
            self._ok_lats[qi].append(latency_s)
        else:
            self._fail(qi, failure, latency_s)

    # -- TCP --------------------------------------------------------------------------------
    def _tcp_query(self, tail: bytes, kind: int, qi: int, t_first: float, src: str, fallback: bool) -> None:
        """One query over TCP in its own greenlet (protocol tcp, or a TC=1 reply's retry).
        ``_spawn_tcp`` has counted it in flight already."""
        sock = gevent.socket.socket(self._family(), _socket.SOCK_STREAM)
        try:
            with gevent.Timeout(self.timeout_s, False):
                try:
                    sock.bind((src, 0))
                    sock.connect((self.target.address, self.target.port))
                    msg = wire.ID_BYTES[random.getrandbits(16)] + tail
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
                self._account_reply(reply, kind, qi, time.perf_counter() - t_first)
                return
            self._count("dns.timeouts")
            self._fail(qi, "timeout", time.perf_counter() - t_first)
        finally:
            sock.close()
            self._tcp_inflight -= 1

    def _spawn_tcp(self, tail: bytes, kind: int, qi: int, t_first: float, src: str, fallback: bool) -> None:
        if self._tcp_inflight >= self.options.tcp_max_inflight:
            self._count("dns.send_errors")
            self._fail(qi, "send_error", 0.0)
            return
        # counted in flight now, not when the greenlet first runs, so the drain waits for it
        self._tcp_inflight += 1
        gevent.spawn(self._tcp_query, tail, kind, qi, t_first, src, fallback)

    # -- the one UDP send path ----------------------------------------------------------------
    def _send_queries(self, n: int, retry: tuple[int, Outstanding] | None = None) -> int:
        """The one send path: the next ``n`` original queries of the pool, round robin over the
        fixed sockets, or one retry (``retry`` = the socket for it and the attempt before).
        Each attempt gets a free ID on its socket and an :class:`Outstanding` record. Returns how
        many left; the others are accounted as failed."""
        perf = time.perf_counter
        outs = self._outs
        next_id = self._next_id
        sends = self._sends
        if retry is None:
            attempt = 0
            queries = self.pool.queries
            nq = len(queries)
            qpos = self._qpos
            si = self._si
            n_fixed = self._n_fixed
            streams = self._streams
        else:
            s, prev = retry
            attempt = prev.attempt + 1
            n = 1
        timeout_s = self.attempt_timeouts_s[attempt]
        fifo_append = self._pending[attempt].append
        new, record, id_bytes = _new, Outstanding, ID_BYTES
        sent = 0
        for _ in range(n):
            t = perf()
            if retry is None:
                tail, kind, qi = queries[qpos]
                qpos = qpos + 1 if qpos + 1 < nq else 0
                if kind == KIND_RANDOM:
                    tail = self.pool.fresh_tail(tail)
                s = si
                si = si + 1 if si + 1 < n_fixed else 0
                t_first = t
                if streams is not None:
                    streams.submit(s, tail, kind, qi, t)
                    continue
            else:
                tail, kind, qi, t_first = prev.tail, prev.kind, prev.qi, prev.t_first_s
            out = outs[s]
            qid = next_id[s]
            if qid in out:
                qid = _free_id(out, qid)
                if qid < 0:
                    # 64 IDs in a row still outstanding on this socket: give more ports per source
                    self._count("dns.ids_exhausted")
                    self._count("dns.send_errors")
                    self._fail(qi, "send_error", t - t_first)
                    continue
            next_id[s] = (qid + 1) & 0xFFFF
            try:
                sends[s](id_bytes[qid] + tail)
            except OSError as err:
                if not self._resend_after(err, s, id_bytes[qid] + tail, qi, t_first, t):
                    continue
            rec = new(record, (t_first, t + timeout_s, attempt, s, qid, tail, kind, qi))
            out[qid] = rec
            fifo_append(rec)
            sent += 1
        if retry is None:
            self._qpos = qpos
            self._si = si
        return sent

    def _resend_after(self, err: OSError, s: int, msg: bytes, qi: int, t_first_s: float, now: float) -> bool:
        """A send failed: after an ICMP port unreachable try once more, else account the failure."""
        if isinstance(err, ConnectionRefusedError):
            # the error belongs to an earlier datagram on this socket: its port is closed
            self._icmp_refused(s, now)
            try:
                self._sends[s](msg)
                return True
            except OSError as again:
                err = again
        if isinstance(err, BlockingIOError):
            self._count("dns.send_eagain")  # socket send buffer full: the query never left
        self._count("dns.send_errors")
        self._fail(qi, "send_error", now - t_first_s)
        return False

    def _icmp_refused(self, s: int, now: float) -> None:
        # ECONNREFUSED: an ICMP port unreachable came back for this socket; the port is
        # closed, so nothing sent on it will be answered
        out = self._outs[s]
        for rec in out.values():
            self._fail(rec.qi, "icmp_unreachable", now - rec.t_first_s)
        self._count("dns.icmp_unreachable", len(out))
        out.clear()

    # -- the loop: named steps over the state _begin sets up ----------------------------------
    def run(self) -> None:
        """Send until stopped, the caps are reached or every schedule is exhausted; then wait
        for replies to queries already sent (at most one full retry cycle) and flush."""
        if not self._socks:
            self.open()
        self._begin()
        perf = time.perf_counter
        try:
            while True:
                if self._sending:
                    self._send_due(perf())
                self._read_replies()
                now = perf()
                self._expire(now)
                if now >= self._next_flush:
                    self._flush(now - self._last_flush)
                    self._last_flush = now
                    self._next_flush = now + self.interval_s
                if not self._sending and (now >= self._drain_until or self.outstanding_n() == 0):
                    break
                self._wait()
        finally:
            self._finish()

    def _begin(self) -> None:
        perf = time.perf_counter
        # one FIFO of Outstanding per attempt number: deadlines within a FIFO rise with send
        # time, so expiry only looks at the heads
        self._pending: list[deque] = [deque() for _ in range(self.retries_n + 1)]
        self._qpos = random.randrange(len(self.pool.queries))
        self._si = 0  # next fixed socket, round robin
        self._base_sent = 0
        self._burst_sent = 0
        self._burst_cur = -1  # burst being sent, its queries so far, its first and last send
        self._burst_cur_n = 0
        self._burst_first = -1.0
        self._burst_last = -1.0
        self._answered_n = 0  # answers read so far (a burst's drain rate is counted from it)
        self._burst_answered0 = 0  # ... as it was before the current burst's first send
        self._closing: BurstWindow | None = None  # a burst sent, waiting for the next read pass
        self._t0 = perf()
        self._wall0 = time.time()
        self.started_unix_s = self._wall0
        self._end_t = self._t0 + self.max_duration_s
        self._next_flush = self._t0 + self.interval_s
        self._last_flush = self._t0
        self._sending = True
        self._drain_until = math.inf
        self._port_fallback_warned = False

    def _send_due(self, now: float) -> None:
        """Send what the schedules say is due by ``now`` (catching up in bounded chunks)."""
        if self._stop or now >= self._end_t:
            if not self._stop and now > self._end_t:
                # a pass that came late to the end still sends what fell due before it, in the
                # usual chunks (bounded: the schedule's count at the end), so a stall near the end
                # does not cut the schedule short
                while self._sending and self._send_due_by(self._end_t):
                    pass
            self._stop_sending(self._stop)
            return
        self._send_due_by(now)

    def _send_due_by(self, now: float) -> int:
        """One chunk of what is due by ``now``; how many queries it sent."""
        rel = now - self._t0
        burst_train = self.burst_train
        n_base = self.base.due(rel) - self._base_sent
        n_burst = burst_train.due(rel) - self._burst_sent if burst_train is not None else 0
        room = self.max_queries_n - (self._base_sent + self._burst_sent)
        # behind schedule (a slow pass): catch up in chunks and read replies in between
        n_base = min(n_base, MAX_BASE_BATCH, room)
        n_burst = min(n_burst, MAX_BURST_BATCH, room - n_base)
        cap_reached = n_base + n_burst >= room
        if n_base + n_burst:
            if n_burst:
                k = burst_train.burst_of(self._burst_sent)
                if k != self._burst_cur:
                    self._close_burst()
                    self._burst_cur, self._burst_cur_n, self._burst_first = k, 0, -1.0
                    self._burst_answered0 = self._answered_n
            self._send_originals(n_base, n_burst)
            self._base_sent += n_base
            self._burst_sent += n_burst
            if self.budget is not None:
                self.budget.add_originals(now, n_base + n_burst)
            if burst_train is not None and self._burst_cur >= 0 and self._burst_cur_n >= burst_train.size_n:
                self._close_burst()
        if cap_reached:
            self._stop_sending(False)
        return n_base + n_burst

    def _send_originals(self, n_base: int, n_burst: int) -> None:
        """The next ``n_base + n_burst`` queries (burst queries after the base ones of this pass)."""
        if n_base:
            self._send_queries(n_base)
        if n_burst:
            t_first = time.perf_counter()
            self._send_queries(n_burst)
            if self._burst_first < 0:
                self._burst_first = t_first
            self._burst_last = time.perf_counter()
            self._burst_cur_n += n_burst
        self._count("dns.original_sent", n_base + n_burst)

    def _close_burst(self) -> None:
        """The burst being sent is complete (or sending stopped): record its real window."""
        if self._burst_cur >= 0 and self._burst_cur_n:
            t0, wall0 = self._t0, self._wall0
            bw = BurstWindow(
                self._burst_cur,
                wall0 + self.burst_train.start_of(self._burst_cur),
                wall0 + (self._burst_first - t0),
                wall0 + (self._burst_last - t0),
                self._burst_cur_n,
            )
            if self._closing is not None:
                self._finish_burst()
            # kept until the next read pass has counted what came back during the burst
            self._closing = bw._replace(answered_in_window_n=self._burst_answered0)
            log.info("burst %d: %d queries left in %.1f ms", bw.burst_index, bw.sent_n, bw.window_s * 1000)
        self._burst_cur, self._burst_cur_n = -1, 0

    def _finish_burst(self) -> None:
        """The read pass after a burst is done: record the burst with the answers read during it."""
        bw = self._closing
        self._closing = None
        bw = bw._replace(answered_in_window_n=self._answered_n - bw.answered_in_window_n,
                         answers_read_unix_s=self._wall0 + (time.perf_counter() - self._t0))
        self.bursts.append(bw)
        self._done_bursts.append(bw)

    def _stop_sending(self, stopped: bool) -> None:
        """No more original queries. Wait for what is in flight: one full retry cycle when the
        schedule or a cap ran out, one attempt's timeout when stopped (no retries then)."""
        self._sending = False
        self._close_burst()
        timeouts = self.attempt_timeouts_s
        self._drain_until = time.perf_counter() + (max(timeouts) if stopped else sum(timeouts)) + 0.01

    def _read_replies(self) -> None:
        """Read every reply waiting on any socket; match each by (socket, ID) and account it."""
        perf = time.perf_counter
        outs = self._outs
        recvs = self._recvs
        if self._n_fixed <= 8 and not self._attempt_socks_n:
            ready = range(self._n_fixed)  # cheaper than asking epoll for a few sockets
        else:
            fd_index = self._fd_index
            ready = [fd_index[fd] for fd, _ in self._ep.poll(0)]
        outcome_by_flags = wire.OUTCOME_BY_FLAGS  # wire.classify without the call, per reply
        failure_of = wire.FAILURE_OF
        ok_lats = self._ok_lats
        rc = self._rc
        tcp_fallback = self.tcp_fallback
        n_fixed = self._n_fixed
        answered = late = 0
        for s in ready:
            recv = recvs[s]
            out = outs[s]
            while True:
                try:
                    r = recv(65535)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    self._icmp_refused(s, perf())
                    continue
                t = perf()
                if len(r) < 12:
                    late += 1
                    continue
                rec = out.pop((r[0] << 8) | r[1], None)
                if rec is None:
                    late += 1  # answer to a query already timed out (or not ours)
                    continue
                answered += 1
                code = outcome_by_flags[r[2]][r[3]]
                rc[code] += 1
                failure = failure_of[rec.kind][code]
                if failure is None:
                    ok_lats[rec.qi].append(t - rec.t_first_s)
                elif code == TRUNCATED and tcp_fallback:
                    # like a stub resolver: the same question again over TCP
                    self._count("dns.retry_sent")
                    self._count("dns.tcp_fallback")
                    self._spawn_tcp(rec.tail, rec.kind, rec.qi, rec.t_first_s, self._src_of[s], True)
                else:
                    self._fail(rec.qi, failure, t - rec.t_first_s)
            if s >= n_fixed and not out:
                self._close_attempt_socket(s)  # its one query is done
        if answered:
            self._answered_n += answered
            self._count("dns.answered", answered)
        if self._closing is not None:
            self._finish_burst()
        if late:
            self._count("dns.late_replies", late)

    def _expire(self, now: float) -> None:
        """Attempts past their deadline: retry them, or give up (timeout, or unfinished once
        stopped: a stopped run sends no retry, so the stop, not the server, ended them)."""
        outs = self._outs
        n_fixed = self._n_fixed
        last_attempt = self.retries_n
        timed_out = unfinished = 0
        for fifo in self._pending:
            while fifo and fifo[0].deadline_s <= now:
                rec = fifo.popleft()
                out = outs[rec.sock]
                if out.get(rec.qid) is not rec:
                    continue  # answered (or failed) already
                del out[rec.qid]
                if rec.sock >= n_fixed:
                    src = self._src_of[rec.sock]
                    self._close_attempt_socket(rec.sock)
                else:
                    src = ""
                if rec.attempt < last_attempt:
                    if self._stop:
                        unfinished += 1
                    elif not self._retry(rec, now, src):
                        timed_out += 1
                else:
                    timed_out += 1
                    self._fail(rec.qi, "timeout", now - rec.t_first_s)
        if timed_out:
            self._count("dns.timeouts", timed_out)
        if unfinished:
            self._count("dns.unfinished", unfinished)

    def _retry(self, rec: Outstanding, now: float, src: str) -> bool:
        """The next attempt of ``rec``'s query, from the socket the port policy says. False when
        the retry budget refuses it (the query then ends as a timeout)."""
        if not self._allow_retry(now):
            self._count("dns.retry_suppressed")
            self._fail(rec.qi, "timeout", now - rec.t_first_s)
            return False
        s = self._retry_socket(rec, src)
        self._count("dns.retry_sent")
        sent = self._send_queries(1, (s, rec))
        if not sent and s >= self._n_fixed:
            self._close_attempt_socket(s)
        return True

    def _retry_socket(self, rec: Outstanding, src: str) -> int:
        """Socket slot for a retry of ``rec`` (see :mod:`.retry` for the policies)."""
        policy = self.port_policy
        if policy == "per-query":
            return rec.sock
        if policy == "per-attempt":
            s = self._open_attempt_socket(src or self._src_of[rec.sock])
            if s >= 0:
                return s
            self._count("dns.attempt_socket_limit")
            if not self._port_fallback_warned:
                self._port_fallback_warned = True
                log.warning("DNS retries: %d per-attempt sockets open (the limit); further retries "
                            "use the fixed sockets until some close", self._attempt_socks_n)
            # fall through: the fixed sockets, like the fixed policy
        s = self._si
        self._si = s + 1 if s + 1 < self._n_fixed else 0
        return s

    def _wait(self) -> None:
        """Until a reply, the next due query, the next deadline or the next flush."""
        wake = min(self._next_flush, self._drain_until)
        if self._sending:
            rel_next = self.base.time_of(self._base_sent)
            if self.burst_train is not None:
                rel_next = min(rel_next, self.burst_train.time_of(self._burst_sent))
            if rel_next == math.inf:
                self._stop_sending(False)  # every schedule is exhausted: drain from now
                wake = min(wake, self._drain_until)
            else:
                wake = min(wake, self._t0 + rel_next, self._end_t)
        for fifo in self._pending:
            if fifo:
                wake = min(wake, fifo[0].deadline_s)
        delay = wake - time.perf_counter()
        if delay <= SPIN_S:
            gevent.sleep(0)
        else:
            # wakes on any reply (epoll descriptor readable) or the next due event
            gevent.select.select([self._ep.fileno()], [], [], delay)

    def _finish(self) -> None:
        """After the drain: what is still waiting is unfinished; last interval; socket cleanup."""
        if self._closing is not None:
            self._finish_burst()
        still = sum(len(o) for o in self._outs) + self._tcp_inflight
        if still:
            self._count("dns.unfinished", still)
        for i in range(self._n_fixed, len(self._socks)):
            self._close_attempt_socket(i)
        for out in self._outs:
            out.clear()
        self._flush(time.perf_counter() - self._last_flush)
        self.ended_unix_s = time.time()
        unfinished = self.totals.get("dns.unfinished", 0)
        if unfinished:
            log.info("DNS: %d queries were unfinished when the run stopped (sent, no answer yet and "
                     "no retry after the stop): counted as dns.unfinished, not as failures", unfinished)

    def summary(self) -> str:
        t = self.totals
        orig = t.get("dns.original_sent", 0)
        retry = t.get("dns.retry_sent", 0)
        amp = (orig + retry) / orig if orig else 0.0
        rc = " ".join(f"{name}={t.get('dns.rcode.' + name, 0)}" for name in wire.OUTCOME_NAMES)
        extra = "".join(f" {k.split('.', 1)[1]}={t[k]}" for k in ("dns.retry_suppressed", "dns.unfinished", "dns.stream_connects",
                                                               "dns.stream_connect_failures", "dns.tls_handshakes_full",
                                                               "dns.tls_handshakes_resumed") if t.get(k))
        return (
            f"sent={orig} retries={retry} amplification={amp:.3f} answered={t.get('dns.answered', 0)} "
            f"timeouts={t.get('dns.timeouts', 0)} {rc} late={t.get('dns.late_replies', 0)}{extra} "
            f"answer latency: {self.answer_latency.summary()}"
        )


ID_BYTES = wire.ID_BYTES
KIND_RANDOM = wire.KIND_RANDOM_SUBDOMAIN
TRUNCATED = wire.TRUNCATED


def _free_id(out: dict, qid: int) -> int:
    """The first of the next 64 IDs from ``qid`` not outstanding on a socket, or -1."""
    for _ in range(64):
        if qid not in out:
            return qid
        qid = (qid + 1) & 0xFFFF
    return -1


def _attempt_socket_room(wanted: int) -> int:
    """Per-attempt sockets this process can hold open: ``wanted``, within the open-file limit
    (the soft limit is raised to the hard one first, as far as needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    need = in_use + wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        new_soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(0, min(wanted, soft - in_use - FD_RESERVE))


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
