"""`loadkit collect`: sample a host's memory and socket-buffer saturation every interval.

Examples::

    loadkit collect --group proxies=dovecot --group dns=unbound --udp-port 5353 \\
        --interval 0.5 --duration 60 --out runs/collect-1
    loadkit collect --group proxy1=cgroup:/loadkit/proxy1@11243 --listen 127.0.0.1:9108
    loadkit collect --group dns=unbound --listen 0.0.0.0:9108 --web-config web.yml

A group that matches nothing at start (a typo in a cgroup path or a pattern) is an error unless
``--allow-missing``. Beyond loopback, ``--listen`` needs ``--web-config`` (TLS and basic auth, the
Prometheus exporter toolkit's file format; :mod:`loadkit.observe.webconfig`) or ``--insecure``.
SIGINT and SIGTERM end the run flushed, also when the launcher ignored SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from loadkit.cli._common import add_command
from loadkit.errors import CollectorError

log = logging.getLogger("loadkit.collect")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "collect", _run, "sample memory, UDP buffers, listen queues and process events of this host",
                    "Sample process groups, cgroups, UDP/TCP saturation counters and host memory every "
                    "--interval; write Parquet (--out) and/or serve /metrics and /snapshot (--listen).")
    p.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="a process group: NAME=REGEX (process name or first word of the command line), "
        "NAME=cmdline:REGEX (whole command line) or NAME=cgroup:PATH (a memory cgroup), each "
        "optionally @PORT,PORT (listening ports: established connections there are sessions). "
        "Repeatable.",
    )
    p.add_argument(
        "--udp-port",
        action="append",
        default=[],
        metavar="PORT[,PORT]",
        help="record the receive queue and drops of UDP sockets bound to this port. Repeatable.",
    )
    p.add_argument("--interval", type=str, default="1", metavar="SECONDS", help="time between samples (0.1-3600, default 1)")
    p.add_argument("--duration", type=str, default=None, metavar="SECONDS", help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="write Parquet tables and events.jsonl here")
    p.add_argument("--listen", default=None, metavar="HOST:PORT", help="serve /metrics and /snapshot here (e.g. 127.0.0.1:9108)")
    p.add_argument(
        "--web-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TLS certificate/key and basic-auth users for --listen, in the Prometheus exporters' "
        "web config format (tls_server_config: {cert_file, key_file}, basic_auth_users: {NAME: BCRYPT}); "
        "required beyond loopback",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve --listen beyond loopback as plain HTTP without authentication",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="start even if a group matches nothing yet (its figures are 0 until it appears)",
    )
    p.add_argument(
        "--full-memory-interval",
        type=str,
        default="10",
        metavar="SECONDS",
        help="read USS/PSS (costly) at most this often; 0 never (default 10)",
    )
    p.add_argument(
        "--flush-interval",
        type=str,
        default="5",
        metavar="SECONDS",
        help="write a Parquet part at least this often; a crash loses at most this much (default 5)",
    )
    p.add_argument("--host-label", default=None, metavar="NAME", help="host name written in records (default: hostname)")
    p.add_argument("--json", action="store_true", help="print the final summary as one JSON object on stdout")
    p.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)
    p.add_argument("--cgroup-root", default="/sys/fs/cgroup", help=argparse.SUPPRESS)


def _seconds(text: str | None, what: str) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise CollectorError(f"--{what} {text!r} is not a number of seconds") from None
    if not math.isfinite(value):  # float() takes nan and inf; nan passes every range check after
        raise CollectorError(f"--{what} {text!r} is not a finite number of seconds")
    return value


def _ports(values: list[str]) -> list[int]:
    ports: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                port = int(part)
            except ValueError:
                raise CollectorError(f"--udp-port {value!r}: {part!r} is not a port number") from None
            ports.append(port)  # the range is CollectorConfig.validate's to check, as for every caller
    return ports


def build_config(args: argparse.Namespace):
    """The :class:`CollectorConfig` for parsed arguments (validated; CollectorError if bad)."""
    from loadkit.observe.collector import CollectorConfig
    from loadkit.observe.groups import parse_group_spec

    full = _seconds(args.full_memory_interval, "full-memory-interval")
    config = CollectorConfig(
        groups=[parse_group_spec(g) for g in args.group],
        udp_ports=_ports(args.udp_port),
        interval_s=_seconds(args.interval, "interval"),
        duration_s=_seconds(args.duration, "duration"),
        out_dir=args.out,
        proc_root=args.proc_root,
        cgroup_root=args.cgroup_root,
        full_memory_interval_s=full or None,
        flush_interval_s=_seconds(args.flush_interval, "flush-interval"),
    )
    if args.host_label:
        config.host = args.host_label
    config.validate()
    return config


def _listen(args: argparse.Namespace):
    """``(host, port, web config)`` for --listen, or None; refused beyond loopback without TLS and
    basic auth (or --insecure), before anything is bound or sampled."""
    from loadkit.observe.exporter import parse_listen
    from loadkit.observe.webconfig import check_exposure, load_web_config

    if not args.listen:
        if args.web_config or args.insecure:
            raise CollectorError("--web-config and --insecure apply to --listen HOST:PORT, which is not given")
        return None
    host, port = parse_listen(args.listen)
    web_config = load_web_config(args.web_config) if args.web_config else None
    check_exposure(host, port, web_config, args.insecure)
    return host, port, web_config


def _run(args: argparse.Namespace) -> int:
    from loadkit.observe.collector import Collector
    from loadkit.observe.exporter import Exporter
    from loadkit.observe.groups import check_groups_match

    config = build_config(args)
    listen = _listen(args)
    if not args.allow_missing:
        check_groups_match(config.groups, config.proc_root, config.cgroup_root)
    collector = Collector(config)
    exporter = Exporter(collector, *listen).start() if listen else None
    if exporter is not None:
        log.info("serving %s/metrics and %s/snapshot", exporter.url, exporter.url)
    # SIGTERM (a supervisor, `timeout`) and SIGINT end the run like Ctrl-C: flushed, not cut
    # short; set here, so a SIGINT the launcher ignored (a background job) still stops it
    previous = {sig: signal.signal(sig, lambda *_: collector.stop(timeout_s=0))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    started = time.perf_counter()
    status = _StatusLine(sys.stderr)
    try:
        collector.start()
        while collector.running:
            collector.join(0.1)
            status.show(collector, time.perf_counter() - started)
    except KeyboardInterrupt:
        pass
    finally:
        status.end()
        collector.stop()
        if exporter is not None:
            exporter.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    elapsed = time.perf_counter() - started
    summary = {
        "samples_n": collector.samples_n,
        "elapsed_s": round(elapsed, 3),
        "out_dir": str(config.out_dir) if config.out_dir else None,
        "mean_sample_s": round(collector.sample_s_total / max(1, collector.samples_n), 6),
        "overruns_n": collector.overruns_n,
        "warnings_n": len(collector.warn.keys),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    where = f" to {config.out_dir}" if config.out_dir else ""
    print(
        f"collected {collector.samples_n} samples in {elapsed:.1f} s{where} "
        f"(mean sample {1000 * collector.sample_s_total / max(1, collector.samples_n):.1f} ms, "
        f"overruns {collector.overruns_n}, warnings {len(collector.warn.keys)})"
    )
    return 0


class _StatusLine:
    """One line on a terminal, rewritten in place about once a second while collecting; nothing
    when stderr is not a terminal (a log file or a pipe gets no carriage returns)."""

    every_s = 1.0

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._last_s = -self.every_s
        self._shown = False

    def show(self, collector, elapsed_s: float) -> None:
        if not self.tty or elapsed_s - self._last_s < self.every_s:
            return
        self._last_s = elapsed_s
        n = collector.samples_n
        mean_ms = 1000 * collector.sample_s_total / max(1, n)
        self.stream.write(f"\r\033[Kcollect: {elapsed_s:.0f} s, {n} samples, mean sample {mean_ms:.1f} ms, "
                          f"overruns {collector.overruns_n}, warnings {len(collector.warn.keys)}")
        self.stream.flush()
        self._shown = True

    def end(self) -> None:
        if self._shown:  # the final summary starts on a line of its own
            self.stream.write("\n")
            self.stream.flush()
