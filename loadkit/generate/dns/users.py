"""Locust side of the DNS generator: custom arguments, one sender per process, a user class.

The load is open loop, so it is not made by users waiting for replies: each Locust process
(standalone, or each worker) runs one :class:`~.sender.DnsSender` from ``test_start`` to
``test_stop``, sending its share of the configured totals (worker ``index`` of ``count``; the
master tells workers how many there are when the test starts). :class:`DnsUser` only keeps a
user slot and, under ``run_single_user``, runs the sender itself for debugging. When a burst
has left, its real emission window becomes a ``burst`` event of the run record
(:mod:`loadkit.generate.event_channel`; from the sender's per-interval report, nothing per query).

A locustfile calls :func:`install` with its defaults; every option is a Locust custom argument
(``--dns-*``), so it shows in the web UI. Every option, the names file and the target are
checked in ``init`` before anything is sent: a bad value prints one line and locust exits 2.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import gevent
from locust import User, task
from locust.stats import CSV_STATS_INTERVAL_SEC
from locust.util.timespan import parse_timespan

from loadkit.defaults import DNS_PORT, DOT_PORT_OFFSET, LAB_ADDRESS, find_lab
from loadkit.errors import LoadkitError, ProfileError
from loadkit.generate.event_channel import events_for
from loadkit.generate.locust_compat import check_locust_version
from loadkit.generate.locust_stats import inject
from loadkit.generate.metrics import metrics_for
from loadkit.generate.shapes import KneeCriteria, KneeDetector, KneePoint
from loadkit.generate.wiring import (
    exit_on_user_error,
    note_target,
    piggyback,
    start_at_test_start,
    stop_at_test_stop,
    targets_noted,
    worker_share,
)
from loadkit.profile.targets import Target, target_spec, user_target

from . import schedule, wire
from .histogram import LatencyHistogram, fine_latency_for
from .query_files import load_queries
from .retry import PORT_POLICIES
from .sender import BurstWindow, DnsSender, IntervalReport, SenderOptions, source_addresses

log = logging.getLogger(__name__)

#: outstanding queries one socket may hold (IDs are 16 bits; keep clear of wrapping)
_IDS_PER_SOCKET = 30000


@dataclass
class DnsSettings:
    """Every option of the DNS locustfiles, with the defaults a locustfile passes to
    :func:`install`. Rates and burst sizes are totals over all workers."""

    host: str = ""
    """target ('': --target dns=..., else Locust's --host, else the lab's unbound)"""
    rate_qps: float = 2000.0
    """base query rate (0: bursts only)"""
    arrival: str = "constant"
    """base arrivals: constant (evenly spaced) or poisson"""
    burst_size_n: int = 2000
    """queries in each burst (0: no bursts)"""
    burst_ms: float = 10.0
    """time over which a burst's queries are spread (0: as fast as possible)"""
    burst_period_s: float = 5.0
    first_burst_s: float = 2.0
    burst_count: int = 0
    """bursts in all, then only the base rate goes on (0: bursts until the end)"""
    names_file: str = ""
    """names file: one DNS name per line, a dnsperf/resperf query file ('name qtype' per line) or a
    BIND/unbound query log ('' = the lab's names file)"""
    qtypes: str = "A:80,AAAA:20"
    nxdomain_share: float = 0.0
    """share of queries for names that do not exist (their NXDOMAIN counts as success)"""
    random_subdomain_share: float = 0.0
    """share of queries for a fresh random label under the zone (cache-busting)"""
    protocol: str = "udp"
    """udp, tcp or dot (DNS over TLS); tcp and dot clients (one per source address and port) each
    keep their own connection, close it when idle and reconnect for their next query"""
    idle_timeout_s: float = 20.0
    """tcp/dot: a client closes its connection after this long without queries (0: never)"""
    tls_resume: str = "on"
    """dot: on: a reconnect offers the last TLS session (resumed handshake); off: full handshakes"""
    edns_bytes: int = 1232
    """EDNS UDP payload size (0: no EDNS)"""
    timeout_s: float = 1.0
    """first attempt's timeout"""
    retries: int = 2
    """attempts after the first, like a stub resolver"""
    backoff: float = 2.0
    """each retry waits this many times longer than the previous attempt"""
    tcp_fallback: str = "on"
    """on: a truncated (TC) reply is asked again over TCP"""
    port_policy: str = "fixed"
    """source port of a retry: per-attempt (a fresh socket each retry, as stub resolvers that
    randomise ports: each retry is a new firewall session), per-query (the query's socket) or
    fixed (the sender's fixed sockets, round robin)"""
    retry_budget: float = 0.0
    """retries at most this many times the original queries over the budget window (0: no budget);
    a retry over budget is not sent (dns.retry_suppressed)"""
    retry_budget_window_s: float = 10.0
    """sliding window of the retry budget (s)"""
    sources: int = 1
    """distinct source addresses (each a home router / client)"""
    first_source: str = "127.1.0.1"
    source_qps: float = 0.0
    """when > 0: the base rate is this per source (sources x source_qps in total)"""
    ports_per_source: int = 0
    """sockets per source address (0: enough for the rate and timeouts)"""
    stats_interval_s: float = 0.5
    ramp_to_qps: float = 0.0
    """when > 0: the base rate ramps linearly from --dns-rate to this (resperf-like)"""
    ramp_s: float = 60.0
    knee_loss: float = 0.05
    """ramp stops when loss passes this ratio..."""
    knee_p99_ms: float = 100.0
    """...or the 99th percentile of answers passes this (ms), for two intervals in a row"""
    max_queries: int = 50_000_000
    """safety cap on original queries per process"""


