"""Typed records passed between pipeline stages.

profile -> generate -> observe -> record -> model -> report

Every field carries its unit in its name (``_s`` seconds, ``_unix_s`` wall-clock timestamp,
``_bytes``, ``_n`` a count, ``_qps`` a rate). Timestamps written to records come from
``time.time()`` on the host that made them, so load statistics and collector samples share one
clock; durations are measured with ``time.perf_counter()``.

A run directory (see :data:`RUN_LAYOUT`) holds these records as Parquet part files, one file per
flushed chunk, so that a crash loses at most the chunk being written. Records know nothing of the
analysis that reads them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

# --------------------------------------------------------------------------------------------
# generate: failures
# --------------------------------------------------------------------------------------------

#: failure classes used by the load generators. Locust groups its failure table by the error's
#: repr, so a class token (never a per-request detail) is what reaches Locust.
FAILURE_CLASSES: tuple[str, ...] = (
    # DNS
    "timeout",
    "servfail",
    "refused",
    "nxdomain_unexpected",
    "rcode_other",
    "truncated",
    "icmp_unreachable",
    "send_error",
    # mail
    "conn_refused",
    "conn_reset",
    "eof_before_greeting",
    "eof_after_login",
    "eof_during_login",  # greeted, then closed before the LOGIN/PASS reply
    "client_error",  # the generator itself failed (out of descriptors, no buffers)
    "bye_greeting",
    "auth_rejected",
    "bad",
    "no",
    "timeout_connect",
    "timeout_greeting",
    "timeout_login",
    "timeout_select",
    "timeout_fetch",
    "timeout_logout",
    "tls_error",
    "protocol_error",
)


class Failure(Exception):
    """A classed request failure handed to Locust's request event.

    ``repr()`` and ``str()`` are the class token alone (``"eof_after_login"``) so Locust's
    failure table counts by class; ``detail`` keeps the specifics for logs.
    """

    def __init__(self, failure_class: str, detail: str = "") -> None:
        super().__init__(failure_class)
        self.failure_class = failure_class
        self.detail = detail

    def __repr__(self) -> str:
        return self.failure_class

    __str__ = __repr__


# --------------------------------------------------------------------------------------------
# record: request statistics per interval (written by loadkit.record from Locust's stats)
# --------------------------------------------------------------------------------------------


class RequestInterval(NamedTuple):
    """Requests of one (type, name) completed during one interval.

    Made by the recording plugin from the delta of Locust's cumulative stats between two flushes.
    Latency percentiles are the upper edges of the log buckets of the same interval's
    :class:`LatencyBucket` rows (``loadkit.record.latency``), so they never under-report; a run's
    percentile is computed from those buckets, never by averaging these. ``latency_max_s`` is the
    generator's exact maximum when it keeps a fine histogram, else Locust's rounded one.
    """

    ts_unix_s: float  #: end of the interval
    interval_s: float
    request_type: str  #: Locust request_type, e.g. "DNS", "IMAP", "POP3"
    name: str  #: Locust name, e.g. "A", "LOGIN", "connect+greeting"
    requests_n: int  #: completed requests (successes + failures)
    failures_n: int
    latency_mean_s: float
    latency_p50_s: float
    latency_p90_s: float
    latency_p95_s: float
    latency_p99_s: float
    latency_max_s: float


#: fine latency buckets: a latency of ``us`` microseconds falls in bucket
#: ``int(log2(us) * LATENCY_BUCKETS_PER_OCTAVE)`` (everything up to 1 µs in bucket 0), as in
#: HdrHistogram's log buckets. Reporting a bucket's upper edge never under-reports, and over-reports
#: by at most :data:`LATENCY_BUCKET_ERROR` of the value.
LATENCY_BUCKETS_PER_OCTAVE = 16
#: relative width of one bucket, 2 ** (1/16) - 1: about 4.4 %
LATENCY_BUCKET_ERROR = 2.0 ** (1.0 / LATENCY_BUCKETS_PER_OCTAVE) - 1.0


def latency_bucket(latency_s: float) -> int:
    """Index of the log bucket that holds ``latency_s`` (see :data:`LATENCY_BUCKETS_PER_OCTAVE`)."""
    us = latency_s * 1e6
    if us <= 1.0:
        return 0
    return int(math.log2(us) * LATENCY_BUCKETS_PER_OCTAVE)


def latency_bucket_upper_s(index: int) -> float:
    """Upper edge of bucket ``index`` in seconds: every latency in it is below this."""
    return 2.0 ** ((index + 1) / LATENCY_BUCKETS_PER_OCTAVE) / 1e6


def percentile_edge_s(index: int, max_s: float | None = None) -> float:
    """What a percentile that falls in bucket ``index`` reports: the bucket's upper edge, capped at
    ``max_s`` (the exact largest latency of the same requests) when that lies inside the bucket,
    so the top bucket's edge never reads above every latency seen. A ``max_s`` outside the bucket
    (none, or from other requests) leaves the edge."""
    edge = latency_bucket_upper_s(index)
    if max_s is not None and edge / (1.0 + LATENCY_BUCKET_ERROR) <= max_s * (1.0 + 1e-9) < edge:
        return float(max_s)
    return edge


def nearest_rank(q: float, n: int) -> int:
    """The 1-based rank of the ``q`` quantile (0..1) among ``n`` values: ``ceil(q * n)``, at least 1
    (nearest rank, as HdrHistogram does)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside 0..1")
    # round before ceil: q is often k/n itself (a rank asked back), and k/n*n lands a hair above k in
    # floating point (7/25*25 = 7.000000000000001), which would step one rank, one bucket, too far
    return max(1, math.ceil(round(q * n, 9)))


