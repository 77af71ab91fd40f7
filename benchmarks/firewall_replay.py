"""Incident 2's whole loop: the shipped firewall scenario, then each mitigation on its own.

For every case of :func:`loadkit.lab.firewall_replay.cases` (as shipped; an 8 MiB receive buffer;
a 10 s UDP timeout; a 40,000-entry table; a 5 % retry budget) this brings up a lab of its own on
``--address`` with the case's settings, prints the verdict the firewall model predicts from the
parameters alone (table size and timeout, the lab's calibrated DNS capacity, the receive buffer,
the clients' retries), runs the scenario with ``loadkit run`` (90 s), and prints what the run
measured beside it. The lab is brought down after each case. Needs root and nft, as the lab's
firewall does. About 2 minutes per case.

With ``--scenario holds``: ``scenarios/retry_storm_firewall_holds.toml`` (the loop that holds
itself: a table admitting more than unbound at 0.02 core serves, behind a deep receive buffer) and
its cases (the default buffer; a table admitting less than the server serves; a 10 % retry budget;
a larger table; a shorter UDP timeout). About 2 minutes per case.

    python benchmarks/firewall_replay.py [--address 127.0.91.1] [--scenario drains|holds] [--only "as shipped"] [--out runs/firewall]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from loadkit.demo import dump_toml
from loadkit.errors import LoadkitError
from loadkit.lab import Lab, LabConfig
from loadkit.lab import firewall_replay as replay

REPO = Path(__file__).resolve().parents[1]


def run_case(case: replay.ReplayCase, address: str, out: Path, work: Path) -> dict:
    lab = Lab(LabConfig(dir=work / case.release, address=address, accounts=10, proxies=1,
                        **replay.lab_settings(case)))
    try:
        status = lab.up()
        predicted = replay.predict(case, status)
        print(f"[{case.label}] {case.what}; predicted: {predicted.predicted_verdict} ({predicted.waste.reason})",
              flush=True)
        path = work / f"{case.release}.toml"
        path.write_text(dump_toml(replay.profile(status, case)))
        before = set(out.iterdir()) if out.exists() else set()
        subprocess.run([sys.executable, "-m", "loadkit", "run", str(path), "--out", str(out),
                        "--release", case.release], cwd=REPO, timeout=300, check=False,
                       stdout=subprocess.DEVNULL)
        [run_dir] = [p for p in out.iterdir() if p not in before and (p / "manifest.json").exists()]
        return {"case": case.label, "capacity_qps": status.dns_cpu.capacity_qps if status.dns_cpu else None,
                **replay.outcome(run_dir, predicted)}
    finally:
        lab.down()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="127.0.91.1")
    ap.add_argument("--scenario", choices=("drains", "holds"), default="drains",
                    help="retry_storm_firewall.toml (drains) or retry_storm_firewall_holds.toml (holds)")
    ap.add_argument("--only", action="append", help="case label (repeatable); default: all")
    ap.add_argument("--out", default="runs/firewall-replay")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lk-fw-replay-") as tmp:
        for case in replay.cases(a.scenario):
            if a.only and case.label not in a.only:
                continue
            try:
                row = run_case(case, a.address, out, Path(tmp))
            except LoadkitError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("case | table peak/size | firewall drops | retries | queries timed out | goodput < 1/2 after trigger | "
          "verdict | predicted")
    for r in rows:
        print(f"{r['case']} | {r['table_peak_n']:,.0f}/{r['table_size_n']:,.0f} | {r['firewall_drops_n']:,.0f} | "
              f"{r['retries_n']:,.0f} | {r['queries_failed_n'] or 0:,.0f} | {r['goodput_below_half_s']:.0f} s | "
              f"{r['verdict']} | {r['predicted_verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