#: command-line names that differ from ``--dns-<field with dashes>`` (units go in the help)
_FLAGS = {
    "rate_qps": "--dns-rate",
    "burst_size_n": "--dns-burst-size",
    "burst_period_s": "--dns-burst-period",
    "first_burst_s": "--dns-first-burst",
    "timeout_s": "--dns-timeout",
    "stats_interval_s": "--dns-stats-interval",
    "ramp_to_qps": "--dns-ramp-to",
    "ramp_s": "--dns-ramp-duration",
    "retry_budget_window_s": "--dns-retry-budget-window",
    "idle_timeout_s": "--dns-idle-timeout",
}


def _flag(field_name: str) -> str:
    """Command-line option of a :class:`DnsSettings` field."""
    return _FLAGS.get(field_name, "--dns-" + field_name.replace("_", "-"))


_HELP_SKIP = {"host"}
#: fields with a fixed set of values (a list in --help and the web UI)
_CHOICES = {"protocol": ["udp", "tcp", "dot"], "tls_resume": ["on", "off"], "arrival": ["constant", "poisson"], "tcp_fallback": ["on", "off"],
            "port_policy": list(PORT_POLICIES)}
#: field annotation -> option type (a locustfile may pass 2 where 2.0 is meant)
_TYPES = {"float": float, "int": int, "str": str}


def add_arguments(parser: Any, settings: DnsSettings) -> None:
    """Register every :class:`DnsSettings` field but ``host`` as a Locust custom argument."""
    # straight on the parser: Locust lists in the web UI only what its own add_argument saw
    # (an argument group's add_argument bypasses it)
    docs = _field_docs()
    for f in fields(DnsSettings):
        if f.name in _HELP_SKIP:
            continue
        default = getattr(settings, f.name)
        kwargs: dict[str, Any] = {"default": default, "help": docs.get(f.name, "")}
        if _TYPES[f.type] is not str:
            kwargs["type"] = _TYPES[f.type]
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        parser.add_argument(_flag(f.name), dest="dns_" + f.name, **kwargs)


def _field_docs() -> dict[str, str]:
    # the docstrings under the dataclass fields, as --help text
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(DnsSettings))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())  # type: ignore[union-attr]
    return docs


def settings_from_options(options: Any, base: DnsSettings, host: str | None) -> DnsSettings:
    """:class:`DnsSettings` from parsed Locust options (web UI values arrive as strings)."""
    values: dict[str, Any] = {}
    for f in fields(DnsSettings):
        if f.name == "host":
            continue
        raw = getattr(options, "dns_" + f.name, None) if options is not None else None
        if raw is None:
            continue
        kind = _TYPES[f.type]
        try:
            values[f.name] = kind(raw)
        except (TypeError, ValueError):
            what = "an integer" if kind is int else "a number"
            raise ProfileError(f"option {_flag(f.name)} {raw!r} is not {what}") from None
    s = replace(base, **values)
    if host:
        s = replace(s, host=host)
    return s


