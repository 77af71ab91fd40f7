"""DNS over TCP and over TLS, as real clients send it: each client keeps its own connection.

A stub resolver that speaks TCP or DNS over TLS (Android's Private DNS, RFC 7858) does not open
a connection per query: it opens one, pipelines its queries over it (RFC 7766: two-byte length
prefix, replies matched by ID, in any order), closes it after an idle time, and opens a new one
for the next query, resuming its TLS session when it can. A burst of such clients reconnecting at
once is a handshake storm, which costs a resolver far more than the same queries over UDP.

:class:`StreamPool` is that, under gevent (no asyncio): one :class:`StreamClient` per client
(one per source address and port slot of the sender), each with one connection at a time, a
greenlet that connects and writes, and a greenlet per connection that reads. What a connection
is made of is the ``connector``'s business: :class:`TcpConnector` here, the TLS one in
:mod:`.transport_dot`. Results go to a :class:`StreamSink` (the sender's accounting), never to
Locust.

Failure classes a query can end with, beside the reply's own (``servfail`` ...):
``conn_refused`` (nothing listens), ``conn_timeout`` (the connect did not complete: a server at
its connection limit leaves new connections in its backlog), ``conn_error``,
``tls_handshake_timeout`` / ``tls_handshake_error`` (the handshake did not complete / failed),
``tls_error`` (a TLS error on an established connection), ``conn_closed`` / ``conn_reset`` (the
server closed or reset the connection with the query pending, after ``retries_n`` re-sends on
new connections, or when the retry budget refused the next one), ``timeout`` (no reply by the
query's deadline). A re-send counts in ``dns.retry_sent`` when it is written, not when it is
queued (a reconnect that fails sends nothing). A connection lost once the run is stopping ends
the queries that still had a re-send left as ``dns.unfinished``, not failures: the stop, not the
server, kept them from being asked again (as the sender does with UDP attempts).
"""

from __future__ import annotations

import _socket
import errno
import logging
import math
import random
import time
from collections import deque
from typing import Any, Callable, NamedTuple, Sequence

import gevent
import gevent.event
import gevent.socket

from .wire import ID_BYTES

log = logging.getLogger(__name__)


def _no_budget(_now_s: float) -> bool:
    return True


class StreamSink(NamedTuple):
    """Where a pool's results go (the sender's accounting; called from the pool's greenlets)."""

    reply: Callable[[bytes, int, int, float], None]  #: (reply, kind, qi, latency_s)
    fail: Callable[[int, str, float], None]  #: (qi, failure class, latency_s)
    count: Callable[[str, int], None]  #: (counter name, increment)
    inflight: Callable[[int], None]  #: queries in flight go up or down by this
    #: (perf_counter time) -> whether the retry budget allows one more re-send (and counts it)
    allow_retry: Callable[[float], bool] = _no_budget


class StreamOptions(NamedTuple):
    """How the clients of one pool connect, wait and reconnect."""

    connect_timeout_s: float = 2.0  #: TCP connect, and the TLS handshake after it, each
    query_timeout_s: float = 5.0  #: a query's whole budget, from its first send
    retries_n: int = 2  #: re-sends of a query whose connection was lost, each on a new connection
    idle_timeout_s: float = 20.0  #: a client closes its connection after this long without queries (0: never)
    max_pending_n: int = 1000  #: queries one connection may have unanswered


class ConnectFailed(Exception):
    """A connection could not be made; ``failure_class`` is what its queued queries end with."""

    def __init__(self, failure_class: str, detail: str = "") -> None:
        super().__init__(f"{failure_class}: {detail}")
        self.failure_class = failure_class


def connect_tcp(family: int, src: str, address: str, port: int, timeout_s: float):
    """A gevent TCP socket bound to ``src`` and connected to ``address:port``, or ConnectFailed."""
    sock = gevent.socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)  # one query, one segment
        sock.bind((src, 0))
        with gevent.Timeout(timeout_s, ConnectFailed("conn_timeout", f"no connect in {timeout_s:g} s")):
            sock.connect((address, port))
    except ConnectionRefusedError as err:
        sock.close()
        raise ConnectFailed("conn_refused", str(err)) from err
    except ConnectFailed:
        sock.close()
        raise
    except OSError as err:
        sock.close()
        raise ConnectFailed("conn_error", str(err)) from err
    return sock


