"""Locust plugin every locustfile imports: records the run and attaches collectors.

Importing this module adds loadkit's options to Locust's command line::

    --target PROTO=HOST[:PORT]  where the users of one protocol (dns, imap, pop3) send, before
                              --host (repeatable; no port: the protocol's standard port)
    --record-dir DIR          write a run record under DIR/<run id> (nothing is written without it)
    --run-id ID               the run directory's name (default: <time>-<scenario>-<random>)
    --scenario NAME / --release LABEL
    --record-interval S       seconds per request/failure/generator interval (default 1)
    --collect-group N=SPEC    a process group or cgroup to sample (repeatable), e.g.
                              p1=cgroup:/sys/fs/cgroup/loadkit/p1@1143,1110
    --collect-udp-port P      a UDP port whose socket queue and drops are sampled (repeatable)
    --collect-allow-missing   start even if a --collect-group matches nothing yet (else refused)
    --collector URL           a remote collector to read samples from (repeatable)
    --collect-interval S      sampling interval (default 0.5)
    --abort-cgroup-memory-fraction F   stop when a group's cgroup memory >= F x its limit
    --abort-failure-ratio F   stop when failures/requests >= F over one interval ...
    --abort-min-requests N    ... that has at least N requests (default 50)

The abort and collector options act with or without ``--record-dir``: without a record a
:class:`LiveWatch` checks the same thresholds (and the collector shows in the headless output and
the web UI's Target tab); the abort is logged. ``--collect-group`` is checked with the one group
grammar (:mod:`loadkit.profile.groupspec`) at start, and against the host: a group that matches
nothing (no such cgroup, no such process) is refused unless ``--collect-allow-missing``
(:func:`loadkit.observe.groups.check_groups_match`, the check ``loadkit collect`` makes too);
``--abort-cgroup-memory-fraction`` without a collector is refused there too, each in one line.
Ctrl-C/SIGINT is handled by the plugin in every Locust process, also when the launcher ignored
it (a background job): the record says ``interrupted``, as after SIGTERM.

In the process that owns the statistics (Locust's master, or the single local process) a
:class:`Recorder` then writes, every interval: :class:`~loadkit.schema.RequestInterval` and
:class:`~loadkit.schema.FailureInterval` rows from the deltas of Locust's cumulative stats and
response-time histograms, :class:`~loadkit.schema.LatencyBucket` rows (a generator's fine
histograms when it reports them, else Locust's), :class:`~loadkit.schema.GeneratorMetric` rows from
:func:`loadkit.generate.metrics.metrics_for`, and the collector samples received since the last
interval; each interval is flushed as part files, so a SIGKILL loses at most one interval.
Events (run start/end, aborts, lost workers, collector events) go to ``events.jsonl`` at once;
generator events (:func:`loadkit.generate.event_channel.events_for`, e.g. each DNS burst) within one
watch interval.
Workers record nothing: their statistics and generator metrics reach the master.

Collectors are attached through ``loadkit.plugin.live_collector.attach_collector(environment,
groups, udp_ports, urls, interval_s, sink)``; ``sink(record)`` takes any sample record or
:class:`~loadkit.schema.Event` (and ``sink(row_dict, table="net")`` for rows with extra columns).
It may be called from any thread. A collector that cannot be attached is a ``warning`` event in
the record, not a lost run.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import gevent
from locust import events
from locust import runners as locust_runners
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import diff_response_time_dicts
from locust.util.timespan import parse_timespan

from loadkit.errors import LoadkitError, ProfileError, RecordError
from loadkit.generate.dns.histogram import fine_latency_for
from loadkit.generate.event_channel import events_for
from loadkit.generate.metrics import forget_worker, metrics_for
from loadkit.generate.wiring import exit_on_user_error, targets_noted
from loadkit.record.latency import buckets_from_locust_ms, percentile_of_counts
from loadkit.schema import Event, FailureInterval, GeneratorMetric, GroupSample, LatencyBucket, RequestInterval
from loadkit.observe.groups import check_groups_match
from loadkit.plugin.live_collector import attach_collector
from loadkit.plugin.metrics_route import add_metrics_route, serve_metrics
from loadkit.profile.groupspec import parse_groups
from loadkit.record.writer import INTERRUPT_MARKER, RunWriter, new_run_id
from loadkit.stop_signals import own_stop_signals

log = logging.getLogger(__name__)

#: a test with no -t still stops by itself after this long (--max-run-time)
DEFAULT_MAX_RUN_TIME = "1h"

#: how often queued collector samples are drained and abort thresholds checked: an abort
#: happens within one sampling interval plus this
WATCH_INTERVAL_S = 0.25

#: master -> workers: an abort threshold was crossed, stop users without a grace period
ABORT_MESSAGE = "loadkit_abort"

_recorder: "Recorder | None" = None
#: the process's SIGINT watcher, installed once per process
_sigint_handler: list = []


def _stop_now(environment: Any) -> None:
    """Users are killed at once on the coming stop (no --stop-timeout grace): after an abort
    every held session is load the target cannot take."""
    environment.stop_timeout = 0


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("loadkit record", "Run record, collectors and abort thresholds")
    group.add_argument("--target", action="append", default=[], metavar="PROTOCOL=HOST[:PORT]",
                       help="where the users of one protocol (dns, imap, pop3) send, before --host "
                       "(repeatable; a host without a port means the protocol's standard port)")
    group.add_argument("--record-dir", default="", help="write a run record under DIR/<run id>")
    group.add_argument("--run-id", default="", help="run directory name (default: time-scenario-random)")
    group.add_argument("--scenario", default="adhoc", help="scenario name recorded in the manifest")
    group.add_argument("--release", default="unlabelled", help="release label recorded in the manifest")
    group.add_argument("--record-interval", type=float, default=1.0, help="seconds per recorded interval")
    group.add_argument("--collect-group", action="append", default=[], help="NAME=SPEC to sample (repeatable)")
    group.add_argument("--collect-udp-port", action="append", type=int, default=[], help="UDP port to sample")
    group.add_argument("--collect-allow-missing", action="store_true", default=False,
                       help="start even if a --collect-group matches nothing yet (it records 0 until it appears)")
    group.add_argument("--collector", action="append", default=[], help="remote collector URL (repeatable)")
    group.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                       help="serve the load side's /metrics here when there is no web UI (--headless, "
                       "loadkit run); loopback only, e.g. 127.0.0.1:9646")
    group.add_argument("--collect-interval", type=float, default=0.5, help="collector sampling interval (s)")
    group.add_argument("--abort-cgroup-memory-fraction", type=float, default=0.0,
                       help="abort when a group's cgroup memory reaches this fraction of its limit (0: off)")
    group.add_argument("--abort-failure-ratio", type=float, default=0.0,
                       help="abort when failures/requests over one interval reach this (0: off)")
    group.add_argument("--abort-min-requests", type=int, default=50,
                       help="an interval needs this many requests before the failure ratio counts")
    group.add_argument("--max-run-time", default=DEFAULT_MAX_RUN_TIME,
                       help="safety cap: the test stops itself after this long even without -t "
                       "(e.g. 30m, 2h); -t may not exceed it")


def max_run_time_s(options: Any) -> float:
    """The safety cap on a test's length, checked against ``-t``; a bad value is one line."""
    text = str(getattr(options, "max_run_time", "") or DEFAULT_MAX_RUN_TIME)
    try:
        cap_s = float(parse_timespan(text))
    except (ValueError, TypeError):
        raise ProfileError(f"--max-run-time {text!r} is not a duration (e.g. 30m, 2h)") from None
    if cap_s <= 0:
        raise ProfileError(f"--max-run-time must be more than 0, got {text!r}")
    run_time_s = float(getattr(options, "run_time", 0) or 0)
    if run_time_s > cap_s:
        raise ProfileError(
            f"-t {run_time_s:.0f}s is longer than the safety cap --max-run-time {text}; raise the cap "
            "if this target can take it"
        )
    return cap_s


