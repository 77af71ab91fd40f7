"""Replay recorded DNS queries with their timing: captures, dnstap files, query logs.

What happened, sent again: each query of a recording (:mod:`.replay_input`) leaves at its
recorded offset divided by ``--replay-speed``, open loop, whatever the server does. Each
recorded client sends from its own loopback address (clients are numbered in order of first
appearance and given addresses from ``--replay-first-source`` upwards, so a per-IP limit sees the
same clients at every replay of the same file and window), with its recorded question, flags and
EDNS (captures and dnstap keep the query's bytes; logs are rebuilt from what they say).
``--replay-scale K`` sends K copies of every query, copy k from a further block of addresses.
``--replay-from`` / ``--replay-to`` cut a window (seconds from the first query, or a timestamp).

The recording is never held in memory: a first pass before anything is sent checks the whole
file (a bad file stops the run with one line naming it), numbers the clients and spools the
window's queries to a compact temporary file (:class:`Spool`); the second pass reads that back
as the sender sends (a struct unpack per query instead of decoding frames again). Sending, retries, failure classes, interval reports
and the run record are those of every DNS locustfile: :class:`ReplaySender` is a
:class:`~.sender.DnsSender` whose base schedule is the recording. Success is an answer with
NOERROR or NXDOMAIN (a recorded query for a name that does not exist is answered correctly with
NXDOMAIN). Each query's lateness, actual minus scheduled send time, is counted in the generator
counters as a cumulative histogram (``dns.replay_lateness_le_50us`` ... ``_le_1s``, with ``_n`` and
``_sum_us``), like a Prometheus histogram: it sums over workers and reads through
:mod:`loadkit.record.counters`.
"""

from __future__ import annotations

import datetime
import math
import os
import struct
import tempfile
import time
import weakref
from collections import deque
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import gevent
import dns.rdatatype
import numpy as np

from loadkit.errors import InputFileError, ProfileError
from loadkit.profile.targets import Target, user_target

from . import wire
from .histogram import LatencyHistogram
from .replay_input import FORMATS, RecordedQuery, read_queries
from .retry import PORT_POLICIES
from .sender import MAX_BASE_BATCH, DnsSender, IntervalReport, Outstanding, SenderOptions, source_addresses
from .sender import _attempt_socket_room as _socket_room

#: a replayed query succeeds with NOERROR or NXDOMAIN (:data:`.wire.FAILURE_OF`)
_KIND = wire.KIND_NXDOMAIN
#: most distinct request names (query types) of one replay; the rarest beyond are "other"
MAX_QTYPE_NAMES = 64


def qtype_name(qtype: int) -> str:
    """The Locust request name of a query type: its mnemonic (A, AAAA, TYPE65...)."""
    return dns.rdatatype.to_text(qtype)


#: upper edges of the lateness counters (cumulative, as Prometheus histograms): name -> seconds
LATENESS_EDGES_S = {"50us": 50e-6, "100us": 1e-4, "200us": 2e-4, "500us": 5e-4, "1ms": 1e-3, "2ms": 2e-3,
                    "5ms": 5e-3, "10ms": 1e-2, "100ms": 0.1, "1s": 1.0}
_PROTOCOLS = ("as-recorded", "udp", "tcp", "dot")
#: the sender's wait for the next query ends this much early and the rest is spun (yielding to
#: other greenlets each pass): gevent's timers (libev over epoll) wake 0.1-0.6 ms late. Not more:
#: on a loaded machine a process that spins is scheduled behind those that sleep, and a 1.5 ms
#: lead made the median lateness at 2,000 q/s 5 ms instead of 1 ms (benchmarks/replay_timing.py)
WAKE_LEAD_S = 0.0005
#: a recording is read this far past --replay-to (stamps of merged captures step back a little)
_WINDOW_END_SLACK_S = 60.0


