"""A short smoke load against the lab: bring it up, send a little DNS, IMAP and POP3, report, down.

``loadkit lab smoke [--dir DIR] [--keep]`` (``make smoke``, ``python -m loadkit.lab.smoke``) checks
a lab alone, without Locust: :func:`run_smoke`. Every loop is bounded in count and time, and every
target passes :func:`loadkit.profile.targets.check_target` first.
"""

from __future__ import annotations

import csv
import imaplib
import poplib
import random
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import dns.message
import dns.rcode

from loadkit.profile.targets import check_target

from .config import LabConfig
from .lab import Lab
from .status import LabStatus

DNS_QUERIES = 2000
IMAP_SESSIONS = 60
POP3_SESSIONS = 30
#: wall-clock cap on each phase
PHASE_TIMEOUT_S = 30.0


def dns_smoke(status: LabStatus, n: int = DNS_QUERIES) -> dict[str, float]:
    """Send ``n`` A/AAAA/MX/TXT queries for names from the names file, one at a time over UDP."""
    target = check_target(str(status.dns), status.dns.port)
    names = Path(status.names_file).read_text().split()
    rng = random.Random(1)
    answered = refused = timeouts = 0
    latencies = []
    family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
    deadline = time.perf_counter() + PHASE_TIMEOUT_S
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        for i in range(n):
            if time.perf_counter() > deadline:
                break
            query = dns.message.make_query(rng.choice(names), "A")
            t0 = time.perf_counter()
            s.sendto(query.to_wire(), (target.address, target.port))
            try:
                reply = dns.message.from_wire(s.recv(4096))
            except (TimeoutError, socket.timeout):
                timeouts += 1
                continue
            latencies.append(time.perf_counter() - t0)
            if reply.rcode() == dns.rcode.REFUSED:
                refused += 1
            else:
                answered += 1
    latencies.sort()
    return {
        "sent": answered + refused + timeouts,
        "answered": answered,
        "refused": refused,
        "timeouts": timeouts,
        "latency_p50_s": latencies[len(latencies) // 2] if latencies else float("nan"),
        "latency_p99_s": latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
    }


def _accounts(status: LabStatus) -> list[tuple[str, str]]:
    with open(status.accounts_file, newline="") as f:
        return [(r["user"], r["password"]) for r in csv.DictReader(f)]


def _sessions(status: LabStatus, n: int, one_session: Callable[[str, str], int],
              errors: tuple[type[BaseException], ...]) -> dict[str, float]:
    """Up to ``n`` sessions, one account each, within :data:`PHASE_TIMEOUT_S`; ``one_session``
    returns the messages it saw."""
    ok = failed = messages = 0
    t_start = time.perf_counter()
    for user, password in _accounts(status)[:n]:
        if time.perf_counter() - t_start > PHASE_TIMEOUT_S:
            break
        try:
            messages += one_session(user, password)
            ok += 1
        except (OSError, *errors):
            failed += 1
    elapsed_s = time.perf_counter() - t_start
    return {"sessions": ok, "failed": failed, "messages_seen": messages,
            "rate_per_s": ok / elapsed_s if elapsed_s else 0.0}


def imap_smoke(status: LabStatus, n: int = IMAP_SESSIONS) -> dict[str, float]:
    """``n`` sessions of LOGIN, SELECT INBOX, LOGOUT through haproxy."""
    target = check_target(str(status.imap), status.imap.port)

    def session(user: str, password: str) -> int:
        m = imaplib.IMAP4(target.address, target.port, timeout=5)
        m.login(user, password)
        typ, data = m.select("INBOX")
        m.logout()
        return int(data[0]) if typ == "OK" else 0

    return _sessions(status, n, session, (imaplib.IMAP4.error,))


def pop3_smoke(status: LabStatus, n: int = POP3_SESSIONS) -> dict[str, float]:
    """``n`` sessions of USER, PASS, STAT, QUIT through haproxy."""
    target = check_target(str(status.pop3), status.pop3.port)

    def session(user: str, password: str) -> int:
        c = poplib.POP3(target.address, target.port, timeout=5)
        c.user(user)
        c.pass_(password)
        count, _size = c.stat()
        c.quit()
        return count

    return _sessions(status, n, session, (poplib.error_proto,))


def run_smoke(lab_dir: Path, keep: bool = False) -> int:
    """Bring the lab in ``lab_dir`` up, send a little DNS, IMAP and POP3, print what happened and
    bring it down again (unless ``keep``). 0 when every service answered, 1 otherwise."""
    lab = Lab(LabConfig(dir=lab_dir))
    try:
        print(f"bringing the lab up in {lab.dir} ...", flush=True)
        status = lab.up()
        print(status.to_table(), "\n", flush=True)
        d = dns_smoke(status)
        print(f"DNS  {status.dns}: {d['sent']} queries, {d['answered']} answered, "
              f"{d['refused']} refused, {d['timeouts']} timed out; latency p50 "
              f"{d['latency_p50_s'] * 1e3:.2f} ms, p99 {d['latency_p99_s'] * 1e3:.2f} ms")
        i = imap_smoke(status)
        print(f"IMAP {status.imap}: {i['sessions']} sessions (LOGIN, SELECT, LOGOUT), "
              f"{i['failed']} failed, {i['rate_per_s']:.0f}/s, {i['messages_seen']} messages seen")
        q = pop3_smoke(status)
        print(f"POP3 {status.pop3}: {q['sessions']} sessions (USER, PASS, STAT, QUIT), "
              f"{q['failed']} failed")
        print("\n" + lab.status().to_table(), flush=True)
        healthy = d["answered"] > 0 and i["failed"] == 0 and q["failed"] == 0
        return 0 if healthy else 1
    finally:
        if not keep:
            lab.down()
            print(f"lab in {lab.dir} is down")


if __name__ == "__main__":  # python -m loadkit.lab.smoke: the command line is the CLI's
    from loadkit.cli import main

    sys.exit(main(["lab", "smoke", *sys.argv[1:]]))
