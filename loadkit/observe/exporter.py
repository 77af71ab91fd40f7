"""HTTP endpoints of a running collector: Prometheus exposition and a JSON snapshot.

- ``GET /metrics``: the latest sample through ``prometheus_client`` (a custom collector,
  :class:`SampleMetrics`, yields metric families; the text or OpenMetrics format is chosen from
  the scraper's ``Accept`` header, as ``prometheus_client``'s own handler does). Names are
  node_exporter's where node_exporter has the figure (``node_netstat_Udp_RcvbufErrors``,
  ``node_netstat_TcpExt_ListenOverflows``, ``node_sockstat_UDP_mem``,
  ``node_nf_conntrack_entries``, ``node_memory_MemAvailable_bytes``, ``node_load1``...) so
  existing dashboards and alerts apply, and ``loadkit_`` names otherwise
  (``loadkit_group_cgroup_memory_bytes{group="proxy1"}``). Units are in the names (``_bytes``,
  ``_seconds``), counters end in ``_total``, CPU is a ``_seconds_total`` counter (``rate()`` of
  it is cores busy), and no figure is a percentage.
- ``GET /snapshot?cursor=N``: JSON with the latest sample (records as in the run directory, with
  ``*_delta`` columns), the events after cursor ``N`` and the next cursor. A load run on another
  host pulls this every interval (``loadkit.plugin.live_collector``), so the target's samples
  land in the run record on the load's timeline.

The server binds to the address it is given (loopback by default) and only reads the
collector's last sample: a scrape never triggers sampling work. With a web configuration
(:mod:`loadkit.observe.webconfig`) it serves HTTPS and asks for basic authentication on every
path. ``GET /snapshot?members=1`` adds each group's member processes with their command lines,
and every string the snapshot serves passes :func:`redact` first, so a password given on a
command line (``--password X``, ``password=X``, ``mysql -pX``, ``scheme://user:X@``) does not
leave the host.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, urlparse

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.exposition import choose_encoder, generate_latest

from loadkit.errors import CollectorError

from .collector import Collector, Sample
from .webconfig import BasicAuth, WebConfig

log = logging.getLogger("loadkit.observe")

DEFAULT_LISTEN = ("127.0.0.1", 9108)

#: metric kind -> prometheus_client family (node_exporter's netstat counters are untyped)
_FAMILIES = {"untyped": UnknownMetricFamily, "gauge": GaugeMetricFamily, "counter": CounterMetricFamily}


def _netstat(protocol: str, name: str) -> tuple[str, str, str]:
    """A ``/proc/net/snmp``/``netstat`` counter as node_exporter's netstat collector names it:
    ``node_netstat_<Protocol>_<Name>``, untyped, help ``Statistic <Protocol><Name>.``."""
    return f"node_netstat_{protocol}_{name}", "untyped", f"Statistic {protocol}{name}."


# NetSample field -> (metric name, type, help); node_exporter's netstat/sockstat/conntrack
# collectors export these as untyped/gauge with exactly these names
_NET_METRICS: dict[str, tuple[str, str, str]] = {
    "udp_in_datagrams_n": _netstat("Udp", "InDatagrams"),
    "udp_in_errors_n": _netstat("Udp", "InErrors"),
    "udp_rcvbuf_errors_n": _netstat("Udp", "RcvbufErrors"),
    "udp_sndbuf_errors_n": _netstat("Udp", "SndbufErrors"),
    "udp_no_ports_n": _netstat("Udp", "NoPorts"),
    "udp6_in_datagrams_n": _netstat("Udp6", "InDatagrams"),
    "udp6_in_errors_n": _netstat("Udp6", "InErrors"),
    "udp6_rcvbuf_errors_n": _netstat("Udp6", "RcvbufErrors"),
    "tcp_listen_overflows_n": _netstat("TcpExt", "ListenOverflows"),
    "tcp_listen_drops_n": _netstat("TcpExt", "ListenDrops"),
    "tcp_backlog_drops_n": _netstat("TcpExt", "TCPBacklogDrop"),
    "sockets_used_n": ("node_sockstat_sockets_used", "gauge", "Number of IPv4 sockets in use."),
    "udp_mem_pages": ("node_sockstat_UDP_mem", "gauge", "Number of UDP sockets in state mem."),
    "conntrack_count_n": ("node_nf_conntrack_entries", "gauge", "Number of currently allocated flow entries for connection tracking."),
    "conntrack_max_n": ("node_nf_conntrack_entries_limit", "gauge", "Maximum size of connection tracking table."),
    "softnet_dropped_n": ("loadkit_softnet_dropped_total", "counter", "Packets dropped because a CPU's input backlog was full, all CPUs."),
}

_SYSTEM_METRICS: dict[str, tuple[str, str, str]] = {
    "mem_available_bytes": ("node_memory_MemAvailable_bytes", "gauge", "Memory information field MemAvailable_bytes."),
    "mem_total_bytes": ("node_memory_MemTotal_bytes", "gauge", "Memory information field MemTotal_bytes."),
    "swap_used_bytes": ("loadkit_swap_used_bytes", "gauge", "SwapTotal - SwapFree."),
    "load1": ("node_load1", "gauge", "1m load average."),
}

_GROUP_METRICS: dict[str, tuple[str, str, str]] = {
    "procs_n": ("loadkit_group_processes", "gauge", "Processes in the group."),
    "rss_bytes": ("loadkit_group_rss_bytes", "gauge", "Summed RSS (overstates memory when pages are shared)."),
    "uss_bytes": ("loadkit_group_uss_bytes", "gauge", "Summed USS (refreshed every full-memory interval)."),
    "pss_bytes": ("loadkit_group_pss_bytes", "gauge", "Summed PSS (refreshed every full-memory interval)."),
    "fds_n": ("loadkit_group_open_fds", "gauge", "Open file descriptors."),
    "tcp_established_n": ("loadkit_group_tcp_established", "gauge", "Established TCP connections of the group."),
    "tcp_other_n": ("loadkit_group_tcp_other", "gauge", "TCP sockets of the group in any other state."),
    "sessions_n": ("loadkit_group_sessions", "gauge", "Established connections on the group's listening ports."),
    "cgroup_memory_bytes": ("loadkit_group_cgroup_memory_bytes", "gauge", "Memory charged to the group's cgroup."),
    "cgroup_limit_bytes": ("loadkit_group_cgroup_limit_bytes", "gauge", "Memory limit of the group's cgroup (0 = none)."),
    "cgroup_failcnt_n": ("loadkit_group_cgroup_failcnt_total", "counter", "Times the cgroup hit its memory limit."),
    "cgroup_oom_kills_n": ("loadkit_group_cgroup_oom_kills_total", "counter", "Processes OOM-killed in the cgroup."),
}

_SOCKET_METRICS: dict[str, tuple[str, str, str]] = {
    "rx_queue_bytes": ("loadkit_udp_socket_rx_queue_bytes", "gauge", "Receive-buffer memory in use by the UDP socket."),
    "tx_queue_bytes": ("loadkit_udp_socket_tx_queue_bytes", "gauge", "Send-buffer memory in use by the UDP socket."),
    "rcvbuf_bytes": ("loadkit_udp_socket_rcvbuf_bytes", "gauge", "The UDP socket's receive buffer size (sk_rcvbuf; 0 = unknown)."),
    "drops_n": ("loadkit_udp_socket_drops_total", "counter", "Datagrams the UDP socket dropped (receive buffer full)."),
}

# a firewall's session table is exported beside the host's conntrack table, not inside its
# node_exporter family: sum(node_nf_conntrack_entries) stays the host's figure
_FIREWALL_METRICS: dict[str, tuple[str, str, str]] = {
    "entries_n": ("loadkit_firewall_entries", "gauge", "Sessions in the firewall's session table now."),
    "size_n": ("loadkit_firewall_entries_limit", "gauge",
               "Size of the firewall's session table; a new flow that finds it full is dropped."),
    "drops_n": ("loadkit_firewall_new_flow_drops_total", "counter",
                "New flows a firewall dropped because its session table was full."),
    "timeout_s": ("loadkit_firewall_timeout_seconds", "gauge", "Per-entry timeout of the firewall's session table."),
}

HOST_CPU_METRIC = ("loadkit_host_cpu_busy_seconds_total", "counter",
                   "CPU time the host spent neither idle nor in iowait, summed over cores, since the exporter started.")
GROUP_CPU_METRIC = ("loadkit_group_cpu_seconds_total", "counter",
                    "User + system CPU time of the group's processes, since the exporter started.")

Rows = list[tuple[dict[str, Any], Any]]


def _family(name: str, kind: str, help_: str, rows: Rows) -> Metric | None:
    """One metric family from ``(labels, value)`` rows (None when there are no rows: a family
    with no samples tells a scraper nothing). Every row of a family has the same label names."""
    if not rows:
        return None
    fam = _FAMILIES[kind](name, help_, labels=list(rows[0][0]))
    for labels, value in rows:
        fam.add_metric([str(v) for v in labels.values()], float(value))
    return fam


class CpuSeconds:
    """CPU time as counters, from the samples' per-interval CPU use.

    A sample carries CPU as a rate over its interval (``cpu_percent``, host and per group); the
    rate times the time since the previous sample is the CPU time used in between, and their sum
    is a counter Prometheus can ``rate()`` at any window (a gauge of the last interval's percent
    hides every spike between two scrapes). Starts at 0 with the first sample it sees.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prev_ts_unix_s: float | None = None
        self.host_s = 0.0
        self.groups_s: dict[str, float] = {}

    def add(self, sample: Sample) -> None:
        with self._lock:
            prev, self._prev_ts_unix_s = self._prev_ts_unix_s, sample.ts_unix_s
            dt_s = sample.ts_unix_s - prev if prev is not None else 0.0
            dt_s = dt_s if dt_s > 0 else 0.0  # a clock step back adds nothing rather than subtracting
            self.host_s += sample.system.cpu_percent / 100.0 * dt_s
            for g in sample.groups:
                self.groups_s[g.group] = self.groups_s.get(g.group, 0.0) + g.cpu_percent / 100.0 * dt_s

    def values(self) -> tuple[float, dict[str, float]]:
        with self._lock:
            return self.host_s, dict(self.groups_s)


