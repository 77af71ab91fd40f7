"""A real second stable state: unbound's own retry storm behind a deep receive buffer.

A metastable failure needs work wasted on answers that come too late (see ``loadkit.model.retries``):
a server whose queue holds more than the clients' timeout of work answers everything late once a
trigger fills it, every query is retried, and the retries keep the queue full at the original
demand. This runs that on the lab's unbound, held to ``--cores`` of a CPU (its capacity measured
at ``lab up``), with demand at ``--load`` of that capacity and stub resolvers that retry twice after
1 s each: one burst of 20,000 queries at 10 s, then the base load alone for a minute. Cases:

- ``deep buffer``: so-rcvbuf 8 MiB (16 MiB in the kernel: seconds of queue at this capacity);
- ``deep buffer, retry budget 0.1``: the same, the clients retrying at most 10 % of their originals;
- ``default buffer``: the platform's receive buffer (a fraction of a second of queue);
- with ``--firewall``, the first and third again through the lab's stateful firewall (a table of
  12,000 sessions of 3 s: it admits 4,000 new flows/s, more than the server serves), each retry
  from a new source port: incident 2's chain with the waste that makes it hold.

For each it prints the verdict the per-query loop predicts from the parameters alone (the
calibrated capacity, the server socket's buffer as sampled, the clients' retries, timeout and
budget) beside the run's measured verdict and how long goodput stayed under half after the burst.
About 2 minutes per case; the lab is brought down after each.

    python benchmarks/server_retry_storm.py [--address 127.0.92.1] [--cores 0.02] [--load 0.7] [--firewall]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from loadkit.demo import dump_toml
from loadkit.errors import LoadkitError
from loadkit.lab import Lab, LabConfig
from loadkit.model.firewall import waste_loop
from loadkit.model.retries import metastability, retry_amplification
from loadkit.model.udp import buffer_datagrams
from loadkit.record.reader import load_run

REPO = Path(__file__).resolve().parents[1]
CASES = (("deep buffer", 8 * 2**20, None, False), ("deep buffer, retry budget 0.1", 8 * 2**20, 0.1, False),
         ("default buffer", 0, None, False),
         ("deep buffer behind a firewall", 8 * 2**20, None, True), ("default buffer behind a firewall", 0, None, True))
RETRIES, TIMEOUT_S, BURST_N = 2, 1.0, 20_000
#: the firewall cases' table: 3 s sessions, so 7,000 fixed client sockets used in turn make every
#: query a new flow at the base load; 12,000 entries admit 4,000 new flows/s, more than the
#: server serves, and hold the base load (about 6,000) with room to spare
FW_SESSIONS, FW_TIMEOUT_S, FW_SOURCES, FW_PORTS = 12_000, 3.0, 70, 100


def profile(status, rate_qps: float, budget: float | None, firewall: bool) -> dict:
    options = {"dns-names-file": str(status.names_file), "dns-rate": round(rate_qps), "dns-burst-size": BURST_N,
               "dns-burst-ms": 0, "dns-burst-period": 100, "dns-first-burst": 10, "dns-burst-count": 1,
               "dns-timeout": TIMEOUT_S, "dns-retries": RETRIES, "dns-backoff": 1.0}
    if budget:
        options["dns-retry-budget"] = budget
    target = status.dns
    if firewall:  # through the table, each retry from a fresh port as stub resolvers do
        target = status.firewall.dns
        options.update({"dns-port-policy": "per-attempt", "dns-sources": FW_SOURCES,
                        "dns-first-source": "127.1.0.1", "dns-ports-per-source": FW_PORTS})
    return {"run": {"scenario": "server_retry_storm", "release": "bench", "duration": "70s"},
            "targets": {"dns": str(target), "allowlist": ["127.0.0.0/8"]},
            "load": {"locustfile": str(REPO / "locustfiles" / "dns_burst.py"), "host": "dns", "users": 1,
                     "spawn_rate": 1, "options": options},
            "collect": {"udp_ports": sorted({status.dns.port, target.port}), "interval_s": 0.5},
            "caps": {"max_users": 10, "max_duration_s": "10m", "max_rate_qps": 30000}}


def below_half_s(run_dir: Path, after_unix_s: float) -> float:
    """The longest stretch after ``after_unix_s`` with answered under half the original demand."""
    amp = retry_amplification(load_run(run_dir))
    longest = current = 0.0
    for ts, row in amp[amp.index.to_numpy(dtype=float) > after_unix_s].iterrows():
        current = current + row["interval_s"] if row["answered_qps"] < 0.5 * row["original_qps"] else 0.0
        longest = max(longest, current)
    return longest


def run_case(label: str, rcvbuf: int, budget: float | None, firewall: bool, a: argparse.Namespace,
             work: Path) -> dict:
    table = dict(firewall_sessions=FW_SESSIONS, firewall_udp_timeout_s=FW_TIMEOUT_S) if firewall else {}
    lab = Lab(LabConfig(dir=work / "lab", address=a.address, accounts=10, proxies=1, dns_cpu=a.cores,
                        dns_rcvbuf_bytes=rcvbuf, **table))
    try:
        status = lab.up()
        capacity = status.dns_cpu.capacity_qps
        rate = a.load * capacity
        path = work / "storm.toml"
        path.write_text(dump_toml(profile(status, rate, budget, firewall)))
        out = work / "runs"
        before = set(out.iterdir()) if out.exists() else set()
        subprocess.run([sys.executable, "-m", "loadkit", "run", str(path), "--out", str(out)], cwd=REPO,
                       timeout=300, check=False, stdout=subprocess.DEVNULL)
        [run_dir] = [p for p in out.iterdir() if p not in before and (p / "manifest.json").exists()]
        run = load_run(run_dir)
        socks = run.sockets[run.sockets["local_port"] == status.dns.port]
        sk_rcvbuf = float(socks["rcvbuf_bytes"].max())
        delay = buffer_datagrams(sk_rcvbuf) / capacity
        size, fw_timeout = (FW_SESSIONS, FW_TIMEOUT_S) if firewall else (math.inf, 1.0)
        predicted = waste_loop(rate, size, fw_timeout, retries_n=RETRIES, capacity_qps=capacity,
                               queue_delay_s=delay, stub_timeout_s=TIMEOUT_S, retry_budget=budget,
                               port_policy="per-attempt" if firewall else "fixed")
        verdict = metastability(run)
        fw = getattr(run, "firewall", None)
        table_row = {}
        if firewall and fw is not None and len(fw):
            mine = fw[fw["size_n"] == FW_SESSIONS]
            table_row = {"table_peak_n": float(mine["entries_n"].max()),
                         "firewall_drops_n": float(mine["drops_n"].max() - mine["drops_n"].min())}
        return {"case": label, **table_row, "capacity_qps": capacity, "rate_qps": round(rate), "sk_rcvbuf_bytes": sk_rcvbuf,
                "queue_delay_s": round(delay, 2),
                "predicted": "metastable" if predicted.sustains else "recovers", "why": predicted.reason,
                "verdict": verdict.verdict, "recovery_s": verdict.recovery_s,
                "post_amplification": round(verdict.post_amplification, 2),
                "goodput_below_half_s": below_half_s(run_dir, verdict.trigger_end_unix_s), "run": str(run_dir)}
    finally:
        lab.down()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="127.0.92.1")
    ap.add_argument("--cores", type=float, default=0.02, help="unbound's CPU quota (default %(default)s)")
    ap.add_argument("--load", type=float, default=0.7, help="base demand as a share of the calibrated capacity")
    ap.add_argument("--only", action="append", help="case label (repeatable); default: all")
    ap.add_argument("--firewall", action="store_true",
                    help="also the cases behind the lab's firewall table (root and nft)")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lk-server-storm-") as tmp:
        for label, rcvbuf, budget, firewall in CASES:
            if (a.only and label not in a.only) or (firewall and not a.firewall):
                continue
            try:
                row = run_case(label, rcvbuf, budget, firewall, a, Path(tmp))
            except LoadkitError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            rows.append(row)
            print(row, flush=True)
    print("case | capacity q/s | demand q/s | sk_rcvbuf | queue delay | table peak/size, drops | "
          "goodput < 1/2 after burst | amplification at end | verdict | predicted")
    for r in rows:
        table = (f"{r['table_peak_n']:,.0f}/{FW_SESSIONS:,}, {r['firewall_drops_n']:,.0f}" if "table_peak_n" in r
                 else "-")
        print(f"{r['case']} | {r['capacity_qps']:,} | {r['rate_qps']:,} | {r['sk_rcvbuf_bytes']:,.0f} B | "
              f"{r['queue_delay_s']:.2f} s | {table} | {r['goodput_below_half_s']:.0f} s | "
              f"{r['post_amplification']:.2f}x | {r['verdict']} | {r['predicted']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
