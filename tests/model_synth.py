"""Synthetic run directories with known parameters, for the model tests and notebook tests.

Each writer makes a run directory in the ``RUN_LAYOUT`` format with :class:`PartWriter`, so the
models read it through :func:`loadkit.record.reader.load_run` exactly like a recorded run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loadkit.partfiles import PartWriter
from loadkit.schema import RUN_LAYOUT, GeneratorMetric, GroupSample, NetSample, RequestInterval

MiB = 2**20
T0 = 1_764_000_000.0  # a fixed start so runs are reproducible


def write_manifest(run_dir: Path, run_id: str, scenario: str, *, release: str = "synthetic",
                   started: float = T0, ended: float = T0 + 600, lab: dict | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = dict(run_id=run_id, scenario=scenario, release=release, status="completed",
                    started_unix_s=started, ended_unix_s=ended, profile={}, targets=[],
                    versions={}, host={}, lab=lab or {}, gates=[])
    (run_dir / RUN_LAYOUT["manifest"]).write_text(json.dumps(manifest))


def group_row(ts: float, group: str, sessions: float, memory: float, limit: float, *,
              oom_kills: int = 0, host: str = "lab") -> GroupSample:
    return GroupSample(ts_unix_s=ts, host=host, group=group, procs_n=int(sessions) + 2,
                       rss_bytes=int(memory * 6), uss_bytes=int(memory * 0.9), pss_bytes=int(memory),
                       cpu_percent=1.0, fds_n=int(sessions) * 2, tcp_established_n=int(sessions) * 2,
                       tcp_other_n=0, sessions_n=int(sessions), cgroup_memory_bytes=int(memory),
                       cgroup_limit_bytes=int(limit), cgroup_failcnt_n=0, cgroup_oom_kills_n=oom_kills)


def write_headroom_run(run_dir: Path, *, proxies: dict[str, tuple[float, float, float]] | None = None,
                       max_sessions: int = 100, step: int = 10, samples_per_step: int = 5,
                       noise_bytes: float = 0.5 * MiB, outliers: int = 3, seed: int = 1,
                       run_id: str = "headroom-synth", t0: float = T0, oom_kills_start: int = 0,
                       oom_at_sessions: int | None = None, curvature: float = 0.0,
                       ) -> dict[str, tuple[float, float, float]]:
    """Proxies ramped from 0 to ``max_sessions`` each: memory = base + per_session * sessions
    × (1 + curvature × sessions / 100) + noise.

    ``proxies``: name -> (base_bytes, bytes_per_session, limit_bytes). Returns it.
    ``oom_kills_start`` is each cgroup's cumulative OOM-kill counter when the run starts (kills
    in earlier runs); from ``oom_at_sessions`` on, the first proxy's counter is one higher.
    """
    proxies = proxies or {f"proxy{i}": (30 * MiB, 1.2 * MiB, 256 * MiB) for i in (1, 2, 3)}
    rng = np.random.default_rng(seed)
    writer = PartWriter(run_dir / RUN_LAYOUT["groups"])
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
                writer.append(group_row(ts, name, s, mem, limit, oom_kills=kills))
        writer.flush()
    # a few wild samples (a reclaim, a restart) that a robust fit must shrug off
    for k in range(outliers):
        ts += 1.0
        name = list(proxies)[k % len(proxies)]
        base, per, limit = proxies[name]
        kills = oom_kills_start + int(name == first and oom_at_sessions is not None)
        writer.append(group_row(ts, name, max_sessions // 2, base + per * max_sessions * 1.5, limit,
                                oom_kills=kills))
    writer.flush()
    write_manifest(run_dir, run_id, "imap_hold_ramp", started=t0, ended=ts)
    return proxies


def write_usl_run(run_dir: Path, *, sigma: float = 0.03, kappa: float = 2e-4, lambda_: float = 900.0,
                  levels=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96), intervals_per_level: int = 5,
                  noise: float = 0.01, seed: int = 2, run_id: str = "usl-synth") -> None:
    """A closed-loop stepped run: throughput from the USL, latency from Little's law (N / X)."""
    rng = np.random.default_rng(seed)
    req = PartWriter(run_dir / RUN_LAYOUT["requests"])
    gen = PartWriter(run_dir / RUN_LAYOUT["generator"])
    ts = T0
    for n in levels:
        x = lambda_ * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))
        for _ in range(intervals_per_level):
            ts += 2.0
            xi = x * (1 + rng.normal(0, noise))
            lat = n / xi
            req.append(RequestInterval(ts, 2.0, "IMAP", "LOGIN", int(round(xi * 2.0)), 0, lat, lat,
                                       lat * 1.5, lat * 1.8, lat * 2.5, lat * 4))
            gen.append(GeneratorMetric(ts, "users", "gauge", float(n)))
    req.flush()
    gen.flush()
    write_manifest(run_dir, run_id, "imap_login_steps", ended=ts)


