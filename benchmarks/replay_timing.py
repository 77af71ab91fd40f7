"""Replay timing: 100,000 queries of a capture replayed at x1 and x10 (goal: lateness p99 <= 1 ms
at 20,000 q/s), against a pure-asyncio replayer measured in the same run.

The capture is written by this script with dpkt (``--capture FILE`` replays your own instead):
``--queries`` UDP queries at Poisson arrivals of ``--rate`` q/s from ``--clients`` clients, for
names of the lab's zone. Both replayers read it with the same reader
(:func:`loadkit.generate.dns.replay_input.read_queries`, streamed), send each query from its
client's own loopback address at its recorded offset divided by the speed, and record each
query's lateness (actual minus scheduled send). loadkit's is the DNS replay of the locustfile
(:func:`loadkit.generate.dns.replay.build_sender`: retries, matching and accounting included);
the anchor is a plain asyncio loop (``asyncio.sleep`` to each due time, one datagram endpoint per
client). The target is a sink socket that never answers (the server cannot enter the figure;
timeouts 0.2 s, no retries) or ``--target host:port`` (a lab's unbound). Prints, per speed and
replayer, the recorded and achieved rates and lateness p50/p99 (the run record's histogram: upper
bucket edges), then ``ratio=`` (asyncio's p99 over loadkit's at x10: above 1, loadkit is closer to
schedule). Two shared cores: figures are noisy. ``replay_vs_drool.py`` replays the same capture with
drool too and measures every replayer's lateness at a kernel-timestamping sink.

    python benchmarks/replay_timing.py [--queries 100000] [--rate 2000] [--speeds 1,10] [--target 127.0.0.1:5353]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import dns.message
import dpkt

from loadkit.generate.dns import replay
from loadkit.generate.dns.histogram import LatencyHistogram
from loadkit.generate.dns.replay_input import read_queries
from loadkit.generate.dns.sender import source_addresses

GOAL_P99_S = 0.001
GOAL_RATE_QPS = 20000


def write_capture(path: Path, n: int, rate_qps: float, clients: int, seed: int = 5) -> Path:
    """``n`` UDP queries (A/AAAA for h00000..h09999.lab.test) at Poisson arrivals, Ethernet pcap."""
    rng = random.Random(seed)
    templates = {}
    for qtype in ("A", "AAAA"):
        m = dns.message.make_query("x.", qtype, use_edns=0, payload=1232)
        m.id = 0
        templates[qtype] = m.to_wire()
    t = 1_700_000_000.0
    with path.open("wb") as f:
        w = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
        for i in range(n):
            t += rng.expovariate(rate_qps)
            c = rng.randrange(clients)
            qtype = "A" if rng.random() < 0.8 else "AAAA"
            name = b"\x06h%05d\x03lab\x04test\x00" % rng.randrange(10000)
            tmpl = templates[qtype]
            msg = struct.pack("!H", i & 0xFFFF) + tmpl[2:12] + name + tmpl[15:]
            udp = dpkt.udp.UDP(sport=30000 + c, dport=53, data=msg, ulen=8 + len(msg))
            ip = dpkt.ip.IP(src=socket.inet_aton(f"198.19.{(c >> 8) & 255}.{c & 255}"), dst=socket.inet_aton("198.18.0.53"),
                            p=17, data=udp.pack(), ttl=64)
            w.writepkt(b"\x00" * 12 + b"\x08\x00" + ip.pack(), ts=t)
    return path


class _TimedSender(replay.ReplaySender):
    """The replay sender, noting its first and last original send (for the achieved rate)."""

    first_s = last_s = 0.0

    def _send_originals(self, n_base: int, n_burst: int) -> None:
        super()._send_originals(n_base, n_burst)
        now = time.perf_counter()
        self.first_s = self.first_s or now
        self.last_s = now


def loadkit_replay(capture: Path, target: str, speed: float, first_source: str, timeout_s: float):
    p = replay.plan(replay.ReplaySettings(host=target, file=str(capture), speed=speed, retries=0,
                                          timeout_s=timeout_s, first_source=first_source))
    sender = replay.build_sender(p)
    sender.__class__ = _TimedSender  # same object, timed
    sender.open()
    try:
        sender.run()
    finally:
        sender.close()
    sent = sender.totals.get("dns.original_sent", 0)
    return sent, sender.last_s - sender.first_s, sender.lateness, p.span_s


class _Sink(asyncio.DatagramProtocol):
    answers = 0

    def datagram_received(self, data: bytes, addr) -> None:
        _Sink.answers += 1


async def _asyncio_replay(capture: Path, host: str, port: int, speed: float, addresses: dict[str, str]):
    loop = asyncio.get_running_loop()
    transports = {}
    for client, src in addresses.items():
        transports[client], _ = await loop.create_datagram_endpoint(_Sink, local_addr=(src, 0),
                                                                    remote_addr=(host, port))
    lates: list[float] = []
    perf = time.perf_counter
    origin = None
    t0 = perf()
    first = last = 0.0
    qid = 0
    for q in read_queries(capture):
        if origin is None:
            origin = q.ts_unix_s
        due = t0 + (q.ts_unix_s - origin) / speed
        delay = due - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        now = perf()
        lates.append(now - due)
        qid = (qid + 1) & 0xFFFF
        transports[q.client].sendto(qid.to_bytes(2, "big") + q.tail)
        first = first or now
        last = now
    await asyncio.sleep(0.2)
    for tr in transports.values():
        tr.close()
    h = LatencyHistogram()
    h.add_many([max(x, 0.0) for x in lates])
    return len(lates), last - first, h


def asyncio_replay(capture: Path, target: str, speed: float, first_source: str):
    host, _, port = target.rpartition(":")
    clients: dict[str, int] = {}
    for q in read_queries(capture):
        clients.setdefault(q.client, len(clients))
    addrs = source_addresses(len(clients), first_source)
    return asyncio.run(_asyncio_replay(capture, host, int(port), speed, {c: addrs[i] for c, i in clients.items()}))


def _line(name: str, speed: float, n: int, span_rec_s: float, took_s: float, lateness: LatencyHistogram) -> str:
    rec = n / span_rec_s if span_rec_s else 0.0
    achieved = n / took_s if took_s > 0 else 0.0
    return (f"{name:8s} x{speed:<4g} sent={n} recorded={rec * speed:8.0f} q/s achieved={achieved:8.0f} q/s "
            f"lateness p50={lateness.percentile_s(0.5) * 1e6:7.0f} us p99={lateness.percentile_s(0.99) * 1e6:8.0f} us "
            f"max={lateness.max_s * 1e3:7.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=2000.0, help="recorded rate of the written capture (q/s)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--speeds", default="1,10")
    parser.add_argument("--capture", type=Path, default=None, help="replay this capture instead of writing one")
    parser.add_argument("--target", default="", help="host:port that answers (default: a sink that never does)")
    args = parser.parse_args()
    speeds = [float(x) for x in args.speeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        capture = args.capture or write_capture(Path(tmp) / "bench.pcap", args.queries, args.rate, args.clients)
        sink = None
        target = args.target
        if not target:
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sink.bind(("127.0.0.1", 0))
            target = f"127.0.0.1:{sink.getsockname()[1]}"
        span = replay.plan(replay.ReplaySettings(host=target, file=str(capture))).span_s
        print(f"capture {capture}: {args.queries if not args.capture else '?'} queries over {span:.1f} s; target "
              f"{target}{' (sink, no answers)' if sink else ''}", flush=True)
        p99 = {}
        for speed in speeds:
            n, took, late, span_s = loadkit_replay(capture, target, speed, "127.8.0.1", 0.2)
            print(_line("loadkit", speed, n, span_s, took, late), flush=True)
            p99[("loadkit", speed)] = late.percentile_s(0.99)
            n, took, late = asyncio_replay(capture, target, speed, "127.8.4.1")
            print(_line("asyncio", speed, n, span_s, took, late), flush=True)
            p99[("asyncio", speed)] = late.percentile_s(0.99)
        if sink is not None:
            sink.close()
    top = max(speeds)
    ok = p99[("loadkit", top)] <= GOAL_P99_S
    print(f"goal: lateness p99 <= {GOAL_P99_S * 1e3:g} ms at {GOAL_RATE_QPS} q/s: "
          f"{'met' if ok else 'NOT met'} at x{top:g} ({p99[('loadkit', top)] * 1e3:.2f} ms)")
    print(f"ratio={p99[('asyncio', top)] / max(p99[('loadkit', top)], 1e-9):.2f}  "
          f"(asyncio lateness p99 / loadkit lateness p99 at x{top:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