def sample_families(sample: Sample | None, collector: Collector | None = None,
                    cpu: CpuSeconds | None = None) -> Iterator[Metric]:
    """The metric families of one sample (and the collector's own counters)."""
    fams: list[Metric | None] = []
    if sample is not None:
        fams += [_family(*meta, [({}, getattr(sample.net, f))]) for f, meta in _NET_METRICS.items()]
        fams += [_family(*meta, [({}, getattr(sample.system, f))]) for f, meta in _SYSTEM_METRICS.items()]
        fams += [_family(*meta, [({"group": g.group}, getattr(g, f)) for g in sample.groups])
                 for f, meta in _GROUP_METRICS.items()]
        # sockets sharing an address and port (SO_REUSEPORT, one per server thread) are one
        # row each: the inode tells them apart, else their series would collide
        fams += [_family(*meta, [({"address": s.local_address, "port": s.local_port, "inode": s.inode}, getattr(s, f))
                                 for s in sample.sockets])
                 for f, meta in _SOCKET_METRICS.items()]
        fams += [_family(*meta, [({"firewall": fw.firewall}, getattr(fw, f)) for fw in sample.firewall])
                 for f, meta in _FIREWALL_METRICS.items()]
        fams.append(_family("loadkit_collector_last_sample_timestamp_seconds", "gauge",
                            "When the last sample was taken.", [({}, sample.ts_unix_s)]))
        fams.append(_family("loadkit_collector_last_sample_duration_seconds", "gauge",
                            "Time the last sample took.", [({}, sample.sample_s)]))
    if cpu is not None:
        host_s, groups_s = cpu.values()
        fams.append(_family(*HOST_CPU_METRIC, [({}, host_s)]))
        fams.append(_family(*GROUP_CPU_METRIC, [({"group": g}, s) for g, s in sorted(groups_s.items())]))
    if collector is not None:
        fams.append(_family("loadkit_collector_samples_total", "counter", "Samples taken.", [({}, collector.samples_n)]))
        fams.append(_family("loadkit_collector_overruns_total", "counter",
                            "Ticks skipped because a sample overran its interval.", [({}, collector.overruns_n)]))
    return (f for f in fams if f is not None)


