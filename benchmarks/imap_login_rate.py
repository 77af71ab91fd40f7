"""Storm login rate of the bridged Locust IMAP user against a pure-asyncio aioimaplib anchor.

    .venv/bin/python benchmarks/imap_login_rate.py                 # brings a lab up on 127.0.0.1
    .venv/bin/python benchmarks/imap_login_rate.py --lab-address 127.0.9.1 --seconds 10
    .venv/bin/python benchmarks/imap_login_rate.py --host 127.0.0.1:11143 --accounts accounts.csv

A session is connect (+greeting and CAPABILITY), LOGIN, SELECT INBOX, LOGOUT. Both sides run
the same number of concurrent clients against the same server in the same run, each in a fresh
process, alternating rounds: the *anchor* is a plain asyncio script using aioimaplib's own API
(``IMAP4`` + ``wait_hello_from_server``); the *bridged* side is the storm's ``ImapUser`` run by
Locust as a library, its asyncio work handed to the bridge's loop thread. The rate is sessions
completed per second; the last line holds ``ratio=bridged/anchor`` (goal >= 0.8).

By default the target is the lab's dovecot backend (no proxy memory limit to hit); ``--target
haproxy`` goes through the proxies instead. Figures on a shared machine are noisy: compare
within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def read_accounts(path: str, n: int) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = [(r["user"], r["password"]) for r in csv.DictReader(f)]
    return rows[:n]


# -- the anchor: pure asyncio, aioimaplib's own API --------------------------------------------


def anchor(host: str, port: int, accounts: str, workers: int, seconds: float) -> None:
    import aioimaplib

    creds = read_accounts(accounts, workers)
    done = 0
    failed = 0

    async def worker(user: str, password: str, deadline: float) -> None:
        nonlocal done, failed
        while time.monotonic() < deadline:
            try:
                client = aioimaplib.IMAP4(host=host, port=port, timeout=10)
                await client.wait_hello_from_server()
                ok = (await client.login(user, password)).result == "OK"
                ok = ok and (await client.select("INBOX")).result == "OK"
                ok = ok and (await client.logout()).result == "OK"
            except Exception:  # noqa: BLE001 - counted, the anchor keeps going
                ok = False
            if ok:
                done += 1
            else:
                failed += 1

    async def main() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(worker(u, p, t0 + seconds) for u, p in creds))
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    print(f"sessions={done} failed={failed} elapsed_s={elapsed:.3f}", flush=True)


# -- the bridged Locust user ---------------------------------------------------------------------


def bridged(host: str, port: int, accounts: str, workers: int, seconds: float) -> None:
    import gevent
    from locust.env import Environment

    from loadkit.generate.mail.users import ImapUser, MailOptions, ReconnectPolicy, set_options

    class StormUser(ImapUser):
        """connect, LOGIN, SELECT, LOGOUT, again."""

    creds = read_accounts(accounts, workers)
    tmp = Path(tempfile.mkdtemp()) / "accounts.csv"
    tmp.write_text("user,password\n" + "".join(f"{u},{p}\n" for u, p in creds))
    env = Environment(user_classes=[StormUser], host=f"{host}:{port}")
    set_options(env, MailOptions(
        accounts_file=tmp, dwell_s=0.0, fetch_n=0,
        reconnect=ReconnectPolicy(kind="immediate", min_delay_s=0.0),
        max_retry_rate_per_s=1e6,
    ))
    runner = env.create_local_runner()
    t0 = time.monotonic()
    runner.start(workers, spawn_rate=workers)
    gevent.sleep(seconds)
    elapsed = time.monotonic() - t0
    stats = env.stats.get("LOGOUT", "IMAP")
    done = stats.num_requests - stats.num_failures
    failed = env.stats.total.num_failures
    runner.quit()
    print(f"sessions={done} failed={failed} elapsed_s={elapsed:.3f}", flush=True)


# -- the comparison ------------------------------------------------------------------------------


def run_side(side: str, host: str, port: int, accounts: str, workers: int, seconds: float) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, __file__, f"--{side}", "--host", f"{host}:{port}", "--accounts", accounts,
         "--workers", str(workers), "--seconds", str(seconds)],
        capture_output=True, text=True, timeout=seconds + 120,
    )
    line = (out.stdout.strip().splitlines() or [""])[-1]
    if not line.startswith("sessions="):
        raise SystemExit(f"{side} run failed: {out.stderr[-2000:]}")
    fields = dict(kv.split("=") for kv in line.split())
    return int(fields["sessions"]) / float(fields["elapsed_s"]), int(fields["failed"])


def compare(host: str, port: int, accounts: str, args: argparse.Namespace) -> None:
    anchors, bridges = [], []
    for r in range(args.rounds):
        a, a_fail = run_side("anchor", host, port, accounts, args.workers, args.seconds)
        b, b_fail = run_side("bridged", host, port, accounts, args.workers, args.seconds)
        anchors.append(a)
        bridges.append(b)
        print(f"round {r + 1}: anchor (pure asyncio aioimaplib) {a:7.0f} sessions/s ({a_fail} failed), "
              f"bridged Locust user {b:7.0f} sessions/s ({b_fail} failed)", flush=True)
    a, b = sum(anchors) / len(anchors), sum(bridges) / len(bridges)
    print(f"target={host}:{port} workers={args.workers} seconds={args.seconds} rounds={args.rounds} "
          f"anchor_sessions_per_s={a:.0f} bridged_sessions_per_s={b:.0f} ratio={b / a:.2f} (goal >= 0.8)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", help="HOST:PORT of an IMAP server to use instead of bringing a lab up")
    p.add_argument("--accounts", help="accounts CSV (user,password) for --host")
    p.add_argument("--lab-address", default="127.0.0.1", help="loopback address for the lab")
    p.add_argument("--target", choices=("backend", "haproxy"), default="backend")
    p.add_argument("--workers", type=int, default=50, help="concurrent clients on each side")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    p.add_argument("--rounds", type=int, default=2, help="anchor/bridged pairs, alternating")
    p.add_argument("--anchor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bridged", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.anchor or args.bridged:
        host, port = args.host.rsplit(":", 1)
        (anchor if args.anchor else bridged)(host, int(port), args.accounts, args.workers, args.seconds)
        return 0
    if args.host:
        if not args.accounts:
            p.error("--host needs --accounts")
        host, port = args.host.rsplit(":", 1)
        compare(host, int(port), args.accounts, args)
        return 0
    # bring a lab up for the comparison and always take it down again
    from loadkit.lab import Lab, LabConfig

    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(LabConfig(dir=Path(tmp) / "lab", address=args.lab_address, accounts=max(args.workers, 100)))
        status = lab.up()
        try:
            if args.target == "backend":
                backend = next(c for c in status.components if c.name == "dovecot-backend")
                host, port = args.lab_address, backend.ports[0]
            else:
                host, port = status.imap
            compare(host, port, str(status.accounts_file), args)
        finally:
            lab.down()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
