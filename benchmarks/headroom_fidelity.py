"""Headroom fidelity: does a fit at half the capacity predict the real fall-over?

Brings up a lab of its own (``--proxies`` dovecot proxies, ``--proxy-memory`` each, behind
haproxy round-robin) on ``--address``, then:

1. ramps held IMAP sessions (connect, LOGIN, hold) through haproxy in steps of ``--step``,
   sampling each proxy's cgroup memory and haproxy's session count for it after each step, and
   refits the headroom model as it goes; it stops ramping once the next step would pass 50 % of
   the capacity the fit predicts;
2. fits :func:`loadkit.model.fit_headroom` on those samples only (a run directory in the usual
   layout, read back with ``load_run``) and prints the prediction;
3. keeps adding sessions in steps of 1 % of the prediction until the lab falls over: the first
   OOM kill in a proxy cgroup, a proxy marked down, or a held session or a login lost. The
   measured fall-over is the largest number of sessions held at once;
4. prints predicted, measured and, last, ``error_pct=<(predicted-measured)/measured*100>``.

Bounded: at most ``--max-sessions`` sessions and ``--max-seconds`` overall. Everything it starts
(the lab, its sessions) is stopped at the end. On a shared 2-core machine the ramp is slow and
logins can time out under others' load; the figure is the ratio, not a speed.

    python benchmarks/headroom_fidelity.py [--proxies 3] [--proxy-memory 256MiB] [--address 127.0.7.1]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from loadkit.errors import LoadkitError
from loadkit.lab import Lab, LabConfig, parse_bytes
from loadkit.lab.mail import haproxy_stats
from loadkit.model import fit_headroom
from loadkit.observe.cgroups import read_memory, resolve
from loadkit.partfiles import PartWriter
from loadkit.profile.targets import check_target
from loadkit.record.reader import load_run
from loadkit.schema import RUN_LAYOUT, GroupSample

LOGIN_TIMEOUT_S = 15.0


class Sessions:
    """Held IMAP sessions through haproxy: each logs in and then waits for EOF."""

    def __init__(self, host: str, port: int, accounts: list[tuple[str, str]]) -> None:
        self.host, self.port = host, port
        self.accounts = accounts
        self.next_account = 0
        self.alive = 0
        self.peak_alive = 0
        self.failures: list[tuple[float, str]] = []  # (ts_unix_s, failure class)
        self.tasks: set[asyncio.Task] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def _hold(self, user: str, password: str, logged_in: asyncio.Future) -> None:
        writer = None
        try:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), LOGIN_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError) as err:
                raise _Fail("conn_refused" if isinstance(err, ConnectionRefusedError) else "timeout_connect")
            self.writers.append(writer)
            greeting = await asyncio.wait_for(reader.readline(), LOGIN_TIMEOUT_S)
            if not greeting.startswith(b"* OK"):
                raise _Fail("eof_before_greeting" if not greeting else "bye_greeting")
            writer.write(f"a1 LOGIN {user} {password}\r\n".encode())
            while True:
                line = await asyncio.wait_for(reader.readline(), LOGIN_TIMEOUT_S)
                if not line:
                    raise _Fail("eof_during_login")
                if line.startswith(b"a1 "):
                    break
            if not line.startswith(b"a1 OK"):
                raise _Fail("auth_rejected")
            self.alive += 1
            self.peak_alive = max(self.peak_alive, self.alive)
            logged_in.set_result(True)
            try:
                while await reader.read(4096):  # hold; the proxy sends nothing until we ask
                    pass
                self.failures.append((time.time(), "eof_after_login"))
            finally:
                self.alive -= 1
        except _Fail as fail:
            self.failures.append((time.time(), fail.failure_class))
        except (OSError, asyncio.TimeoutError):
            self.failures.append((time.time(), "conn_reset"))
        finally:
            if not logged_in.done():
                logged_in.set_result(False)

    async def open(self, n: int) -> int:
        """Open ``n`` more sessions concurrently; how many logged in."""
        futures = []
        for _ in range(n):
            user, password = self.accounts[self.next_account % len(self.accounts)]
            self.next_account += 1
            fut = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._hold(user, password, fut))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            futures.append(fut)
        return sum(await asyncio.gather(*futures))

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class _Fail(Exception):
    def __init__(self, failure_class: str) -> None:
        super().__init__(failure_class)
        self.failure_class = failure_class


class ProxyProbe:
    """Cgroup memory and haproxy sessions of every proxy, as GroupSample rows."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        status = lab.status()
        self.cgroups = {}
        for p in status.proxies:
            found = resolve(p.cgroup) if p.cgroup else None
            if found is None:
                raise LoadkitError(f"{p.name} runs without a memory cgroup: this benchmark needs limits")
            self.cgroups[p.name] = found

    def sample(self) -> tuple[list[GroupSample], dict[str, str]]:
        ts = time.time()
        sessions: dict[str, int] = {}
        states: dict[str, str] = {}
        for row in haproxy_stats(self.lab.stats_socket):
            if row.backend.startswith("imap"):
                sessions[row.server] = sessions.get(row.server, 0) + row.sessions
                states[row.server] = row.state
        rows = []
        for name, (directory, version) in self.cgroups.items():
            try:
                mem = read_memory(directory, version)
            except OSError:
                continue
            rows.append(GroupSample(
                ts_unix_s=ts, host="lab", group=name, procs_n=0, rss_bytes=0, uss_bytes=0, pss_bytes=0,
                cpu_percent=0.0, fds_n=0, tcp_established_n=0, tcp_other_n=0,
                sessions_n=sessions.get(name, 0), cgroup_memory_bytes=mem.memory_bytes,
                cgroup_limit_bytes=mem.limit_bytes, cgroup_failcnt_n=mem.failcnt_n,
                cgroup_oom_kills_n=mem.oom_kills_n))
        return rows, states