@dataclass
class DnsPlan:
    """Everything checked and built before the first packet."""

    settings: DnsSettings
    target: Target
    pool: wire.QueryPool
    base: Any
    bursts: schedule.BurstTrain | None
    sources: list[str]

    total_rate_qps: float
    """the base rate over all workers (a ramp's start)"""
    rate_from: str
    """where ``total_rate_qps`` comes from, for the log"""


def base_rate(s: DnsSettings, locustfile: DnsSettings | None = None) -> tuple[float, str]:
    """Total base rate and where it comes from. ``--dns-rate`` given on the command line (not
    the locustfile's default) wins; else sources x ``--dns-source-qps`` when that is > 0."""
    rate_given = locustfile is not None and s.rate_qps != locustfile.rate_qps
    if s.source_qps > 0 and not rate_given:
        return s.source_qps * s.sources, f"{s.sources} sources x {s.source_qps:g} q/s"
    return s.rate_qps, "--dns-rate"


def plan(settings: DnsSettings, locustfile: DnsSettings | None = None) -> DnsPlan:
    """Check every setting, the names file and the target; build pool and schedules. The one
    place DNS options are checked: the sender takes what this passes down.
    ``locustfile`` is the locustfile's defaults (to tell an explicit ``--dns-rate``).

    Raises a :class:`LoadkitError` with a one-line message on the first problem."""
    s = settings
    for name in ("rate_qps", "source_qps", "ramp_to_qps", "burst_ms", "first_burst_s", "retry_budget"):
        value = getattr(s, name)
        if not (value >= 0) or math.isinf(value):
            raise ProfileError(f"option {_flag(name)} {value:g} must be a number >= 0")
    for name in ("burst_size_n", "burst_count", "retries", "ports_per_source", "edns_bytes"):
        if getattr(s, name) < 0:
            raise ProfileError(f"option {_flag(name)} {getattr(s, name)} must be >= 0")
    if s.max_queries < 1:
        raise ProfileError(f"option {_flag('max_queries')} {s.max_queries} must be >= 1")
    if s.protocol not in ("udp", "tcp", "dot"):
        raise ProfileError(f"option --dns-protocol {s.protocol!r} must be udp, tcp or dot")
    if s.tls_resume not in ("on", "off"):
        raise ProfileError(f"option --dns-tls-resume {s.tls_resume!r} must be on or off")
    if not s.idle_timeout_s >= 0 or math.isinf(s.idle_timeout_s):
        raise ProfileError(f"option --dns-idle-timeout {s.idle_timeout_s:g} must be a number >= 0")
    if s.arrival not in ("constant", "poisson"):
        raise ProfileError(f"option --dns-arrival {s.arrival!r} must be constant or poisson")
    if s.tcp_fallback not in ("on", "off"):
        raise ProfileError(f"option --dns-tcp-fallback {s.tcp_fallback!r} must be on or off")
    if s.sources < 1 or s.sources > 60000:
        raise ProfileError(f"option --dns-sources {s.sources} must be between 1 and 60000")
    if not s.timeout_s > 0:
        raise ProfileError(f"option --dns-timeout {s.timeout_s:g} must be > 0")
    if not s.backoff >= 1:
        raise ProfileError(f"option --dns-backoff {s.backoff:g} must be >= 1")
    if not s.stats_interval_s > 0:
        raise ProfileError(f"option --dns-stats-interval {s.stats_interval_s:g} must be > 0")
    if s.port_policy not in PORT_POLICIES:
        raise ProfileError(f"option --dns-port-policy {s.port_policy!r} must be one of {', '.join(PORT_POLICIES)}")
    if not s.retry_budget_window_s > 0 or math.isinf(s.retry_budget_window_s):
        raise ProfileError(f"option --dns-retry-budget-window {s.retry_budget_window_s:g} must be > 0")
    mix = wire.parse_qtype_mix(s.qtypes)
    # '' is the lab (its DoT port for dot); its names file is found from the target
    found = user_target("dns", s.host or _lab_dot_spec(s.protocol), tls=s.protocol == "dot")
    target = found.target
    sources = source_addresses(s.sources, s.first_source)
    # a names file, a dnsperf query file or a BIND/unbound query log; a line's own qtype wins
    names = load_queries(found.file("names", s.names_file, "--dns-names-file"))
    pool = wire.QueryPool(
        names, mix, s.nxdomain_share, s.random_subdomain_share, edns_payload_bytes=s.edns_bytes
    )
    rate, rate_from = base_rate(s, locustfile)
    if s.ramp_to_qps > 0:
        base: Any = schedule.LinearRamp(rate, s.ramp_to_qps, s.ramp_s)
    elif s.arrival == "poisson":
        base = schedule.PoissonRate(rate)
    else:
        base = schedule.ConstantRate(rate)
    bursts = None
    if s.burst_size_n > 0:
        bursts = schedule.BurstTrain(s.burst_size_n, s.burst_ms / 1000.0, s.burst_period_s, s.first_burst_s,
                                     count=s.burst_count)
    return DnsPlan(s, target, pool, base, bursts, sources, rate, rate_from)


