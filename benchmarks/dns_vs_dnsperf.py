"""loadkit's sustained DNS load against dnsperf, one after the other, on the same unbound.

Brings up its own lab on a loopback address (``--address``), runs ``dnsperf -c 1 -l 10`` with
the lab's names as A queries, then loadkit's sender in this one process for the same time, open
loop at dnsperf's rate, with full accounting (every reply matched and classified by RCODE, every
answer's latency in the fine histogram); then, stricter, the highest open-loop rate it keeps to
with under 1 % shortfall (short trials stepping down from dnsperf's rate). Prints the rates and,
last, a line with ``ratio=<loadkit answered qps / dnsperf qps>``. Both share two cores with whatever else
runs on the machine, so figures are noisy: compare ratios from the same run, not across runs.

    python benchmarks/dns_vs_dnsperf.py [--address 127.53.53.1] [--seconds 10]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadkit.generate.dns import schedule, wire
from loadkit.generate.dns.sender import DnsSender, SenderOptions
from loadkit.lab import Lab, LabConfig
from loadkit.profile.targets import check_target


def run_dnsperf(address: str, port: int, names: list[str], seconds: int, workdir: Path) -> float:
    queries = workdir / "dnsperf-queries.txt"
    queries.write_text("".join(f"{n} A\n" for n in names))
    cmd = ["dnsperf", "-c", "1", "-l", str(seconds), "-s", address, "-p", str(port), "-d", str(queries)]
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        sys.exit(f"dnsperf failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    for line in out.stdout.splitlines():
        if "Queries sent" in line or "Queries completed" in line or "Queries lost" in line or "Average Latency" in line:
            print("  dnsperf:", line.strip())
    m = re.search(r"Queries per second:\s+([\d.]+)", out.stdout)
    if not m:
        sys.exit(f"no 'Queries per second' in dnsperf's output:\n{out.stdout}")
    return float(m.group(1))


def run_loadkit(address: str, port: int, names: list[str], seconds: float, rate_qps: float,
                quiet: bool = False) -> tuple[float, float]:
    """``(answered qps, shortfall)`` of an open-loop run at ``rate_qps``: the shortfall is the
    share of the offered queries not answered (lost, or never sent because the sender fell
    behind its schedule)."""
    target = check_target(f"{address}:{port}", port)
    pool = wire.QueryPool(names, [("A", 1.0)])
    # sockets enough that outstanding queries never exhaust one socket's 16-bit IDs
    ports = max(1, int(rate_qps * 1.0 / 30000) + 1)
    sender = DnsSender(
        target,
        pool,
        SenderOptions(timeout_s=1.0, retries_n=0, ports_per_source=ports, max_duration_s=seconds),
        base=schedule.ConstantRate(rate_qps),
    )
    sender.open()
    t0 = time.perf_counter()
    try:
        sender.run()
    finally:
        sender.close()
    t = sender.totals
    sent = t.get("dns.original_sent", 0)
    answered = t.get("dns.answered", 0)
    loss = 1.0 - answered / (rate_qps * seconds) if rate_qps else 1.0
    if not quiet:
        print(f"  loadkit: offered {rate_qps:.0f} qps for {seconds:g} s over {ports} socket(s); "
              f"{time.perf_counter() - t0:.1f} s including the drain")
        print(f"  loadkit: {sender.summary()}")
    else:
        print(f"  loadkit trial: offered {rate_qps:.0f} qps for {seconds:g} s: "
              f"sent {sent / seconds:.0f} qps, answered {answered / seconds:.0f} qps, shortfall {loss * 100:.2f} %")
    return answered / seconds, loss


def find_rate(address: str, port: int, names: list[str], start_qps: float) -> float:
    """The highest offered rate (stepping down from ``start_qps`` by 15 %) that loadkit sustains
    with under 1 % shortfall in a 2-second trial: an open-loop sender has no outstanding-query window
    (dnsperf's -q), so it is run at the rate it can really carry."""
    rate = start_qps
    for _ in range(12):
        _, loss = run_loadkit(address, port, names, 2.0, rate, quiet=True)
        if loss < 0.01:
            return rate
        rate *= 0.85
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.53.53.1", help="loopback address for the lab")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("dnsperf") is None:
        sys.exit("dnsperf is not installed (Debian package dnsperf)")
    with tempfile.TemporaryDirectory(prefix="loadkit-bench-") as tmp:
        # a 4 MiB receive buffer on unbound, as a production resolver should have: with the
        # platform default (about 256 queries) any scheduling hiccup of an open-loop sender or
        # of unbound on a shared machine overflows it, which measures the buffer, not the sender
        lab = Lab(LabConfig(dir=Path(tmp) / "lab", address=args.address, dns_rcvbuf_bytes=4 * 1024 * 1024))
        status = lab.up()
        try:
            host, port = status.dns
            names = wire.load_names(status.names_file)
            print(f"lab unbound at {host}:{port}, {len(names)} names; 2 shared cores: figures are noisy")
            dnsperf_qps = run_dnsperf(host, port, names, args.seconds, Path(tmp))
            print(f"dnsperf: {dnsperf_qps:.0f} qps", flush=True)
            time.sleep(1.0)
            # like for like: dnsperf sends as fast as its outstanding-query window lets it, so
            # loadkit is offered dnsperf's own rate for the same time; what it gets answered,
            # every reply classified and timed, is its throughput
            loadkit_qps, loss = run_loadkit(host, port, names, args.seconds, dnsperf_qps)
            print(f"loadkit: {loadkit_qps:.0f} answered qps offered {dnsperf_qps:.0f} qps open loop "
                  f"(shortfall {loss * 100:.2f} %, every reply classified and timed)", flush=True)
            # stricter: the open-loop rate it keeps to schedule with under 1 % shortfall
            time.sleep(1.0)
            steady_qps = find_rate(host, port, names, dnsperf_qps)
            print(f"loadkit: keeps an open-loop schedule of {steady_qps:.0f} qps with < 1 % shortfall "
                  f"(2 s trials): {steady_qps / dnsperf_qps:.3f} of dnsperf")
        finally:
            lab.down()
    print(f"dnsperf_qps={dnsperf_qps:.0f} loadkit_qps={loadkit_qps:.0f} ratio={loadkit_qps / dnsperf_qps:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
