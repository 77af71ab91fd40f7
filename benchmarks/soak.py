"""Soak: does a long run leak memory or file descriptors?

Brings up a lab of its own (``--address``, default 127.0.0.1; ``--lab-dir`` to reuse a running
one), starts a ``loadkit collect --listen`` on loopback, and runs a profile with a DNS burst load
(``dns_burst.py``) and an IMAP login storm (``imap_storm.py``, sessions held ``--dwell`` seconds,
then LOGOUT and a new login) through ``loadkit run --workers 1`` for ``--minutes`` (default 30).
Every ``--every`` seconds (10) it samples the RSS and open descriptors of

- ``generator``: the Locust worker (DNS sender and IMAP users),
- ``master``: the Locust master (the recorder, pulling the collector),
- ``collector``: the ``loadkit collect`` process,
- ``runner``: the ``loadkit run`` process,

and after the warm-up (``--warmup-minutes``, default a fifth of the run, at least 2) prints, per
process, the least-squares slope of RSS in MiB per 10 minutes and the change in open descriptors.
The goal: at most 1 MiB per 10 min and no descriptor growth. The anchor printed beside it is the
process's RSS at the end of the warm-up (a slope is read against that size). Samples go to
``--csv``. Every process it starts is stopped by its PID; the lab it made is brought down.

    python benchmarks/soak.py --minutes 30 [--address 127.0.0.1] [--csv soak.csv]
    python benchmarks/soak.py --from-csv soak.csv [--warmup-minutes 9]   # the figures again

The table also gives the slope over the second half of the samples after the warm-up: a process
that grows early and then levels off (a cache filling) shows a flat second half; a leak does not.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from loadkit.lab import Lab, LabConfig

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024

PROFILE = """
[run]
scenario = "soak"
release = "soak"
duration = "{duration_s}s"
stop_timeout = "5s"
[targets]
dns = "{address}:{dns_port}"
imap = "{address}:{imap_port}"
allowlist = ["127.0.0.0/8"]
[load]
locustfile = ["{root}/locustfiles/dns_burst.py", "{root}/locustfiles/imap_storm.py"]
users = {users}
spawn_rate = {users}
options = {{ dns-rate = {dns_rate}, dns-burst-size = {burst}, dns-burst-period = 10, dns-first-burst = 2, dns-names-file = "{names}", mail-accounts = "{accounts}", mail-dwell = {dwell}, mail-reconnect = "fixed", mail-reconnect-delay = 1.0 }}
[collect]
urls = ["http://127.0.0.1:{collector_port}"]
interval_s = 1.0
[caps]
max_users = 200
max_duration_s = "{cap_s}s"
max_rate_qps = 20000
[record]
interval_s = 1.0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slope_per_10min(ts: list[float], values: list[float]) -> float:
    """Least-squares slope of ``values`` against ``ts`` (seconds), scaled to 600 s."""
    n = len(ts)
    if n < 2:
        return float("nan")
    mt, mv = sum(ts) / n, sum(values) / n
    den = sum((t - mt) ** 2 for t in ts)
    return 600.0 * sum((t - mt) * (v - mv) for t, v in zip(ts, values)) / den if den else float("nan")


def roles(runner: psutil.Process, collector: psutil.Process) -> dict[str, psutil.Process]:
    """The processes to watch, found among the runner's children by their Locust role."""
    found = {"runner": runner, "collector": collector}
    try:
        for child in runner.children():
            cmd = child.cmdline()
            if "--worker" in cmd:
                found.setdefault("generator", child)
            elif "--master" in cmd:
                found["master"] = child
    except psutil.Error:
        pass
    return found


