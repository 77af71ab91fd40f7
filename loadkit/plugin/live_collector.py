"""The Locust-facing side of the collector: the target's saturation on the load's clock.

:func:`attach_collector` gives a Locust environment a :class:`LiveCollector` that, every
``interval_s``,

- samples this host with a local :class:`loadkit.observe.collector.Collector` (when ``groups``
  or ``udp_ports`` are given); the sampling itself runs in gevent's native thread pool so that
  reading ``/proc`` never stalls the load's greenlets for the length of a sample; and/or
- pulls ``/snapshot`` from each remote collector URL (``loadkit collect --listen`` on a target
  host) with a short timeout, a cursor so each event arrives once, and no duplicate rows when
  the remote has not sampled since the last pull;

then hands every record to ``sink`` in the hub's thread (greenlet-safe, no locking needed), keeps
the latest values for a one-line summary in Locust's headless status output (every 2 s, like
Locust's own table) and, with the web UI, a "Target" tab and ``/loadkit/collector`` (JSON).

``sink`` is called once per record: ``sink(GroupSample)``, ``sink(SystemSample)``,
``sink(Event)``, and ``sink(row, table="net")`` / ``sink(row, table="sockets")`` for the rows
that carry ``*_delta`` columns (dicts laid out as the collector's Parquet tables). ``on_sample``,
if given, gets each whole :class:`~loadkit.observe.collector.Sample` instead.

loadkit.observe imports nothing from Locust; this module is where the two meet.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable, Mapping, Sequence

import gevent

from loadkit.errors import CollectorError, TargetError
from loadkit.observe.collector import Collector, CollectorConfig, Sample
from loadkit.observe.degrade import WarnOnce
from loadkit.profile.groupspec import GroupSpec, parse_groups
from loadkit.profile.targets import check_target, split_host_port
from loadkit.schema import Event

log = logging.getLogger(__name__)
#: Locust prints its headless stats table through this logger: the summary line goes with it
stats_logger = logging.getLogger("locust.stats_logger")

#: the port ``loadkit collect --listen`` is usually given
DEFAULT_COLLECTOR_PORT = 9108
#: the headless summary line is printed as often as Locust prints its table
STATUS_INTERVAL_S = 2.0
_ENV_ATTR = "loadkit_live_collector"
_TAB_KEY = "loadkit-target"

Sink = Callable[..., None]


def _snapshot_url(url: str, allowlist: Sequence[str] | str | None) -> str:
    """Validate a collector URL (scheme, host in the allowlist) and return its base."""
    if "://" in url and not url.startswith("http://"):
        raise CollectorError(f"collector URL {url!r}: only http:// is supported (e.g. http://192.0.2.5:9108)")
    try:
        host, port = split_host_port(url.removeprefix("http://").split("/", 1)[0], DEFAULT_COLLECTOR_PORT)
        target = check_target(f"{host}:{port}", DEFAULT_COLLECTOR_PORT, allowlist)
    except TargetError as err:
        raise CollectorError(f"collector URL {url!r}: {err}") from err
    addr = f"[{target.address}]" if ":" in target.address else target.address
    return f"http://{addr}:{target.port}"


class _Remote:
    def __init__(self, url: str, base: str) -> None:
        self.url = url
        self.base = base
        self.cursor = 0
        self.last_ts = 0.0
        self.failures_n = 0


def _group_memory_rows(host: str, g: Any) -> list[dict[str, Any]]:
    """A group's memory for the Target tab: its cgroup's charge, limit and OOM kills when it is
    in a memory cgroup, else its summed RSS (a group without a cgroup has no cgroup figures)."""
    if not (g.cgroup_memory_bytes or g.cgroup_limit_bytes):
        return [{"host": host, "what": f"{g.group} RSS MiB", "value": round(g.rss_bytes / 2**20, 1)}]
    rows = [{"host": host, "what": f"{g.group} cgroup memory MiB", "value": round(g.cgroup_memory_bytes / 2**20, 1)}]
    if g.cgroup_limit_bytes:
        rows.append({"host": host, "what": f"{g.group} cgroup limit MiB", "value": round(g.cgroup_limit_bytes / 2**20, 1)})
    rows.append({"host": host, "what": f"{g.group} OOM kills", "value": g.cgroup_oom_kills_n})
    return rows


class LiveCollector:
    """Local and remote collectors feeding one Locust environment (see :func:`attach_collector`)."""

    def __init__(
        self,
        environment: Any,
        groups: Sequence[GroupSpec] = (),
        udp_ports: Sequence[int] = (),
        urls: Sequence[str] = (),
        interval_s: float = 1.0,
        sink: Sink | None = None,
        on_sample: Callable[[Sample], None] | None = None,
        timeout_s: float = 2.0,
        allowlist: Sequence[str] | str | None = None,
        collector_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.environment = environment
        self.interval_s = float(interval_s)
        self.sink = sink
        self.on_sample = on_sample
        self.timeout_s = timeout_s
        self.warn = WarnOnce("collector")
        self.local: Collector | None = None
        if groups or udp_ports:
            config = CollectorConfig(
                groups=list(groups),
                udp_ports=list(udp_ports),
                interval_s=self.interval_s,
                **dict(collector_config or {}),
            )
            self.local = Collector(config)  # validates: CollectorError on bad settings
        elif not urls:
            raise CollectorError("attach_collector needs groups, udp_ports or collector URLs")
        self.remotes = [_Remote(u, _snapshot_url(u, allowlist)) for u in urls]
        #: source ("local" or the URL) -> its latest sample
        self.latest: dict[str, Sample] = {}
        self._greenlets: list[gevent.Greenlet] = []
        self._stopped = False
        self.samples_n = 0

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> "LiveCollector":
        if self.local is not None:
            self._greenlets.append(gevent.spawn(self._loop, self._sample_local))
        for remote in self.remotes:
            self._greenlets.append(gevent.spawn(self._loop, lambda r=remote: self._pull(r)))
        parsed = getattr(self.environment, "parsed_options", None)
        headless = getattr(parsed, "headless", False) or getattr(self.environment, "web_ui", None) is None
        if headless and not getattr(parsed, "only_summary", False):
            self._greenlets.append(gevent.spawn(self._status_loop))
        return self

    def stop(self) -> None:
        """Stop sampling and pulling; one last local sample is taken so the end is on record."""
        if self._stopped:
            return
        self._stopped = True
        for g in self._greenlets:
            g.kill(block=True, timeout=5)
        if self.local is not None:
            try:
                self._sample_local()
            finally:
                self.local.close()

    def _loop(self, step: Callable[[], None]) -> None:
        next_t = time.perf_counter()
        while not self._stopped:
            try:
                step()
            except Exception:  # keep sampling: one bad tick is logged, not fatal
                log.exception("collector tick failed")
            next_t += self.interval_s
            now = time.perf_counter()
            if now > next_t:  # overran: skip missed ticks rather than bunching samples
                next_t = now + self.interval_s - (now - next_t) % self.interval_s
            gevent.sleep(max(0.0, next_t - now))

    # -- sources --------------------------------------------------------------------------------

    def _sample_local(self) -> None:
        assert self.local is not None
        # /proc reads in a native thread: the load's greenlets keep running meanwhile
        sample = gevent.get_hub().threadpool.apply(self.local.sample)
        self._deliver("local", sample)

    def _pull(self, remote: _Remote) -> None:
        url = f"{remote.base}/snapshot?cursor={remote.cursor}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
                doc = json.loads(resp.read())
        except (OSError, urllib.error.URLError, ValueError) as err:
            remote.failures_n += 1
            if self.warn.warn(f"unreachable:{remote.url}", f"collector {remote.url} unreachable ({err}); retrying every interval"):
                self._emit_events(self.warn.take())
            return
        if doc.get("cursor", 0) < remote.cursor:  # the remote collector restarted
            remote.cursor = 0
        else:
            remote.cursor = int(doc.get("cursor", remote.cursor))
        events = doc.get("events", [])
        body = doc.get("sample")
        if body is None or float(body["ts_unix_s"]) <= remote.last_ts:
            self._emit_events([Event(e["ts_unix_s"], e["kind"], e["source"], e.get("detail", {})) for e in events])
            return
        remote.last_ts = float(body["ts_unix_s"])
        self._deliver(remote.url, Sample.from_json(body, events))

    # -- delivery -------------------------------------------------------------------------------

    def _deliver(self, source: str, sample: Sample) -> None:
        self.latest[source] = sample
        self.samples_n += 1
        if self.on_sample is not None:
            self.on_sample(sample)
        if self.sink is None:
            return
        rows = sample.rows()
        for g in sample.groups:
            self.sink(g)
        self.sink(sample.system)
        for row in rows["net"]:
            self.sink(row, table="net")
        for row in rows["sockets"]:
            self.sink(row, table="sockets")
        for row in rows.get("firewall", []):
            self.sink(row, table="firewall")
        self._emit_events(sample.events)

    def _emit_events(self, events: Iterable[Event]) -> None:
        for event in events:
            if event.kind == "oom_kill":
                log.warning("OOM kill in %s: %s", event.source, event.detail)
            if self.sink is not None:
                self.sink(event)

    # -- display --------------------------------------------------------------------------------

    def status_line(self) -> str:
        """One line: the figures that tell whether the target is saturating."""
        parts = []
        for source, s in self.latest.items():
            host = s.host if source == "local" else f"{s.host}"
            bits = [
                f"rcvbuf_err +{s.net_delta.get('udp_rcvbuf_errors_n', 0)}",
                f"listen_ovf +{s.net_delta.get('tcp_listen_overflows_n', 0)}",
                f"mem_avail {s.system.mem_available_bytes / 2**20:.0f}MiB",
            ]
            for g in s.groups:
                mem = (
                    f"{g.cgroup_memory_bytes / 2**20:.0f}/{g.cgroup_limit_bytes / 2**20:.0f}MiB"
                    if g.cgroup_limit_bytes
                    else f"rss {g.rss_bytes / 2**20:.0f}MiB"
                )
                oom = f" oom {g.cgroup_oom_kills_n}" if g.cgroup_oom_kills_n else ""
                sess = f" sess {g.sessions_n}" if g.sessions_n else ""
                bits.append(f"{g.group} {g.procs_n}p {mem}{sess}{oom}")
            for sock in s.sockets:
                drops = s.socket_drops_delta.get((sock.local_address, sock.local_port), 0)
                bits.append(f"udp {sock.local_address}:{sock.local_port} q {sock.rx_queue_bytes}B drops +{drops}")
            parts.append(f"[{host}] " + ", ".join(bits))
        return "target: " + (" | ".join(parts) if parts else "no collector sample yet")

    def table_rows(self) -> list[dict[str, Any]]:
        """Rows for the web UI's "Target" tab: one per host and group/socket."""
        rows = []
        for s in self.latest.values():
            rows.append({"host": s.host, "what": "udp rcvbuf errors /interval", "value": s.net_delta.get("udp_rcvbuf_errors_n", 0)})
            rows.append({"host": s.host, "what": "tcp listen overflows /interval", "value": s.net_delta.get("tcp_listen_overflows_n", 0)})
            rows.append({"host": s.host, "what": "memory available MiB", "value": round(s.system.mem_available_bytes / 2**20)})
            for g in s.groups:
                rows.append({"host": s.host, "what": f"{g.group} processes", "value": g.procs_n})
                rows += _group_memory_rows(s.host, g)
                rows.append({"host": s.host, "what": f"{g.group} sessions", "value": g.sessions_n})
            for sock in s.sockets:
                key = (sock.local_address, sock.local_port)
                what = f"udp {sock.local_address}:{sock.local_port} drops /interval"
                rows.append({"host": s.host, "what": what, "value": s.socket_drops_delta.get(key, 0)})
        return rows

    def _status_loop(self) -> None:
        while not self._stopped:
            gevent.sleep(STATUS_INTERVAL_S)
            if self.latest:
                stats_logger.info(self.status_line())

    def add_web_ui(self, web_ui: Any) -> None:
        """A "Target" tab (table of the latest figures) and ``/loadkit/collector`` (JSON)."""
        from flask import jsonify, request
        from werkzeug.routing import Rule

        app = web_ui.app

        def _loadkit_collector() -> Any:
            return jsonify({src: s.to_json() for src, s in self.latest.items()})

        def _extend_stats(response: Any) -> Any:
            if request.path != "/stats/requests" or not response.is_json:
                return response
            body = response.get_json()
            extended = [e for e in body.get("extended_stats") or [] if e.get("key") != _TAB_KEY]
            extended.append({"key": _TAB_KEY, "data": self.table_rows()})
            body["extended_stats"] = extended
            response.set_data(json.dumps(body))
            return response

        # Flask refuses @app.route once the app has served a request (the UI may already be
        # open when a run starts), so the rule and the hook are registered directly
        if "loadkit_collector" not in app.view_functions:
            app.url_map.add(Rule("/loadkit/collector", endpoint="loadkit_collector", methods=["GET"]))
        app.view_functions["loadkit_collector"] = _loadkit_collector
        hooks = app.after_request_funcs.setdefault(None, [])
        hooks[:] = [h for h in hooks if getattr(h, "__name__", "") != "_extend_stats"]
        hooks.append(_extend_stats)

        args = web_ui.template_args
        args["extended_tabs"] = [t for t in args.get("extended_tabs") or [] if t.get("key") != _TAB_KEY] + [
            {"title": "Target", "key": _TAB_KEY}
        ]
        args["extended_tables"] = [t for t in args.get("extended_tables") or [] if t.get("key") != _TAB_KEY] + [
            {
                "key": _TAB_KEY,
                "structure": [
                    {"key": "host", "title": "Host"},
                    {"key": "what", "title": "Figure"},
                    {"key": "value", "title": "Value"},
                ],
            }
        ]


