"""Synthetic run records in the :data:`loadkit.schema.RUN_LAYOUT` format, for tests and benchmarks.

Two kinds of run, each with known parameters so a test can check what a model or a report says:

- :func:`write_mail_run`: an IMAP (or POP3) storm through ``proxies`` proxies in memory cgroups of
  ``limit_bytes``, round-robin. Each proxy's cgroup charge is ``base_bytes + bytes_per_session *
  sessions``; total sessions ramp linearly to ``peak_sessions``. A proxy whose charge would pass
  its limit is OOM-killed (an ``oom_kill`` event), drops its sessions and fails its clients.
- :func:`write_dns_run`: an open-loop DNS flood with periodic bursts against one UDP socket whose
  receive buffer holds ``rcvbuf_datagrams`` queries; what overflows it is dropped (``RcvbufErrors``)
  and retried by the clients ``retry_factor`` times as often a second later.

Everything goes through the recorder's own :class:`loadkit.record.writer.RunWriter`, one part
file per ``chunk_s`` of run time, as in a recorded run. Runs are deterministic for a given ``seed``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

import numpy as np

from loadkit.record.writer import RunWriter
from loadkit.schema import (
    Event,
    FailureInterval,
    GeneratorMetric,
    GroupSample,
    NetSample,
    RequestInterval,
    RunManifest,
    SocketSample,
    SystemSample,
)

MIB = 1024 * 1024

MAIL_NAMES = ("connect+greeting", "LOGIN", "SELECT", "FETCH", "LOGOUT")
DNS_NAMES = ("A",)


def _manifest(
    run_id: str,
    scenario: str,
    release: str,
    status: str,
    started: float,
    ended: float,
    targets: list[str],
    lab: dict,
    profile: dict,
    gates: list[dict],
) -> RunManifest:
    return RunManifest(
        run_id=run_id,
        scenario=scenario,
        release=release,
        status=status,
        started_unix_s=started,
        ended_unix_s=ended,
        profile=profile,
        targets=targets,
        versions={"loadkit": "0.1.0", "locust": "synthetic", "python": "3.11", "kernel": "synthetic"},
        host={"hostname": "runfactory", "cpus": 2, "mem_total_bytes": 8 * 1024 * MIB},
        lab=lab,
        gates=gates,
    )


def _request_rows(
    ts: float,
    request_type: str,
    names: Iterable[str],
    requests_n: int,
    failures_n: int,
    latency_s: float,
) -> list[RequestInterval]:
    rows = []
    for i, name in enumerate(names):
        lat = latency_s * (1.0 + 0.1 * i)
        rows.append(
            RequestInterval(
                ts_unix_s=ts,
                interval_s=1.0,
                request_type=request_type,
                name=name,
                requests_n=int(requests_n),
                failures_n=int(min(failures_n, requests_n)),
                latency_mean_s=lat,
                latency_p50_s=lat * 0.9,
                latency_p90_s=lat * 1.6,
                latency_p95_s=lat * 2.0,
                latency_p99_s=lat * 3.0,
                latency_max_s=lat * 5.0,
            )
        )
    return rows


def _net_row(ts: float, host: str, counters: dict[str, int], prev: dict[str, int]) -> dict:
    row = NetSample(
        ts_unix_s=ts,
        host=host,
        udp_in_datagrams_n=counters["udp_in_datagrams_n"],
        udp_in_errors_n=counters["udp_rcvbuf_errors_n"],
        udp_rcvbuf_errors_n=counters["udp_rcvbuf_errors_n"],
        udp_sndbuf_errors_n=0,
        udp_no_ports_n=0,
        udp6_in_datagrams_n=0,
        udp6_in_errors_n=0,
        udp6_rcvbuf_errors_n=0,
        tcp_listen_overflows_n=0,
        tcp_listen_drops_n=0,
        tcp_backlog_drops_n=0,
        sockets_used_n=200,
        udp_mem_pages=10,
        conntrack_count_n=0,
        conntrack_max_n=0,
        softnet_dropped_n=0,
    )._asdict()
    for key in ("udp_in_datagrams_n", "udp_in_errors_n", "udp_rcvbuf_errors_n"):
        row[f"{key}_delta"] = row[key] - prev.get(key, row[key])
    return row


def write_mail_run(
    root: str | Path,
    *,
    run_id: str = "mail-run",
    release: str = "r1",
    scenario: str = "proxies_fall_over",
    request_type: str = "IMAP",
    names: Iterable[str] = MAIL_NAMES,
    proxies: int = 3,
    limit_bytes: int = 256 * MIB,
    bytes_per_session: float = 1.2 * MIB,
    base_bytes: float = 20 * MIB,
    peak_sessions: int = 750,
    duration_s: int = 120,
    chunk_s: int = 10,
    started_unix_s: float | None = None,
    status: str = "completed",
    forecast_peak_sessions: int | None = 400,
    noise_bytes: float = 0.3 * MIB,
    latency_spike_at_s: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a mail storm run; return its directory (``root/run_id``)."""
    rng = np.random.default_rng(seed)
    names = tuple(names)
    run_dir = Path(root) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    started = float(started_unix_s if started_unix_s is not None else time.time() - duration_s - 60)
    proxy_names = [f"proxy{i + 1}" for i in range(proxies)]
    lab = {
        "imap": ["127.0.0.1", 1143],
        "pop3": ["127.0.0.1", 1110],
        "proxies": [
            {"name": n, "cgroup": f"/sys/fs/cgroup/loadkit/{n}", "limit_bytes": limit_bytes}
            for n in proxy_names
        ],
    }
    profile = {"scenario": scenario, "protocol": request_type.lower(), "users": peak_sessions}
    if forecast_peak_sessions is not None:  # where a profile's [gates] table puts it
        profile["gates"] = {"forecast_peak_sessions": forecast_peak_sessions}
    gates = [{"name": "failure_ratio<=0.5", "passed": True, "value": 0.0, "limit": 0.5}]
    w = RunWriter(run_dir)
    w.write_manifest(
        _manifest(run_id, scenario, release, "running", started, 0.0, ["tcp://127.0.0.1:1143"], lab, profile, []),
    )
    w.add(Event(started, "run_started", "runfactory", {"run_id": run_id}))
    alive = [True] * proxies
    logins = 0.0
    failures_total = 0
    for second in range(1, duration_s + 1):
        ts = started + second
        total = peak_sessions * second / duration_s
        per_proxy = total / proxies
        held = 0
        fails_now = 0
        for i, name in enumerate(proxy_names):
            sessions = per_proxy + rng.normal(0, 1.5)
            sessions = max(0.0, sessions)
            memory = base_bytes + bytes_per_session * sessions + rng.normal(0, noise_bytes)
            if alive[i] and memory >= limit_bytes:
                alive[i] = False
                w.add(Event(ts, "oom_kill", name, {"pid": 1000 + i, "process": "dovecot"}))
                w.add(Event(ts, "process_exited", name, {"pid": 1000 + i, "root": True}))
            if not alive[i]:
                fails_now += int(sessions)
                sessions, memory = 0.0, base_bytes * 0.2
            held += int(sessions)
            w.add(
                GroupSample(
                    ts_unix_s=ts,
                    host="runfactory",
                    group=name,
                    procs_n=int(sessions) + 3 if alive[i] else 0,
                    rss_bytes=int(memory * 6),
                    uss_bytes=int(memory * 0.9),
                    pss_bytes=int(memory),
                    cpu_percent=float(min(100.0, sessions / 10)),
                    fds_n=int(sessions * 2) + 10,
                    tcp_established_n=int(sessions * 2),
                    tcp_other_n=0,
                    sessions_n=int(round(sessions)),
                    cgroup_memory_bytes=int(memory),
                    cgroup_limit_bytes=int(limit_bytes),
                    cgroup_failcnt_n=0 if alive[i] else 1,
                    cgroup_oom_kills_n=0 if alive[i] else 1,
                )
            )
        rate = peak_sessions / duration_s
        logins += rate
        failures_total += fails_now
        load = held / max(1.0, peak_sessions)
        latency = 0.004 + 0.02 * load**3 + abs(rng.normal(0, 0.0005))
        if latency_spike_at_s is not None and second == latency_spike_at_s:
            latency *= 25
        w.add_many(
            _request_rows(ts, request_type, names, max(1, round(rate)), min(fails_now, round(rate)), latency)
        )
        if fails_now:
            w.add(
                FailureInterval(ts, 1.0, request_type, names[0], "eof_after_login", min(fails_now, round(rate)))
            )
        proto = request_type.lower()
        w.add_many(
            [
                GeneratorMetric(ts, f"{proto}.logins", "counter", logins),
                GeneratorMetric(ts, f"{proto}.held_sessions", "gauge", float(held)),
                GeneratorMetric(ts, "users", "gauge", float(round(total))),
            ]
        )
        w.add(
            SystemSample(ts, "runfactory", 4 * 1024 * MIB - int(held * MIB), 8 * 1024 * MIB, 0, 1.0, 50.0)
        )
        if second % chunk_s == 0:
            w.flush()
    w.add(Event(started + duration_s, "run_ended", "runfactory", {"status": status}))
    w.flush()
    if status != "running":
        w.write_manifest(
            _manifest(
                run_id, scenario, release, status, started, started + duration_s,
                ["tcp://127.0.0.1:1143"], lab, profile, gates,
            ),
        )
    return run_dir


