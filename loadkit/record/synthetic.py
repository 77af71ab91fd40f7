"""Made-up run records with known parameters: try the models and the report on runs whose answers
are known, without a lab.

Each writer makes one run directory in the :data:`loadkit.schema.RUN_LAYOUT` format through the
recorder's own :class:`~loadkit.record.writer.RunWriter`, so :func:`loadkit.record.reader.load_run`
reads it exactly like a recorded run. Runs are deterministic for a given ``seed``::

    from loadkit.record.synthetic import write_mail_run
    from loadkit.record.reader import load_run
    from loadkit import model

    run_dir = write_mail_run("runs", proxies=3, bytes_per_session=1.2 * 2**20, peak_sessions=750)
    print(model.fit_headroom(load_run(run_dir)).summary())   # about 200 sessions per 256 MiB proxy

Whole runs, as a recorder would leave them (manifest, requests, failures, samples, events):

- :func:`write_mail_run`: an IMAP (or POP3) storm through ``proxies`` proxies in memory cgroups
  of ``limit_bytes``, round robin. Each proxy's charge is ``base_bytes + bytes_per_session *
  sessions``; sessions ramp linearly to ``peak_sessions``. A proxy whose charge passes its limit
  is OOM-killed (an ``oom_kill`` event), drops its sessions and fails its clients.
- :func:`write_dns_run`: an open-loop DNS flood with periodic bursts against one UDP socket whose
  receive buffer holds ``rcvbuf_datagrams`` queries; what overflows is dropped (``RcvbufErrors``)
  and retried ``retry_factor`` times as often a second later.

One table each, for a single model:

- :func:`write_headroom_run`: proxies' memory against sessions (the headroom fit).
- :func:`write_usl_run`: a closed-loop stepped run from the Universal Scalability Law.
- :func:`write_retry_run`: generator counters of a trigger-then-remove DNS run, metastable or not.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from loadkit import __version__
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
#: a fixed start for the single-table runs, so they are reproducible
T0 = 1_764_000_000.0

MAIL_NAMES = ("connect+greeting", "LOGIN", "SELECT", "FETCH", "LOGOUT")
DNS_NAMES = ("A",)
#: a UDP query's share of a loopback socket's receive buffer
_DATAGRAM_BYTES = 832


# --------------------------------------------------------------------------------------------
# manifests and rows
# --------------------------------------------------------------------------------------------


def write_manifest(run_dir: str | Path, run_id: str, scenario: str, *, release: str = "synthetic",
                   started: float = T0, ended: float = T0 + 600, lab: dict | None = None,
                   status: str = "completed", profile: dict | None = None, targets: list | None = None,
                   gates: list | None = None) -> dict[str, Any]:
    """Write (or rewrite) a synthetic run's manifest; the host and versions say it is made up."""
    manifest = RunManifest(
        run_id=run_id, scenario=scenario, release=release, status=status, started_unix_s=started,
        ended_unix_s=ended, profile=profile or {}, targets=targets or [],
        versions={"loadkit": __version__, "locust": "synthetic", "python": "synthetic", "kernel": "synthetic"},
        host={"hostname": "synthetic", "cpus": 2, "mem_total_bytes": 8 * 1024 * MIB}, lab=lab or {},
        gates=gates or [],
    )
    return RunWriter(run_dir).write_manifest(manifest)


def group_row(ts: float, group: str, sessions: float, memory: float, limit: float, *,
              oom_kills: int = 0, host: str = "lab") -> GroupSample:
    """One process group's sample whose cgroup charge (and PSS) is ``memory``; RSS overstates it
    six times, as shared pages do for dovecot."""
    return GroupSample(ts_unix_s=ts, host=host, group=group, procs_n=int(sessions) + 2,
                       rss_bytes=int(memory * 6), uss_bytes=int(memory * 0.9), pss_bytes=int(memory),
                       cpu_percent=1.0, fds_n=int(sessions) * 2, tcp_established_n=int(sessions) * 2,
                       tcp_other_n=0, sessions_n=int(sessions), cgroup_memory_bytes=int(memory),
                       cgroup_limit_bytes=int(limit), cgroup_failcnt_n=0, cgroup_oom_kills_n=oom_kills)


