"""A stateful firewall's session table, read from nftables: entries, size, new-flow drops.

The table is an nftables dynamic set (``flags dynamic,timeout``) that a rule fills with one
element per flow (client address . port) and a named counter that counts the new flows that
found the set full and were dropped (the lab's firewall, ``loadkit.lab.firewall``, is built this
way; any host that names its table ``loadkit_fw_*`` with a set ``sessions`` and a counter
``new_flow_drops`` is read the same way).

The kernel keeps no element count a user can read cheaply: the count comes from listing the set
(``nft -j list table``), which costs about 12 µs per element here (50,000 elements: 0.6 s), so
the collector reads it at most every :data:`MIN_READ_INTERVAL_S` and at most 1/4 of the time.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import sys
import time
from typing import NamedTuple

#: the name of every firewall table loadkit creates starts with this
TABLE_PREFIX = "loadkit_fw_"
#: the session table (an nftables dynamic set) inside the table
SESSIONS_SET = "sessions"
#: the named counter of new flows dropped because the session table was full
DROPS_COUNTER = "new_flow_drops"
#: seconds an ``nft`` call may take before the reading is given up
NFT_TIMEOUT_S = 5.0


def table_for(address: str, port: int) -> str:
    """The name of the loadkit firewall table guarding ``address:port``
    (``127.0.0.1``, 5354 -> ``loadkit_fw_127_0_0_1_5354``; nft names allow letters, digits, '_')."""
    return TABLE_PREFIX + re.sub(r"[^0-9A-Za-z]", "_", f"{address}_{port}")


class FirewallReading(NamedTuple):
    """One firewall table at one instant (made by :func:`read_table`)."""

    family: str  #: nftables family, ``ip`` or ``ip6``
    table: str  #: nftables table name
    entries_n: int  #: sessions in the table now (elements of the set)
    size_n: int  #: the table's size (the set's ``size``); new flows beyond it are dropped
    drops_n: int  #: new flows dropped because the table was full (cumulative counter)
    timeout_s: float  #: per-entry timeout of the set


def nft_binary() -> str | None:
    """Path of ``nft`` on PATH, or None."""
    return shutil.which("nft")


def _original(module: str, name: str):
    """``module.name`` as it was before gevent's monkey patching (the collector runs in Locust
    processes, in a thread of gevent's pool, where gevent's subprocess cannot wait for a child:
    its child watchers only exist on the main thread's loop)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched(module):
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


def _spawn(argv: list[str], timeout_s: float = NFT_TIMEOUT_S) -> tuple[int, str, str]:
    """``(returncode, stdout, stderr)`` of ``argv`` with unpatched primitives only: posix_spawn,
    pipes, the original poll and waitpid (see :func:`_original`)."""
    # poll, not select: a load generator holds thousands of sockets, past select's 1024 limit
    poller = _original("select", "poll")()
    waitpid = _original("os", "waitpid")
    posix_spawn = _original("os", "posix_spawn")  # gevent's registers a child watcher
    # posix_spawn takes a path, not a name to look up on PATH
    path = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if path is None:
        raise FileNotFoundError(f"{argv[0]} is not on PATH")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = posix_spawn(path, argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2),
            (os.POSIX_SPAWN_CLOSE, out_r), (os.POSIX_SPAWN_CLOSE, err_r)])
    finally:
        os.close(out_w)
        os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    open_fds = [out_r, err_r]
    for fd in open_fds:
        os.set_blocking(fd, False)
        poller.register(fd, _POLL_IN)
    deadline = time.monotonic() + timeout_s
    code: int | None = None
    try:
        # the end is the child's exit, not EOF: under gevent, EOF on the pipes was seen to go
        # missing once its loop had run (the write ends stayed open in this process)
        while code is None:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                _reap(waitpid, pid, 0)
                raise OSError(f"{' '.join(argv[1:])} took more than {timeout_s:g} s")
            ready = [fd for fd, _ in poller.poll(min(left, 0.02) * 1000)]
            _drain([fd for fd in ready if fd in open_fds], chunks, open_fds, poller)
            code = _reap(waitpid, pid, os.WNOHANG)
        _drain(list(open_fds), chunks, open_fds, poller)
    finally:
        os.close(out_r)
        os.close(err_r)
    if code < 0:  # reaped by someone else (gevent's SIGCHLD handler): judge by the output
        code = 1 if not chunks[out_r] and chunks[err_r] else 0
    return code, b"".join(chunks[out_r]).decode(), b"".join(chunks[err_r]).decode()


