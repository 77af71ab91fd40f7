"""The sampler: one host's memory and buffer saturation, every interval, on the load's clock.

:class:`Collector` takes one :class:`Sample` per interval (default 1 s, down to 0.1 s) in its own
thread, for a duration or until stopped. Each sample holds the records of
:mod:`loadkit.schema` (``GroupSample`` per group, one ``NetSample`` with per-interval deltas,
``SocketSample`` per watched UDP socket, one ``SystemSample``) and the events since the last one.
Samples go to

- Parquet (``out_dir``), laid out like a run directory's ``samples/`` (:data:`RUN_LAYOUT`), so
  ``loadkit.record.reader.load_run`` reads a collector directory as it reads a run; part files
  are flushed every ``flush_interval_s``, so a crash loses at most that much;
- every sink added with :meth:`Collector.add_sink` (the Locust recorder, the exporter);
- :attr:`Collector.latest` and :meth:`Collector.events_since` (the HTTP endpoints).

Nothing the kernel or permissions withhold stops the collector: the figure is 0 and a warning is
logged once and recorded as an event. Timestamps are ``time.time()``; scheduling uses
``time.perf_counter()`` deadlines, and a sample that overruns its interval skips the missed
ticks rather than bunching samples together.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from loadkit.errors import CollectorError
from loadkit.partfiles import PartWriter
from loadkit.schema import (RUN_LAYOUT, Event, FirewallSample, GroupSample, NetSample, SocketSample,
                            SystemSample)

from . import cgroups, procfs, sockdiag
from . import firewall as firewall_tables
from .degrade import WarnOnce
from .events import EventTracker
from .groups import GroupSpec, ProcessGroups, check_unique
from .wrap import CounterTracker

log = logging.getLogger("loadkit.observe")

MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 3600.0

#: NetSample fields that are counters (get a ``*_delta`` column); the rest are gauges
NET_COUNTERS: tuple[str, ...] = (
    "udp_in_datagrams_n",
    "udp_in_errors_n",
    "udp_rcvbuf_errors_n",
    "udp_sndbuf_errors_n",
    "udp_no_ports_n",
    "udp6_in_datagrams_n",
    "udp6_in_errors_n",
    "udp6_rcvbuf_errors_n",
    "tcp_listen_overflows_n",
    "tcp_listen_drops_n",
    "tcp_backlog_drops_n",
    "softnet_dropped_n",
)
#: GroupSample fields that are counters
GROUP_COUNTERS: tuple[str, ...] = ("cgroup_failcnt_n", "cgroup_oom_kills_n")

# NetSample field -> (file, section, kernel name)
_SNMP_FIELDS = {
    "udp_in_datagrams_n": ("Udp", "InDatagrams"),
    "udp_in_errors_n": ("Udp", "InErrors"),
    "udp_rcvbuf_errors_n": ("Udp", "RcvbufErrors"),
    "udp_sndbuf_errors_n": ("Udp", "SndbufErrors"),
    "udp_no_ports_n": ("Udp", "NoPorts"),
}
_SNMP6_FIELDS = {
    "udp6_in_datagrams_n": "Udp6InDatagrams",
    "udp6_in_errors_n": "Udp6InErrors",
    "udp6_rcvbuf_errors_n": "Udp6RcvbufErrors",
}
_NETSTAT_FIELDS = {
    "tcp_listen_overflows_n": ("TcpExt", "ListenOverflows"),
    "tcp_listen_drops_n": ("TcpExt", "ListenDrops"),
    "tcp_backlog_drops_n": ("TcpExt", "TCPBacklogDrop"),
}


class Sample(NamedTuple):
    """Everything one tick of the collector saw (:meth:`Collector.sample`)."""

    ts_unix_s: float
    host: str
    groups: list[GroupSample]
    net: NetSample
    net_delta: dict[str, int]  #: NetSample counter field -> increase since the previous sample
    sockets: list[SocketSample]
    socket_drops_delta: dict[tuple[str, int], int]  #: (address, port) -> drops since the previous sample
    group_delta: dict[str, dict[str, int]]  #: group -> {"cgroup_oom_kills_n": ..., ...}
    system: SystemSample
    events: list[Event]
    sample_s: float  #: time this sample took to take
    #: socket inode -> its own drops since the previous sample (``socket_drops_delta`` sums a key)
    socket_inode_drops_delta: dict[int, int] = {}
    #: FirewallSample per firewall table read this tick (none on ticks a slow read skips)
    firewall: tuple = ()

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        """Rows per table of :data:`RUN_LAYOUT` (``groups``, ``net``, ``sockets``, ``system``)
        with the ``*_delta`` columns, exactly as the collector writes them."""
        net = self.net._asdict()
        net.update({f"{k}_delta": v for k, v in self.net_delta.items()})
        groups = []
        for g in self.groups:
            row = g._asdict()
            row.update({f"{k}_delta": v for k, v in self.group_delta.get(g.group, {}).items()})
            groups.append(row)
        sockets = []
        for s in self.sockets:
            row = s._asdict()
            # one row per socket: its own delta when known (several SO_REUSEPORT sockets share a key)
            row["drops_n_delta"] = self.socket_inode_drops_delta.get(
                s.inode, self.socket_drops_delta.get((s.local_address, s.local_port), 0))
            sockets.append(row)
        return {"groups": groups, "net": [net], "sockets": sockets, "system": [self.system._asdict()],
                "firewall": [f._asdict() for f in self.firewall]}

    def to_json(self) -> dict[str, Any]:
        """JSON-able form served at ``/snapshot`` (events travel separately, with a cursor)."""
        rows = self.rows()
        return {
            "ts_unix_s": self.ts_unix_s,
            "host": self.host,
            "sample_s": self.sample_s,
            "groups": rows["groups"],
            "net": rows["net"][0],
            "sockets": rows["sockets"],
            "system": rows["system"][0],
            "firewall": rows["firewall"],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], events: Sequence[dict[str, Any]] = ()) -> "Sample":
        """Inverse of :meth:`to_json` (a pulled remote snapshot); unknown keys are ignored."""

        def rec(kind: type, row: dict[str, Any]) -> Any:
            return kind(**{f: row[f] for f in kind._fields if f in row})

        net_row = d["net"]
        return cls(
            ts_unix_s=float(d["ts_unix_s"]),
            host=str(d["host"]),
            groups=[rec(GroupSample, r) for r in d.get("groups", [])],
            net=rec(NetSample, net_row),
            net_delta={k: int(net_row.get(f"{k}_delta", 0)) for k in NET_COUNTERS},
            sockets=[rec(SocketSample, r) for r in d.get("sockets", [])],
            socket_drops_delta={
                (r.get("local_address", ""), r["local_port"]): int(r.get("drops_n_delta", 0))
                for r in d.get("sockets", [])
            },
            group_delta={r["group"]: {k: int(r.get(f"{k}_delta", 0)) for k in GROUP_COUNTERS} for r in d.get("groups", [])},
            system=rec(SystemSample, d["system"]),
            events=[Event(e["ts_unix_s"], e["kind"], e["source"], e.get("detail", {})) for e in events],
            sample_s=float(d.get("sample_s", 0.0)),
            firewall=tuple(rec(FirewallSample, r) for r in d.get("firewall", [])),
            socket_inode_drops_delta={int(r["inode"]): int(r.get("drops_n_delta", 0))
                                      for r in d.get("sockets", []) if r.get("inode")},
        )


@dataclass
class CollectorConfig:
    """What to sample, how often, and where to put it."""

    groups: Sequence[GroupSpec] = ()
    """process groups (``loadkit.observe.groups.parse_group_spec``)"""
    udp_ports: Sequence[int] = ()
    """local UDP ports whose sockets' queue and drops are recorded"""
    interval_s: float = 1.0
    """time between samples, 0.1 s at least"""
    duration_s: float | None = None
    """stop after this long; None runs until :meth:`Collector.stop`"""
    out_dir: Path | None = None
    """write Parquet tables and ``events.jsonl`` here (laid out like a run directory)"""
    host: str = field(default_factory=socket.gethostname)
    """host label written in every record"""
    proc_root: str = procfs.PROC_ROOT
    cgroup_root: str = cgroups.CGROUP_ROOT
    full_memory_interval_s: float | None = 10.0
    """read USS/PSS (expensive: walks every mapping) at most this often; None or 0 never"""
    flush_interval_s: float = 5.0
    """write a Parquet part at least this often (a crash loses at most this much)"""
    events_kept: int = 10000
    """events kept in memory for :meth:`Collector.events_since` (the snapshot endpoint)"""
    firewall: bool = True
    """read the session tables of loadkit firewalls (nftables ``loadkit_fw_*``) when running as
    root with ``nft`` installed; elsewhere there is nothing to read and nothing is recorded"""

    def validate(self) -> None:
        if not isinstance(self.interval_s, (int, float)) or not MIN_INTERVAL_S <= self.interval_s <= MAX_INTERVAL_S:
            raise CollectorError(f"interval {self.interval_s!r} s is out of range {MIN_INTERVAL_S}-{MAX_INTERVAL_S:g} s")
        if self.duration_s is not None and (not isinstance(self.duration_s, (int, float)) or not self.duration_s > 0):
            raise CollectorError(f"duration {self.duration_s!r} s must be a positive number of seconds")
        for port in self.udp_ports:
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise CollectorError(f"UDP port {port!r} is out of range 1-65535")
        if not isinstance(self.flush_interval_s, (int, float)) or not self.flush_interval_s > 0:
            raise CollectorError(f"flush interval {self.flush_interval_s!r} s must be a positive number of seconds")
        if self.full_memory_interval_s is not None and self.full_memory_interval_s < 0:
            raise CollectorError(f"full-memory interval {self.full_memory_interval_s!r} s must be >= 0")
        check_unique(self.groups)