def write_dns_run(
    root: str | Path,
    *,
    run_id: str = "dns-run",
    release: str = "r1",
    scenario: str = "dns_burst_retry_storm",
    names: Iterable[str] = DNS_NAMES,
    base_rate_qps: float = 2000.0,
    burst_queries: int = 1200,
    burst_every_s: int = 10,
    rcvbuf_datagrams: int = 256,
    service_rate_qps: float = 20000.0,
    retry_factor: float = 1.0,
    duration_s: int = 120,
    chunk_s: int = 10,
    started_unix_s: float | None = None,
    status: str = "completed",
    forecast_peak_qps: float | None = 3000.0,
    other_server_drops_per_s: int = 0,
    seed: int = 0,
) -> Path:
    """Write a DNS burst run; return its directory (``root/run_id``).

    ``other_server_drops_per_s``: drops of another server's socket on the same host
    (127.0.3.1:5353), which the host-wide RcvbufErrors count and the target's socket does not.

    Each second carries ``base_rate_qps`` queries; every ``burst_every_s`` seconds a burst of
    ``burst_queries`` arrives at once. Of a burst, what does not fit in the buffer (plus what the
    server serves while it arrives, taken as nothing: a burst is instantaneous) is dropped.
    """
    rng = np.random.default_rng(seed)
    names = tuple(names)
    run_dir = Path(root) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    started = float(started_unix_s if started_unix_s is not None else time.time() - duration_s - 60)
    profile = {"scenario": scenario, "protocol": "dns", "rate_qps": base_rate_qps}
    if forecast_peak_qps is not None:
        profile["forecast_peak_qps"] = forecast_peak_qps
    gates = [{"name": "failure_ratio<=0.05", "passed": True, "value": 0.0, "limit": 0.05}]
    # the kernel doubles a requested so-rcvbuf; the lab records the requested value
    lab = {"dns": ["127.0.0.1", 5353], "dns_so_rcvbuf_bytes": rcvbuf_datagrams * 832 // 2}
    w = RunWriter(run_dir)
    w.write_manifest(
        _manifest(run_id, scenario, release, "running", started, 0.0, ["udp://127.0.0.1:5353"], lab, profile, []),
    )
    w.add(Event(started, "run_started", "runfactory", {"run_id": run_id}))
    original = retry = answered = dropped = 0.0
    counters = {"udp_in_datagrams_n": 10_000, "udp_rcvbuf_errors_n": 5}
    prev: dict[str, int] = {}
    sock_drops = other_drops = 0
    pending_retries = 0.0
    for second in range(1, duration_s + 1):
        ts = started + second
        new = base_rate_qps + rng.normal(0, base_rate_qps * 0.01)
        burst = burst_queries if second % burst_every_s == 0 else 0
        retries_now = pending_retries
        offered = new + burst + retries_now
        # steady traffic is served as it arrives; a burst lands at once on the buffer
        steady_drops = max(0.0, new + retries_now - service_rate_qps)
        burst_drops = max(0.0, burst - rcvbuf_datagrams)
        drops = steady_drops + burst_drops
        pending_retries = drops * retry_factor
        original += new + burst
        retry += retries_now
        answered += offered - drops
        dropped += drops
        counters["udp_in_datagrams_n"] += int(offered - drops)
        counters["udp_rcvbuf_errors_n"] += int(drops) + other_server_drops_per_s
        sock_drops += int(drops)
        other_drops += other_server_drops_per_s
        w.add_row("net", _net_row(ts, "runfactory", counters, prev))
        prev = dict(counters)
        w.add_many(
            [
                SocketSample(ts, "runfactory", 5353, int(min(burst, rcvbuf_datagrams) * 832), 0, sock_drops, "127.0.0.1"),
                SocketSample(ts, "runfactory", 5353, 0, 0, other_drops, "127.0.3.1"),
            ]
        )
        latency = 0.0004 + (0.003 if burst else 0.0) + abs(rng.normal(0, 0.00005))
        timeouts = int(drops)
        w.add_many(_request_rows(ts, "DNS", names, round(offered), timeouts, latency))
        if timeouts:
            w.add(FailureInterval(ts, 1.0, "DNS", names[0], "timeout", timeouts))
        w.add_many(
            [
                GeneratorMetric(ts, "dns.original_sent", "counter", original),
                GeneratorMetric(ts, "dns.retry_sent", "counter", retry),
                GeneratorMetric(ts, "dns.answered", "counter", answered),
                GeneratorMetric(ts, "dns.dropped", "counter", dropped),
                GeneratorMetric(ts, "dns.timeouts", "counter", dropped),
            ]
        )
        w.add(
            GroupSample(ts, "runfactory", "unbound", 1, 40 * MIB, 30 * MIB, 32 * MIB, 60.0, 20, 0, 0, 0, 0, 0, 0, 0)
        )
        w.add(SystemSample(ts, "runfactory", 4 * 1024 * MIB, 8 * 1024 * MIB, 0, 1.0, 60.0))
        if second % chunk_s == 0:
            w.flush()
    w.add(Event(started + duration_s, "run_ended", "runfactory", {"status": status}))
    w.flush()
    if status != "running":
        w.write_manifest(
            _manifest(
                run_id, scenario, release, status, started, started + duration_s,
                ["udp://127.0.0.1:5353"], lab, profile, gates,
            ),
        )
    return run_dir