def sample(procs: dict[str, psutil.Process]) -> dict[str, tuple[int, int]]:
    out = {}
    for role, p in procs.items():
        try:
            out[role] = (p.memory_info().rss, p.num_fds())
        except psutil.Error:
            continue
    return out


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # a process this script started
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="length of the load run (default 30)")
    ap.add_argument("--warmup-minutes", type=float, default=None,
                    help="samples before this are left out of the slope (default: a fifth, at least 2)")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between samples (default 10)")
    ap.add_argument("--address", default="127.0.0.1", help="loopback address of the lab to make")
    ap.add_argument("--lab-dir", type=Path, default=None, help="use (or make) the lab in this directory")
    ap.add_argument("--users", type=int, default=21, help="Locust users, split over DNS and IMAP (default 21)")
    ap.add_argument("--dns-rate", type=int, default=300, help="DNS base rate, q/s (default 300)")
    ap.add_argument("--burst", type=int, default=300, help="DNS burst size every 10 s (default 300)")
    ap.add_argument("--dwell", type=float, default=1.0, help="seconds each IMAP session is held (default 1)")
    ap.add_argument("--csv", type=Path, default=None, help="write the samples here")
    ap.add_argument("--from-csv", type=Path, default=None,
                    help="no run: print the figures of samples written earlier with --csv")
    args = ap.parse_args()
    if args.from_csv:
        with open(args.from_csv, newline="") as fh:
            rows = [{**r, "elapsed_s": float(r["elapsed_s"]), "rss_bytes": int(r["rss_bytes"]),
                     "fds_n": int(r["fds_n"])} for r in csv.DictReader(fh)]
        minutes = max(r["elapsed_s"] for r in rows) / 60
        warm = args.warmup_minutes if args.warmup_minutes is not None else max(2.0, minutes / 5)
        return report(rows, 60 * warm)
    duration_s = int(args.minutes * 60)
    warmup_s = 60 * (args.warmup_minutes if args.warmup_minutes is not None else max(2.0, args.minutes / 5))

    work = Path(tempfile.mkdtemp(prefix="loadkit-soak-"))
    lab_dir = args.lab_dir or work / "lab"
    lab = Lab.from_dir(lab_dir) if args.lab_dir else Lab(LabConfig(dir=lab_dir, address=args.address))
    made_lab = not lab.status().running
    status = lab.up()
    collector_port = free_port()
    groups = ["--group", f"dns=cmdline:unbound -d -c {status.dir}/conf/unbound.conf"]
    for p in status.proxies:
        spec = f"cgroup:{p.cgroup}" if p.cgroup else f"cmdline:dovecot -F -c .*{p.name}"
        groups += ["--group", f"{p.name}={spec}@{p.imap.port},{p.pop3.port}"]
    collector = subprocess.Popen(
        [sys.executable, "-m", "loadkit", "collect", *groups, "--udp-port", str(status.dns.port),
         "--interval", "1", "--listen", f"127.0.0.1:{collector_port}", "--duration", str(duration_s + 300)],
        stdout=subprocess.DEVNULL, stderr=open(work / "collector.log", "w"))
    profile = work / "soak.toml"
    profile.write_text(PROFILE.format(
        duration_s=duration_s, cap_s=duration_s + 60, address=status.dns.host, dns_port=status.dns.port,
        imap_port=status.imap.port, root=ROOT, users=args.users, dns_rate=args.dns_rate, burst=args.burst,
        names=status.names_file, accounts=status.accounts_file, dwell=args.dwell,
        collector_port=collector_port))
    runner = None
    rows: list[dict] = []
    try:
        time.sleep(2.0)  # the collector's endpoint comes up
        runner = subprocess.Popen(
            [sys.executable, "-m", "loadkit", "run", str(profile), "--out", str(work / "runs"), "--workers", "1"],
            stdout=open(work / "run.log", "w"), stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        runner_ps, collector_ps = psutil.Process(runner.pid), psutil.Process(collector.pid)
        print(f"soak: {args.minutes:g} min, samples every {args.every:g} s, warm-up {warmup_s / 60:g} min, "
              f"work dir {work}", flush=True)
        next_at = t0 + args.every
        while runner.poll() is None:
            time.sleep(max(0.0, next_at - time.perf_counter()))
            next_at += args.every
            elapsed = time.perf_counter() - t0
            if elapsed > duration_s:
                continue  # the load has ended: processes wind down and exit, not a leak figure
            for role, (rss, fds) in sample(roles(runner_ps, collector_ps)).items():
                if not rss:
                    continue  # gone (a zombie has no memory)
                rows.append({"elapsed_s": round(elapsed, 1), "role": role, "rss_bytes": rss, "fds_n": fds})
            if len(rows) and int(elapsed) % 300 < args.every:
                now = {r["role"]: r for r in rows if r["elapsed_s"] == round(elapsed, 1)}
                print(f"  {elapsed / 60:5.1f} min  " + "  ".join(
                    f"{k} {v['rss_bytes'] / MiB:.1f} MiB/{v['fds_n']} fds" for k, v in sorted(now.items())), flush=True)
        print(f"soak: loadkit run exited with status {runner.returncode} (log {work / 'run.log'})")
    finally:
        if runner is not None:
            stop(runner)
        stop(collector)
        if made_lab and not args.lab_dir:
            lab.down()
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["elapsed_s", "role", "rss_bytes", "fds_n"])
            w.writeheader()
            w.writerows(rows)
    return report(rows, warmup_s)


def report(rows: list[dict], warmup_s: float) -> int:
    ok = True
    print(f"{'process':10} {'samples':>7} {'rss@warmup MiB':>14} {'rss@end MiB':>11} "
          f"{'slope MiB/10min':>15} {'2nd half':>8} {'fds@warmup':>10} {'fds@end':>7} {'fds max':>7}")
    for role in ("generator", "master", "collector", "runner"):
        mine = [r for r in rows if r["role"] == role and r["elapsed_s"] >= warmup_s]
        if len(mine) < 3:
            print(f"{role:10} too few samples after the warm-up ({len(mine)})")
            ok = False
            continue
        ts = [r["elapsed_s"] for r in mine]
        rss = [r["rss_bytes"] / MiB for r in mine]
        fds = [r["fds_n"] for r in mine]
        slope = slope_per_10min(ts, rss)
        # the slope over the second half tells a plateau reached late in the warm-up from a leak
        half = len(ts) // 2
        late = slope_per_10min(ts[half:], rss[half:])
        fd_growth = fds[-1] - fds[0]
        ok = ok and slope <= 1.0 and fd_growth <= 0
        print(f"{role:10} {len(mine):7d} {rss[0]:14.1f} {rss[-1]:11.1f} {slope:15.3f} {late:8.3f} "
              f"{fds[0]:10d} {fds[-1]:7d} {max(fds):7d}")
    print(f"goal: <= 1 MiB per 10 min and no fd growth after the warm-up: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