def attach_collector(
    environment: Any,
    groups: Mapping[str, str] | Iterable[str | GroupSpec] | None = None,
    udp_ports: Sequence[int] = (),
    urls: Sequence[str] = (),
    interval_s: float = 1.0,
    sink: Sink | None = None,
    on_sample: Callable[[Sample], None] | None = None,
    timeout_s: float = 2.0,
    allowlist: Sequence[str] | str | None = None,
    start: bool = True,
    **collector_config: Any,
) -> LiveCollector:
    """Attach a collector to a Locust environment and start it (see the module docstring).

    ``groups``: ``{"proxies": "dovecot", "p1": "cgroup:/loadkit/p1@11243"}`` or
    ``["proxies=dovecot", ...]``; ``udp_ports``: local UDP ports to watch; ``urls``: remote
    ``loadkit collect --listen`` endpoints (``http://host:9108``), each checked against the
    allowlist; extra keyword arguments go to :class:`CollectorConfig` (``full_memory_interval_s``,
    ``out_dir``...). Stops with Locust's ``quitting`` event. Raises :class:`CollectorError` on a
    bad group, port, interval or URL.
    """
    live = LiveCollector(
        environment,
        groups=parse_groups(groups),
        udp_ports=list(udp_ports),
        urls=list(urls),
        interval_s=interval_s,
        sink=sink,
        on_sample=on_sample,
        timeout_s=timeout_s,
        allowlist=allowlist,
        collector_config=collector_config,
    )
    setattr(environment, _ENV_ATTR, live)
    if getattr(environment, "web_ui", None) is not None:
        try:
            live.add_web_ui(environment.web_ui)
        except Exception as err:  # the web tab is a nicety; the record is what matters
            log.warning("collector tab not added to the web UI: %s", err)
    events = getattr(environment, "events", None)
    if events is not None:
        events.quitting.add_listener(lambda **_kw: live.stop())
    if start:
        live.start()
    return live


def live_collector_of(environment: Any) -> LiveCollector | None:
    """The :class:`LiveCollector` attached to ``environment``, if any."""
    return getattr(environment, _ENV_ATTR, None)