class SampleMetrics:
    """A ``prometheus_client`` custom collector: the families of a collector's latest sample."""

    def __init__(self, collector: Collector, cpu: CpuSeconds | None = None) -> None:
        self.collector = collector
        self.cpu = cpu

    def collect(self) -> Iterator[Metric]:
        return sample_families(self.collector.latest, self.collector, self.cpu)


class _OneSample:
    def __init__(self, sample: Sample | None, collector: Collector | None, cpu: CpuSeconds | None) -> None:
        self.args = (sample, collector, cpu)

    def collect(self) -> Iterator[Metric]:
        return sample_families(*self.args)


def exposition(sample: Sample | None, collector: Collector | None = None, cpu: CpuSeconds | None = None) -> str:
    """The Prometheus text format (version 0.0.4) for one sample."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_OneSample(sample, collector, cpu))
    return generate_latest(registry).decode()


#: flags whose next argument (or ``=value``) is a secret, in any program's command line
SECRET_FLAGS = frozenset({
    "--password", "--passwd", "--pass", "--secret", "--token", "--api-key", "--apikey",
    "--auth-token", "--access-token", "--client-secret", "--db-password", "--mail-password",
})
#: flags that are secrets only in some programs (``-p`` is a port for ssh, redis-cli, locust...):
#: program name -> (flag, value attached as in ``-pSECRET``)
_PROGRAM_SECRET_FLAGS = {
    "mysql": ("-p", True), "mysqldump": ("-p", True), "mysqladmin": ("-p", True), "mariadb": ("-p", True),
    "sshpass": ("-p", False), "redis-cli": ("-a", False),
}
#: ``password=X``, ``PGPASSWORD=X``, ``api_key:X``...: a key naming a secret, then its value
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b([\w.-]*(?:passw(?:or)?d|pass|secret|token|api[_-]?key|credentials?)[\w.-]*)([=:])(?!//)(\S+)")
#: ``scheme://user:SECRET@host``
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s/:@]*:)([^\s/@]+)(@)")
REDACTED = "***"


def redact(text: str) -> str:
    """A command line (or any text) with secrets replaced by ``***``: values after
    :data:`SECRET_FLAGS`, ``key=value`` where the key names a password, secret, token or API key,
    the password in a URL, and the few program-specific flags of ``_PROGRAM_SECRET_FLAGS``."""
    if not text:
        return text
    words = text.split(" ")
    program = os.path.basename(words[0]) if words else ""
    special = _PROGRAM_SECRET_FLAGS.get(program)
    out: list[str] = []
    hide_next = False
    for word in words:
        if hide_next and word:
            out.append(REDACTED)
            hide_next = False
            continue
        flag, eq, _value = word.partition("=")
        if flag.lower() in SECRET_FLAGS:
            if eq:
                word = f"{flag}={REDACTED}"
            else:
                hide_next = True
        elif special is not None and word.startswith(special[0]) and word != special[0] and special[1]:
            word, special = special[0] + REDACTED, None
        elif special is not None and word == special[0] and not special[1]:
            # once: what follows may be another program's options (`sshpass -p X ssh -p 2222`)
            hide_next, special = True, None
        out.append(word)
    text = " ".join(out)
    text = _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + m.group(3), text)
    return _SECRET_ASSIGNMENT.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)


def _redact_all(value: Any) -> Any:
    """Every string inside a JSON-able value through :func:`redact` (events carry messages and
    names that a future field may fill with a command line: redact them all, not field by field)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_all(v) for v in value]
    return value