def write_manifest(run_dir: Path, run_id: str, lab_status: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_LAYOUT["manifest"]).write_text(json.dumps({
        "run_id": run_id, "scenario": "imap_hold_ramp", "release": "", "status": "completed",
        "started_unix_s": time.time(), "ended_unix_s": time.time(), "profile": {}, "targets": [],
        "versions": {}, "host": {}, "lab": lab_status, "gates": []}))


async def ramp(args: argparse.Namespace, lab: Lab, work: Path) -> tuple[float, float]:
    status = lab.status()
    target = check_target(f"{status.imap.host}:{status.imap.port}", 143)
    with open(status.accounts_file) as fh:
        accounts = [(r["user"], r["password"]) for r in csv.DictReader(fh)]
    sessions = Sessions(target.address, target.port, accounts)
    probe = ProxyProbe(lab)
    fit_dir = work / "fit-run"
    write_manifest(fit_dir, "headroom-fit", status.to_dict())
    writer = PartWriter(fit_dir / RUN_LAYOUT["groups"])
    deadline = time.perf_counter() + args.max_seconds

    async def settle_and_sample(into: PartWriter | None, n: int = 3) -> tuple[list[GroupSample], dict]:
        await asyncio.sleep(args.settle)
        rows, states = [], {}
        for _ in range(n):
            rows, states = probe.sample()
            if into is not None:
                into.extend(rows)
            await asyncio.sleep(0.3)
        if into is not None:
            into.flush()
        return rows, states

    try:
        # 1. ramp to at most half the predicted capacity, refitting as we go
        await settle_and_sample(writer)  # zero sessions: the proxies' base memory
        predicted = None
        steps = 0
        while time.perf_counter() < deadline:
            if predicted is not None and sessions.alive + args.step > 0.5 * predicted:
                break
            await sessions.open(args.step)
            steps += 1
            await settle_and_sample(writer)
            if sessions.failures:
                raise LoadkitError(f"sessions failed below half the capacity: {sessions.failures[:3]}")
            if steps >= 3:
                try:
                    predicted = fit_headroom(load_run(fit_dir), ci_draws=200).all_fail_sessions
                except LoadkitError:
                    predicted = None
            print(f"  fit ramp: {sessions.alive} sessions held"
                  + (f", capacity so far ≈ {predicted:.0f}" if predicted else ""), flush=True)
        result = fit_headroom(load_run(fit_dir))
        fitted_at = sessions.alive
        print(f"fit on {fitted_at} sessions ({result.max_fraction_observed:.0%} of the predicted first failure):")
        for p in result.proxies:
            print(f"  {p.summary()}")
        print(f"predicted: {result.summary()}")

        # 2. ramp to the real fall-over in 1 % steps of the prediction
        fine = max(1, round(0.01 * result.all_fail_sessions))
        base_kills = {r.group: r.cgroup_oom_kills_n for r in probe.sample()[0]}
        failed_at = None
        while time.perf_counter() < deadline and sessions.next_account < args.max_sessions:
            await sessions.open(fine)
            rows, states = await settle_and_sample(None, n=1)
            killed = [r.group for r in rows if r.cgroup_oom_kills_n > base_kills.get(r.group, 0)]
            down = [name for name, st in states.items() if not st.startswith("UP")]
            if sessions.failures or killed or down:
                failed_at = sessions.peak_alive
                print(f"  fall-over at {sessions.alive} held (peak {sessions.peak_alive}): OOM kills in "
                      f"{killed or '-'}, down {down or '-'}, client failures "
                      f"{sorted({c for _, c in sessions.failures}) or '-'}", flush=True)
                # a few more steps: do the other proxies follow?
                for _ in range(3):
                    await sessions.open(fine)
                    rows, states = await settle_and_sample(None, n=1)
                killed = [r.group for r in rows if r.cgroup_oom_kills_n > base_kills.get(r.group, 0)]
                down = [name for name, st in states.items() if not st.startswith("UP")]
                print(f"  3 steps later: {len(set(killed) | set(down))}/{len(rows)} proxies hit "
                      f"(OOM kills {killed or '-'}, down {down or '-'}), {sessions.alive} held", flush=True)
                break
        if failed_at is None:
            raise LoadkitError(f"no fall-over within {args.max_sessions} sessions / {args.max_seconds} s "
                               f"(peak held {sessions.peak_alive})")
        return result.all_fail_sessions, float(failed_at)
    finally:
        await sessions.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default="127.0.7.1", help="loopback address for the lab")
    ap.add_argument("--proxies", type=int, default=3)
    ap.add_argument("--proxy-memory", default="256MiB")
    ap.add_argument("--step", type=int, default=30, help="sessions added per step while fitting")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait after each step")
    ap.add_argument("--max-sessions", type=int, default=2000)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--keep-run", type=Path, default=None, metavar="DIR",
                    help="keep the run directory the fit used (collector group samples) here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="headroom-fidelity-") as tmp:
        lab = Lab(LabConfig(dir=Path(tmp) / "lab", address=args.address, proxies=args.proxies,
                            proxy_memory_bytes=parse_bytes(args.proxy_memory),
                            accounts=min(99999, args.max_sessions + 100)))
        try:
            status = lab.up()
            print(f"lab: {args.proxies} proxies × {args.proxy_memory} on {status.imap}", flush=True)
            predicted, measured = asyncio.run(ramp(args, lab, Path(tmp)))
            if args.keep_run is not None:
                shutil.copytree(Path(tmp) / "fit-run", args.keep_run, dirs_exist_ok=True)
        except LoadkitError as err:
            print(f"headroom_fidelity: {err}", file=sys.stderr)
            return 2
        finally:
            lab.down()
    print(f"predicted={predicted:.0f} sessions (all {args.proxies} proxies fall over)")
    print(f"measured={measured:.0f} sessions (most held at once before the first failure)")
    print(f"error_pct={round((predicted - measured) / measured * 100, 1) + 0.0:.1f}")  # no "-0.0"
    return 0


if __name__ == "__main__":
    sys.exit(main())