#: poll events that mean "read now" (data, or the write end closed)
_POLL_IN = 0x001 | 0x010  # POLLIN | POLLHUP


def _drain(fds: list[int], chunks: dict[int, list[bytes]], open_fds: list[int], poller) -> None:
    for fd in fds:
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                open_fds.remove(fd)
                poller.unregister(fd)  # else poll reports its hang-up at once, every time
                break
            chunks[fd].append(data)


def _reap(waitpid, pid: int, flags: int) -> int | None:
    """The child's exit code, None while it runs, -1 when another handler reaped it."""
    try:
        got, status = waitpid(pid, flags)
    except ChildProcessError:
        return -1
    return None if got == 0 else os.waitstatus_to_exitcode(status)


def _nft_json(args: list[str], nft: str) -> list[dict]:
    code, out, err = _spawn([nft, "-j", *args])
    if code != 0:
        first = (err.strip().splitlines() or ["no message"])[0]
        raise OSError(f"nft {' '.join(args)}: {first}")
    return json.loads(out or "{}").get("nftables", [])


def list_tables(nft: str = "nft", prefix: str = TABLE_PREFIX) -> list[tuple[str, str]]:
    """``[(family, name)]`` of the tables whose name starts with ``prefix``."""
    tables = []
    for obj in _nft_json(["list", "tables"], nft):
        t = obj.get("table")
        if t and str(t.get("name", "")).startswith(prefix):
            tables.append((str(t["family"]), str(t["name"])))
    return sorted(tables)


def parse_table(doc: list[dict], family: str, table: str) -> FirewallReading:
    """The reading from ``nft -j list table FAMILY TABLE`` output (``doc["nftables"]``)."""
    entries = size = drops = 0
    timeout_s = 0.0
    found_set = False
    for obj in doc:
        s = obj.get("set")
        if s and s.get("name") == SESSIONS_SET:
            found_set = True
            entries = len(s.get("elem", []))
            size = int(s.get("size", 0))
            timeout_s = float(s.get("timeout", 0))
        c = obj.get("counter")
        if c and c.get("name") == DROPS_COUNTER:
            drops = int(c.get("packets", 0))
    if not found_set:
        raise ValueError(f"nftables table {family} {table} has no set {SESSIONS_SET!r}")
    return FirewallReading(family, table, entries, size, drops, timeout_s)


def read_table(family: str, table: str, nft: str = "nft") -> FirewallReading:
    """Read one firewall table now (OSError when nft fails, e.g. the table is gone)."""
    return parse_table(_nft_json(["list", "table", family, table], nft), family, table)


class FirewallReader:
    """Finds the ``loadkit_fw_*`` tables on this host and reads them, bounded in cost.

    A listing of a large set is slow (see the module docstring): when the last reading took
    ``t`` seconds, the next one is taken no sooner than ``4 t`` later, and ticks in between get
    no reading (rather than a stale one stamped with a new time).
    """

    #: look for new tables at most this often when none is known
    DISCOVER_INTERVAL_S = 5.0
    #: never read more often than this
    MIN_READ_INTERVAL_S = 0.1

    def __init__(self, nft: str | None = None) -> None:
        self.nft = nft or nft_binary()
        self._tables: list[tuple[str, str]] = []
        self._next_discover = 0.0
        self._next_read = 0.0
        self.read_s = 0.0  #: how long the last reading took

    @property
    def available(self) -> bool:
        return self.nft is not None

    def read(self) -> list[FirewallReading]:
        """The current readings (empty without nft, without root, or without a table)."""
        if self.nft is None:
            return []
        now = time.perf_counter()
        if now >= self._next_discover:
            # new tables come and go with labs; look again every few seconds
            self._tables = list_tables(self.nft)
            self._next_discover = now + self.DISCOVER_INTERVAL_S
        if now < self._next_read:
            return []
        readings = []
        for family, table in self._tables:
            try:
                readings.append(read_table(family, table, self.nft))
            except (OSError, ValueError):
                continue  # the table went away between the listing and the read (lab down)
        self.read_s = time.perf_counter() - now
        self._next_read = now + max(self.MIN_READ_INTERVAL_S, 4 * self.read_s)
        return readings