#: Locust request names whose "response time" is how long a mail session was held (dwell, IDLE),
#: not a latency: every latency percentile over a run leaves them out unless asked for by name
SESSION_HOLD_NAMES: tuple[str, ...] = ("hold",)


class LatencyBucket(NamedTuple):
    """How many requests of one (type, name) completed during one interval with a latency in one
    log bucket (:func:`latency_bucket`). Rows of one interval and name together are its latency
    histogram; merged over any window they give that window's percentiles
    (``loadkit.record.latency``).

    Made by the recording plugin every interval, beside the :class:`RequestInterval` of the same
    ``ts_unix_s``: from a generator's fine histogram (``source="fine"``, microsecond resolution) when
    it reports one, else from the delta of Locust's response-time dict (``source="locust"``): Locust
    keeps milliseconds rounded to 2 significant digits, and each of its keys counts in the bucket of
    the upper edge of its rounding step.
    """

    ts_unix_s: float  #: end of the interval, as in RequestInterval
    interval_s: float
    request_type: str
    name: str
    bucket_index: int
    count_n: int
    source: str  #: "fine" or "locust"


class FailureInterval(NamedTuple):
    """Failures of one class for one (type, name) during one interval (``loadkit.record``)."""

    ts_unix_s: float
    interval_s: float
    request_type: str
    name: str
    failure_class: str
    failures_n: int


class GeneratorMetric(NamedTuple):
    """A generator-side counter or gauge sampled at the end of an interval.

    Counters (``kind="counter"``) are cumulative since the run started and summed over workers:
    ``dns.original_sent``, ``dns.retry_sent``, ``dns.answered``, ``dns.dropped``,
    ``imap.logins``. Gauges (``kind="gauge"``) are a current value summed over workers:
    ``imap.held_sessions``, ``pop3.held_sessions``, ``users``. Made by
    :mod:`loadkit.generate.metrics`, written by ``loadkit.record``.
    """

    ts_unix_s: float
    metric: str
    kind: str  #: "counter" or "gauge"
    value: float


# --------------------------------------------------------------------------------------------
# observe: collector samples (loadkit.observe)
# --------------------------------------------------------------------------------------------


class GroupSample(NamedTuple):
    """One process group (name/cmdline pattern or cgroup) at one instant (``observe``).

    Fields the kernel or permissions do not provide are 0 (a warning is logged once).
    """

    ts_unix_s: float
    host: str
    group: str
    procs_n: int
    rss_bytes: int
    uss_bytes: int
    pss_bytes: int
    cpu_percent: float  #: summed over the group's processes; 100 = one core
    fds_n: int
    tcp_established_n: int
    tcp_other_n: int  #: TCP connections in any other state
    sessions_n: int  #: established TCP connections on the group's given listening ports
    #: (client sessions on a proxy: ``--group p1=cgroup:PATH@PORT,PORT``); 0 when no port given
    cgroup_memory_bytes: int  #: memory.usage_in_bytes (v1) / memory.current (v2), 0 if none
    cgroup_limit_bytes: int  #: 0 if none or unlimited
    cgroup_failcnt_n: int  #: memory.failcnt (v1), memory.events max (v2)
    cgroup_oom_kills_n: int  #: memory.oom_control oom_kill (v1) / memory.events oom_kill (v2)


class NetSample(NamedTuple):
    """Host-wide network saturation counters at one instant (``observe``).

    Counters are cumulative as the kernel reports them (wrap-corrected); the ``*_delta`` columns
    of the Parquet table hold the per-interval increase of each counter.
    """

    ts_unix_s: float
    host: str
    udp_in_datagrams_n: int
    udp_in_errors_n: int
    udp_rcvbuf_errors_n: int  # RcvbufErrors is in /proc/net/snmp, not psutil
    udp_sndbuf_errors_n: int
    udp_no_ports_n: int
    udp6_in_datagrams_n: int
    udp6_in_errors_n: int
    udp6_rcvbuf_errors_n: int
    tcp_listen_overflows_n: int  #: TcpExt ListenOverflows, /proc/net/netstat
    tcp_listen_drops_n: int
    tcp_backlog_drops_n: int
    sockets_used_n: int  #: /proc/net/sockstat
    udp_mem_pages: int
    conntrack_count_n: int  #: 0 with conntrack_max_n 0 when the module is absent
    conntrack_max_n: int
    softnet_dropped_n: int


