"""Pure parsers of the ``/proc`` files that show network and memory saturation.

psutil has no UDP buffer, socket-queue, listen-overflow or conntrack figures, so loadkit reads
them itself, in psutil's style: every function takes the ``/proc`` root as a parameter (tests
point it at canned files under ``tests/data/proc``) and returns plain numbers with units in
their names. A parser raises ``OSError`` when its file cannot be read and
:class:`ProcFormatError` (a ``ValueError``) when its content is not what the kernel writes (cut
short, or garbled); deciding what to do about either (a zero and one warning) is the
collector's job, not the parser's.

Sources (Linux ``Documentation/networking/proc_net*.rst`` and ``net/ipv4/proc.c``):

- ``net/snmp``: pairs of lines ``Proto: Name Name...`` / ``Proto: value value...``
  (``Udp: RcvbufErrors`` counts datagrams dropped because a socket's receive buffer was full);
- ``net/netstat``: the same layout for ``TcpExt`` (``ListenOverflows``, ``ListenDrops``,
  ``TCPBacklogDrop``) and ``IpExt``;
- ``net/snmp6``: one ``Name value`` per line (``Udp6RcvbufErrors``);
- ``net/udp``, ``net/udp6``, ``net/tcp``, ``net/tcp6``: one socket per line, addresses in hex;
  for UDP the last column is the socket's cumulative ``drops``;
- ``net/sockstat``: ``PROTO: key value key value``; ``mem`` is in pages;
- ``net/softnet_stat``: one line per CPU, hex columns, the second is packets dropped because the
  backlog queue was full;
- ``sys/net/netfilter/nf_conntrack_{count,max}``: absent without the conntrack module;
- ``meminfo`` (kB), ``loadavg``, ``stat`` (CPU time in clock ticks).
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, TypeVar

from loadkit.errors import CollectorError

T = TypeVar("T")

#: default root; tests and containers pass another
PROC_ROOT = "/proc"

#: /proc/net/tcp ``st`` column (include/net/tcp_states.h)
TCP_STATES: dict[int, str] = {
    0x01: "ESTABLISHED",
    0x02: "SYN_SENT",
    0x03: "SYN_RECV",
    0x04: "FIN_WAIT1",
    0x05: "FIN_WAIT2",
    0x06: "TIME_WAIT",
    0x07: "CLOSE",
    0x08: "CLOSE_WAIT",
    0x09: "LAST_ACK",
    0x0A: "LISTEN",
    0x0B: "CLOSING",
    0x0C: "NEW_SYN_RECV",
}
TCP_ESTABLISHED = 0x01


class ProcFormatError(CollectorError, ValueError):
    """A ``/proc`` file's content is not in the kernel's format; a ``ValueError`` too, so every
    caller that skips an unreadable figure already skips this one."""


def _read(proc_root: str | os.PathLike, rel: str) -> str:
    with open(Path(proc_root) / rel, encoding="ascii", errors="replace") as fh:
        return fh.read()


# --------------------------------------------------------------------------------------------
# counters: snmp, netstat, snmp6
# --------------------------------------------------------------------------------------------


def parse_paired_table(text: str) -> dict[str, dict[str, int]]:
    """``Proto: names`` / ``Proto: values`` line pairs -> ``{"Udp": {"RcvbufErrors": 3, ...}}``.

    The layout of ``/proc/net/snmp`` and ``/proc/net/netstat``. A pair whose lengths differ (a
    kernel bug or a file cut short) is skipped rather than misaligned.
    """
    tables: dict[str, dict[str, int]] = {}
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for head, values in zip(lines[::2], lines[1::2]):
        proto, _, names = head.partition(":")
        vproto, _, nums = values.partition(":")
        if proto != vproto:
            continue
        names_l, nums_l = names.split(), nums.split()
        if len(names_l) != len(nums_l):
            continue
        row: dict[str, int] = {}
        for name, num in zip(names_l, nums_l):
            try:
                row[name] = int(num)
            except ValueError:
                continue
        tables[proto.strip()] = row
    return tables


def read_snmp(proc_root: str | os.PathLike = PROC_ROOT) -> dict[str, dict[str, int]]:
    """``/proc/net/snmp``: ``{"Ip": {...}, "Tcp": {...}, "Udp": {"RcvbufErrors": n, ...}}``."""
    return parse_paired_table(_read(proc_root, "net/snmp"))


def read_netstat(proc_root: str | os.PathLike = PROC_ROOT) -> dict[str, dict[str, int]]:
    """``/proc/net/netstat``: ``{"TcpExt": {"ListenOverflows": n, ...}, "IpExt": {...}}``."""
    return parse_paired_table(_read(proc_root, "net/netstat"))


def parse_keyed(text: str) -> dict[str, int]:
    """Lines of ``KEY VALUE`` (``/proc/net/snmp6``, a cgroup's ``memory.events``...); other lines
    and values that are not integers are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def read_snmp6(proc_root: str | os.PathLike = PROC_ROOT) -> dict[str, int]:
    """``/proc/net/snmp6``: ``{"Udp6RcvbufErrors": n, ...}``; absent when IPv6 is off."""
    return parse_keyed(_read(proc_root, "net/snmp6"))


# --------------------------------------------------------------------------------------------
# sockets: udp, udp6, tcp, tcp6
# --------------------------------------------------------------------------------------------


class UdpSocket(NamedTuple):
    """One line of ``/proc/net/udp`` or ``udp6`` (:func:`read_udp_sockets`)."""

    local_address: str
    local_port: int
    rx_queue_bytes: int  #: receive-buffer memory in use (``rx_queue``), not a datagram count
    tx_queue_bytes: int
    drops_n: int  #: datagrams dropped by this socket since it was created
    inode: int


class TcpSocket(NamedTuple):
    """One line of ``/proc/net/tcp`` or ``tcp6`` (:func:`read_tcp_sockets`)."""

    local_port: int
    remote_port: int
    state: int  #: see :data:`TCP_STATES`
    rx_queue_bytes: int  #: for LISTEN sockets: the accept queue length
    inode: int


def _hex_address(hexaddr: str) -> str:
    """Kernel hex address (host byte order per 32-bit word) -> text form."""
    raw = bytes.fromhex(hexaddr)
    if len(raw) not in (4, 16):
        raise ProcFormatError(f"socket address {hexaddr[:40]!r} is neither IPv4 nor IPv6")
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = struct.unpack("<4I", raw)
    return socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words))