def snapshot(collector: Collector, cursor: int = 0, members: bool = False) -> dict[str, Any]:
    """The ``/snapshot`` document: latest sample, events after ``cursor``, next cursor; with
    ``members`` each group's processes and their command lines. Secrets are redacted."""
    events, next_cursor = collector.events_since(cursor)
    latest = collector.latest
    doc = {
        "sample": latest.to_json() if latest is not None else None,
        "events": [e._asdict() for e in events],
        "cursor": next_cursor,
        "collector": {
            "host": collector.host,
            "interval_s": collector.config.interval_s,
            "samples_n": collector.samples_n,
            "overruns_n": collector.overruns_n,
            "warnings": sorted(collector.warn.keys),
        },
    }
    if members:
        doc["members"] = collector.groups.member_processes()
    return _redact_all(doc)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        auth = self.server.auth
        if auth is not None and not auth.check(self.headers.get("Authorization")):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="loadkit collector"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        url = urlparse(self.path)
        collector = self.server.collector
        if url.path == "/metrics":
            # text 0.0.4 unless the scraper asks for OpenMetrics (prometheus_client's own choice)
            encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, ctype, encoder(self.server.registry))
        elif url.path == "/snapshot":
            query = parse_qs(url.query)
            try:
                cursor = int(query.get("cursor", ["0"])[0])
            except ValueError:
                self._send(400, "text/plain", b"cursor must be an integer\n")
                return
            members = query.get("members", ["0"])[0] not in ("0", "", "false")
            body = json.dumps(snapshot(collector, cursor, members), default=str).encode()
            self._send(200, "application/json", body)
        elif url.path in ("/", "/healthz"):
            self._send(200, "text/plain", b"loadkit collector: /metrics (Prometheus), /snapshot?cursor=N (JSON)\n")
        else:
            self._send(404, "text/plain", b"not found: try /metrics or /snapshot\n")

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes every second: keep quiet
        log.debug("exporter: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    collector: Collector
    registry: CollectorRegistry
    auth: BasicAuth | None = None
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # the TLS handshake runs in the request's own thread, with a timeout: a client that
        # connects and says nothing must not hold up the accept loop
        if self.tls is not None:
            request.settimeout(10)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as err:
                log.debug("exporter: TLS handshake with %s failed: %s", client_address, err)
                return
        super().finish_request(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class Exporter:
    """Serves a collector's endpoints from a daemon thread. ``port=0`` picks a free port."""

    def __init__(self, collector: Collector, host: str = DEFAULT_LISTEN[0], port: int = DEFAULT_LISTEN[1],
                 web_config: WebConfig | None = None) -> None:
        self.collector = collector
        server_cls = _Server6 if ":" in host else _Server
        tls = web_config.ssl_context() if web_config is not None and web_config.tls else None
        try:
            self._server = server_cls((host, port), _Handler)
        except OSError as err:
            raise CollectorError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
        self._server.collector = collector
        #: CPU time counters, summed from every sample taken while this exporter exists
        self.cpu = CpuSeconds()
        collector.add_sink(self.cpu.add)
        self._server.registry = CollectorRegistry(auto_describe=False)
        self._server.registry.register(SampleMetrics(collector, self.cpu))
        self._server.tls = tls
        self._server.auth = BasicAuth(web_config.users) if web_config is not None and web_config.users else None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        scheme = "https" if self._server.tls is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def start(self) -> "Exporter":
        self._thread = threading.Thread(target=self._server.serve_forever, name="loadkit-exporter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9108"``, ``":9108"``, ``"[::1]:9108"`` -> ``(host, port)``."""
    s = text.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_s = s.rpartition(":")
    host = host or DEFAULT_LISTEN[0]
    try:
        port = int(port_s)
    except ValueError:
        raise CollectorError(f"listen address {text!r} is not HOST:PORT (e.g. 127.0.0.1:9108)") from None
    if not 0 <= port <= 65535:
        raise CollectorError(f"listen address {text!r}: port {port} is out of range 0-65535")
    return host, port