class SocketSample(NamedTuple):
    """One watched UDP socket (by local port) from ``/proc/net/udp``/``udp6`` (``observe``)."""

    ts_unix_s: float
    host: str
    local_port: int
    rx_queue_bytes: int
    tx_queue_bytes: int
    drops_n: int  #: cumulative per-socket drops (the ``drops`` column)
    #: bound address ("0.0.0.0", "127.0.0.1", "::"); sockets sharing address and port (several
    #: threads with SO_REUSEPORT) are one row each, told apart by ``inode``
    local_address: str = ""
    inode: int = 0  #: the socket's inode (0 in records made before sockets had one row each)
    #: the kernel's sk_rcvbuf (``ss -m`` ``rb``) via netlink sock_diag; 0 when unavailable
    rcvbuf_bytes: int = 0
    #: when ``drops_n`` was read (the middle of the read: sock_diag, about a millisecond, else
    #: ``/proc/net/udp``, which can take half a second on a busy host); a burst's drops are told
    #: from the next one's by it
    read_unix_s: float = 0.0


class SystemSample(NamedTuple):
    """Host memory and CPU at one instant (``observe``, via psutil)."""

    ts_unix_s: float
    host: str
    mem_available_bytes: int
    mem_total_bytes: int
    swap_used_bytes: int
    load1: float
    cpu_percent: float  #: whole host, 100 * cores at most


class FirewallSample(NamedTuple):
    """A stateful firewall's session table at one instant (``observe``, from nftables; see
    ``loadkit.observe.firewall``). One row per firewall table per sample."""

    ts_unix_s: float
    host: str
    firewall: str  #: "FAMILY TABLE", e.g. "ip loadkit_fw_127_0_0_1_1143"
    entries_n: int  #: sessions in the table now
    size_n: int  #: the table's size; a new flow that finds it full is dropped
    drops_n: int  #: new flows dropped because the table was full (cumulative)
    timeout_s: float  #: per-entry timeout after a flow's last packet


class Event(NamedTuple):
    """Something that happened at one instant: a process appeared, exited, was OOM-killed, a
    run aborted, a worker was lost, a gate was evaluated. One JSON line in ``events.jsonl``.
    """

    ts_unix_s: float
    kind: str  #: e.g. "process_started", "process_exited", "oom_kill", "abort", "worker_lost", "gate"
    source: str  #: group, host or component the event is about
    detail: dict


#: event kinds used across stages
EVENT_KINDS: tuple[str, ...] = (
    "process_started",
    "process_exited",
    "process_restarted",
    "oom_kill",
    "run_started",
    "run_ended",
    "abort",
    "worker_lost",
    "gate",
    "warning",
    "phase",  # a load phase began: detail {"phase": "trigger_start" | "trigger_end" | ...}
    "burst",  # a DNS burst left one process: detail {"burst_index", "first_sent_unix_s", "window_s", "sent_n", ...}
)


# --------------------------------------------------------------------------------------------
# record: run directory layout
# --------------------------------------------------------------------------------------------

#: name -> path inside a run directory. Tables are directories of Parquet part files
#: (``part-000001.parquet``...), read together by DuckDB/pyarrow as one table.
RUN_LAYOUT: dict[str, str] = {
    "manifest": "manifest.json",  # RunManifest as JSON
    "requests": "requests",  # RequestInterval
    "failures": "failures",  # FailureInterval
    "latency": "latency",  # LatencyBucket
    "generator": "generator",  # GeneratorMetric
    "groups": "samples/groups",  # GroupSample
    "net": "samples/net",  # NetSample (+ *_delta columns)
    "sockets": "samples/sockets",  # SocketSample
    "system": "samples/system",  # SystemSample
    "firewall": "samples/firewall",  # FirewallSample
    "events": "events.jsonl",  # Event, one JSON object a line
    "locust": "locust",  # Locust's own --csv and --html output
}


#: table name -> the record type of its rows (tables may add columns, e.g. the ``*_delta``
#: counters of ``net``); the writer and the reader of run directories both go by this
TABLE_RECORDS: dict[str, type] = {
    "requests": RequestInterval,
    "failures": FailureInterval,
    "latency": LatencyBucket,
    "generator": GeneratorMetric,
    "groups": GroupSample,
    "net": NetSample,
    "sockets": SocketSample,
    "system": SystemSample,
    "firewall": FirewallSample,
}


class RunManifest(NamedTuple):
    """What a run was: written at start, rewritten at the end (``loadkit.record``)."""

    run_id: str
    scenario: str
    release: str
    status: str  #: "running", "completed", "aborted", "failed", "interrupted"
    started_unix_s: float
    ended_unix_s: float  #: 0.0 while running
    profile: dict  #: the validated profile (never credentials)
    targets: list  #: ["udp://127.0.0.1:5353", ...] as resolved and allowed
    versions: dict  #: {"loadkit": ..., "locust": ..., "python": ..., "kernel": ...}
    host: dict  #: {"hostname": ..., "cpus": ..., "mem_total_bytes": ...}
    lab: dict  #: the lab's status at start when the target is the lab, else {}
    gates: list  #: gate results, [{"name", "passed", "value", "limit"}]