def request_rows(ts: float, request_type: str, names: Iterable[str], requests_n: int, failures_n: int,
                 latency_s: float, interval_s: float = 1.0) -> list[RequestInterval]:
    """One interval's rows, one per name; later names are 10 % slower each."""
    rows = []
    for i, name in enumerate(names):
        lat = latency_s * (1.0 + 0.1 * i)
        rows.append(RequestInterval(
            ts_unix_s=ts, interval_s=interval_s, request_type=request_type, name=name,
            requests_n=int(requests_n), failures_n=int(min(failures_n, requests_n)), latency_mean_s=lat,
            latency_p50_s=lat * 0.9, latency_p90_s=lat * 1.6, latency_p95_s=lat * 2.0,
            latency_p99_s=lat * 3.0, latency_max_s=lat * 5.0,
        ))
    return rows


def _net_row(ts: float, host: str, counters: dict[str, int], prev: dict[str, int]) -> dict:
    row = NetSample(
        ts_unix_s=ts, host=host, udp_in_datagrams_n=counters["udp_in_datagrams_n"],
        udp_in_errors_n=counters["udp_rcvbuf_errors_n"], udp_rcvbuf_errors_n=counters["udp_rcvbuf_errors_n"],
        udp_sndbuf_errors_n=0, udp_no_ports_n=0, udp6_in_datagrams_n=0, udp6_in_errors_n=0,
        udp6_rcvbuf_errors_n=0, tcp_listen_overflows_n=0, tcp_listen_drops_n=0, tcp_backlog_drops_n=0,
        sockets_used_n=200, udp_mem_pages=10, conntrack_count_n=0, conntrack_max_n=0, softnet_dropped_n=0,
    )._asdict()
    # the collector writes per-interval deltas beside the cumulative counters
    for key in ("udp_in_datagrams_n", "udp_in_errors_n", "udp_rcvbuf_errors_n"):
        row[f"{key}_delta"] = row[key] - prev.get(key, row[key])
    return row