def write_retry_run(run_dir: Path, *, metastable: bool, base_qps: float = 1000.0, trigger_qps: float = 4000.0,
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
    gen = PartWriter(run_dir / RUN_LAYOUT["generator"])
    net = PartWriter(run_dir / RUN_LAYOUT["net"])
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
            gen.append(GeneratorMetric(ts, metric, "counter", value))
        net.append(NetSample(ts, "lab", int(ans_c), int(drops_c), int(drops_c), 0, 0, 0, 0, 0, 0, 0, 0,
                             10, 1, 0, 0, 0))
    gen.flush()
    net.flush()
    write_manifest(run_dir, run_id or ("retry-metastable" if metastable else "retry-recovers"),
                   "dns_trigger", ended=ts)
    return {"trigger_start_unix_s": T0 + before_s, "trigger_end_unix_s": T0 + before_s + trigger_s}


def kpi_trace(days: int = 7, step_s: float = 60.0, spike_at_s: float = 12.5 * 3600, spike_len_s: float = 300.0,
              spike_height: float = 50.0, shift_day: int | None = 4, shift: float = 30.0, seed: int = 4,
              wander: float = 0.0, wander_s: float = 3600.0, daily_amplitude: float = 0.0,
              plateau_s: float = 0.0, plateau_height: float = 0.0, plateau_day: int = 1):
    """A week of a per-minute KPI (e.g. RcvbufErrors per minute): noise, a daily 12:30 spike of
    ``spike_len_s``, and a level shift at the start of ``shift_day``. Returns (series, truth).

    ``wander``: a slow AR(1) drift of that standard deviation and correlation time ``wander_s``
    (real KPIs drift; white noise alone makes every hourly mean look sharp).
    ``daily_amplitude``: a day/night cycle (sine, peak at 15:00). ``plateau_s``: one long spike
    of ``plateau_height`` at 03:00 on ``plateau_day``."""
    import math

    import pandas as pd

    rng = np.random.default_rng(seed)
    t = T0 - (T0 % 86400) + np.arange(0, days * 86400, step_s)
    v = 10.0 + rng.normal(0, 1.0, len(t))
    if wander > 0:
        phi = math.exp(-step_s / wander_s)
        w = np.empty(len(t))
        w[0] = rng.normal(0, wander)
        kicks = rng.normal(0, wander * math.sqrt(1 - phi**2), len(t))
        for k in range(1, len(t)):
            w[k] = phi * w[k - 1] + kicks[k]
        v += w
    if daily_amplitude:
        v += daily_amplitude * np.sin(2 * np.pi * ((t % 86400) / 86400.0 - 0.375))
    if plateau_s > 0:
        p0 = t[0] + plateau_day * 86400 + 3 * 3600
        v[(t >= p0) & (t < p0 + plateau_s)] += plateau_height
    sod = t % 86400
    v[(sod >= spike_at_s) & (sod < spike_at_s + spike_len_s)] += spike_height
    shift_ts = None
    if shift_day is not None:
        shift_ts = t[0] + shift_day * 86400 + 6 * 3600
        v[t >= shift_ts] += shift
    s = pd.Series(v, index=pd.to_datetime(t, unit="s"), name="rcvbuf_errors_per_min")
    return s, {"spike_at_s": spike_at_s, "spike_len_s": spike_len_s, "shift_ts": shift_ts, "t0": t[0],
               "plateau_ts": (t[0] + plateau_day * 86400 + 3 * 3600) if plateau_s > 0 else None}