class SampleWriter:
    """Parquet part files per table plus ``events.jsonl``, under one directory."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.writers = {t: PartWriter(self.out_dir / RUN_LAYOUT[t]) for t in ("groups", "net", "sockets", "system", "firewall")}
            self._events = (self.out_dir / RUN_LAYOUT["events"]).open("a", encoding="utf-8")
        except OSError as err:
            raise CollectorError(f"cannot write collector output to {self.out_dir}: {err.strerror or err}") from err

    def write(self, sample: Sample) -> None:
        for table, rows in sample.rows().items():
            self.writers[table].extend(rows)
        self.write_events(sample.events)

    def write_events(self, events: Sequence[Event]) -> None:
        for event in events:
            self._events.write(json.dumps(event._asdict(), default=str) + "\n")
        if events:
            self._events.flush()  # events are rare and precious: never buffered

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        self.flush()
        self._events.close()


class Collector:
    """Samples one host; thread-based. ``start()``/``stop()``, or ``run()`` in the caller's thread."""

    def __init__(self, config: CollectorConfig) -> None:
        config.validate()
        self.config = config
        self.host = config.host
        self.warn = WarnOnce(config.host)
        self.groups = ProcessGroups(
            config.groups,
            self.warn,
            proc_root=config.proc_root,
            cgroup_root=config.cgroup_root,
            full_memory_interval_s=config.full_memory_interval_s,
        )
        self.tracker = EventTracker(config.host)
        self._counters = CounterTracker(wrap32={"drops", "softnet"})
        self._cpu_prev: procfs.CpuTimes | None = None
        # listing nftables needs CAP_NET_ADMIN: a non-root collector has no firewall to read
        self._firewall = (firewall_tables.FirewallReader()
                          if config.firewall and os.geteuid() == 0 else None)
        self._sinks: list[Callable[[Sample], None]] = []
        self._writer = SampleWriter(config.out_dir) if config.out_dir is not None else None
        self._last_flush = time.perf_counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._events: deque[tuple[int, Event]] = deque(maxlen=config.events_kept)
        self._event_seq = 0
        #: the most recent sample (None before the first)
        self.latest: Sample | None = None
        self.samples_n = 0
        self.overruns_n = 0
        self.sample_s_max = 0.0
        self.sample_s_total = 0.0

    # -- sinks and reads ------------------------------------------------------------------------

    def add_sink(self, sink: Callable[[Sample], None]) -> None:
        """Call ``sink(sample)`` after every sample, in the collector's thread."""
        self._sinks.append(sink)

    def events_since(self, cursor: int = 0) -> tuple[list[Event], int]:
        """Events with sequence number > ``cursor`` still held, and the cursor to pass next time."""
        with self._lock:
            events = [e for seq, e in self._events if seq > cursor]
            return events, self._event_seq

    # -- one sample -----------------------------------------------------------------------------

    def _try(self, key: str, what: str, fn: Callable[[], Any], default: Any) -> Any:
        try:
            return fn()
        except FileNotFoundError:
            self.warn.warn(key, f"{what} is not provided on this host; recorded as 0")
        except (OSError, ValueError, IndexError) as err:
            self.warn.warn(key, f"{what} is unreadable ({err}); recorded as 0")
        return default

    def _net(self, ts: float) -> tuple[NetSample, dict[str, int]]:
        root = self.config.proc_root
        snmp = self._try("snmp", f"{root}/net/snmp", lambda: procfs.read_snmp(root), {})
        snmp6 = self._try("snmp6", f"{root}/net/snmp6 (IPv6 UDP counters)", lambda: procfs.read_snmp6(root), {})
        netstat = self._try("netstat", f"{root}/net/netstat", lambda: procfs.read_netstat(root), {})
        sockstat = self._try("sockstat", f"{root}/net/sockstat", lambda: procfs.read_sockstat(root), {})
        softnet = self._try("softnet", f"{root}/net/softnet_stat", lambda: procfs.read_softnet(root), [])
        conntrack = self._try(
            "conntrack",
            "conntrack (nf_conntrack module not loaded)",
            lambda: procfs.read_conntrack(root),
            procfs.Conntrack(0, 0),
        )
        raw: dict[str, int] = {}
        for name, (section, key) in _SNMP_FIELDS.items():
            raw[name] = snmp.get(section, {}).get(key, 0)
        for name, key in _SNMP6_FIELDS.items():
            raw[name] = snmp6.get(key, 0)
        for name, (section, key) in _NETSTAT_FIELDS.items():
            raw[name] = netstat.get(section, {}).get(key, 0)
        if snmp and "RcvbufErrors" not in snmp.get("Udp", {}):
            self.warn.warn("snmp_udp", "Udp RcvbufErrors missing from /proc/net/snmp; recorded as 0")
        total, delta = self._counters.update("net", raw)
        # softnet: 32-bit counters per CPU, each wrap-corrected, then summed
        soft_total = soft_delta = 0
        for cpu, row in enumerate(softnet):
            t, d = self._counters.update(("softnet", cpu), {"softnet": row.dropped_n})
            soft_total += t["softnet"]
            soft_delta += d["softnet"]
        total["softnet_dropped_n"] = soft_total
        delta["softnet_dropped_n"] = soft_delta
        net = NetSample(
            ts_unix_s=ts,
            host=self.host,
            sockets_used_n=sockstat.get("sockets", {}).get("used", 0),
            udp_mem_pages=sockstat.get("UDP", {}).get("mem", 0),
            conntrack_count_n=conntrack.count_n,
            conntrack_max_n=conntrack.max_n,
            **{k: total[k] for k in NET_COUNTERS},
        )
        return net, {k: delta[k] for k in NET_COUNTERS}

    def _sockets(self, ts: float) -> tuple[list[SocketSample], dict[tuple[str, int], int], dict[int, int]]:
        if not self.config.udp_ports:
            return [], {}, {}
        root = self.config.proc_root
        # sock_diag first: a dump filtered by port takes about a millisecond, while /proc/net/udp
        # lists every socket on the host (tens of thousands under a load generator) and can take
        # half a second, too long to tell one burst's drops from the next one's
        t0 = time.time()
        diag = self._meminfo()
        diag_ts = (t0 + time.time()) / 2
        found = self._try("udp_sockets", f"{root}/net/udp", lambda: procfs.read_udp_sockets(root, self.config.udp_ports), [])
        proc_ts = (t0 + time.time()) / 2
        if found and not diag and os.path.realpath(root) == "/proc":
            self.warn.warn("sock_diag", "netlink sock_diag (udp_diag) is unavailable: socket receive-buffer "
                           "sizes recorded as 0; models assume the doubled so-rcvbuf")
        rows, deltas, by_inode = [], {}, {}
        live = set()
        # one row per socket: SO_REUSEPORT sockets (unbound num-threads > 1) fill and drop apart
        for s in sorted(found, key=lambda s: (s.local_address, s.local_port, s.inode)):
            key = (s.local_address, s.local_port, s.inode)
            live.add(key)
            m = diag.get(s.inode)
            drops = m.drops_n if m is not None else s.drops_n  # the same sk_drops, read at a sharper instant
            _, delta = self._counters.update(("udp", key), {"drops": drops})
            by_inode[s.inode] = delta["drops"]
            deltas[key[:2]] = deltas.get(key[:2], 0) + delta["drops"]
            rows.append(SocketSample(ts, self.host, s.local_port, s.rx_queue_bytes, s.tx_queue_bytes, drops,
                                     s.local_address, s.inode, m.rcvbuf_bytes if m is not None else 0,
                                     diag_ts if m is not None else proc_ts))
        for key in self._counters.keys():
            if isinstance(key, tuple) and key[0] == "udp" and key[1] not in live:
                self._counters.forget(key)  # socket closed: a new one starts from its own zero
        seen_ports = {s.local_port for s in found}
        for port in self.config.udp_ports:
            if port not in seen_ports:
                self.warn.warn(f"udp_port:{port}", f"no UDP socket is bound to port {port} (yet); nothing recorded for it until one is")
        return rows, deltas, by_inode

    def _meminfo(self) -> dict:
        """inode -> sock_diag memory figures (sk_rcvbuf, sk_drops) of the watched sockets; {} for a
        canned /proc root (the live kernel's sockets are not those) or without sock_diag."""
        if os.path.realpath(self.config.proc_root) != "/proc":
            return {}
        return sockdiag.udp_rcvbuf(self.config.udp_ports)

    def _system(self, ts: float) -> SystemSample:
        root = self.config.proc_root
        mem = self._try("meminfo", f"{root}/meminfo", lambda: procfs.read_meminfo(root), {})
        load = self._try("loadavg", f"{root}/loadavg", lambda: procfs.read_loadavg(root), (0.0, 0.0, 0.0))
        cpu = self._try("stat", f"{root}/stat", lambda: procfs.read_cpu_times(root), None)
        cpu_pct = 0.0
        if cpu is not None and self._cpu_prev is not None and cpu.total_ticks > self._cpu_prev.total_ticks:
            busy = cpu.busy_ticks - self._cpu_prev.busy_ticks
            cpu_pct = 100.0 * cpu.cpus_n * max(0, busy) / (cpu.total_ticks - self._cpu_prev.total_ticks)
        if cpu is not None:
            self._cpu_prev = cpu
        if mem and "MemAvailable" not in mem:
            self.warn.warn("memavailable", "MemAvailable missing from meminfo (kernel < 3.14); recorded as 0")
        return SystemSample(
            ts_unix_s=ts,
            host=self.host,
            mem_available_bytes=mem.get("MemAvailable", 0),
            mem_total_bytes=mem.get("MemTotal", 0),
            swap_used_bytes=max(0, mem.get("SwapTotal", 0) - mem.get("SwapFree", 0)),
            load1=load[0],
            cpu_percent=round(cpu_pct, 3),
        )

    def _firewall_rows(self, ts: float) -> list[FirewallSample]:
        if self._firewall is None:
            return []
        try:
            readings = self._firewall.read()
        except Exception as err:  # nft missing a table, or a bug: never costs the other figures
            self.warn.warn(f"firewall:{type(err).__name__}", f"firewall tables unreadable ({err}); none recorded")
            return []
        return [FirewallSample(ts, self.host, f"{r.family} {r.table}", r.entries_n, r.size_n,
                               r.drops_n, r.timeout_s) for r in readings]

    def sample(self) -> Sample:
        """Take one sample now, hand it to the writer and sinks, and return it."""
        t0 = time.perf_counter()
        ts = time.time()
        net, net_delta = self._net(ts)
        sockets, sock_delta, inode_delta = self._sockets(ts)
        system = self._system(ts)
        root = self.config.proc_root

        def tcp(inodes: set[int]) -> list:
            return self._try("tcp", f"{root}/net/tcp", lambda: procfs.read_tcp_sockets(root, inodes), [])

        group_rows: list[GroupSample] = []
        group_delta: dict[str, dict[str, int]] = {}
        try:
            group_rows = self.groups.sample(ts, self.host, tcp)
        except Exception as err:  # a bug in one figure must not cost the others
            self.warn.warn(f"groups:{type(err).__name__}", f"process groups could not be sampled ({err!r})")
        for g in group_rows:
            _, d = self._counters.update(("group", g.group), {k: getattr(g, k) for k in GROUP_COUNTERS})
            group_delta[g.group] = d
        events = self.tracker.update(ts, self.groups.members, self.groups.cgroup_readings) if group_rows else []
        firewall = self._firewall_rows(ts)
        events = self.warn.take() + events
        sample = Sample(ts, self.host, group_rows, net, net_delta, sockets, sock_delta, group_delta, system, events, 0.0,
                        inode_delta)
        sample = sample._replace(firewall=tuple(firewall), sample_s=time.perf_counter() - t0)
        self._publish(sample)
        return sample

    def _publish(self, sample: Sample) -> None:
        with self._lock:
            for event in sample.events:
                self._event_seq += 1
                self._events.append((self._event_seq, event))
            self.latest = sample
            self.samples_n += 1
            self.sample_s_total += sample.sample_s
            self.sample_s_max = max(self.sample_s_max, sample.sample_s)
        if self._writer is not None:
            self._writer.write(sample)
            if time.perf_counter() - self._last_flush >= self.config.flush_interval_s:
                self._writer.flush()
                self._last_flush = time.perf_counter()
        for sink in self._sinks:
            try:
                sink(sample)
            except Exception:  # a sink's bug is logged, the sampling goes on
                log.exception("collector sink %r failed", sink)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Sample every interval until the duration is up or :meth:`stop` is called."""
        interval = float(self.config.interval_s)
        start = time.perf_counter()
        end = start + self.config.duration_s if self.config.duration_s else math.inf
        next_t = start
        try:
            while not self._stop.is_set():
                try:
                    self.sample()
                except Exception:  # a bug in one tick must not end the recording
                    log.exception("collector sample failed; sampling goes on")
                next_t += interval
                now = time.perf_counter()
                if now > next_t:
                    missed = int((now - next_t) // interval) + 1
                    self.overruns_n += missed
                    self.warn.warn(
                        "overrun",
                        f"a sample took longer than the {interval:g} s interval; missed ticks are skipped "
                        "(use a longer --interval or fewer/lighter groups)",
                    )
                    next_t += missed * interval
                if next_t > end + 1e-9:
                    break
                self._stop.wait(max(0.0, next_t - time.perf_counter()))
        finally:
            self.close()

    def start(self) -> "Collector":
        """Run :meth:`run` in a daemon thread."""
        if self._thread is not None:
            raise CollectorError("collector already started")
        self._thread = threading.Thread(target=self.run, name="loadkit-collector", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = 10.0) -> None:
        """Stop sampling, flush output, and wait for the thread."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Flush and close the output (also called when :meth:`run` ends)."""
        pending = self.warn.take()
        if self._writer is not None:
            if pending:
                self._writer.write_events(pending)
            self._writer.close()
            self._writer = None
        if pending:
            with self._lock:
                for event in pending:
                    self._event_seq += 1
                    self._events.append((self._event_seq, event))