def _on_sigint() -> None:
    """Ctrl-C/SIGINT cuts the test short: the record says ``interrupted`` (as after SIGTERM),
    then KeyboardInterrupt goes to the main greenlet, Locust's own Ctrl-C path (final stats,
    ``quitting``), as gevent's hub does with a KeyboardInterrupt it catches."""
    if _recorder is not None and not _recorder._stopped:
        _recorder._mark_interrupted()
    gevent.get_hub().parent.throw(KeyboardInterrupt)


def _own_stop_signals() -> None:
    # a launcher that ignores SIGINT (a background job, some CI runners) must not leave Locust
    # running through Ctrl-C: an inherited SIG_IGN survives exec (Locust sets SIGTERM itself)
    ignored = own_stop_signals()
    if ignored:
        log.debug("%s was ignored by the launcher; handled again", " and ".join(ignored))
    if threading.current_thread() is threading.main_thread() and not _sigint_handler:
        _sigint_handler.append(gevent.signal_handler(signal.SIGINT, _on_sigint))


@events.init.add_listener
def _on_init(environment: Any, **_kw: Any) -> None:
    global _recorder
    # Locust arms -t from gevent's cached loop clock, last read before the locustfile's imports:
    # refreshed here, or slow imports (seconds on a loaded machine) come off the run time
    gevent.get_hub().loop.update_now()
    if environment.parsed_options is not None:  # a Locust process (not a library user's Environment)
        _own_stop_signals()
    metrics_for(environment)  # wire generator metrics in every process, workers included
    events_for(environment)  # and generator events (a master merges its workers' from the start)
    add_metrics_route(environment)  # /metrics on the web UI, where there is one (a master, a local run)
    options = environment.parsed_options
    if options is None:
        return
    if not isinstance(environment.runner, WorkerRunner):
        try:
            cap_s = max_run_time_s(options)
        except LoadkitError as err:
            exit_on_user_error(err)
        _arm_run_time_cap(environment, cap_s)
    if isinstance(environment.runner, WorkerRunner):
        environment.runner.register_message(ABORT_MESSAGE, lambda *_a, **_kw: _stop_now(environment))
        # workers report every 3 s by default: report once per record interval instead, so an
        # interval row on the master holds about one interval of requests, not three or none
        locust_runners.WORKER_REPORT_INTERVAL = min(3.0, max(0.2, float(options.record_interval)))
        return
    try:  # the one group grammar (regexes compiled): a bad spec stops the run here, in one line
        specs = parse_groups(options.collect_group)
        if specs and not getattr(options, "collect_allow_missing", False):
            # a group that matches nothing (a typo) is refused now, not recorded as zeros
            check_groups_match(specs, allow_option="--collect-allow-missing")
        if options.abort_cgroup_memory_fraction > 0 and not (options.collect_group or options.collector):
            raise ProfileError("--abort-cgroup-memory-fraction needs a collector to read the memory from: "
                               "--collect-group NAME=cgroup:PATH or --collector URL")
        if getattr(options, "metrics_listen", ""):
            if getattr(environment, "web_ui", None) is None:
                serve_metrics(environment, options.metrics_listen)
            else:
                log.warning("--metrics-listen %s not used: the web UI serves /metrics on its own port",
                            options.metrics_listen)
    except LoadkitError as err:
        exit_on_user_error(err)
    if getattr(options, "record_dir", ""):
        _recorder = Recorder(environment, options)
        _recorder.start()
    elif collector_wanted(options) or options.abort_failure_ratio > 0 or options.abort_cgroup_memory_fraction > 0:
        # no record, but the abort and collector options still act (live)
        try:
            watch = LiveWatch(environment, options).start()
        except LoadkitError as err:
            exit_on_user_error(err)
        environment.events.quitting.add_listener(lambda **_kw: watch.stop())