class TcpConnector:
    """Plain DNS over TCP (RFC 7766)."""

    protocol = "tcp"

    def __init__(self, family: int, address: str, port: int) -> None:
        self.family, self.address, self.port = family, address, port

    def open(self, client: "StreamClient", timeout_s: float) -> Any:
        return connect_tcp(self.family, client.src, self.address, self.port, timeout_s)

    def after_first_reply(self, conn: Any, client: "StreamClient") -> None:
        """Called once per connection, after its first reply (TLS keeps its session here)."""

    def lost_error_class(self, err: BaseException) -> str:
        return "conn_reset" if isinstance(err, ConnectionResetError) else "conn_closed"


class _Query:
    __slots__ = ("tail", "kind", "qi", "t_first_s", "deadline_s", "attempt", "qid")

    def __init__(self, tail: bytes, kind: int, qi: int, t_first_s: float, deadline_s: float) -> None:
        self.tail, self.kind, self.qi = tail, kind, qi
        self.t_first_s, self.deadline_s = t_first_s, deadline_s
        self.attempt = 0
        self.qid = -1


class StreamClient:
    """One client: its queue, its one connection at a time, its pending queries by ID."""

    def __init__(self, pool: "StreamPool", src: str, index: int) -> None:
        self.pool = pool
        self.src = src
        self.index = index
        self.queue: deque[_Query] = deque()
        self.pending: dict[int, _Query] = {}
        self.conn: Any = None
        #: the TLS session of the last connection (resumption), kept by the connector
        self.tls_session: Any = None
        self.last_active_s = time.perf_counter()
        self.wake = gevent.event.Event()
        self.greenlet: gevent.Greenlet | None = None
        self._reader: gevent.Greenlet | None = None
        self._next_id = random.getrandbits(16)

    def submit(self, q: _Query) -> None:
        self.queue.append(q)
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._run)
        self.wake.set()

    # -- the client's loop ------------------------------------------------------------------------
    def _run(self) -> None:
        pool = self.pool
        idle_s = pool.options.idle_timeout_s
        while not pool.closed:
            self.wake.clear()
            now = time.perf_counter()
            self._expire(now)
            if self.queue and len(self.pending) < pool.options.max_pending_n:
                if self.conn is None:
                    self._connect()
                if self.conn is not None:
                    self._write()
                continue
            wake_at = min((q.deadline_s for q in self.pending.values()), default=math.inf)
            if self.queue:
                wake_at = min(wake_at, self.queue[0].deadline_s)
            if self.conn is not None and idle_s > 0 and not self.pending and not self.queue:
                if now - self.last_active_s >= idle_s:
                    pool.sink.count("dns.stream_idle_closes", 1)
                    self._drop_connection()
                    continue
                wake_at = min(wake_at, self.last_active_s + idle_s)
            # nothing to do: sleep until a query arrives (submit sets wake) or a deadline
            self.wake.wait(None if wake_at == math.inf else max(0.0, wake_at - now))

    def _connect(self) -> None:
        pool = self.pool
        pool.sink.count("dns.stream_connects", 1)
        try:
            self.conn = pool.connector.open(self, pool.options.connect_timeout_s)
        except ConnectFailed as err:
            pool.sink.count("dns.stream_connect_failures", 1)
            log.debug("DNS %s client %s: %s", pool.connector.protocol, self.src, err)
            now = time.perf_counter()
            # the queries waiting for this connection end with its failure (a client would
            # report them failed too); the next query tries a new connection
            while self.queue:
                q = self.queue.popleft()
                self._end(q, err.failure_class, now)
            return
        self.last_active_s = time.perf_counter()
        self._first_reply = True
        self._reader = gevent.spawn(self._read, self.conn)

    def _write(self) -> None:
        frames = []
        pending = self.pending
        room = self.pool.options.max_pending_n - len(pending)
        resent = 0
        while self.queue and room > 0:
            q = self.queue.popleft()
            resent += q.attempt > 0
            qid = self._next_id
            while qid in pending:
                qid = (qid + 1) & 0xFFFF
            self._next_id = (qid + 1) & 0xFFFF
            q.qid = qid
            pending[qid] = q
            msg = ID_BYTES[qid] + q.tail
            frames.append(len(msg).to_bytes(2, "big") + msg)
            room -= 1
        conn = self.conn
        try:
            conn.sendall(b"".join(frames))
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            if conn is self.conn:
                self._lost(err)
            return
        self.last_active_s = time.perf_counter()
        if resent:
            self.pool.sink.count("dns.retry_sent", resent)  # offered load: counted as it leaves

    def _read(self, conn: Any) -> None:
        sink = self.pool.sink
        try:
            while True:
                head = _recv_exact(conn, 2)
                reply = _recv_exact(conn, int.from_bytes(head, "big"))
                t = time.perf_counter()
                q = self.pending.pop((reply[0] << 8) | reply[1], None) if len(reply) >= 2 else None
                if q is None:
                    sink.count("dns.late_replies", 1)  # its query timed out already
                    continue
                sink.inflight(-1)
                sink.reply(reply, q.kind, q.qi, t - q.t_first_s)
                self.last_active_s = t
                if self._first_reply and conn is self.conn:
                    self._first_reply = False
                    self.pool.connector.after_first_reply(conn, self)
                if not self.pending:
                    self.wake.set()  # the idle clock starts now
        except gevent.GreenletExit:
            raise
        except (OSError, EOFError, ValueError) as err:
            if conn is self.conn:
                self._lost(err)

    # -- endings ----------------------------------------------------------------------------------
    def _lost(self, err: BaseException) -> None:
        """The server closed or broke the connection: re-send what was pending on a new one,
        like a stub resolver, ``retries_n`` times per query; then it fails."""
        pool = self.pool
        sink = pool.sink
        sink.count("dns.stream_server_closes", 1)
        failure_class = pool.connector.lost_error_class(err)
        log.debug("DNS %s client %s lost its connection: %r", pool.connector.protocol, self.src, err)
        pending = sorted(self.pending.values(), key=lambda q: q.t_first_s, reverse=True)
        self.pending.clear()
        self._drop_connection()
        now = time.perf_counter()
        unfinished = 0
        for q in pending:
            if q.attempt >= pool.options.retries_n:
                self._end(q, failure_class, now)  # its last attempt was lost: a failure, stop or not
            elif pool.stopping:
                unfinished += 1  # a stopped run re-sends nothing: the stop cut it short
                sink.inflight(-1)
            elif not sink.allow_retry(now):
                sink.count("dns.retry_suppressed", 1)
                self._end(q, failure_class, now)
            else:
                q.attempt += 1  # dns.retry_sent is counted when _write sends it
                self.queue.appendleft(q)  # the oldest first again
        if unfinished:
            sink.count("dns.unfinished", unfinished)
        self.wake.set()

    def _drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        reader, self._reader = self._reader, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=False)

    def _expire(self, now: float) -> None:
        late = [qid for qid, q in self.pending.items() if q.deadline_s <= now]
        for qid in late:
            self._end(self.pending.pop(qid), "timeout", now)
        n = len(late)
        # a re-sent query goes back to the head, so the head is not always the oldest: look at all
        if self.queue and min(q.deadline_s for q in self.queue) <= now:
            keep = deque()
            for q in self.queue:
                if q.deadline_s <= now:
                    self._end(q, "timeout", now)
                    n += 1
                else:
                    keep.append(q)
            self.queue = keep
        if n:
            self.pool.sink.count("dns.timeouts", n)

    def _end(self, q: _Query, failure_class: str, now: float) -> None:
        self.pool.sink.inflight(-1)
        self.pool.sink.fail(q.qi, failure_class, now - q.t_first_s)

    def close(self) -> None:
        for q in list(self.queue) + list(self.pending.values()):
            self.pool.sink.inflight(-1)
        self.queue.clear()
        self.pending.clear()
        self._drop_connection()
        if self.greenlet is not None and self.greenlet is not gevent.getcurrent():
            self.greenlet.kill(block=False)
        self.greenlet = None


class StreamPool:
    """The stream clients of one sender: client ``i`` sends from ``sources[i]``."""

    def __init__(self, connector: Any, sources: Sequence[str], options: StreamOptions, sink: StreamSink) -> None:
        self.connector = connector
        self.options = options
        self.sink = sink
        self.closed = False
        #: set when the run stops: a lost connection's queries are not re-sent any more
        self.stopping = False
        self.clients = [StreamClient(self, src, i) for i, src in enumerate(sources)]

    def submit(self, client_index: int, tail: bytes, kind: int, qi: int, t_first_s: float) -> None:
        """Queue one query on client ``client_index`` (it connects when it has none)."""
        self.sink.inflight(1)
        q = _Query(tail, kind, qi, t_first_s, t_first_s + self.options.query_timeout_s)
        self.clients[client_index % len(self.clients)].submit(q)

    def connections_n(self) -> int:
        return sum(1 for c in self.clients if c.conn is not None)

    def close(self) -> None:
        self.closed = True
        for c in self.clients:
            c.close()


def _recv_exact(conn: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError(errno.ECONNRESET, "connection closed by the server")
        buf += chunk
    return buf