def _lab_dot_spec(protocol: str) -> str:
    """For dot without a target: the DoT endpoint of the lab that would be the DNS target."""
    if protocol != "dot":
        return ""
    lab = find_lab()
    address = lab.address if lab else LAB_ADDRESS
    port = lab.dot_port if lab else DNS_PORT + DOT_PORT_OFFSET
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def build_sender(p: DnsPlan, index: int = 0, count: int = 1, on_interval=None) -> DnsSender:
    """The sender for worker ``index`` of ``count``: its part of rates, bursts and sources."""
    s = p.settings
    mine = [src for j, src in enumerate(p.sources) if j % count == index] or [p.sources[index % len(p.sources)]]
    base = p.base.share(index, count)
    bursts = p.bursts.share(index, count) if p.bursts is not None else None
    ports = s.ports_per_source
    if ports == 0 and s.protocol != "udp":
        ports = 1  # tcp/dot: one client (one connection) per source address
    elif ports == 0:
        # enough sockets that outstanding queries never exhaust the 16-bit IDs of one socket
        peak_qps = max(getattr(base, "rate_qps", 0.0), getattr(base, "end_qps", 0.0), getattr(base, "peak_qps", 0.0))
        horizon_s = sum(s.timeout_s * s.backoff**k for k in range(s.retries + 1))
        ports = max(1, math.ceil(peak_qps * horizon_s / _IDS_PER_SOCKET / len(mine)))
        ports = min(ports, 64)
    options = SenderOptions(
        protocol=s.protocol,
        timeout_s=s.timeout_s,
        retries_n=s.retries,
        backoff=s.backoff,
        tcp_fallback=s.tcp_fallback == "on",
        ports_per_source=ports,
        port_policy=s.port_policy,
        retry_budget=s.retry_budget,
        retry_budget_window_s=s.retry_budget_window_s,
        interval_s=s.stats_interval_s,
        max_queries_n=s.max_queries,
        idle_timeout_s=s.idle_timeout_s,
        tls_resume=s.tls_resume == "on",
    )
    return DnsSender(p.target, p.pool, options, base=base, bursts=bursts, sources=mine, on_interval=on_interval)


