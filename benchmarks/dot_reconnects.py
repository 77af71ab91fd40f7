"""What a DoT reconnect storm costs a resolver: full vs resumed handshakes vs UDP, side by side.

Every client sends its next query after its idle timeout has closed its connection, so every
query opens a new TLS connection (as handsets do after a network change). The same query rate
is sent three ways against the same unbound: UDP (the anchor), DoT with session resumption and
DoT with full handshakes. Printed per mode: answered q/s, handshakes, answer latency p50/p99
and the resolver's CPU seconds per 1,000 queries (psutil, the process listening on the port),
with the ratio to UDP.

    python benchmarks/dot_reconnects.py --address 127.0.0.1 --dns-port 5353 --dot-port 5853 \\
        --names .loadkit/lab/names.txt --clients 200 --rate 400 --seconds 5
"""

from __future__ import annotations

import argparse
import time

import psutil
from gevent import monkey

monkey.patch_all()

from loadkit.generate.dns.users import DnsSettings, build_sender, plan  # noqa: E402


def _owner(address: str, port: int) -> psutil.Process | None:
    for c in psutil.net_connections("tcp"):
        if c.laddr and c.laddr.port == port and c.laddr.ip == address and c.status == psutil.CONN_LISTEN and c.pid:
            return psutil.Process(c.pid)
    return None


def _cpu_s(proc: psutil.Process | None) -> float:
    if proc is None:
        return float("nan")
    t = proc.cpu_times()
    return t.user + t.system


def run(mode: str, a: argparse.Namespace, server: psutil.Process | None) -> dict:
    protocol, resume = {"udp": ("udp", "on"), "dot-resumed": ("dot", "on"), "dot-full": ("dot", "off")}[mode]
    port = a.dns_port if protocol == "udp" else a.dot_port
    settings = DnsSettings(host=f"{a.address}:{port}", names_file=a.names, rate_qps=a.rate, burst_size_n=0,
                           protocol=protocol, sources=a.clients, tls_resume=resume, timeout_s=2.0, retries=0,
                           # a client's queries are clients/rate apart: idle for less than that
                           idle_timeout_s=min(0.05, a.clients / a.rate / 4), stats_interval_s=1.0)
    sender = build_sender(plan(settings))
    sender.max_duration_s = a.seconds
    me = psutil.Process()
    cpu0, mine0, t0 = _cpu_s(server), _cpu_s(me), time.perf_counter()
    sender.open()
    try:
        sender.run()
    finally:
        sender.close()
    elapsed_s = time.perf_counter() - t0
    t = sender.totals
    answered = t.get("dns.answered", 0)
    return {
        "mode": mode,
        "answered_share": answered / max(t.get("dns.original_sent", 0), 1),
        "answered_qps": answered / elapsed_s,
        "client_cpu_ms_per_kq": (_cpu_s(me) - mine0) / max(answered, 1) * 1e6,
        "full": t.get("dns.tls_handshakes_full", 0),
        "resumed": t.get("dns.tls_handshakes_resumed", 0),
        "p50_ms": sender.answer_latency.percentile_s(0.5) * 1000,
        "p99_ms": sender.answer_latency.percentile_s(0.99) * 1000,
        "cpu_ms_per_kq": (_cpu_s(server) - cpu0) / max(answered, 1) * 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--dns-port", type=int, default=5353)
    p.add_argument("--dot-port", type=int, default=5853)
    p.add_argument("--names", default=".loadkit/lab/names.txt")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--rate", type=float, default=400.0)
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args()
    server = _owner(a.address, a.dns_port)
    rows = [run(mode, a, server) for mode in ("udp", "dot-resumed", "dot-full")]
    anchor = rows[0]["cpu_ms_per_kq"]
    print(f"{a.clients} clients, {a.rate:g} q/s offered for {a.seconds:g} s, one new connection per DoT query")
    print(f"{'mode':<12} {'answered':>8} {'answered q/s':>12} {'full':>6} {'resumed':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'server CPU ms/1000 q':>21} {'x UDP':>6} {'client CPU ms/1000 q':>21}")
    for r in rows:
        print(f"{r['mode']:<12} {r['answered_share']:>8.1%} {r['answered_qps']:>12.0f} {r['full']:>6} {r['resumed']:>8} "
              f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['cpu_ms_per_kq']:>21.0f} {r['cpu_ms_per_kq'] / anchor:>6.1f} "
              f"{r['client_cpu_ms_per_kq']:>21.0f}")


if __name__ == "__main__":
    main()