def _socket_rows(text: str, min_fields: int) -> Iterator[list[str]]:
    """The fields of each socket line of a ``/proc/net`` socket table (the header skipped, a
    line cut short skipped: the kernel prints the table while sockets come and go)."""
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) >= min_fields:
            yield f


def parse_udp(text: str, ports: set[int] | None = None) -> list[UdpSocket]:
    """Lines of ``/proc/net/udp``/``udp6``; with ``ports``, only sockets bound to them (the
    port is checked before anything else is decoded: the table can hold thousands of sockets)."""
    sockets: list[UdpSocket] = []
    for f in _socket_rows(text, 13):
        try:
            addr, _, port = f[1].partition(":")
            if ports is not None and int(port, 16) not in ports:
                continue
            tx, _, rx = f[4].partition(":")
            sockets.append(
                UdpSocket(_hex_address(addr), int(port, 16), int(rx, 16), int(tx, 16), int(f[12]), int(f[9]))
            )
        except (ValueError, OSError):
            continue
    return sockets


def read_udp_sockets(
    proc_root: str | os.PathLike = PROC_ROOT, ports: Iterable[int] | None = None
) -> list[UdpSocket]:
    """UDP sockets of ``net/udp`` and ``net/udp6``, only those bound to ``ports`` if given.

    A missing ``udp6`` (IPv6 disabled) is not an error; a missing ``udp`` is.
    """
    return _read_v4_v6(proc_root, "net/udp", parse_udp, set(ports) if ports is not None else None)