def _arm_run_time_cap(environment: Any, cap_s: float) -> None:
    """Every load loop stops by itself: without -t (the web UI, or a forgotten option) the test
    is stopped after ``cap_s`` from its start."""

    def _cap() -> None:
        log.warning("stopping the test: it reached the safety cap --max-run-time (%.0f s)", cap_s)
        runner = environment.runner
        if runner is not None:
            runner.quit()

    timer: list = []

    @environment.events.test_start.add_listener
    def _start(**_kw: Any) -> None:
        if not timer:
            timer.append(gevent.spawn_later(cap_s, _cap))

    @environment.events.quitting.add_listener
    def _quit(**_kw: Any) -> None:
        for g in timer:
            g.kill(block=False)


@events.quitting.add_listener
def _on_quitting(environment: Any, **_kw: Any) -> None:
    if _recorder is not None and _recorder.environment is environment:
        _recorder.stop()


class _Prev:
    __slots__ = ("num_requests", "num_failures", "total_response_time", "response_times")

    def __init__(self) -> None:
        self.num_requests = 0
        self.num_failures = 0
        self.total_response_time = 0.0
        self.response_times: dict[int, int] = {}


def request_intervals(
    entries: dict, previous: dict[tuple[str, str], _Prev], now_unix_s: float, interval_s: float
) -> list[RequestInterval]:
    """The :class:`RequestInterval` rows of :func:`interval_rows` (for callers without histograms)."""
    return interval_rows(entries, previous, now_unix_s, interval_s)[0]


