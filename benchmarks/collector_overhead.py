"""Collector overhead with many watched processes.

Starts ``--procs`` (500) ``sleep`` children of its own, watches them as one process group, samples
at ``--interval`` (1 s) for ``--seconds`` and prints:

- the collector's CPU as % of one core at that interval (goal: <= 2 % at 1 s with 500 processes);
- the time one sample takes (mean, p95, max) and from it the fastest sustainable interval;
- the cost of reading USS/PSS for every member on every sample (off by default: every 10 s);
- the anchor, measured in the same run on the same processes: a plain
  ``psutil.process_iter(["name", "cmdline", "memory_info", "cpu_times", "num_fds"])`` scan per
  tick, which is what re-matching every process each tick would cost; the ratio to it is the
  figure to compare across machines.

Every child is killed by its PID at the end. Figures on a shared 2-core machine are noisy:
run it more than once and read the ratio rather than the absolute milliseconds.

    python benchmarks/collector_overhead.py [--procs 500] [--seconds 20] [--interval 1]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time

import psutil

from loadkit.observe.collector import Collector, CollectorConfig
from loadkit.observe.groups import parse_group_spec


def spawn(n: int, tag: str) -> list[subprocess.Popen]:
    return [subprocess.Popen(["sleep", tag], stdin=subprocess.DEVNULL) for _ in range(n)]


def naive_scan(pattern: re.Pattern) -> int:
    """The anchor: every process re-read and re-matched, as a simple per-tick loop would."""
    n = 0
    for p in psutil.process_iter(["name", "cmdline", "memory_info", "cpu_times", "num_fds"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if pattern.search(cmd):
            n += 1
    return n


def measure(config: CollectorConfig, seconds: float) -> tuple[float, list[float], int, Collector]:
    """(CPU % of one core, sample durations, members seen, collector) for a collector thread."""
    collector = Collector(config)
    durations: list[float] = []
    members = []
    collector.add_sink(lambda s: (durations.append(s.sample_s), members.append(s.groups[0].procs_n)))
    collector.start()
    while collector.samples_n < 1:  # the first sample classifies every process: not steady state
        time.sleep(0.01)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    collector.stop()
    cpu = time.process_time() - cpu0  # the main thread only sleeps: this is the collector's CPU
    wall = time.perf_counter() - wall0
    return 100.0 * cpu / wall, durations, max(members) if members else 0, collector


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()

    tag = f"900.{os.getpid()}"  # a sleep length unique to this run: matches only our children
    spec = parse_group_spec(f"watched=cmdline:^sleep {re.escape(tag)}$")
    children = spawn(args.procs, tag)
    try:
        time.sleep(1.0)
        pattern = re.compile(spec.pattern)
        t = time.perf_counter()
        anchor_runs = 5
        for _ in range(anchor_runs):
            found = naive_scan(pattern)
        anchor_s = (time.perf_counter() - t) / anchor_runs
        host_procs = len(psutil.pids())

        base = dict(groups=[spec], udp_ports=[5353], interval_s=args.interval)
        cpu_pct, durs, members, _ = measure(CollectorConfig(**base, full_memory_interval_s=None), args.seconds)
        steady = durs[1:] or durs  # the first sample classifies every process on the host
        mean_s, p95_s, max_s = statistics.mean(steady), pct(steady, 0.95), max(steady)
        cpu_ms = 10 * cpu_pct * args.interval  # CPU ms per sample: % of one core x interval
        _, dflt, _, _ = measure(CollectorConfig(**base), min(args.seconds, 12))  # USS/PSS every 10 s
        _, durs_full, _, _ = measure(CollectorConfig(**base, full_memory_interval_s=0.001), min(args.seconds, 6))
        full_s = statistics.mean(durs_full[1:] or durs_full)
        # the fastest interval that keeps up: the shortest one with under 5 % of ticks skipped
        fastest, trials = None, []
        for interval in (0.1, 0.2, 0.3, 0.5, 1.0):
            c_pct, d, _, col = measure(CollectorConfig(groups=[spec], udp_ports=[5353], interval_s=interval, full_memory_interval_s=None), 4)
            ticks = len(d) + col.overruns_n
            trials.append(f"{interval:g} s: {col.overruns_n}/{ticks} ticks skipped, CPU {c_pct:.1f} %")
            if col.overruns_n <= 0.05 * ticks:
                fastest = interval
                break

        print(f"watched processes: {members} of {args.procs} started (host has {host_procs} processes)")
        print(f"anchor (process_iter scan + match per tick): {1000 * anchor_s:.1f} ms per tick, found {found}")
        print(f"collector at {args.interval:g} s for {args.seconds:g} s: {len(durs)} samples, first {1000 * durs[0]:.1f} ms (classifies every process)")
        print(f"  sample time mean {1000 * mean_s:.1f} ms, p95 {1000 * p95_s:.1f} ms, max {1000 * max_s:.1f} ms")
        print(f"  ratio to anchor: {mean_s / anchor_s:.2f}x the time of one naive scan")
        print(f"  collector CPU: {cpu_pct:.2f} % of one core (goal <= 2 %), {cpu_ms:.1f} ms CPU per sample")
        print(f"  with the default USS/PSS refresh (every 10 s): mean {1000 * statistics.mean(dflt[1:] or dflt):.1f} ms per sample")
        print(f"with USS/PSS of every member on every sample: {1000 * full_s:.1f} ms per sample "
              f"({full_s / mean_s:.1f}x the default sample)")
        print("interval trials: " + "; ".join(trials))
        print(f"fastest sustainable interval: {fastest:g} s" if fastest else "fastest sustainable interval: > 1 s on this host now")
        print("note: shared 2-core host; figures vary between runs")
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()


if __name__ == "__main__":
    main()
