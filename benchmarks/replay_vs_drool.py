"""Replay timing beside drool: the same capture replayed at x1 and x10 by loadkit, a pure-asyncio
anchor and DNS-OARC's drool (when it is on PATH), every one measured the same way at the sink.

The capture and the two Python replayers are those of ``replay_timing.py`` (100,000 UDP queries at
Poisson arrivals of 2,000 q/s from 200 clients, written with dpkt; ``--capture FILE`` replays your
own). drool 2 (Debian's ``drool`` package, on dnsjit) is run as
``drool replay --no-tcp --no-responses --timing multiply=<1/speed> --json FILE 127.0.0.1 PORT``:
its ``keep``/``multiply`` timing sleeps each recorded gap (times the factor) after the previous
send, and it sends every query from one socket (not one source per recorded client).

drool reports no lateness, so lateness is measured for all replayers alike at the receiving end:
a sink process (its own, so that reading never competes with the replayer's interpreter) binds a
fresh UDP port per run with ``SO_TIMESTAMPNS``, and the kernel stamps each datagram as loopback
delivers it (CLOCK_REALTIME, nanoseconds; the reader's own delay does not enter). Each arrival is
matched to its query in the capture by question (name, type, class; the k-th arrival of a
question is its k-th recording), then ``lateness = (arrival - first arrival) - (recorded offset -
first one's offset) / speed``: the first packet aligned with the schedule, so a replayer that
falls behind and never catches up shows a lateness that grows through the run (a negative one means
the first packet itself left that much late). Figures per speed
and replayer: the recorded rate (times the speed), the achieved rate at the sink (matched arrivals
over first-to-last arrival), lateness p50/p99/max at the sink (nearest rank, exact values), and
for loadkit and asyncio their own send-side p99 (the replay's histogram, upper bucket edges).
Arrivals the sink never saw are counted as ``lost`` (a full receive buffer would show there).

Two shared cores: run it a few times; compare replayers within one run.

    python benchmarks/replay_vs_drool.py [--queries 100000] [--rate 2000] [--speeds 1,10] [--replayers loadkit,asyncio,drool]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

from loadkit.generate.dns import replay
from loadkit.generate.dns.replay_input import read_queries
from loadkit.schema import nearest_rank

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replay_timing  # noqa: E402  (the sibling benchmark: capture writer and both replayers)

REPLAYERS = ("loadkit", "asyncio", "drool")
INSTALL_HINT = "drool is not on PATH: apt-get install -y drool (Debian bookworm: drool 2.0.0) to see its figures beside loadkit's"
#: 64 MiB: 100,000 small datagrams fit even if the sink's reader stalls for the whole run
SINK_RCVBUF_BYTES = 64 << 20
#: the sink stops once told and idle this long (the kernel queue is drained before it times out)
SINK_IDLE_S = 0.2
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS


def question(msg: bytes, start: int = 12) -> bytes:
    """The question section's bytes (name, type, class) of a wire message, ``b""`` if malformed."""
    i = start
    n = len(msg)
    while i < n:
        length = msg[i]
        if length == 0:
            return msg[start:i + 5] if i + 5 <= n else b""
        if length & 0xC0:
            return b""
        i += length + 1
    return b""


def _sink(conn, stop) -> None:
    """Child process: receive on a fresh port, keep (kernel arrival ns, question) per datagram."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # root may exceed rmem_max; others get what rmem_max allows
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), SINK_RCVBUF_BYTES)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SINK_RCVBUF_BYTES)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.bind(("127.0.0.1", 0))
    s.settimeout(SINK_IDLE_S)
    conn.send(s.getsockname()[1])
    got: list[tuple[int, bytes]] = []
    space = socket.CMSG_SPACE(16)
    recvmsg = s.recvmsg
    while True:
        try:
            data, anc, _flags, _addr = recvmsg(4096, space)
        except socket.timeout:
            if stop.is_set():
                break
            continue
        ts_ns = 0
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", value[:16])
                ts_ns = sec * 1_000_000_000 + nsec
        got.append((ts_ns, question(data)))
    s.close()
    conn.send(got)
    conn.close()


class Sink:
    """A timestamping sink in its own process, for one run."""

    def __enter__(self) -> Sink:
        ctx = mp.get_context("spawn")
        self._parent, child = ctx.Pipe()
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_sink, args=(child, self._stop), daemon=True)
        self._proc.start()
        self.port = self._parent.recv()
        return self

    def arrivals(self) -> list[tuple[int, bytes]]:
        """Stop receiving (once the queue is empty) and return the arrivals."""
        self._stop.set()
        got = self._parent.recv()
        self._proc.join(10)
        return got

    def __exit__(self, *exc) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


def schedule(capture: Path) -> tuple[dict[bytes, deque], int]:
    """Each question's recorded offsets (s, file order), and the query count."""
    by_q: dict[bytes, deque] = defaultdict(deque)
    first = None
    n = 0
    for q in read_queries(capture):
        if first is None:
            first = q.ts_unix_s
        # tail is the message after its 2-byte ID: the question starts 10 bytes in
        by_q[question(q.tail, 10)].append(q.ts_unix_s - first)
        n += 1
    return by_q, n