class DnsRun:
    """One process's DNS load inside a Locust environment (see the module docstring)."""

    def __init__(self, environment: Any, settings: DnsSettings) -> None:
        self.environment = environment
        self.defaults = settings
        self.plan: DnsPlan | None = None
        self.sender: DnsSender | None = None
        self.greenlet: gevent.Greenlet | None = None
        self.knee: KneeDetector | None = None
        self.knee_point: KneePoint | None = None
        self.request_type = "DNS"
        #: fine latency of successful answers over the whole test (on a master: every worker's)
        self.answer_latency = LatencyHistogram()
        self._unreported = LatencyHistogram()
        #: (index, count) of this process among the processes that send
        self.share = (0, 1)

    def make_plan(self) -> DnsPlan:
        """Check the options (again: they may have changed in the web UI); build only when
        they differ from the last plan."""
        env = self.environment
        settings = settings_from_options(env.parsed_options, self.defaults, target_spec(env, "dns"))
        if self.plan is None or self.plan.settings != settings:
            self.plan = plan(settings, self.defaults)
        return self.plan

    def sources_n(self) -> int | None:
        """Source addresses the load is sent from, all processes together (``/metrics``). Never
        builds a plan (it answers web requests, and a master builds none): the plan's count when
        there is one, else ``--dns-sources`` as the options say; None when they cannot be read."""
        if self.plan is not None:
            return len(self.plan.sources)
        try:
            return settings_from_options(getattr(self.environment, "parsed_options", None), self.defaults, None).sources
        except LoadkitError:
            return None

    # -- interval reports -> Locust stats and generator metrics -----------------------------------
    def on_interval(self, report: IntervalReport) -> None:
        env = self.environment
        fine = fine_latency_for(env)
        for tally in report.qtypes:
            h: LatencyHistogram = tally.latencies
            # the same requests into Locust's stats (whole ms) and, at µs, into the run record
            fine.add(self.request_type, tally.qtype, h)
            if h.count or tally.failures:
                inject(
                    env,
                    self.request_type,
                    tally.qtype,
                    h.items_s(),
                    tally.failures,
                    min_s=h.min_s if h.count else None,
                    max_s=h.max_s,
                    total_s=h.sum_s,
                    ts_unix_s=report.ts_unix_s,
                )
        self.answer_latency.merge(report.answers)
        self._unreported.merge(report.answers)
        metrics = metrics_for(env)
        for key, value in report.counters.items():
            metrics.add(key, value)
        metrics.set_gauge("dns.outstanding", report.outstanding_n)
        for bw in report.bursts:
            metrics.set_max_gauge("dns.burst_window_s", bw.window_s)  # workers send a burst's shares at once
            self.record_burst(bw)
        if self.knee is not None and self.sender is not None:
            self._check_knee(report)

    def record_burst(self, bw: BurstWindow) -> None:
        """One ``burst`` event in the run record: when this process's share of a burst really
        left (the sender times its first and last query; nothing is added per query)."""
        events_for(self.environment).emit(
            "burst",
            "dns",
            {
                "burst_index": bw.burst_index,
                "planned_start_unix_s": bw.planned_start_unix_s,
                "first_sent_unix_s": bw.first_sent_unix_s,
                "last_sent_unix_s": bw.last_sent_unix_s,
                "window_s": bw.window_s,
                "sent_n": bw.sent_n,
                # the server's drain rate inside the burst (loadkit.model.fit_udp_burst)
                "answered_in_window_n": bw.answered_in_window_n,
                "answers_read_unix_s": bw.answers_read_unix_s,
                "worker_index": self.share[0],
                "workers_n": self.share[1],
            },
            ts_unix_s=bw.first_sent_unix_s,
        )

    def _check_knee(self, report: IntervalReport) -> None:
        c = report.counters
        dt = report.interval_s or 1.0
        sent = c.get("dns.original_sent", 0) + c.get("dns.retry_sent", 0)
        good = sum(t.latencies.count - sum(t.failures.values()) for t in report.qtypes)
        failed = sum(sum(t.failures.values()) for t in report.qtypes)
        done = good + failed
        loss = failed / done if done else 0.0
        run_time = report.ts_unix_s - self.sender.started_unix_s
        knee = self.knee.observe(run_time, sent / dt, good / dt, loss, report.answers.percentile_s(0.99))
        if knee is not None and self.knee_point is None:
            self.knee_point = knee
            log.warning(
                "ramp-to-knee: passed the knee (%s) at %.1f s; max throughput %.0f qps at offered "
                "%.0f qps, loss %.2f %%",
                knee.reason, knee.stopped_at_s, knee.max_throughput_rps, knee.offered_rps, knee.loss_ratio * 100,
            )
            metrics_for(self.environment).set_gauge("dns.knee_qps", knee.max_throughput_rps)
            self.sender.stop()
            runner = self.environment.runner
            if runner is not None:
                gevent.spawn_later(0.1, runner.quit)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        p = self.make_plan()
        shape = getattr(self.environment, "shape_class", None)
        if shape is not None and hasattr(shape, "users_at") and p.settings.ramp_to_qps <= 0:
            # a loadkit shape in the locustfile: the base rate follows it, --dns-rate at its peak
            p = replace(p, base=schedule.shape_rate(shape, p.total_rate_qps))
            log.info("DNS base rate follows the load shape %s (peak %g qps)", type(shape).__name__,
                     p.total_rate_qps)
        index, count = worker_share(self.environment)
        self.share = (index, count)
        self.sender = build_sender(p, index, count, on_interval=self.on_interval)
        note_target(self.environment, p.settings.protocol, p.target)
        self.request_type = {"udp": "DNS", "tcp": "DNS-TCP", "dot": "DNS-DOT"}[p.settings.protocol]
        if p.settings.ramp_to_qps > 0:
            self.knee = KneeDetector(KneeCriteria(p.settings.knee_loss, p.settings.knee_p99_ms / 1000.0))
        self.sender.open()
        o = self.sender.options
        log.info(
            "DNS load to %s: worker %d of %d, %d source(s) x %d port(s), base %s (%s), bursts %s; "
            "retries %d, source port %s, retry budget %s",
            p.target, index + 1, count, len(self.sender.sources), self.sender.ports_per_source,
            _describe(self.sender.base), p.rate_from, _describe(self.sender.burst_train), o.retries_n,
            o.port_policy, f"{o.retry_budget:g} x originals over {o.retry_budget_window_s:g} s"
            if o.retry_budget > 0 else "none",
        )
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        assert self.sender is not None
        try:
            self.sender.run()
        finally:
            self.sender.close()
            log.info("DNS load done: %s", self.sender.summary())

    def log_stopped(self) -> None:
        """What a sending process logs at test stop."""
        if self.answer_latency.count:
            log.info("DNS answer latency (fine histogram): %s", self.answer_latency.summary())

    def stop(self) -> None:
        if self.sender is not None:
            self.sender.stop()
        if self.greenlet is not None:
            # the sender drains replies for at most one retry cycle, then flushes its last interval
            self.greenlet.join(timeout=sum(self.sender.attempt_timeouts_s) + 2.0)
            if not self.greenlet.dead:
                self.greenlet.kill(block=True, timeout=1.0)
            self.greenlet = None
            _let_locust_write_csv(self.environment)
        if self.knee is not None and self.knee_point is None and self.sender is not None:
            best = self.knee.result(time.time() - self.sender.started_unix_s)
            log.warning(
                "ramp-to-knee: the ramp ended before the knee; max throughput %.0f qps at offered "
                "%.0f qps, loss %.2f %%", best.max_throughput_rps, best.offered_rps, best.loss_ratio * 100,
            )