def interval_rows(
    entries: dict,
    previous: dict[tuple[str, str], _Prev],
    now_unix_s: float,
    interval_s: float,
    fine: dict[tuple[str, str], Any] | None = None,
) -> tuple[list[RequestInterval], list[LatencyBucket]]:
    """Per-(type, name) rows and latency histograms for the requests completed since
    ``previous``; updates ``previous``.

    Locust counts every request in ``num_requests`` and its response time in the histogram,
    failures included, so the deltas cover successes and failures alike. A counter that went
    down means Locust reset its stats: the interval starts from zero.

    ``fine`` maps (request_type, name) to a generator's fine histogram of the same requests
    (:func:`loadkit.generate.dns.histogram.fine_latency_for`); other names get theirs from the delta
    of Locust's rounded milliseconds. The row's percentiles come from those buckets by
    :func:`loadkit.record.latency.percentile_of_counts`, the computation every figure of the run uses.
    """
    fine = dict(fine or {})
    rows: list[RequestInterval] = []
    buckets: list[LatencyBucket] = []
    for (name, method), entry in list(entries.items()):
        prev = previous.get((name, method))
        if prev is None or entry.num_requests < prev.num_requests:
            prev = _Prev()
        n = entry.num_requests - prev.num_requests
        if n > 0:
            delta = diff_response_time_dicts(entry.response_times, prev.response_times)
            hist = fine.pop((str(method), str(name)), None)
            if hist is not None:
                counts, source, max_s = hist.counts, "fine", hist.max_s
            else:
                counts, source = buckets_from_locust_ms(delta), "locust"
                max_s = (max(delta) if delta else 0) / 1000.0
            buckets += _bucket_rows(now_unix_s, interval_s, str(method), str(name), counts, source)
            # a fine histogram's exact maximum caps its top bucket's edge, as every figure does
            cap_s = max_s if source == "fine" else None
            pct = lambda q: percentile_of_counts(counts, q, cap_s) or 0.0  # noqa: E731
            rows.append(
                RequestInterval(
                    ts_unix_s=now_unix_s,
                    interval_s=interval_s,
                    request_type=str(method),
                    name=str(name),
                    requests_n=n,
                    failures_n=max(0, entry.num_failures - prev.num_failures),
                    latency_mean_s=(entry.total_response_time - prev.total_response_time) / n / 1000.0,
                    latency_p50_s=pct(0.5),
                    latency_p90_s=pct(0.9),
                    latency_p95_s=pct(0.95),
                    latency_p99_s=pct(0.99),
                    latency_max_s=max_s,
                )
            )
        cur = _Prev()
        cur.num_requests = entry.num_requests
        cur.num_failures = entry.num_failures
        cur.total_response_time = entry.total_response_time
        cur.response_times = dict(entry.response_times)
        previous[(name, method)] = cur
    for (method, name), hist in fine.items():  # counted by the generator, not (yet) by Locust
        buckets += _bucket_rows(now_unix_s, interval_s, method, name, hist.counts, "fine")
    return rows, buckets


def _bucket_rows(ts_unix_s: float, interval_s: float, request_type: str, name: str,
                 counts: dict[int, int], source: str) -> list[LatencyBucket]:
    return [LatencyBucket(ts_unix_s, interval_s, request_type, name, int(b), int(c), source)
            for b, c in sorted(counts.items()) if c > 0]