def sink_figures(arrivals: list[tuple[int, bytes]], sched: dict[bytes, deque], speed: float) -> dict:
    """Lateness of each matched arrival against the schedule (first packet aligned), achieved rate."""
    pending = {k: deque(v) for k, v in sched.items()}
    pairs = []
    extra = 0
    for ts_ns, key in sorted(arrivals):
        offsets = pending.get(key)
        if offsets:
            pairs.append((ts_ns, offsets.popleft() / speed))
        else:
            extra += 1
    if not pairs:
        return {"n": 0, "extra": extra}
    rx0_ns, due0_s = pairs[0]
    lates = sorted((ts_ns - rx0_ns) / 1e9 - (due_s - due0_s) for ts_ns, due_s in pairs)
    took_s = (pairs[-1][0] - rx0_ns) / 1e9
    n = len(lates)
    return {"n": n, "extra": extra, "achieved_qps": n / took_s if took_s > 0 else 0.0,
            "p50_s": lates[nearest_rank(0.5, n) - 1], "p99_s": lates[nearest_rank(0.99, n) - 1],
            "max_s": lates[-1], "min_s": lates[0]}


def run_drool(capture: Path, port: int, speed: float) -> dict:
    cmd = ["drool", "replay", "--no-tcp", "--no-responses", "--timing", f"multiply={1.0 / speed:.6g}",
           "--json", str(capture), "127.0.0.1", str(port)]
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        print(f"  drool failed ({out.returncode}): {(out.stderr or out.stdout).strip()[:300]}", flush=True)
        return {}
    try:
        return json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        print(f"  no JSON figures in drool's output: {out.stdout.strip()[:300]}", flush=True)
        return {}


def one_run(name: str, capture: Path, speed: float, sched: dict, n_recorded: int, span_s: float) -> dict | None:
    """One replayer at one speed into a fresh sink; prints its line."""
    own = ""
    with Sink() as sink:
        target = f"127.0.0.1:{sink.port}"
        if name == "loadkit":
            n, _took, late, _span = replay_timing.loadkit_replay(capture, target, speed, "127.8.0.1", 0.2)
            own = f" own p99={late.percentile_s(0.99) * 1e6:6.0f} us"
        elif name == "asyncio":
            n, _took, late = replay_timing.asyncio_replay(capture, target, speed, "127.8.4.1")
            own = f" own p99={late.percentile_s(0.99) * 1e6:6.0f} us"
        else:
            stats = run_drool(capture, sink.port, speed)
            if not stats:
                return None
            n = int(stats.get("sent", 0))
            own = f" own runtime={stats.get('runtime', 0.0):.2f} s errors={stats.get('errors', 0)}"
        time.sleep(SINK_IDLE_S)  # the last datagrams' way through loopback
        f = sink_figures(sink.arrivals(), sched, speed)
    recorded = n_recorded / span_s * speed if span_s else 0.0
    if not f["n"]:
        print(f"{name:8s} x{speed:<4g} sent={n} nothing matched at the sink (extra={f['extra']})", flush=True)
        return None
    print(f"{name:8s} x{speed:<4g} sent={n} lost={n_recorded - f['n']} recorded={recorded:8.0f} q/s "
          f"achieved={f['achieved_qps']:8.0f} q/s sink lateness p50={f['p50_s'] * 1e6:7.0f} us "
          f"p99={f['p99_s'] * 1e6:8.0f} us max={f['max_s'] * 1e3:7.1f} ms min={f['min_s'] * 1e6:6.0f} us{own}",
          flush=True)
    return f


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Lateness is measured at a kernel-timestamping sink (SO_TIMESTAMPNS) for every replayer.")
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=2000.0, help="recorded rate of the written capture (q/s)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--speeds", default="1,10")
    parser.add_argument("--capture", type=Path, default=None, help="replay this capture (UDP queries) instead of writing one")
    parser.add_argument("--replayers", default=",".join(REPLAYERS), help="comma-separated, of " + ", ".join(REPLAYERS))
    args = parser.parse_args()
    speeds = [float(x) for x in args.speeds.split(",")]
    names = [x for x in args.replayers.split(",") if x]
    unknown = sorted(set(names) - set(REPLAYERS))
    if unknown or not names or any(s <= 0 for s in speeds):
        parser.error(f"replayers are some of {', '.join(REPLAYERS)} and speeds are above 0")
    if "drool" in names and shutil.which("drool") is None:
        print(INSTALL_HINT, flush=True)
        names.remove("drool")
    with tempfile.TemporaryDirectory() as tmp:
        capture = args.capture or replay_timing.write_capture(Path(tmp) / "bench.pcap", args.queries, args.rate,
                                                              args.clients)
        sched, n_recorded = schedule(capture)
        span_s = replay.plan(replay.ReplaySettings(host="127.0.0.1:53", file=str(capture))).span_s
        print(f"capture {capture}: {n_recorded} queries over {span_s:.1f} s; each run into its own "
              f"timestamping sink on 127.0.0.1 (no answers)", flush=True)
        p99: dict[tuple[str, float], float] = {}
        for speed in speeds:
            for name in names:
                f = one_run(name, capture, speed, sched, n_recorded, span_s)
                if f:
                    p99[(name, speed)] = f["p99_s"]
    top = max(speeds)
    if ("loadkit", top) in p99:
        for other in ("asyncio", "drool"):
            if (other, top) in p99:
                print(f"ratio_{other}={p99[(other, top)] / max(p99[('loadkit', top)], 1e-9):.2f}  "
                      f"({other} sink lateness p99 / loadkit's at x{top:g}; above 1, loadkit is closer to schedule)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
