"""A UDP socket's real receive-buffer size, from the kernel's sock_diag netlink interface.

``/proc/net/udp`` shows a socket's queue and drops but not its buffer size ``sk_rcvbuf`` (what
``ss -m`` prints as ``rb``): the size that decides when a burst starts to drop. A ``SO_RCVBUF``
request is doubled by the kernel and capped by ``net.core.rmem_max`` (``SO_RCVBUFFORCE`` is not
capped), so the configured value alone does not say it. ``ss`` gets it from an ``inet_diag``
dump with the ``INET_DIAG_SKMEMINFO`` extension (``linux/inet_diag.h``, ``linux/sock_diag.h``);
this module sends the same request with plain sockets and ``struct``.

When netlink or the ``udp_diag`` module is unavailable, :func:`udp_rcvbuf` returns ``{}`` and
the caller degrades (the collector records the doubled ``so-rcvbuf`` it was told, with one
warning).
"""

from __future__ import annotations

import socket
import struct
from typing import Iterable, NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_SKMEMINFO = 7
#: ``SK_MEMINFO_*`` indices in the ``INET_DIAG_SKMEMINFO`` attribute
SK_MEMINFO_RMEM_ALLOC, SK_MEMINFO_RCVBUF, SK_MEMINFO_DROPS = 0, 1, 8

_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (ports big-endian)
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct(">HH16s16s")
_SOCKID_TAIL = struct.Struct("=IQ")  # if, cookie
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue, uid, inode
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_SOCKID_LEN = _SOCKID.size + _SOCKID_TAIL.size  # 48


class UdpMeminfo(NamedTuple):
    """One UDP socket's memory as the kernel accounts it (``sock_diag`` ``SK_MEMINFO``)."""

    family: int
    local_address: str
    local_port: int
    inode: int
    rcvbuf_bytes: int  #: sk_rcvbuf: ``ss -m`` ``rb``
    rmem_alloc_bytes: int  #: receive memory in use now (``ss -m`` ``r``)
    drops_n: int  #: sk_drops


def _request(family: int, port: int, seq: int) -> bytes:
    body = (_REQ.pack(family, socket.IPPROTO_UDP, 1 << (INET_DIAG_SKMEMINFO - 1), 0xFFFFFFFF)
            + _SOCKID.pack(port, 0, b"\0" * 16, b"\0" * 16) + _SOCKID_TAIL.pack(0, 0xFFFFFFFFFFFFFFFF))
    return _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _parse_msg(family: int, payload: bytes) -> UdpMeminfo | None:
    fam = payload[0]
    sport, _, src, _ = _SOCKID.unpack_from(payload, _MSG_HEAD.size)
    _, _, _, _, inode = _MSG_TAIL.unpack_from(payload, _MSG_HEAD.size + _SOCKID_LEN)
    addr = socket.inet_ntop(fam, src[:4] if fam == socket.AF_INET else src)
    off = _MSG_HEAD.size + _SOCKID_LEN + _MSG_TAIL.size
    while off + 4 <= len(payload):
        rta_len, rta_type = struct.unpack_from("=HH", payload, off)
        if rta_len < 4:
            break
        if rta_type == INET_DIAG_SKMEMINFO and rta_len >= 4 + 4 * (SK_MEMINFO_DROPS + 1):
            mem = struct.unpack_from(f"={SK_MEMINFO_DROPS + 1}I", payload, off + 4)
            return UdpMeminfo(fam, addr, sport, inode, mem[SK_MEMINFO_RCVBUF], mem[SK_MEMINFO_RMEM_ALLOC],
                              mem[SK_MEMINFO_DROPS])
        off += (rta_len + 3) & ~3
    return None


def udp_meminfo(ports: Iterable[int], timeout_s: float = 1.0) -> list[UdpMeminfo]:
    """Every IPv4 and IPv6 UDP socket bound to one of ``ports``, with its memory figures.

    Raises :class:`OSError` when netlink sock_diag is unavailable (no permission, no
    ``udp_diag`` module: the kernel then answers ``ENOENT``).
    """
    out: list[UdpMeminfo] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(timeout_s)
        seq = 0
        for port in sorted(set(int(p) for p in ports)):
            for family in (socket.AF_INET, socket.AF_INET6):
                seq += 1
                nl.send(_request(family, port, seq))
                out += _read_dump(nl, family, seq)
    return out


def _read_dump(nl: socket.socket, family: int, seq: int) -> list[UdpMeminfo]:
    found: list[UdpMeminfo] = []
    while True:
        data = nl.recv(1 << 16)
        off = 0
        while off + _NLMSG.size <= len(data):
            length, kind, _, mseq, _ = _NLMSG.unpack_from(data, off)
            if length < _NLMSG.size:
                return found
            payload = data[off + _NLMSG.size: off + length]
            off += (length + 3) & ~3
            if mseq != seq:
                continue
            if kind == NLMSG_DONE:
                return found
            if kind == NLMSG_ERROR:
                errno = -struct.unpack_from("=i", payload)[0]
                if errno == 0:
                    continue
                raise OSError(errno, f"sock_diag UDP dump: {errno}")
            if kind == SOCK_DIAG_BY_FAMILY:
                info = _parse_msg(family, payload)
                if info is not None:
                    found.append(info)


def udp_rcvbuf(ports: Iterable[int]) -> dict[int, UdpMeminfo]:
    """``inode -> UdpMeminfo`` for the sockets bound to ``ports``; ``{}`` when sock_diag is
    unavailable (the caller says so once and degrades)."""
    try:
        return {m.inode: m for m in udp_meminfo(ports)}
    except OSError:
        return {}


def doubled_rcvbuf(so_rcvbuf_bytes: int, rmem_max_bytes: int | None = None, *, forced: bool = False) -> int:
    """The ``sk_rcvbuf`` Linux gives a ``SO_RCVBUF`` request (``sock_setsockopt``): the value
    capped at ``net.core.rmem_max`` (not with ``SO_RCVBUFFORCE``), then doubled for overhead."""
    value = int(so_rcvbuf_bytes)
    if not forced and rmem_max_bytes is not None:
        value = min(value, int(rmem_max_bytes))
    return 2 * value
