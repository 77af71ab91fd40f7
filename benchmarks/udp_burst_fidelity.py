"""UDP burst model against the lab: predicted beside measured loss per burst.

For each receive-buffer size (unbound ``so-rcvbuf``; 0 = the platform default) a lab is brought up
on a free loopback address, and loadkit's own DNS sender fires bursts of each size at it while
the collector samples the server socket (drops, and its real sk_rcvbuf via sock_diag) every
0.1 s. Each configuration is recorded as a run directory and fitted with
``loadkit.model.fit_udp_burst``: the drain rate comes from the answers read inside each burst's
window, the buffer from the socket. The loss each burst *should* have had is printed beside the
drops the socket counted for it.

The error of a configuration is |mean predicted − mean measured| per burst, relative to the burst
size (loss is a share of what was sent; a relative error on a loss near 0 says nothing). The
last line is ``error_pct=<worst absolute>``.

    .venv/bin/python benchmarks/udp_burst_fidelity.py
    .venv/bin/python benchmarks/udp_burst_fidelity.py --rcvbuf 0 --rcvbuf 524288 --burst 2000 --burst 6000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadkit.generate.dns import wire  # noqa: E402
from loadkit.generate.dns.schedule import BurstTrain  # noqa: E402
from loadkit.generate.dns.sender import DnsSender  # noqa: E402
from loadkit.profile.targets import check_target  # noqa: E402
from loadkit.schema import RUN_LAYOUT  # noqa: E402

#: most bursts one configuration sends, and the largest burst: the loop is bounded
MAX_BURSTS = 20
MAX_BURST_N = 20_000


def record_bursts(run_dir: Path, dns: tuple[str, int], names_file: str, *, burst_n: int, count: int,
                  period_s: float = 1.0, window_s: float = 0.0, so_rcvbuf_bytes: int = 0) -> Path:
    """Send ``count`` bursts of ``burst_n`` queries at ``dns`` with loadkit's sender, sample the
    server socket with loadkit's collector, and write what a run directory needs for the burst
    fit: manifest, ``burst`` events, ``samples/sockets``. Returns ``run_dir``."""
    assert 0 < count <= MAX_BURSTS and 0 < burst_n <= MAX_BURST_N
    names = [line.strip() for line in open(names_file) if line.strip()][:5000]
    target = check_target(f"{dns[0]}:{dns[1]}", 53)
    sender = DnsSender(target, wire.QueryPool(names, [("A", 1.0)]), timeout_s=1.0, retries_n=0,
                       bursts=BurstTrain(burst_n, window_s, period_s, first_s=0.3, count=count),
                       sources=(dns[0],), max_duration_s=0.3 + count * period_s + 0.2,
                       max_queries_n=burst_n * count)
    run_dir.mkdir(parents=True, exist_ok=True)
    # the collector in a process of its own, as on a target host: in the sender's process it
    # would wait for the interpreter lock while a burst is sent, and miss the sample between bursts
    send_s = 0.3 + count * period_s + 1.2
    collector = subprocess.Popen(
        [sys.executable, "-m", "loadkit", "collect", "--udp-port", str(dns[1]), "--interval", "0.1",
         "--duration", f"{send_s + 12:.1f}", "--out", str(run_dir), "--full-memory-interval", "0",
         "--flush-interval", "1", "--host-label", "lab"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = time.time()
    try:
        parts = run_dir / RUN_LAYOUT["sockets"]
        deadline = time.monotonic() + 10.0
        while not any(parts.glob("*.parquet")) and time.monotonic() < deadline and collector.poll() is None:
            time.sleep(0.1)  # the collector's first samples are on disk: it watches the socket
        if collector.poll() is not None:
            raise RuntimeError(f"loadkit collect ended early: {collector.stderr.read()[-2000:]}")
        sender.open()
        try:
            sender.run()
        finally:
            sender.close()
        time.sleep(0.3)  # a sample after the last burst's drops
    finally:
        collector.terminate()  # SIGTERM: it flushes what it has and exits
        try:
            collector.wait(timeout=20)
        except subprocess.TimeoutExpired:
            collector.kill()
            collector.wait()
    events = [{"ts_unix_s": bw.first_sent_unix_s, "kind": "burst", "source": "dns",
               "detail": {"burst_index": bw.burst_index, "first_sent_unix_s": bw.first_sent_unix_s,
                          "last_sent_unix_s": bw.last_sent_unix_s, "window_s": bw.window_s, "sent_n": bw.sent_n,
                          "answered_in_window_n": bw.answered_in_window_n,
                          "answers_read_unix_s": bw.answers_read_unix_s}} for bw in sender.bursts]
    with (run_dir / RUN_LAYOUT["events"]).open("a") as fh:  # after the collector's own events
        fh.write("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / RUN_LAYOUT["manifest"]).write_text(json.dumps({
        "run_id": run_dir.name, "scenario": "udp_burst_fidelity", "release": "", "status": "completed",
        "started_unix_s": started, "ended_unix_s": time.time(), "profile": {}, "targets": [f"udp://{dns[0]}:{dns[1]}"],
        "versions": {}, "host": {}, "lab": {"config": {"dns_rcvbuf_bytes": so_rcvbuf_bytes}}, "gates": []}))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    from loadkit.lab import Lab, LabConfig
    from loadkit.model import fit_udp_burst
    from loadkit.record.reader import load_run

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rcvbuf", type=int, action="append", metavar="BYTES",
                   help="unbound so-rcvbuf to test (repeat; 0 = platform default); default 0, 131072, 524288")
    p.add_argument("--burst", type=int, action="append", metavar="QUERIES",
                   help="burst size (repeat); default 2000 and 6000")
    p.add_argument("--count", type=int, default=6, help="bursts of each size (default %(default)s)")
    p.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    args = p.parse_args(argv)
    buffers = args.rcvbuf or [0, 131072, 524288]
    sizes = args.burst or [2000, 6000]
    work = args.keep or Path(tempfile.mkdtemp(prefix="udp-burst-fidelity-"))
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import free_lab_address

    worst = 0.0
    print(f"{'so-rcvbuf':>10} {'rb':>9} {'burst':>6} {'window ms':>9} {'drain q/s':>10} "
          f"{'predicted':>10} {'measured':>9} {'error %':>8}")
    for so in buffers:
        lab = Lab(LabConfig(dir=work / f"lab-{so}", address=free_lab_address({"dns_rcvbuf_bytes": so}),
                            dns_rcvbuf_bytes=so, proxies=1, accounts=10))
        status = lab.up()
        try:
            for n in sizes:
                run = record_bursts(work / f"run-{so}-{n}", status.dns, status.names_file, burst_n=n,
                                    count=args.count, so_rcvbuf_bytes=so)
                fit = fit_udp_burst(load_run(run))
                measured = [b.measured_loss_n for b in fit.bursts if b.measured_loss_n == b.measured_loss_n]
                predicted = [b.predicted_loss_n for b in fit.bursts if b.measured_loss_n == b.measured_loss_n]
                if not measured:
                    print(f"{so:>10} {fit.rcvbuf_bytes:>9.0f} {n:>6}  no burst could be told apart")
                    continue
                mean_m, mean_p = sum(measured) / len(measured), sum(predicted) / len(predicted)
                err = 100.0 * (mean_p - mean_m) / n
                worst = max(worst, abs(err))
                print(f"{so:>10} {fit.rcvbuf_bytes:>9.0f} {n:>6} {fit.burst_window_s * 1e3:>9.1f} "
                      f"{fit.drain_rate_qps:>10,.0f} {mean_p:>10.0f} {mean_m:>9.0f} {err:>+8.1f}")
        finally:
            lab.down()
    print(f"runs in {work}")
    print(f"error_pct={worst:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
