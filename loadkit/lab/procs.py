"""Start, watch and stop the lab's server processes, and check its ports.

Every server runs in the foreground under a PID we record (with its start time, so a reused PID
is never mistaken for ours), detached into its own session so it outlives ``loadkit lab up``.
Stopping sends SIGTERM to that PID, then SIGKILL to its process group (the group it leads, so
only processes it started) if it has not gone.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import psutil

from loadkit.errors import LabError, PortInUse

log = logging.getLogger(__name__)


class Started(NamedTuple):
    """A process the lab started (made by :func:`start`)."""

    pid: int
    create_time_s: float  #: psutil's create_time, to tell our PID from a reused one


def start(
    argv: Sequence[str],
    log_path: Path,
    preexec: Callable[[], None] | None = None,
    popen_hook: Callable[[subprocess.Popen], None] | None = None,
) -> Started:
    """Start ``argv`` detached, stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                preexec_fn=preexec,
            )
        except FileNotFoundError as err:
            raise LabError(
                f"{argv[0]} is not installed (Debian: apt-get install unbound dovecot-imapd "
                "dovecot-pop3d haproxy, or run 'make setup' as root)"
            ) from err
        except subprocess.SubprocessError as err:
            # a failing preexec_fn (cgroup write) arrives here
            raise LabError(f"could not start {argv[0]}: {err}") from err
    _CHILDREN[proc.pid] = proc
    if popen_hook:
        popen_hook(proc)
    try:
        ctime = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        ctime = 0.0
    return Started(proc.pid, ctime)


#: Popen objects of processes started by this Python process, so they can be reaped (a zombie
#: child would otherwise look alive to a PID check)
_CHILDREN: dict[int, subprocess.Popen] = {}


def _reap() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def alive(pid: int, create_time_s: float) -> bool:
    """Is the process we started as ``pid`` still running (not a zombie, not a reused PID)?"""
    _reap()
    if pid <= 0:
        return False
    try:
        p = psutil.Process(pid)
        if create_time_s and abs(p.create_time() - create_time_s) > 1.0:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(pid: int, create_time_s: float, timeout_s: float = 5.0) -> None:
    """Stop the process we started, and what it started in its process group."""
    stop_all([Started(pid, create_time_s)], timeout_s)


def stop_all(started: Sequence[Started], timeout_s: float = 5.0) -> None:
    """SIGTERM every process in order, wait for all at once, then SIGKILL what is left.

    Dovecot's master takes about a second to wind its children down; waiting for each in turn
    would make ``down`` take seconds per proxy.
    """
    for p in started:
        if alive(*p):
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(*p) for p in started):
        time.sleep(0.05)
    for p in started:
        if alive(*p):
            log.warning("pid %d did not stop on SIGTERM within %.0f s; killing it", p.pid, timeout_s)
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _kill_groups(started)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(alive(*p) for p in started):
        time.sleep(0.05)


def _kill_groups(started: Sequence[Started]) -> None:
    """SIGKILL what is left of the process groups our processes led (children of a dead master).

    Only processes whose group is one of ours and that started no earlier than its leader are
    touched, so a reused group id cannot hit someone else's processes. One pass over the
    process table for all groups: other labs on the host may hold thousands of processes.
    """
    leaders = {p.pid: p.create_time_s for p in started if p.pid > 0}
    if not leaders:
        return
    for proc in psutil.process_iter(["status", "create_time"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            pgid = os.getpgid(proc.pid)
            if pgid in leaders and proc.info["create_time"] + 1.0 >= leaders[pgid]:
                proc.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue


def kill_pid(pid: int) -> None:
    """SIGKILL one process we know to be ours (e.g. found in the lab's own cgroup)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- ports ------------------------------------------------------------------------------------


def check_ports_free(address: str, tcp_ports: Iterable[int], udp_ports: Iterable[int]) -> None:
    """Raise :class:`PortInUse` naming the first busy port and its owner when known."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for kind, ports in ((socket.SOCK_STREAM, tcp_ports), (socket.SOCK_DGRAM, udp_ports)):
        for port in ports:
            s = socket.socket(family, kind)
            try:
                if kind == socket.SOCK_STREAM:
                    # a port in TIME_WAIT is free for a server that sets SO_REUSEADDR (all ours do)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, port))
            except OSError as err:
                proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
                if err.errno == errno.EADDRNOTAVAIL:
                    raise PortInUse(
                        f"cannot bind {address}: the address is not on a local interface"
                    ) from err
                owner = port_owner(port, proto)
                who = f" by {owner}" if owner else " by another process (owner unknown)"
                raise PortInUse(
                    f"{proto} port {address}:{port} is in use{who}; stop it or choose another "
                    "--address or port"
                ) from err
            finally:
                s.close()


def port_owner(port: int, proto: str) -> str:
    """``"pid 123 (unbound)"`` for the process bound to local ``port``, or ``""``."""
    kind = "tcp" if proto == "tcp" else "udp"
    try:
        conns = psutil.net_connections(kind=kind)
    except (psutil.Error, OSError):
        return ""
    for c in conns:
        if c.laddr and c.laddr.port == port and (kind == "udp" or c.status == psutil.CONN_LISTEN):
            if c.pid:
                try:
                    return f"pid {c.pid} ({psutil.Process(c.pid).name()})"
                except psutil.Error:
                    return f"pid {c.pid}"
    return ""


def tcp_open(address: str, port: int, timeout_s: float = 0.5) -> bool:
    """Does something accept TCP connections at ``address:port``?"""
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(
    ready: Callable[[], bool],
    what: str,
    timeout_s: float,
    still_running: Callable[[], bool] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll ``ready()`` until true; raise :class:`LabError` on timeout or if the process died."""
    deadline = time.monotonic() + timeout_s
    while True:
        if ready():
            return
        if still_running is not None and not still_running():
            raise LabError(f"{what} exited while starting; see {log_path}{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise LabError(
                f"{what} not ready after {timeout_s:.0f} s; see {log_path}{_log_tail(log_path)}"
            )
        time.sleep(0.05)


def _log_tail(path: Path | None) -> str:
    """The last meaningful log line, to make the one-line error useful."""
    if path is None or not path.exists():
        return ""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return f" (last log line: {lines[-1][:200]})" if lines else ""