@dataclass
class ReplaySettings:
    """Every option of the replay locustfile (totals over all workers)."""

    host: str = ""
    file: str = ""
    format: str = "auto"
    speed: float = 1.0
    scale: int = 1
    window_from: str = ""
    window_to: str = ""
    protocol: str = "as-recorded"
    first_source: str = "127.2.0.1"
    max_sources: int = 4096
    ports_per_source: int = 1
    edns_bytes: int = 1232
    timeout_s: float = 1.0
    retries: int = 2
    backoff: float = 2.0
    tcp_fallback: str = "on"
    port_policy: str = "fixed"
    retry_budget: float = 0.0
    retry_budget_window_s: float = 10.0
    stats_interval_s: float = 0.5
    max_queries: int = 50_000_000


#: field -> (option, help); the DNS options are the other DNS locustfiles' (same names, same meaning)
OPTIONS: dict[str, tuple[str, str]] = {
    "file": ("--replay-file", "recording to replay: pcap/pcapng capture, dnstap file, BIND querylog or "
                              "unbound log-queries log"),
    "format": ("--replay-format", "format of --replay-file (auto: told from its first bytes)"),
    "speed": ("--replay-speed", "queries leave at their recorded offset divided by this (2: twice as fast)"),
    "scale": ("--replay-scale", "copies of every query, each copy from its own block of source addresses"),
    "window_from": ("--replay-from", "replay from this point: seconds after the first query, or a time "
                                     "(2026-11-29T12:30:00, UTC unless it has a zone)"),
    "window_to": ("--replay-to", "replay up to this point (same forms as --replay-from)"),
    "protocol": ("--replay-protocol", "as-recorded (each query over the transport it came on: UDP, or TCP on "
                                      "the client's own connection), udp, tcp or dot (DNS over TLS)"),
    "first_source": ("--replay-first-source", "source address of the first recorded client; the others follow"),
    "max_sources": ("--replay-max-sources", "most source addresses (clients x scale beyond this share them)"),
    "ports_per_source": ("--replay-ports-per-source", "UDP sockets per source address (round robin)"),
    "edns_bytes": ("--replay-edns-bytes", "EDNS buffer size of queries rebuilt from a query log (0: no EDNS)"),
    "timeout_s": ("--dns-timeout", "first attempt's timeout (s)"),
    "retries": ("--dns-retries", "attempts after the first, like a stub resolver"),
    "backoff": ("--dns-backoff", "each retry waits this many times longer than the previous attempt"),
    "tcp_fallback": ("--dns-tcp-fallback", "on: a truncated (TC) reply is asked again over TCP"),
    "port_policy": ("--dns-port-policy", "source port of a retry: per-attempt, per-query or fixed"),
    "retry_budget": ("--dns-retry-budget", "retries at most this many times the originals (0: no budget)"),
    "retry_budget_window_s": ("--dns-retry-budget-window", "sliding window of the retry budget (s)"),
    "stats_interval_s": ("--dns-stats-interval", "how often results are folded into Locust's stats (s)"),
    "max_queries": ("--dns-max-queries", "safety cap on original queries per process"),
}
_CHOICES = {"format": list(FORMATS), "protocol": list(_PROTOCOLS), "tcp_fallback": ["on", "off"],
            "port_policy": list(PORT_POLICIES)}
_TYPES = {"float": float, "int": int, "str": str}


def add_arguments(parser: Any, settings: ReplaySettings) -> None:
    """Every :class:`ReplaySettings` field but ``host`` as a Locust custom argument."""
    for f in fields(ReplaySettings):
        if f.name not in OPTIONS:
            continue
        flag, help_text = OPTIONS[f.name]
        kwargs: dict[str, Any] = {"default": getattr(settings, f.name), "help": help_text}
        if _TYPES[f.type] is not str:
            kwargs["type"] = _TYPES[f.type]
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        parser.add_argument(flag, dest="replay_" + f.name, **kwargs)


def settings_from_options(options: Any, base: ReplaySettings, host: str | None) -> ReplaySettings:
    """:class:`ReplaySettings` from parsed Locust options (web UI values arrive as strings)."""
    values: dict[str, Any] = {}
    for f in fields(ReplaySettings):
        raw = getattr(options, "replay_" + f.name, None) if options is not None and f.name in OPTIONS else None
        if raw is None:
            continue
        try:
            values[f.name] = _TYPES[f.type](raw)
        except (TypeError, ValueError):
            what = "an integer" if _TYPES[f.type] is int else "a number"
            raise ProfileError(f"option {OPTIONS[f.name][0]} {raw!r} is not {what}") from None
    s = replace(base, **values)
    return replace(s, host=host) if host else s