def failure_intervals(
    errors: dict, previous: dict[tuple[str, str, str], int], now_unix_s: float, interval_s: float
) -> list[FailureInterval]:
    """Per-(type, name, class) failure counts since ``previous``; updates ``previous``."""
    rows = []
    for err in list(errors.values()):
        key = (str(err.method), str(err.name), str(err.error))
        before = previous.get(key, 0)
        if err.occurrences < before:
            before = 0
        n = err.occurrences - before
        previous[key] = err.occurrences
        if n > 0:
            # a loadkit Failure's repr is its class token; anything else is kept short
            rows.append(FailureInterval(now_unix_s, interval_s, key[0], key[1], key[2][:120], n))
    return rows


def _every(interval_s: float, step: Callable[[], None], what: str) -> None:
    """Call ``step`` after every ``interval_s`` until the greenlet is killed; a step that raises
    is logged and the loop goes on (one bad interval must not end the watching or recording)."""
    while True:
        gevent.sleep(interval_s)
        try:
            step()
        except LoadkitError as err:  # its message says it all (a full disk): no traceback each time
            log.error("%s failed: %s", what, err)
        except Exception:
            log.exception("%s failed", what)


def generator_options(options: Any) -> dict[str, Any]:
    """The load generators' options of a Locust command line (``--dns-*``, ``--imap-*``,
    ``--pop3-*``, ``--mail-*``, ``--replay-*``, ``--login-*``), named as a profile's ``[load]
    options`` names them (``dns-timeout = 1.0``); options marked secret are left out."""
    from locust.argument_parser import get_parser

    prefixes = ("--dns-", "--imap-", "--pop3-", "--mail-", "--replay-", "--login-")
    try:
        parser = get_parser()  # the options as registered, with the listeners' own flags
    except Exception as err:  # noqa: BLE001 - a record without options is still a record
        log.debug("no option names for the record: %s", err)
        return {}
    secret = set(getattr(parser, "secret_args_included_in_web_ui", {}) or ())
    out: dict[str, Any] = {}
    for action in parser._actions:
        flags = [f for f in action.option_strings if f.startswith(prefixes)]
        value = getattr(options, action.dest, None)
        if flags and action.dest not in secret and isinstance(value, (str, int, float, bool)) and value != "":
            out[max(flags, key=len)[2:]] = value
    return dict(sorted(out.items()))


def collector_wanted(options: Any) -> bool:
    return bool(options.collect_group or options.collect_udp_port or options.collector)


def attach_from_options(environment: Any, options: Any, sink: Any) -> None:
    """Attach the collectors the ``--collect-*`` options ask for (nothing when none is asked)."""
    if collector_wanted(options):
        attach_collector(environment, groups=list(options.collect_group), udp_ports=list(options.collect_udp_port),
                         urls=list(options.collector), interval_s=options.collect_interval, sink=sink)