def _let_locust_write_csv(environment: Any) -> None:
    """Locust's ``--csv`` writer rewrites its files every ``CSV_STATS_INTERVAL_SEC`` and not again
    at exit (its shutdown only closes them), so the sender's last fold, made here at test stop,
    would reach the console's final table but not the CSV: wait for one more write."""
    if getattr(getattr(environment, "parsed_options", None), "csv_prefix", None):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)


def _describe(sched: Any) -> str:
    if sched is None:
        return "none"
    if isinstance(sched, schedule.BurstTrain):
        return f"{sched.size_n} in {sched.window_s * 1000:g} ms every {sched.period_s:g} s"
    if isinstance(sched, schedule.RateCurve):
        return f"rate curve, peak {sched.peak_qps:g} qps"
    if isinstance(sched, schedule.LinearRamp):
        return f"ramp {sched.start_qps:g}->{sched.end_qps:g} qps over {sched.duration_s:g} s"
    if isinstance(sched, (schedule.ConstantRate, schedule.PoissonRate)):
        return f"{type(sched).__name__} {sched.rate_qps:g} qps"
    return type(sched).__name__


_HIST_KEY = "loadkit_dns_answer_latency"


def _wire_answer_latency(run: DnsRun) -> None:
    """The whole-test answer histogram reaches the master: Locust's stats keep whole milliseconds.
    (Per-interval histograms for the run record travel by :func:`.histogram.fine_latency_for`.)"""

    def report() -> dict | None:
        if not run._unreported.count:
            return None
        taken, run._unreported = run._unreported, LatencyHistogram()
        return taken.to_dict()

    def merge(_client_id: str, payload: dict) -> None:
        run.answer_latency.merge(LatencyHistogram.from_dict(payload))

    piggyback(run.environment, _HIST_KEY, report, merge)