# -- the first pass: check the file, number the clients ---------------------------------------------

class ReplayPlan(NamedTuple):
    """Everything checked and counted before the first packet."""

    settings: ReplaySettings
    target: Target
    path: Path
    origin_unix_s: float  #: recorded time that is offset 0 (the window's start)
    clients: dict  #: recorded client address -> number, in order of first appearance
    queries_n: int  #: recorded queries in the window (each is sent ``scale`` times)
    tcp_n: int  #: of which came over TCP (or another stream transport)
    span_s: float  #: recorded time from the window's first to its last query
    end_s: float  #: recorded time from offset 0 (the window's start) to the last query
    addresses: list  #: source addresses of clients x copies (folded at ``max_sources``)
    spool: Spool  #: the window's queries as the first pass read them
    qtypes: list  #: the request names (query types seen, in order of appearance)


def window_time(text: str, first_unix_s: float, option: str) -> float | None:
    """A window bound: seconds after the first query, or an ISO-8601 time (UTC unless zoned)."""
    text = text.strip()
    if not text:
        return None
    try:
        return first_unix_s + float(text)
    except ValueError:
        pass
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ProfileError(f"option {option} {text!r} is neither seconds nor a time like 2026-11-29T12:30:00") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


def _check(s: ReplaySettings) -> None:
    if not s.file:
        raise ProfileError("option --replay-file is required (a pcap/pcapng capture, dnstap file or query log)")
    if not (s.speed > 0) or math.isinf(s.speed):
        raise ProfileError(f"option --replay-speed {s.speed:g} must be a number > 0")
    for name in ("scale", "max_sources", "ports_per_source", "max_queries"):
        if getattr(s, name) < 1:
            raise ProfileError(f"option {OPTIONS[name][0]} {getattr(s, name)} must be >= 1")
    if s.protocol not in _PROTOCOLS:
        raise ProfileError(f"option --replay-protocol {s.protocol!r} must be one of {', '.join(_PROTOCOLS)}")
    if s.tcp_fallback not in ("on", "off"):
        raise ProfileError(f"option --dns-tcp-fallback {s.tcp_fallback!r} must be on or off")
    if s.port_policy not in PORT_POLICIES:
        raise ProfileError(f"option --dns-port-policy {s.port_policy!r} must be one of {', '.join(PORT_POLICIES)}")
    for name, ok, rule in (("timeout_s", s.timeout_s > 0, "> 0"), ("stats_interval_s", s.stats_interval_s > 0, "> 0"),
                           ("backoff", s.backoff >= 1, ">= 1"), ("retries", s.retries >= 0, ">= 0"),
                           ("retry_budget", s.retry_budget >= 0, ">= 0"),
                           ("retry_budget_window_s", s.retry_budget_window_s > 0, "> 0")):
        if not ok or math.isinf(getattr(s, name)):
            raise ProfileError(f"option {OPTIONS[name][0]} {getattr(s, name):g} must be a number {rule}")
    if s.edns_bytes and not 512 <= s.edns_bytes <= 65535:
        raise ProfileError(f"option --replay-edns-bytes {s.edns_bytes} is outside 512..65535 (0 turns EDNS off)")


def windowed(records: Iterator[RecordedQuery], s: ReplaySettings, bounds: list | None = None) -> Iterator[RecordedQuery]:
    """The records inside ``--replay-from`` .. ``--replay-to``, whose bounds are found from the
    file's first record (and appended to ``bounds`` as ``(from, to)``, None where not given)."""
    lo = hi = None
    first = True
    for q in records:
        if first:
            first = False
            lo = window_time(s.window_from, q.ts_unix_s, "--replay-from")
            hi = window_time(s.window_to, q.ts_unix_s, "--replay-to")
            if lo is not None and hi is not None and hi <= lo:
                raise ProfileError(f"--replay-to ({s.window_to}) is not after --replay-from ({s.window_from})")
            if bounds is not None:
                bounds.append((lo, hi))
        ts = q.ts_unix_s
        if lo is not None and ts < lo:
            continue
        if hi is not None and ts >= hi:
            if ts >= hi + _WINDOW_END_SLACK_S:
                return  # well past the window: the rest of the file is later still
            continue  # a capture's stamps may step back a little: look a bit further
        yield q