def parse_tcp(text: str, inodes: set[int] | None = None) -> list[TcpSocket]:
    """Lines of ``/proc/net/tcp``/``tcp6``; with ``inodes``, only those sockets."""
    sockets: list[TcpSocket] = []
    for f in _socket_rows(text, 10):
        try:
            if inodes is not None and int(f[9]) not in inodes:
                continue
            sockets.append(
                TcpSocket(
                    int(f[1].rpartition(":")[2], 16),
                    int(f[2].rpartition(":")[2], 16),
                    int(f[3], 16),
                    int(f[4].partition(":")[2], 16),
                    int(f[9]),
                )
            )
        except ValueError:
            continue
    return sockets


def read_tcp_sockets(
    proc_root: str | os.PathLike = PROC_ROOT, inodes: Iterable[int] | None = None
) -> list[TcpSocket]:
    """TCP sockets of ``net/tcp`` and ``net/tcp6`` (``tcp6`` may be absent), only ``inodes`` if given."""
    return _read_v4_v6(proc_root, "net/tcp", parse_tcp, set(inodes) if inodes is not None else None)


def _read_v4_v6(proc_root: str | os.PathLike, name: str, parse: Callable[[str, set[int] | None], list[T]],
                wanted: set[int] | None) -> list[T]:
    """``parse`` over ``name`` and ``name`` + ``6``; a missing IPv6 table (IPv6 disabled) is no
    error, a missing IPv4 one is."""
    rows = parse(_read(proc_root, name), wanted)
    try:
        rows += parse(_read(proc_root, name + "6"), wanted)
    except FileNotFoundError:
        pass
    return rows


# --------------------------------------------------------------------------------------------
# sockstat, softnet, conntrack
# --------------------------------------------------------------------------------------------


def parse_sockstat(text: str) -> dict[str, dict[str, int]]:
    """``sockets: used 16`` / ``UDP: inuse 0 mem 3`` -> ``{"sockets": {"used": 16}, "UDP": {...}}``."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        proto, _, rest = line.partition(":")
        parts = rest.split()
        row: dict[str, int] = {}
        for key, value in zip(parts[::2], parts[1::2]):
            try:
                row[key] = int(value)
            except ValueError:
                continue
        if proto.strip():
            out[proto.strip()] = row
    return out


def read_sockstat(proc_root: str | os.PathLike = PROC_ROOT) -> dict[str, dict[str, int]]:
    """``/proc/net/sockstat``; ``mem`` values are pages, not bytes."""
    return parse_sockstat(_read(proc_root, "net/sockstat"))


class SoftnetStat(NamedTuple):
    """One CPU's line of ``/proc/net/softnet_stat`` (:func:`read_softnet`)."""

    processed_n: int
    dropped_n: int  #: input backlog full (``netdev_max_backlog``)
    time_squeeze_n: int


def parse_softnet(text: str) -> list[SoftnetStat]:
    rows: list[SoftnetStat] = []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 3:
            try:
                rows.append(SoftnetStat(int(f[0], 16), int(f[1], 16), int(f[2], 16)))
            except ValueError:
                continue
    return rows


def read_softnet(proc_root: str | os.PathLike = PROC_ROOT) -> list[SoftnetStat]:
    return parse_softnet(_read(proc_root, "net/softnet_stat"))


class Conntrack(NamedTuple):
    """Connection-tracking table fill (:func:`read_conntrack`)."""

    count_n: int
    max_n: int


def read_conntrack(proc_root: str | os.PathLike = PROC_ROOT) -> Conntrack:
    """``sys/net/netfilter/nf_conntrack_{count,max}``; ``FileNotFoundError`` without the module.

    The firewall session table of the DNS incident filled the same way this one does.
    """
    try:
        count = int(_read(proc_root, "sys/net/netfilter/nf_conntrack_count").strip())
        maximum = int(_read(proc_root, "sys/net/netfilter/nf_conntrack_max").strip())
    except ValueError:
        raise ProcFormatError("nf_conntrack_count/nf_conntrack_max do not hold a number") from None
    return Conntrack(count, maximum)


