"""How many logged-in IMAP sessions one Locust process holds, and what each costs the client.

    .venv/bin/python benchmarks/imap_held_sessions.py            # 10,000 sessions
    .venv/bin/python benchmarks/imap_held_sessions.py --sessions 2000 --idle

A dovecot proxy needs about a megabyte per session, so the server here is a small asyncio IMAP
responder in a child process (greeting, CAPABILITY, LOGIN, SELECT, IDLE, LOGOUT). The client is
the storm's own ``ImapUser`` run by Locust as a library (Environment + local runner) in this
process: every user logs in, selects INBOX and holds the session. The client's memory per held
session is the growth of this process's RSS (and USS) from just before the users spawn to when
all sessions are held, divided by the sessions held. Goal: <= 32 KiB per session.

The open-file soft limit is raised to the hard limit (20,000 here) in both processes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the responder (child process, plain asyncio) ------------------------------------------------


class Responder(asyncio.Protocol):
    """Just enough IMAP for a client to log in, select an empty INBOX and hold or IDLE."""

    __slots__ = ("transport", "buf", "idle_tag")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""
        self.idle_tag = b""
        transport.write(b"* OK [CAPABILITY IMAP4rev1 IDLE] responder ready\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            self.line(line)

    def line(self, line: bytes) -> None:
        w = self.transport.write
        if self.idle_tag:
            if line.upper() == b"DONE":
                w(self.idle_tag + b" OK Idle completed.\r\n")
                self.idle_tag = b""
            return
        tag, _, rest = line.partition(b" ")
        cmd = rest.split(b" ", 1)[0].upper()
        if cmd == b"CAPABILITY":
            w(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n")
        elif cmd == b"LOGIN":
            w(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        elif cmd == b"SELECT":
            w(b"* 0 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] ok\r\n" + tag + b" OK [READ-WRITE] done\r\n")
        elif cmd == b"IDLE":
            self.idle_tag = tag
            w(b"+ idling\r\n")
        elif cmd == b"LOGOUT":
            w(b"* BYE bye\r\n" + tag + b" OK Logout completed.\r\n")
            self.transport.close()
        else:
            w(tag + b" BAD unknown\r\n")


def serve(host: str, port: int) -> None:
    raise_nofile()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Responder, host, port, backlog=4096)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())


# -- the client (this process, Locust as a library) ---------------------------------------------


def bench(args: argparse.Namespace) -> int:
    limit = raise_nofile()
    if limit < args.sessions + 200:
        print(f"open-file limit {limit} is too low for {args.sessions} sessions", file=sys.stderr)
        return 2
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--host", args.host],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        port = int(server.stdout.readline())
        return _bench_against(args, port)
    finally:
        server.terminate()  # the responder this benchmark started, by its own handle
        server.wait(10)


def _bench_against(args: argparse.Namespace, port: int) -> int:
    import gevent
    import psutil
    from locust.env import Environment

    from loadkit.generate import bridge
    from loadkit.generate.mail.classify import Timeouts
    from loadkit.generate.mail.users import ImapUser, MailOptions, ReconnectPolicy, set_options
    from loadkit.generate.metrics import metrics_for

    class HeldUser(ImapUser):
        """Logs in, selects INBOX and holds the session until the end."""

    accounts = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"held-accounts-{os.getpid()}.csv")
    with open(accounts, "w") as f:
        f.write("user,password\n" + "".join(f"user{i:05d},pw\n" for i in range(args.sessions)))
    env = Environment(user_classes=[HeldUser], host=f"{args.host}:{port}")
    set_options(env, MailOptions(
        accounts_file=accounts, dwell_s=None if args.idle else 3600.0, fetch_n=0,
        reconnect=ReconnectPolicy(kind="fixed", delay_s=1.0), timeouts=Timeouts(30, 30, 30, 30, 30, 10),
    ))
    me = psutil.Process()
    HeldUser.shared(env)  # accounts read, target checked
    bridge.run(asyncio.sleep(0))  # the loop thread exists before the baseline
    gevent.sleep(0.5)
    base_rss, base_uss = me.memory_info().rss, me.memory_full_info().uss
    runner = env.create_local_runner()
    t0 = time.monotonic()
    runner.start(args.sessions, spawn_rate=args.spawn_rate)
    metrics = metrics_for(env)
    held = 0.0
    while time.monotonic() - t0 < args.timeout:
        gevent.sleep(1.0)
        held = metrics.gauges().get("imap.held_sessions", 0.0)
        print(f"  t={time.monotonic() - t0:5.1f}s held={held:.0f}", flush=True)
        if held >= args.sessions:
            break
    gevent.sleep(2.0)  # let allocations settle
    held = metrics.gauges().get("imap.held_sessions", 0.0)
    rss, uss = me.memory_info().rss, me.memory_full_info().uss
    fails = env.stats.total.num_failures
    runner.quit()
    os.unlink(accounts)
    per_rss = (rss - base_rss) / held if held else float("nan")
    per_uss = (uss - base_uss) / held if held else float("nan")
    ok = held >= args.sessions and per_rss <= 32 * 1024
    print(
        f"held={held:.0f} of {args.sessions} ({'IDLE' if args.idle else 'silent'}) failures={fails} "
        f"rss_growth_bytes={rss - base_rss} client_bytes_per_session_rss={per_rss:.0f} "
        f"uss={per_uss:.0f} goal<=32768 {'OK' if ok else 'NOT MET'}"
    )
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=10000)
    p.add_argument("--spawn-rate", type=float, default=1000.0)
    p.add_argument("--timeout", type=float, default=180.0, help="give up waiting after this long")
    p.add_argument("--idle", action="store_true", help="hold sessions in IDLE instead of silence")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.host, 0)
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