class Spool:
    """The first pass's queries in a compact file the second pass reads back: per query one
    16-byte header (recorded time, client number, request name, transport, length) and its wire
    bytes. Reading it costs a struct unpack per query, where decoding a capture again costs
    frames, IP and DNS headers: the replay reads while it sends. Deleted with its last user."""

    HEADER = struct.Struct("<dIBBH")

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="loadkit-replay-", suffix=".spool")
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        self._finalizer = weakref.finalize(self, _unlink, self.path)

    def add(self, ts_unix_s: float, client: int, qi: int, tcp: bool, tail: bytes) -> None:
        self._file.write(self.HEADER.pack(ts_unix_s, client, qi, tcp, len(tail)) + tail)

    def close(self) -> None:
        self._file.close()

    def records(self) -> Iterator[tuple]:
        """``(ts_unix_s, client, qi, tcp, tail)`` in file order."""
        size, unpack = self.HEADER.size, self.HEADER.unpack
        with self.path.open("rb", buffering=1 << 20) as f:
            read = f.read
            while True:
                head = read(size)
                if len(head) < size:
                    return
                ts, client, qi, tcp, n = unpack(head)
                yield ts, client, qi, tcp, read(n)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def plan(settings: ReplaySettings) -> ReplayPlan:
    """Check the options, the target and the whole recording (the first pass, which also spools
    the window's queries for the second); one line on the first problem
    (:class:`~loadkit.errors.LoadkitError`)."""
    s = settings
    _check(s)
    target = user_target("dns", s.host).target
    path = Path(s.file)
    clients: dict[str, int] = {}
    n = tcp_n = 0
    lo, hi = math.inf, -math.inf
    bounds: list = []
    spool = Spool()
    add = spool.add
    qtypes: dict[int, int] = {}  # query type -> request name number, in order of appearance
    try:
        for q in windowed(read_queries(path, s.format, s.edns_bytes), s, bounds):
            n += 1
            tcp_n += q.tcp
            c = clients.get(q.client)
            if c is None:
                c = clients[q.client] = len(clients)
            lo = min(lo, q.ts_unix_s)
            hi = max(hi, q.ts_unix_s)
            qi = qtypes.get(q.qtype)
            if qi is None:
                qi = qtypes[q.qtype] = len(qtypes) if len(qtypes) < MAX_QTYPE_NAMES else MAX_QTYPE_NAMES
            add(q.ts_unix_s, c, qi, q.tcp, q.tail)
    finally:
        spool.close()
    if not n:
        where = " in the window --replay-from/--replay-to" if s.window_from or s.window_to else ""
        raise InputFileError(f"replay file {path} has no DNS queries{where}")
    # offset 0 is the window's start when one is given (a quiet start stays quiet), else the first query
    origin = min(lo, bounds[0][0]) if bounds and bounds[0][0] is not None else lo
    wanted = len(clients) * s.scale
    addresses = source_addresses(min(wanted, s.max_sources), s.first_source)
    names = [qtype_name(t) for t, i in sorted(qtypes.items(), key=lambda kv: kv[1]) if i < MAX_QTYPE_NAMES]
    if len(qtypes) > MAX_QTYPE_NAMES:
        names.append("other")
    return ReplayPlan(s, target, path, origin, clients, n, tcp_n, hi - lo, hi - origin, addresses, spool, names)


# -- the second pass: the recording as the sender's schedule -----------------------------------------

_new = tuple.__new__


class _Item(NamedTuple):
    offset_s: float  #: when it is due, from the start of sending
    sock: int  #: first socket slot of its source address in this process
    tail: bytes
    qi: int  #: request name (index into ReplayPlan.qtypes)
    tcp: bool