class AbortThresholds:
    """``--abort-*`` thresholds of one run: decides, stops the test once, tells ``on_abort``.

    Used by the :class:`Recorder` (which writes the abort event into the record) and by the
    :class:`LiveWatch` of a run without ``--record-dir`` (which logs it): the same figures
    stop both. ``memory`` keeps each group's latest (bytes, limit) for the status line.
    """

    def __init__(self, environment: Any, options: Any,
                 on_abort: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.environment = environment
        self.options = options
        self.on_abort = on_abort
        self.abort_reason: dict[str, Any] | None = None
        self.memory: dict[str, tuple[int, int]] = {}

    def on_group_sample(self, s: GroupSample) -> None:
        # cgroup charge and limit when the group has one, else the group's RSS (limit 0)
        if s.cgroup_limit_bytes > 0:
            self.memory[s.group] = (s.cgroup_memory_bytes, s.cgroup_limit_bytes)
        else:
            self.memory[s.group] = (s.cgroup_memory_bytes or s.rss_bytes, 0)
        threshold = self.options.abort_cgroup_memory_fraction
        if threshold > 0 and s.cgroup_limit_bytes > 0:
            fraction = s.cgroup_memory_bytes / s.cgroup_limit_bytes
            if fraction >= threshold:
                self.abort(
                    "cgroup_memory_fraction", s.group,
                    {"memory_bytes": s.cgroup_memory_bytes, "limit_bytes": s.cgroup_limit_bytes,
                     "fraction": round(fraction, 4), "threshold": threshold, "sample_unix_s": s.ts_unix_s},
                )

    def on_interval(self, requests_n: int, failures_n: int) -> None:
        """One interval's requests and failures against ``--abort-failure-ratio``."""
        threshold = self.options.abort_failure_ratio
        if threshold > 0 and requests_n >= self.options.abort_min_requests and requests_n:
            ratio = failures_n / requests_n
            if ratio >= threshold:
                self.abort("failure_ratio", "requests",
                           {"failures_n": failures_n, "requests_n": requests_n, "ratio": round(ratio, 4),
                            "threshold": threshold})

    def abort(self, reason: str, source: str, detail: dict[str, Any]) -> None:
        """Stop the test at once (workers too), once; the first reason is kept."""
        if self.abort_reason is not None:
            return
        self.abort_reason = {"reason": reason, "source": source, **detail}
        if self.on_abort is not None:
            self.on_abort(source, {"reason": reason, **detail})
        log.warning("aborting run: %s on %s (%s)", reason, source, detail)
        runner = self.environment.runner
        if runner is not None:
            _stop_now(self.environment)
            if isinstance(runner, MasterRunner):
                runner.send_message(ABORT_MESSAGE, {})
            gevent.spawn(runner.quit)


class LiveWatch:
    """Abort thresholds and collectors of a run that writes no record (no ``--record-dir``).

    The thresholds are checked on the same figures as in a recorded run: the failure ratio over
    each ``--record-interval`` from Locust's totals, a group's cgroup memory from each collector
    sample as it arrives. The collector shows in the headless output and the web UI's Target tab
    as usual; an abort is a warning line (``aborting run: failure_ratio on requests ...``) and
    stops the test like a recorded one.
    """

    def __init__(self, environment: Any, options: Any) -> None:
        self.environment = environment
        self.options = options
        self.interval_s = max(0.05, float(options.record_interval))
        self.thresholds = AbortThresholds(environment, options)
        self._prev = (0, 0)
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> "LiveWatch":
        attach_from_options(self.environment, self.options, self.sink)
        if self.options.abort_failure_ratio > 0:
            self._greenlet = gevent.spawn(_every, self.interval_s, self.check, "abort check")
        return self

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    def sink(self, record: Any, table: str | None = None) -> None:
        if isinstance(record, GroupSample):
            self.thresholds.on_group_sample(record)

    def check(self) -> None:
        total = self.environment.stats.total
        now = (total.num_requests, total.num_failures)
        if now[0] < self._prev[0]:  # Locust reset its stats (a new test from the web UI)
            self._prev = (0, 0)
        self.thresholds.on_interval(now[0] - self._prev[0], now[1] - self._prev[1])
        self._prev = now


class Recorder:
    """Writes one run record from a Locust master or local process."""

    def __init__(self, environment: Any, options: Any) -> None:
        self.environment = environment
        self.options = options
        scenario = options.scenario or "adhoc"
        self.run_id = options.run_id or new_run_id(scenario)
        self.writer = RunWriter(Path(options.record_dir) / self.run_id)
        self.interval_s = max(0.05, float(options.record_interval))
        self.status = "running"
        self.thresholds = AbortThresholds(
            environment, options, on_abort=lambda source, detail: self.writer.event("abort", source, detail))
        self._queue: collections.deque = collections.deque()
        self._prev_requests: dict = {}
        self._prev_failures: dict = {}
        self._failures_by_class: collections.Counter = collections.Counter()
        self._workers_seen: dict[str, str] = {}
        self._lost: set[str] = set()
        self._greenlets: list = []
        self._started_perf = time.perf_counter()
        self._last_tick_unix_s = time.time()
        self._stopped = False
        #: a plain ``locust -f`` run records the targets its generators resolved (``loadkit run``
        #: wrote the profile's before Locust started); None once the manifest has them for good
        self._targets_written: list[str] | None = []

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        o = self.options
        profile = None
        previous = self.writer.read_manifest() or {}
        if not previous.get("profile"):
            # a plain ``locust -f`` run: the generator's options as its command line set them, so
            # the models read the retry limit, timeout and port policy it really used
            profile = {"load": {"options": generator_options(o)}}
        self.writer.start(self.run_id, o.scenario or "adhoc", o.release or "unlabelled", profile=profile)
        if previous.get("targets"):
            self._targets_written = None
        self.writer.event("run_started", "locust", {"run_id": self.run_id, "distributed": self.distributed})
        self._attach_collectors()
        # Locust stops gracefully on SIGTERM and then reports "quitting" exactly as after a
        # normal end; this marks the run as interrupted first (the runner leaves the same mark)
        gevent.signal_handler(signal.SIGTERM, self._mark_interrupted)
        if not getattr(o, "headless", False):
            self.environment.events.test_stop.add_listener(self._on_web_ui_test_stop)
        self._greenlets = [gevent.spawn(_every, self.interval_s, self.tick, "recording interval"),
                           gevent.spawn(_every, WATCH_INTERVAL_S, self._watch, "collector drain")]
        log.info("recording run %s in %s", self.run_id, self.writer.run_dir)

    @property
    def distributed(self) -> bool:
        return isinstance(self.environment.runner, MasterRunner)

    def _attach_collectors(self) -> None:
        try:
            attach_from_options(self.environment, self.options, self.sink)
        except Exception as err:  # a collector problem must not lose the run record
            self.writer.event("warning", "collector", {"message": f"collector not attached: {err}"})
            log.warning("collector not attached: %s", err)

    def _on_web_ui_test_stop(self, **_kw: Any) -> None:
        """A web-UI test ends by its stop button or its run time, and Locust stays up (no
        ``--autoquit``): that is the run's normal end, so the record is finished now as
        ``completed`` (or ``aborted``), not later as ``interrupted`` when the process is stopped."""
        if self._stopped or (self.writer.run_dir / INTERRUPT_MARKER).exists():
            return
        # workers send their last statistics right after the stop: take them into the last interval
        gevent.spawn_later(min(3.0, self.interval_s), self._finish_after_web_ui_stop)

    def _finish_after_web_ui_stop(self) -> None:
        if self._stopped:
            return
        self.stop()
        log.info("run %s recorded as %s; a new test started from the web UI is not recorded "
                 "(start Locust again to record another run)", self.run_id, self.status)

    def _mark_interrupted(self) -> None:
        (self.writer.run_dir / INTERRUPT_MARKER).touch()

    def sink(self, record: Any, table: str | None = None) -> None:
        """Collector output: any sample record, an Event, or a dict row for ``table``.

        Rows are queued for the next drain; a memory sample is checked against the abort
        threshold at once when it arrives in the hub's thread (the live collector's promise),
        so an abort does not wait for the drain.
        """
        self._queue.append((record, table))
        if isinstance(record, GroupSample) and threading.current_thread() is threading.main_thread():
            self._on_group_sample(record)

    def stop(self) -> None:
        """Final interval, final flush, manifest status ``completed`` or ``aborted``."""
        if self._stopped:
            return
        self._stopped = True
        for g in self._greenlets:
            g.kill(block=False)
        try:
            self._drain()
            self.tick()
        finally:
            if self.abort_reason:
                status = "aborted"
            elif (self.writer.run_dir / INTERRUPT_MARKER).exists():
                status = "interrupted"
            else:
                status = "completed"
            self.status = status
            self.writer.event("run_ended", "locust", {"status": status})
            self.writer.finish(status)
            self._write_status()

    # -- loops -----------------------------------------------------------------------------------
    def _watch(self) -> None:
        self._drain()
        self._check_workers()

    def _drain(self) -> None:
        # generator events (DNS bursts ...), this process's and its workers', then collector output
        for event in events_for(self.environment).drain():
            self.writer.add(event)
        while self._queue:
            record, table = self._queue.popleft()
            if table is not None:
                self.writer.add_row(table, record)
                continue
            self.writer.add(record)
            if isinstance(record, GroupSample):
                self._on_group_sample(record)  # a second look is harmless: abort acts once
            elif isinstance(record, Event) and record.kind == "oom_kill":
                log.warning("OOM kill in %s: %s", record.source, record.detail)

    # -- abort thresholds (AbortThresholds decides; the record keeps the event) --------------------
    def _on_group_sample(self, s: GroupSample) -> None:
        self.thresholds.on_group_sample(s)

    def _check_failure_ratio(self, rows: list[RequestInterval]) -> None:
        self.thresholds.on_interval(sum(r.requests_n for r in rows), sum(r.failures_n for r in rows))

    @property
    def abort_reason(self) -> dict[str, Any] | None:
        return self.thresholds.abort_reason

    def abort(self, reason: str, source: str, detail: dict[str, Any]) -> None:
        """Record an abort event and stop the test (once)."""
        self.thresholds.abort(reason, source, detail)

    # -- workers ---------------------------------------------------------------------------------
    def _check_workers(self) -> None:
        runner = self.environment.runner
        if not isinstance(runner, MasterRunner):
            return
        for client_id, node in list(runner.clients.items()):
            state = str(node.state)
            if state == "missing" and client_id not in self._lost:
                self._lost.add(client_id)
                forget_worker(self.environment, client_id)
                self.writer.event("worker_lost", client_id, {"last_state": self._workers_seen.get(client_id, "")})
                log.warning("worker %s lost", client_id)
            self._workers_seen[client_id] = state

    # -- one interval ----------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.time()
        interval = max(1e-6, now - self._last_tick_unix_s)
        self._last_tick_unix_s = now
        stats = self.environment.stats
        rows, latency = interval_rows(stats.entries, self._prev_requests, now, interval,
                                      fine_latency_for(self.environment).drain())
        failures = failure_intervals(stats.errors, self._prev_failures, now, interval)
        for f in failures:
            self._failures_by_class[f.failure_class] += f.failures_n
        self.writer.add_many(rows)
        self.writer.add_many(latency)
        self.writer.add_many(failures)
        self.writer.add_many(metrics_for(self.environment).snapshot(now))
        runner = self.environment.runner
        self.writer.add(GeneratorMetric(now, "users", "gauge", float(runner.user_count if runner else 0)))
        if isinstance(runner, MasterRunner):
            self.writer.add(GeneratorMetric(now, "workers", "gauge", float(runner.worker_count)))
        try:
            self._record_targets()
            self._drain()
            self.writer.flush()
        except RecordError:
            # the record cannot be written (its disk is full): load that is not recorded is not sent
            if not self._stopped and runner is not None:
                gevent.spawn(runner.quit)
            raise
        if not self._stopped:
            self._check_failure_ratio(rows)
        self._write_status(rows)

    def _record_targets(self) -> None:
        """Put where the generators send into the manifest of a run that did not name its targets
        (on a master, once its workers have said; a new Host from the web UI adds one)."""
        if self._targets_written is None:
            return
        urls = targets_noted(self.environment)
        if urls != self._targets_written:
            self.writer.update_manifest(targets=list(urls))
            self._targets_written = list(urls)

    def _write_status(self, rows: list[RequestInterval] | None = None) -> None:
        stats = self.environment.stats
        runner = self.environment.runner
        counters = metrics_for(self.environment).counters()
        self.writer.write_status(
            {
                "run_id": self.run_id,
                "status": self.status,
                "elapsed_s": round(time.perf_counter() - self._started_perf, 1),
                "users": runner.user_count if runner else 0,
                "workers": runner.worker_count if isinstance(runner, MasterRunner) else 0,
                "requests_n": stats.total.num_requests,
                "failures_n": stats.total.num_failures,
                "interval_requests_n": sum(r.requests_n for r in rows or []),
                "failures_by_class": dict(self._failures_by_class.most_common(4)),
                "counters": {k: v for k, v in counters.items() if k.startswith(("dns.", "imap.", "pop3."))},
                "memory": {g: list(v) for g, v in sorted(self.thresholds.memory.items())},
                "abort": self.abort_reason,
            }
        )
