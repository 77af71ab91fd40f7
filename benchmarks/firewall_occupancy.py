"""Firewall occupancy: Little's law (new-flow rate x UDP timeout) against the table's real fill.

Brings up a lab of its own on ``--address`` with a stateful firewall (``--sessions`` entries,
``--timeout`` s per entry) in front of DNS, then sends queries through it open loop at
``--rate`` new flows per second, each from a fresh client socket (a stub resolver that picks a new
source port per query: every query is a new session; ``--sources`` loopback source addresses in
turn), for ``--seconds``. Once a full timeout has passed, it reads the table's entries (the collector's reader) several times and compares each
with Little's law, L = lambda W: lambda the new-flow rate measured from the flows actually sent,
W the timeout (a one-packet flow's entry lives exactly that long), counted in distinct
(address, port) keys, since the kernel reuses random ephemeral ports (:func:`occupancy`).

The table is sized well above the prediction, so this is occupancy before saturation. Prints
predicted and measured, the cost of one table reading, and last ``error_pct=`` (mean relative
error of the readings). Needs root and nft (as the lab's firewall does). Bounded by
``--seconds`` and ``--rate``; the lab is brought down at the end.

    python benchmarks/firewall_occupancy.py [--rate 2000] [--timeout 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import bisect
import math
import socket
import struct
import sys
import tempfile
import time

from loadkit.errors import LoadkitError
from loadkit.lab import Lab, LabConfig
from loadkit.lab.firewall import family, table_name
from loadkit.observe.firewall import read_table


def _query(qid: int) -> bytes:
    return struct.pack("!HHHHHH", qid & 0xFFFF, 0x0100, 1, 0, 0, 0) + b"\x03lab\x04test\x00" + struct.pack("!HH", 6, 1)


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """How many source ports the kernel picks from (32768-60999: 28,232)."""
    with open(path) as f:
        lo, hi = map(int, f.read().split())
    return hi - lo + 1


def occupancy(rate_per_s: float, timeout_s: float, keys_n: int) -> float:
    """Expected entries: Little's law, lambda x W, counted in distinct (address, port) keys.

    The kernel picks each new socket's port at random from its ephemeral range, so among the
    lambda W flows of one timeout some share a port and are one session; with K possible keys
    the expected number of distinct ones is K (1 - exp(-lambda W / K)). With one source address
    and 6,000 flows per timeout that is 10 % below lambda W (measured here: 5,410 of 6,000).
    """
    flows = rate_per_s * timeout_s
    return keys_n * -math.expm1(-flows / keys_n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="127.0.91.1")
    ap.add_argument("--rate", type=float, default=2000.0, help="new flows per second")
    ap.add_argument("--timeout", type=float, default=3.0, help="firewall UDP timeout, s")
    ap.add_argument("--seconds", type=float, default=8.0, help="how long to send (> 2 timeouts)")
    ap.add_argument("--sources", type=int, default=1,
                    help="client source addresses 127.1.0.1... (more: fewer shared ports)")
    ap.add_argument("--sessions", type=int, default=100000, help="table size (above the prediction)")
    a = ap.parse_args(argv)
    if a.seconds < 2 * a.timeout or a.rate <= 0 or a.rate > 20000 or not 1 <= a.sources <= 5000:
        ap.error("need --seconds >= 2 x --timeout, 0 < --rate <= 20000, 1 <= --sources <= 5000")
    with tempfile.TemporaryDirectory(prefix="lk-fw-bench-") as tmp:
        cfg = LabConfig(dir=tmp, address=a.address, accounts=10, proxies=1,
                        firewall_sessions=a.sessions, firewall_udp_timeout_s=a.timeout)
        lab = Lab(cfg)
        try:
            lab.up()
            readings = _run(a, cfg)
        except LoadkitError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        finally:
            lab.down()
    errors = []
    for predicted, measured, read_s in readings:
        errors.append((predicted - measured) / measured * 100 if measured else float("nan"))
        print(f"predicted={predicted:.0f} measured={measured} read_s={read_s:.3f}")
    naive = a.rate * a.timeout
    print(f"rate_flows_per_s={a.rate:g} timeout_s={a.timeout:g} sources={a.sources} "
          f"little_law_without_port_reuse={naive:.0f}")
    print(f"error_pct={sum(errors) / len(errors):.2f}")
    return 0


def _run(a: argparse.Namespace, cfg: LabConfig) -> list[tuple[float, int, float]]:
    target = (cfg.address, cfg.firewall_dns_port)
    sources = [f"127.1.{i // 250}.{1 + i % 250}" for i in range(a.sources)]
    keys = a.sources * ephemeral_ports()
    fam, table = family(cfg), table_name(cfg)
    sent_at: list[float] = []  # perf_counter time of each flow's only packet
    readings = []
    start = time.perf_counter()
    next_read = start + a.timeout * 1.2
    end = start + a.seconds
    n = 0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        due = int((now - start) * a.rate)  # open loop: catch up to the schedule
        while n < due:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((sources[n % len(sources)], 0))  # a fresh source port: a new session
                s.sendto(_query(n), target)
            sent_at.append(time.perf_counter())
            n += 1
        if now >= next_read:
            t0 = time.perf_counter()
            reading = read_table(fam, table)
            t1 = time.perf_counter()
            # the listing is a snapshot somewhere in [t0, t1] (the midpoint halves its spread);
            # Little's law with the new-flow rate measured over the whole run so far
            mid = (t0 + t1) / 2
            rate = bisect.bisect_right(sent_at, mid) / (mid - start)
            readings.append((occupancy(rate, a.timeout, keys), reading.entries_n, t1 - t0))
            next_read = time.perf_counter() + 0.5
        time.sleep(0.0005)
    return readings


if __name__ == "__main__":
    sys.exit(main())