class ReplayFeed:
    """The recording as a :class:`~.schedule.Schedule` for :class:`~.sender.DnsSender`: ``due(t)``
    and ``time_of(i)`` read ahead at most one batch; :meth:`pop` hands the next query over.
    Worker ``index`` of ``count`` sends the copies whose source address number is ``index``
    modulo ``count``."""

    def __init__(self, p: ReplayPlan, index: int = 0, count: int = 1, ports_per_source: int = 1) -> None:
        s = p.settings
        self._records = p.spool.records()
        self._spool = p.spool  # kept: the file lives as long as a feed reads it
        self._n_clients = len(p.clients)
        self._n_addr = len(p.addresses)
        self._scale = s.scale
        self._origin = p.origin_unix_s
        self._speed = s.speed
        self._index, self._count = index, count
        self._ports = ports_per_source
        self._ahead: deque[_Item] = deque()
        self._done = False
        self.popped = 0

    def my_addresses(self, addresses: list[str]) -> list[str]:
        """This process's source addresses, in socket order."""
        return addresses[self._index::self._count]

    def _fill(self, n: int) -> None:
        ahead = self._ahead
        records, origin, speed = self._records, self._origin, self._speed
        one = self._scale == 1 and self._count == 1 and self._n_addr == self._n_clients
        while len(ahead) < n and not self._done:
            q = next(records, None)
            if q is None:
                self._done = True
                return
            ts, c, qi, tcp, tail = q
            offset = (ts - origin) / speed
            if one:  # the common case, without the copy arithmetic
                ahead.append(_new(_Item, (offset, c * self._ports, tail, qi, tcp)))
                continue
            for k in range(self._scale):
                a = (k * self._n_clients + c) % self._n_addr
                if a % self._count == self._index:
                    ahead.append(_new(_Item, (offset, (a // self._count) * self._ports, tail, qi, tcp)))

    def due(self, t_s: float) -> int:
        self._fill(MAX_BASE_BATCH)
        k = 0
        for item in self._ahead:
            if item.offset_s > t_s:
                break
            k += 1
        return self.popped + k

    def next_s(self) -> float:
        """When the next query is due (inf: the recording has ended)."""
        self._fill(1)
        return self._ahead[0].offset_s if self._ahead else math.inf

    def time_of(self, i: int) -> float:
        # when the sender's wait should end: WAKE_LEAD_S early, as the hub's timers wake late
        # (:meth:`ReplaySender._wait` spins the rest of the way)
        return self.next_s() - WAKE_LEAD_S

    def pop(self) -> _Item:
        self.popped += 1
        return self._ahead.popleft()

    def share(self, index: int, count: int) -> ReplayFeed:
        raise NotImplementedError("a replay feed is made per process (ReplayFeed(plan, index, count))")


class _Pool:
    """What :class:`~.sender.DnsSender` asks of a query pool: the request names (the recording
    brings the queries). Only the types the recording has: each name costs the sender a tally."""

    def __init__(self, qtypes: list[str]) -> None:
        self.qtypes = list(qtypes)
        self.queries = [None]


class ReplaySender(DnsSender):
    """A :class:`~.sender.DnsSender` whose original queries come from a :class:`ReplayFeed`: each
    leaves through the sender's one send path on its source address's socket (or over TCP), is
    retried, classed and tallied like every DNS query, and its lateness is counted."""

    def __init__(self, target: Target, feed: ReplayFeed, options: SenderOptions, *, sources: list[str],
                 qtypes: list[str], protocol: str = "as-recorded",
                 on_interval: Callable[[IntervalReport], None] | None = None) -> None:
        super().__init__(target, _Pool(qtypes), options, base=feed, sources=sources, on_interval=on_interval)
        self.feed = feed
        self.replay_protocol = protocol
        #: lateness of every query sent (actual - scheduled send), whole run and last interval
        self.lateness = LatencyHistogram()
        self.interval_lateness = LatencyHistogram()
        self._lates: list[float] = []
        self._port_rr = 0

    def _send_originals(self, n_base: int, n_burst: int) -> None:
        perf = time.perf_counter
        pop = self.feed.pop
        t0 = self._t0
        lates = self._lates
        ports = self.ports_per_source
        send = self._send_queries
        force = self.replay_protocol
        streams = self._streams  # tcp/dot: each client's own connection (the sender's stream pool)
        for _ in range(n_base):
            offset_s, s, tail, qi, tcp = pop()
            if ports > 1:
                self._port_rr += 1
                s += self._port_rr % ports
            now = perf()
            lates.append(now - t0 - offset_s)
            if streams is not None and (force != "as-recorded" or tcp):
                streams.submit(s, tail, _KIND, qi, now)
            else:
                # the sender's one send path: attempt -1 + 1 = the original attempt, on socket s
                send(1, (s, _new(Outstanding, (now, 0.0, -1, s, 0, tail, _KIND, qi))))
        self._count("dns.original_sent", n_base)

    def _wait(self) -> None:
        if self._sending and self._t0 + self.feed.next_s() - time.perf_counter() < WAKE_LEAD_S:
            gevent.sleep(0)  # the next query is due within the lead: spin to it
            return
        super()._wait()

    def _flush(self, interval_s: float) -> IntervalReport:
        h = LatencyHistogram()
        if self._lates:
            a = np.asarray(self._lates)
            self._lates = []
            h.add_many(np.maximum(a, 0.0))
            for name, edge_s in LATENESS_EDGES_S.items():
                self._count("dns.replay_lateness_le_" + name, int(np.count_nonzero(a <= edge_s)))
            self._count("dns.replay_lateness_n", len(a))
            self._count("dns.replay_lateness_sum_us", int(a.sum() * 1e6))
        self.interval_lateness = h
        self.lateness.merge(h)
        return super()._flush(interval_s)

    def summary(self) -> str:
        return f"{super().summary()} lateness: {self.lateness.summary()}"


def build_sender(p: ReplayPlan, index: int = 0, count: int = 1,
                 on_interval: Callable[[IntervalReport], None] | None = None) -> ReplaySender:
    """This process's :class:`ReplaySender` (worker ``index`` of ``count``)."""
    s = p.settings
    feed = ReplayFeed(p, index, count, s.ports_per_source)
    feed.due(0.0)  # the first batch is read before the clock starts, not on its time
    mine = feed.my_addresses(p.addresses) or [p.addresses[0]]
    wanted = len(mine) * s.ports_per_source
    if _socket_room(wanted) < wanted:  # raises the soft open-file limit as far as needed first
        raise ProfileError(f"{wanted} client sockets ({len(mine)} source addresses x {s.ports_per_source}) do not fit "
                           f"this process's open-file limit: lower --replay-max-sources or --replay-ports-per-source")
    # as recorded: UDP queries on the fixed sockets, TCP ones on their client's connection
    protocol = s.protocol if s.protocol != "as-recorded" else ("tcp" if p.tcp_n else "udp")
    options = SenderOptions(
        protocol=protocol, timeout_s=s.timeout_s, retries_n=s.retries, backoff=s.backoff,
        tcp_fallback=s.tcp_fallback == "on", ports_per_source=s.ports_per_source, port_policy=s.port_policy,
        retry_budget=s.retry_budget, retry_budget_window_s=s.retry_budget_window_s,
        interval_s=s.stats_interval_s, max_queries_n=s.max_queries,
        # the last query's offset at this speed, plus room: the replay ends with its file (a
        # window that starts before the first query starts quiet, and that lead-in is sent too)
        max_duration_s=p.end_s / s.speed + 60.0,
    )
    return ReplaySender(p.target, feed, options, sources=mine, qtypes=p.qtypes, protocol=s.protocol,
                        on_interval=on_interval)


def describe(p: ReplayPlan) -> str:
    """One line for the log: what is replayed, how."""
    s = p.settings
    folded = len(p.clients) * s.scale > len(p.addresses)
    return (f"{p.queries_n} queries over {p.span_s:.1f} s from {len(p.clients)} client(s) in {p.path} "
            f"(x{s.scale} copies, speed x{s.speed:g}: {p.queries_n * s.scale / max(p.span_s / s.speed, 1e-9):.0f} q/s "
            f"on average) from {len(p.addresses)} source address(es) {p.addresses[0]}..{p.addresses[-1]}"
            + (f" (clients x copies folded onto --replay-max-sources {s.max_sources})" if folded else ""))