def require_supported_locust() -> None:
    """Exit with one line (status 2) when the installed Locust is outside the range whose
    statistics :func:`~loadkit.generate.locust_stats.inject` writes; called as a locustfile
    installs the users, before Locust has parsed anything."""
    try:
        check_locust_version()
    except LoadkitError as err:
        exit_on_user_error(err)


def install(events: Any, settings: DnsSettings | None = None) -> None:
    """Wire the DNS generator into a locustfile: options, checks, one sender per process."""
    require_supported_locust()
    base = settings or DnsSettings()

    @events.init_command_line_parser.add_listener
    def _add_arguments(parser: Any, **_kw: Any) -> None:
        add_arguments(parser, base)

    install_run(events, lambda environment: DnsRun(environment, base))


def install_run(events: Any, make_run: Callable[[Any], DnsRun]) -> None:
    """The listeners every DNS locustfile shares (the users', the replay's): ``make_run(environment)``
    in ``init``, checked there in each process that sends, its sender from ``test_start`` to
    ``test_stop``."""

    @events.init.add_listener
    def _on_init(environment: Any, runner: Any = None, **_kw: Any) -> None:
        run = make_run(environment)
        environment.loadkit_dns = run
        _wire_answer_latency(run)
        fine_latency_for(environment)  # a master merges its workers' fine histograms from the start
        targets_noted(environment)  # and hears where they send
        if type(runner).__name__ == "MasterRunner":
            return  # the master sends nothing; workers check their own options and files
        try:
            target = run.make_plan().target
        except LoadkitError as err:
            exit_on_user_error(err)  # one line, before anything is sent
        if not environment.host:  # the web UI's Host field shows where the load goes
            for cls in environment.user_classes or ():
                if isinstance(cls, type) and issubclass(cls, DnsUser):
                    cls.host = str(target)

    @events.test_start.add_listener
    def _on_test_start(environment: Any, **_kw: Any) -> None:
        start_at_test_start(environment, "loadkit_dns")  # run_single_user: the user runs the sender

    @events.test_stop.add_listener
    def _on_test_stop(environment: Any, **_kw: Any) -> None:
        run: DnsRun | None = stop_at_test_stop(environment, "loadkit_dns")
        if run is not None and type(environment.runner).__name__ != "MasterRunner":
            run.log_stopped()

    @events.quitting.add_listener
    def _on_quitting(environment: Any, **_kw: Any) -> None:
        # on a master the workers' last reports have arrived by now
        run: DnsRun | None = getattr(environment, "loadkit_dns", None)
        if run is not None and run.answer_latency.count and type(environment.runner).__name__ == "MasterRunner":
            log.info("DNS answer latency, all workers (fine histogram): %s", run.answer_latency.summary())


class DnsUser(User):
    """Holds a user slot while the process's DNS sender runs (the load does not come from
    users: it is open loop). Under ``run_single_user`` it runs the sender itself for
    ``debug_duration_s`` and prints each interval."""

    abstract = True
    debug_duration_s: float = 10.0
    """how long ``run_single_user`` sends when no ``--run-time`` is given"""

    @task
    def hold(self) -> None:
        env = self.environment
        if env.runner is not None:
            gevent.sleep(1.0)
            return
        run: DnsRun = env.loadkit_dns
        p = run.plan or run.make_plan()
        sender = build_sender(p, on_interval=_print_interval)
        run_time = getattr(env.parsed_options, "run_time", None)
        sender.max_duration_s = parse_timespan(str(run_time)) if run_time else self.debug_duration_s
        sender.open()
        try:
            sender.run()
        finally:
            sender.close()
        print(sender.summary(), flush=True)
        from locust.exception import StopUser

        raise StopUser()


def _print_interval(report: IntervalReport) -> None:
    c = report.counters
    answers = report.answers
    fails: dict[str, int] = {}
    for t in report.qtypes:
        for k, v in t.failures.items():
            fails[k] = fails.get(k, 0) + v
    print(
        f"{report.interval_s:5.2f}s sent={c.get('dns.original_sent', 0)} retries={c.get('dns.retry_sent', 0)} "
        f"answered={c.get('dns.answered', 0)} failures={fails or 0} outstanding={report.outstanding_n} "
        f"latency {answers.summary()}",
        flush=True,
    )