def _start(run_dir: Path, duration_s: float, started_unix_s: float | None) -> tuple[RunWriter, float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    started = float(started_unix_s if started_unix_s is not None else time.time() - duration_s - 60)
    return RunWriter(run_dir), started


def _finish(w: RunWriter, started: float, duration_s: float, status: str, manifest: dict[str, Any]) -> None:
    w.add(Event(started + duration_s, "run_ended", "synthetic", {"status": status}))
    w.flush()
    if status != "running":
        write_manifest(w.run_dir, status=status, started=started, ended=started + duration_s, **manifest)


# --------------------------------------------------------------------------------------------
# a mail storm
# --------------------------------------------------------------------------------------------


class _Proxies:
    """The proxies of a mail run: memory per session, OOM kills, sessions they drop."""

    def __init__(self, n: int, limit_bytes: int, bytes_per_session: float, base_bytes: float,
                 noise_bytes: float, rng: np.random.Generator) -> None:
        self.names = [f"proxy{i + 1}" for i in range(n)]
        self.alive = [True] * n
        self.limit_bytes, self.per, self.base, self.noise = limit_bytes, bytes_per_session, base_bytes, noise_bytes
        self.rng = rng

    def lab(self) -> dict:
        return {"imap": ["127.0.0.1", 1143], "pop3": ["127.0.0.1", 1110],
                "proxies": [{"name": n, "cgroup": f"/sys/fs/cgroup/loadkit/{n}", "limit_bytes": self.limit_bytes}
                            for n in self.names]}

    def second(self, w: RunWriter, ts: float, total_sessions: float) -> tuple[int, int]:
        """Sample every proxy at ``ts``; ``(sessions held, sessions failed)``."""
        held = failed = 0
        for i, name in enumerate(self.names):
            sessions = max(0.0, total_sessions / len(self.names) + self.rng.normal(0, 1.5))
            memory = self.base + self.per * sessions + self.rng.normal(0, self.noise)
            if self.alive[i] and memory >= self.limit_bytes:
                self.alive[i] = False
                w.add(Event(ts, "oom_kill", name, {"pid": 1000 + i, "process": "dovecot"}))
                w.add(Event(ts, "process_exited", name, {"pid": 1000 + i, "root": True}))
            if not self.alive[i]:
                failed += int(sessions)
                sessions, memory = 0.0, self.base * 0.2
            held += int(sessions)
            w.add(self._sample(ts, name, sessions, memory, dead=not self.alive[i]))
        return held, failed

    def _sample(self, ts: float, name: str, sessions: float, memory: float, dead: bool) -> GroupSample:
        return GroupSample(
            ts_unix_s=ts, host="synthetic", group=name, procs_n=0 if dead else int(sessions) + 3,
            rss_bytes=int(memory * 6), uss_bytes=int(memory * 0.9), pss_bytes=int(memory),
            cpu_percent=float(min(100.0, sessions / 10)), fds_n=int(sessions * 2) + 10,
            tcp_established_n=int(sessions * 2), tcp_other_n=0, sessions_n=int(round(sessions)),
            cgroup_memory_bytes=int(memory), cgroup_limit_bytes=int(self.limit_bytes),
            cgroup_failcnt_n=int(dead), cgroup_oom_kills_n=int(dead),
        )


def write_mail_run(
    root: str | Path, *, run_id: str = "mail-run", release: str = "r1", scenario: str = "proxies_fall_over",
    request_type: str = "IMAP", names: Iterable[str] = MAIL_NAMES, proxies: int = 3,
    limit_bytes: int = 256 * MIB, bytes_per_session: float = 1.2 * MIB, base_bytes: float = 20 * MIB,
    peak_sessions: int = 750, duration_s: int = 120, chunk_s: int = 10, started_unix_s: float | None = None,
    status: str = "completed", forecast_peak_sessions: int | None = 400, noise_bytes: float = 0.3 * MIB,
    latency_spike_at_s: int | None = None, seed: int = 0,
) -> Path:
    """Write a mail storm run (see the module docstring); return its directory ``root/run_id``."""
    rng = np.random.default_rng(seed)
    names = tuple(names)
    w, started = _start(Path(root) / run_id, duration_s, started_unix_s)
    pool = _Proxies(proxies, limit_bytes, bytes_per_session, base_bytes, noise_bytes, rng)
    profile: dict[str, Any] = {"scenario": scenario, "protocol": request_type.lower(), "users": peak_sessions}
    if forecast_peak_sessions is not None:  # where a profile's [gates] table puts it
        profile["gates"] = {"forecast_peak_sessions": forecast_peak_sessions}
    manifest = dict(run_id=run_id, scenario=scenario, release=release, lab=pool.lab(), profile=profile,
                    targets=["tcp://127.0.0.1:1143"])
    write_manifest(w.run_dir, status="running", started=started, ended=0.0, **manifest)
    w.add(Event(started, "run_started", "synthetic", {"run_id": run_id}))
    proto, rate = request_type.lower(), peak_sessions / duration_s
    logins = 0.0
    for second in range(1, duration_s + 1):
        ts = started + second
        total = peak_sessions * second / duration_s
        held, failed = pool.second(w, ts, total)
        latency = 0.004 + 0.02 * (held / max(1.0, peak_sessions)) ** 3 + abs(rng.normal(0, 0.0005))
        if latency_spike_at_s is not None and second == latency_spike_at_s:
            latency *= 25
        failures_n = min(failed, round(rate))
        w.add_many(request_rows(ts, request_type, names, max(1, round(rate)), failures_n, latency))
        if failed:
            w.add(FailureInterval(ts, 1.0, request_type, names[0], "eof_after_login", failures_n))
        logins += rate
        w.add_many([GeneratorMetric(ts, f"{proto}.logins", "counter", logins),
                    GeneratorMetric(ts, f"{proto}.held_sessions", "gauge", float(held)),
                    GeneratorMetric(ts, "users", "gauge", float(round(total)))])
        w.add(SystemSample(ts, "synthetic", 4 * 1024 * MIB - int(held * MIB), 8 * 1024 * MIB, 0, 1.0, 50.0))
        if second % chunk_s == 0:
            w.flush()
    gates = [{"name": "failure_ratio<=0.5", "passed": True, "value": 0.0, "limit": 0.5}]
    _finish(w, started, duration_s, status, dict(manifest, gates=gates))
    return w.run_dir


# --------------------------------------------------------------------------------------------
# a DNS burst run
# --------------------------------------------------------------------------------------------


class _DnsServer:
    """One UDP socket with a buffer of ``rcvbuf_datagrams``, its drops and the clients' retries."""

    def __init__(self, rcvbuf_datagrams: int, service_rate_qps: float, retry_factor: float,
                 other_server_drops_per_s: int) -> None:
        self.rcvbuf, self.service, self.retry_factor = rcvbuf_datagrams, service_rate_qps, retry_factor
        self.other_per_s = other_server_drops_per_s
        self.totals = dict.fromkeys(("original", "retry", "answered", "dropped"), 0.0)
        self.host = {"udp_in_datagrams_n": 10_000, "udp_rcvbuf_errors_n": 5}
        self.prev: dict[str, int] = {}
        self.sock_drops = self.other_drops = 0
        self.pending_retries = 0.0

    def second(self, new: float, burst: int) -> tuple[float, float]:
        """One second of ``new`` queries plus a burst landing at once: ``(offered, dropped)``."""
        retries = self.pending_retries
        offered = new + burst + retries
        # steady traffic is served as it arrives; a burst lands at once on the buffer
        drops = max(0.0, new + retries - self.service) + max(0.0, burst - self.rcvbuf)
        self.pending_retries = drops * self.retry_factor
        for key, value in (("original", new + burst), ("retry", retries), ("answered", offered - drops),
                           ("dropped", drops)):
            self.totals[key] += value
        self.host["udp_in_datagrams_n"] += int(offered - drops)
        self.host["udp_rcvbuf_errors_n"] += int(drops) + self.other_per_s
        self.sock_drops += int(drops)
        self.other_drops += self.other_per_s
        return offered, drops

    def write(self, w: RunWriter, ts: float, burst: int) -> None:
        w.add_row("net", _net_row(ts, "synthetic", self.host, self.prev))
        self.prev = dict(self.host)
        queued_bytes = int(min(burst, self.rcvbuf) * _DATAGRAM_BYTES)
        w.add_many([SocketSample(ts, "synthetic", 5353, queued_bytes, 0, self.sock_drops, "127.0.0.1"),
                    SocketSample(ts, "synthetic", 5353, 0, 0, self.other_drops, "127.0.3.1")])
        t = self.totals
        w.add_many([GeneratorMetric(ts, "dns.original_sent", "counter", t["original"]),
                    GeneratorMetric(ts, "dns.retry_sent", "counter", t["retry"]),
                    GeneratorMetric(ts, "dns.answered", "counter", t["answered"]),
                    GeneratorMetric(ts, "dns.dropped", "counter", t["dropped"]),
                    GeneratorMetric(ts, "dns.timeouts", "counter", t["dropped"])])


def write_dns_run(
    root: str | Path, *, run_id: str = "dns-run", release: str = "r1", scenario: str = "dns_burst_retry_storm",
    names: Iterable[str] = DNS_NAMES, base_rate_qps: float = 2000.0, burst_queries: int = 1200,
    burst_every_s: int = 10, rcvbuf_datagrams: int = 256, service_rate_qps: float = 20000.0,
    retry_factor: float = 1.0, duration_s: int = 120, chunk_s: int = 10, started_unix_s: float | None = None,
    status: str = "completed", forecast_peak_qps: float | None = 3000.0, other_server_drops_per_s: int = 0,
    seed: int = 0,
) -> Path:
    """Write a DNS burst run (see the module docstring); return its directory ``root/run_id``.

    ``other_server_drops_per_s``: drops of another server's socket on the same host
    (127.0.3.1:5353), which the host-wide RcvbufErrors count and the target's socket does not.
    A burst is taken as instantaneous: the server serves nothing while it arrives.
    """
    rng = np.random.default_rng(seed)
    names = tuple(names)
    w, started = _start(Path(root) / run_id, duration_s, started_unix_s)
    profile: dict[str, Any] = {"scenario": scenario, "protocol": "dns", "rate_qps": base_rate_qps}
    if forecast_peak_qps is not None:
        profile["forecast_peak_qps"] = forecast_peak_qps
    # the kernel doubles a requested so-rcvbuf; the lab records the requested value
    lab = {"dns": ["127.0.0.1", 5353], "dns_so_rcvbuf_bytes": rcvbuf_datagrams * _DATAGRAM_BYTES // 2}
    manifest = dict(run_id=run_id, scenario=scenario, release=release, lab=lab, profile=profile,
                    targets=["udp://127.0.0.1:5353"])
    write_manifest(w.run_dir, status="running", started=started, ended=0.0, **manifest)
    w.add(Event(started, "run_started", "synthetic", {"run_id": run_id}))
    server = _DnsServer(rcvbuf_datagrams, service_rate_qps, retry_factor, other_server_drops_per_s)
    for second in range(1, duration_s + 1):
        ts = started + second
        burst = burst_queries if second % burst_every_s == 0 else 0
        offered, drops = server.second(base_rate_qps + rng.normal(0, base_rate_qps * 0.01), burst)
        server.write(w, ts, burst)
        latency = 0.0004 + (0.003 if burst else 0.0) + abs(rng.normal(0, 0.00005))
        w.add_many(request_rows(ts, "DNS", names, round(offered), int(drops), latency))
        if int(drops):
            w.add(FailureInterval(ts, 1.0, "DNS", names[0], "timeout", int(drops)))
        w.add(GroupSample(ts, "synthetic", "unbound", 1, 40 * MIB, 30 * MIB, 32 * MIB, 60.0, 20, 0, 0, 0, 0, 0, 0, 0))
        w.add(SystemSample(ts, "synthetic", 4 * 1024 * MIB, 8 * 1024 * MIB, 0, 1.0, 60.0))
        if second % chunk_s == 0:
            w.flush()
    gates = [{"name": "failure_ratio<=0.05", "passed": True, "value": 0.0, "limit": 0.05}]
    _finish(w, started, duration_s, status, dict(manifest, gates=gates))
    return w.run_dir


# --------------------------------------------------------------------------------------------
# one table for one model
# --------------------------------------------------------------------------------------------


def write_headroom_run(run_dir: str | Path, *, proxies: dict[str, tuple[float, float, float]] | None = None,
                       max_sessions: int = 100, step: int = 10, samples_per_step: int = 5,
                       noise_bytes: float = 0.5 * MIB, outliers: int = 3, seed: int = 1,
                       run_id: str = "headroom-synth", t0: float = T0, oom_kills_start: int = 0,
                       oom_at_sessions: int | None = None, curvature: float = 0.0,
                       ) -> dict[str, tuple[float, float, float]]:
    """Proxies ramped from 0 to ``max_sessions`` each: memory = base + per_session * sessions
    × (1 + curvature × sessions / 100) + noise.

    ``proxies``: name -> (base_bytes, bytes_per_session, limit_bytes). Returns it.
    ``oom_kills_start`` is each cgroup's cumulative OOM-kill counter when the run starts (kills
    in earlier runs); from ``oom_at_sessions`` on, the first proxy's counter is one higher.
    """
    proxies = proxies or {f"proxy{i}": (30 * MIB, 1.2 * MIB, 256 * MIB) for i in (1, 2, 3)}
    rng = np.random.default_rng(seed)
    w = RunWriter(run_dir)
    ts = t0
    first = next(iter(proxies))
    for sessions in range(0, max_sessions + 1, step):
        for _ in range(samples_per_step):
            ts += 1.0
            for name, (base, per, limit) in proxies.items():
                # jitter the per-proxy count around the step like a real balancer
                s = max(0, sessions + int(rng.integers(-1, 2)))
                kills = oom_kills_start + int(name == first and oom_at_sessions is not None
                                              and sessions >= oom_at_sessions)
                mem = base + per * s * (1 + curvature * s / 100) + rng.normal(0, noise_bytes)
                w.add(group_row(ts, name, s, mem, limit, oom_kills=kills))
        w.flush()
    # a few wild samples (a reclaim, a restart) that a robust fit must shrug off
    for k in range(outliers):
        ts += 1.0
        name = list(proxies)[k % len(proxies)]
        base, per, limit = proxies[name]
        kills = oom_kills_start + int(name == first and oom_at_sessions is not None)
        w.add(group_row(ts, name, max_sessions // 2, base + per * max_sessions * 1.5, limit, oom_kills=kills))
    w.flush()
    write_manifest(run_dir, run_id, "imap_hold_ramp", started=t0, ended=ts)
    return proxies


def write_usl_run(run_dir: str | Path, *, sigma: float = 0.03, kappa: float = 2e-4, lambda_: float = 900.0,
                  levels=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96), intervals_per_level: int = 5,
                  noise: float = 0.01, seed: int = 2, run_id: str = "usl-synth") -> None:
    """A closed-loop stepped run: throughput from the USL, latency from Little's law (N / X)."""
    rng = np.random.default_rng(seed)
    w = RunWriter(run_dir)
    ts = T0
    for n in levels:
        x = lambda_ * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))
        for _ in range(intervals_per_level):
            ts += 2.0
            xi = x * (1 + rng.normal(0, noise))
            lat = n / xi
            w.add(RequestInterval(ts, 2.0, "IMAP", "LOGIN", int(round(xi * 2.0)), 0, lat, lat,
                                  lat * 1.5, lat * 1.8, lat * 2.5, lat * 4))
            w.add(GeneratorMetric(ts, "users", "gauge", float(n)))
    w.flush()
    write_manifest(run_dir, run_id, "imap_login_steps", ended=ts)


def write_retry_run(run_dir: str | Path, *, metastable: bool, base_qps: float = 1000.0, trigger_qps: float = 4000.0,
                    capacity_qps: float = 2500.0, retries_per_drop: float = 0.5, before_s: int = 30,
                    trigger_s: int = 20, after_s: int = 60, interval_s: float = 1.0,
                    run_id: str | None = None, seed: int = 3) -> dict:
    """Counters of a trigger-then-remove DNS run from a small queueing simulation.

    Offered = original + retries of the previous interval's drops; the server answers up to
    ``capacity_qps``. With ``metastable`` the server's capacity collapses under overload (the
    drops themselves cost work: a full conntrack table, a thrashing cache) so retries keep it
    saturated after the trigger; otherwise capacity stays put and the retries drain.
    """
    rng = np.random.default_rng(seed)
    w = RunWriter(run_dir)
    ts = T0
    orig_c = retry_c = ans_c = drops_c = 0.0
    pending_retries = 0.0
    overloaded = False
    total = before_s + trigger_s + after_s
    for k in range(int(total / interval_s)):
        t_rel = k * interval_s
        ts += interval_s
        orig = (trigger_qps if before_s <= t_rel < before_s + trigger_s else base_qps) * interval_s
        orig *= 1 + rng.normal(0, 0.01)
        retry = pending_retries
        offered = orig + retry
        cap = capacity_qps * interval_s
        if metastable and overloaded:
            cap *= 0.3  # goodput collapse under overload
        answered = min(offered, cap)
        dropped = offered - answered
        overloaded = dropped > 0.05 * offered
        pending_retries = dropped * retries_per_drop
        orig_c += orig
        retry_c += retry
        ans_c += answered
        drops_c += dropped
        for metric, value in (("dns.original_sent", orig_c), ("dns.retry_sent", retry_c), ("dns.answered", ans_c)):
            w.add(GeneratorMetric(ts, metric, "counter", value))
        w.add(NetSample(ts, "lab", int(ans_c), int(drops_c), int(drops_c), 0, 0, 0, 0, 0, 0, 0, 0, 10, 1, 0, 0, 0))
    w.flush()
    write_manifest(run_dir, run_id or ("retry-metastable" if metastable else "retry-recovers"),
                   "dns_trigger", ended=ts)
    return {"trigger_start_unix_s": T0 + before_s, "trigger_end_unix_s": T0 + before_s + trigger_s}


__all__ = [
    "DNS_NAMES",
    "MAIL_NAMES",
    "MIB",
    "T0",
    "group_row",
    "request_rows",
    "write_dns_run",
    "write_headroom_run",
    "write_mail_run",
    "write_manifest",
    "write_retry_run",
    "write_usl_run",
]