# --------------------------------------------------------------------------------------------
# memory, load, CPU
# --------------------------------------------------------------------------------------------


def parse_meminfo(text: str) -> dict[str, int]:
    """``MemAvailable:  123 kB`` -> ``{"MemAvailable": 125952}`` (bytes; unitless stay as is)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        if len(parts) > 1 and parts[1] == "kB":
            value *= 1024
        out[name.strip()] = value
    return out


def read_meminfo(proc_root: str | os.PathLike = PROC_ROOT) -> dict[str, int]:
    """``/proc/meminfo`` in bytes."""
    return parse_meminfo(_read(proc_root, "meminfo"))


def read_loadavg(proc_root: str | os.PathLike = PROC_ROOT) -> tuple[float, float, float]:
    f = _read(proc_root, "loadavg").split()
    try:
        return float(f[0]), float(f[1]), float(f[2])
    except (IndexError, ValueError):
        raise ProcFormatError(f"loadavg {' '.join(f[:3])[:60]!r} is not three load averages") from None


class CpuTimes(NamedTuple):
    """The aggregate ``cpu`` line of ``/proc/stat``, in clock ticks (:func:`read_cpu_times`)."""

    busy_ticks: int  #: everything but idle and iowait
    total_ticks: int
    cpus_n: int


def parse_cpu_times(text: str) -> CpuTimes:
    busy = total = cpus = 0
    for line in text.splitlines():
        if line.startswith("cpu "):
            # user nice system idle iowait irq softirq steal guest guest_nice; guest time is
            # already counted in user/nice, so stop at steal
            try:
                values = [int(v) for v in line.split()[1:9]]
            except ValueError:
                values = []
            if len(values) < 4:  # idle is the fourth: a line cut short has no total
                raise ProcFormatError(f"stat line {line[:60]!r} has no user/nice/system/idle ticks")
            total = sum(values)
            busy = total - values[3] - (values[4] if len(values) > 4 else 0)
        elif line.startswith("cpu"):
            cpus += 1
    return CpuTimes(busy, total, max(cpus, 1))


def read_cpu_times(proc_root: str | os.PathLike = PROC_ROOT) -> CpuTimes:
    return parse_cpu_times(_read(proc_root, "stat"))


# --------------------------------------------------------------------------------------------
# one process: /proc/PID/stat
# --------------------------------------------------------------------------------------------

#: clock ticks per second and page size, for /proc/PID/stat
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class PidStat(NamedTuple):
    """What one read of ``/proc/PID/stat`` gives (:func:`read_pid_stat`)."""

    state: str  #: "R", "S", "D", "Z" (zombie: exited, not reaped)...
    ppid: int
    cpu_s: float  #: user + system CPU time
    rss_bytes: int
    start_ticks: int  #: start time after boot in clock ticks (tells a reused PID apart)


def parse_pid_stat(text: str) -> PidStat:
    # the command name may contain spaces and parentheses: split after the last ')'
    try:
        f = text[text.rindex(")") + 2 :].split()
        return PidStat(
            f[0],
            int(f[1]),
            (int(f[11]) + int(f[12])) / CLOCK_TICKS,
            int(f[21]) * PAGE_BYTES,
            int(f[19]),
        )
    except (IndexError, ValueError):  # cut short (the process exited mid-read) or garbled
        raise ProcFormatError(f"process stat {text[:60]!r} has no state, parent, times and RSS") from None


def read_pid_stat(pid: int, proc_root: str | os.PathLike = PROC_ROOT) -> PidStat:
    """One file read per process per sample: state, parent, CPU time and RSS together.

    ``FileNotFoundError``/``ProcessLookupError`` when the process is gone.
    """
    # os.open/os.read: a third of the cost of open() for a file read 500 times per sample
    fd = os.open(f"{proc_root}/{pid}/stat", os.O_RDONLY)
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    return parse_pid_stat(data.decode("ascii", "replace"))
