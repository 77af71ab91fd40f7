"""The waste term, tried on the lab: a full session table in front of a server that answers too late.

The firewall model (:func:`loadkit.model.firewall.waste_loop`) says a full table can hold itself
full at the original demand only when the attempts it admits are wasted: the table admits more
than the server serves (A > C) and the server's full queue delays answers past the stub's
timeout. This script brings up a lab of its own on ``--address`` with unbound at ``--dns-cpu``
and an 8 MiB receive buffer (a queue of about 10,000 queries, about 1 s at 10,000 q/s), reads the
DNS capacity C the lab calibrated, sizes the session table to admit ``--admit-ratio`` × C new
flows per second (size = ratio × C × timeout), and sends from one process, open loop, with
per-attempt source ports: ``--demand-ratio`` × C for 5 s, a trigger of ``--trigger-ratio`` × C
for 3 s, then the demand again for ``--after`` s. Prints the model's prediction for those
parameters, then per second the original, retried, answered and late queries, and last whether
goodput came back (``recovered=``).

Measured on a shared 2-core machine (C = 19,600 q/s at a tenth of a core, the lowest quota the
kernel allows): one sender process could not keep a 10,800 q/s schedule while it handled the
retries (between 240 and 20,700 originals a second), so that run says nothing about the server.
It needs a generator with cores of its own. Needs root and nft. Heavy: it offers up to three
times the demand; keep it off a machine others are measuring on.

    python benchmarks/firewall_waste.py [--admit-ratio 1.3] [--address 127.0.91.1]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

from loadkit.errors import LoadkitError
from loadkit.lab import Lab, LabConfig
from loadkit.lab import firewall as lab_firewall
from loadkit.model.firewall import firewall_model
from loadkit.model.udp import buffer_datagrams
from loadkit.observe.firewall import nft_binary, read_table

RCVBUF_BYTES = 8 * 1024 * 1024
STUB_TIMEOUT_S = 0.5
RETRIES_N = 2
FW_TIMEOUT_S = 3.0
TRIGGER_START_S, TRIGGER_END_S = 5.0, 8.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="127.0.91.1")
    ap.add_argument("--dns-cpu", type=float, default=0.1)
    ap.add_argument("--admit-ratio", type=float, default=1.3, help="table admissions / server capacity")
    ap.add_argument("--demand-ratio", type=float, default=0.55, help="original demand / server capacity")
    ap.add_argument("--trigger-ratio", type=float, default=1.6, help="trigger rate / server capacity")
    ap.add_argument("--after", type=float, default=15.0, help="seconds of demand after the trigger")
    a = ap.parse_args(argv)
    if not (0.1 <= a.demand_ratio < 1 and 0.1 <= a.admit_ratio <= 5 and 1 <= a.trigger_ratio <= 3
            and 3 <= a.after <= 60):
        ap.error("need 0.1 <= --demand-ratio < 1, 0.1 <= --admit-ratio <= 5, 1 <= --trigger-ratio <= 3, "
                 "3 <= --after <= 60")
    with tempfile.TemporaryDirectory(prefix="lk-fw-waste-") as tmp:
        cfg = LabConfig(dir=tmp, address=a.address, accounts=10, proxies=1, dns_cpu=a.dns_cpu,
                        dns_rcvbuf_bytes=RCVBUF_BYTES, firewall_sessions=1000, firewall_udp_timeout_s=FW_TIMEOUT_S)
        lab = Lab(cfg)
        try:
            status = lab.up()
            cap = status.dns_cpu.capacity_qps if status.dns_cpu else None
            if not cap:
                raise LoadkitError("the lab measured no DNS capacity (it needs --dns-cpu)")
            size = int(a.admit_ratio * cap * FW_TIMEOUT_S)
            # the same table, resized to the capacity just measured
            lab_firewall.create(dataclasses.replace(cfg, firewall_sessions=size), nft_binary())
            demand = a.demand_ratio * cap
            delay = buffer_datagrams(RCVBUF_BYTES) / cap
            pred = firewall_model(demand, size, FW_TIMEOUT_S, retries_n=RETRIES_N, capacity_qps=cap,
                                  queue_delay_s=delay, stub_timeout_s=STUB_TIMEOUT_S)
            print(f"capacity_qps={cap} demand_qps={demand:.0f} table={size} x {FW_TIMEOUT_S:g} s "
                  f"admits_qps={size / FW_TIMEOUT_S:.0f} queue_delay_s={delay:.2f} stub_timeout_s={STUB_TIMEOUT_S}")
            print(f"predicted={pred.predicted_verdict}: {pred.waste.reason}", flush=True)
            rows = _send(a, cfg, status.names_file, cap, demand)
            end = read_table(lab_firewall.family(cfg), lab_firewall.table_name(cfg))
            print(f"table entries at the end={end.entries_n} of {end.size_n}, firewall drops={end.drops_n}")
        except LoadkitError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        finally:
            lab.down()
    tail = [r for r in rows if r[0] > TRIGGER_END_S + a.after - 5]
    good = sum(r[3] for r in tail) / max(1.0, sum(r[1] for r in tail))
    print(f"answered/original over the last 5 s={good:.2f} recovered={good > 0.9}")
    return 0


def _send(a: argparse.Namespace, cfg: LabConfig, names_file: str, cap: float, demand: float) -> list[tuple]:
    from loadkit.generate.dns.schedule import RateCurve
    from loadkit.generate.dns.sender import DnsSender, source_addresses
    from loadkit.generate.dns.wire import QueryPool
    from loadkit.profile.targets import Target

    with open(names_file) as fh:
        names = fh.read().split()
    pool = QueryPool(names, [("A", 1.0)], size=5000, seed=3)
    total_s = TRIGGER_END_S + a.after

    def rate(t: float) -> float | None:
        if t >= total_s:
            return None
        return a.trigger_ratio * cap if TRIGGER_START_S <= t < TRIGGER_END_S else demand

    rows: list[tuple] = []
    t0 = time.time()

    def on_interval(rep) -> None:
        c = rep.counters
        row = (rep.ts_unix_s - t0, c.get("dns.original_sent", 0), c.get("dns.retry_sent", 0),
               c.get("dns.answered", 0), c.get("dns.late_replies", 0))
        rows.append(row)
        print("t={:5.1f} original={:6d} retry={:6d} answered={:6d} late={:6d}".format(*row), flush=True)

    sender = DnsSender(Target(cfg.address, cfg.address, cfg.firewall_dns_port), pool,
                       base=RateCurve(rate, peak_qps=a.trigger_ratio * cap), sources=source_addresses(50),
                       ports_per_source=40, timeout_s=STUB_TIMEOUT_S, retries_n=RETRIES_N, backoff=1.0,
                       port_policy="per-attempt", interval_s=1.0, max_duration_s=total_s + 5,
                       max_queries_n=int(cap * 3 * total_s), on_interval=on_interval)
    try:
        sender.run()
    finally:
        sender.close()
    return rows


if __name__ == "__main__":
    sys.exit(main())
