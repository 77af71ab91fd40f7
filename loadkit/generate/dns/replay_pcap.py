"""DNS queries from a pcap or pcapng capture (tcpdump, Wireshark), UDP and TCP.

dpkt reads the file's framing (both formats, either byte order, micro- or nanosecond stamps).
The link, IP and transport headers are then taken apart by hand with fixed offsets: dpkt's
decoders build an object per layer, several times slower, and a replay reads its capture while
it sends. A packet is a query when its DNS header has QR = 0 and one question; replies and
anything else are skipped. TCP streams are put back together per connection (the 2-byte length
prefix of RFC 7766 may split or join messages across segments).
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Iterator

import dpkt

from loadkit.errors import InputFileError

from .replay_input import RecordedQuery, make_query, question_qtype

# link types (pcap LINKTYPE_* values) and where their IP header starts
_LINK_ETHERNET = 1
_LINK_NULL = 0
_LINK_LOOP = 108
_LINK_RAW = (101, 12, 14)
_LINK_SLL = 113
_LINK_SLL2 = 276
_ETH_IPV4, _ETH_IPV6, _ETH_VLAN = 0x0800, 0x86DD, 0x8100
_PROTO_TCP, _PROTO_UDP = 6, 17
#: a TCP stream's buffered bytes beyond which it is dropped (no DNS message is that long)
_TCP_BUFFER_MAX_BYTES = 70_000
#: TCP streams followed at once: the oldest are forgotten beyond this
_TCP_STREAMS_MAX = 20_000

_ntop = socket.inet_ntop
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6


def _ip_offset(linktype: int, buf: bytes) -> int:
    """Where the IP header starts in a frame of ``linktype``; -1 when not IP."""
    if linktype == _LINK_ETHERNET:
        ethertype, off = (buf[12] << 8) | buf[13], 14
        while ethertype == _ETH_VLAN and len(buf) >= off + 4:
            ethertype, off = (buf[off + 2] << 8) | buf[off + 3], off + 4
        return off if ethertype in (_ETH_IPV4, _ETH_IPV6) else -1
    if linktype in _LINK_RAW:
        return 0
    if linktype in (_LINK_NULL, _LINK_LOOP):
        return 4  # a 4-byte address family in host or network order
    if linktype == _LINK_SLL:
        return 16 if ((buf[14] << 8) | buf[15]) in (_ETH_IPV4, _ETH_IPV6) else -1
    if linktype == _LINK_SLL2:
        return 20 if ((buf[0] << 8) | buf[1]) in (_ETH_IPV4, _ETH_IPV6) else -1
    return -1


class _TcpStreams:
    """Client-to-server TCP byte streams, cut into length-prefixed DNS messages."""

    def __init__(self) -> None:
        self._streams: dict[tuple, list] = {}  # key -> [next expected seq, bytearray]

    def segment(self, key: tuple, seq: int, flags: int, payload: bytes) -> list[bytes]:
        streams = self._streams
        if flags & 0x05:  # FIN or RST: the connection is over
            st = streams.pop(key, None)
            return self._cut(st, payload, seq) if st is not None and payload else []
        if not payload:
            return []
        st = streams.get(key)
        if st is None:
            if len(streams) >= _TCP_STREAMS_MAX:
                del streams[next(iter(streams))]
            st = streams[key] = [seq, bytearray()]
        out = self._cut(st, payload, seq)
        if len(st[1]) > _TCP_BUFFER_MAX_BYTES:
            del streams[key]
        return out

    @staticmethod
    def _cut(st: list, payload: bytes, seq: int) -> list[bytes]:
        expected, buf = st
        if seq != expected and buf:
            if (seq - expected) & 0xFFFFFFFF > 0x7FFFFFFF:
                return []  # a retransmission of bytes already taken
            buf.clear()  # a gap (lost segment): start again at this segment
        buf += payload
        st[0] = (seq + len(payload)) & 0xFFFFFFFF
        out = []
        while len(buf) >= 2:
            n = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + n:
                break
            out.append(bytes(buf[2:2 + n]))
            del buf[:2 + n]
        return out


def _open(path: Path):
    f = path.open("rb")
    try:
        head = f.read(4)
        f.seek(0)
        reader = dpkt.pcapng.Reader(f) if head == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(f)
    except (ValueError, dpkt.dpkt.Error, struct.error) as err:
        f.close()
        raise InputFileError(f"capture {path} is not a readable pcap/pcapng file ({err})") from None
    return f, reader


def read_pcap(path: Path) -> Iterator[RecordedQuery]:
    """Queries of a pcap/pcapng capture in packet order (see the module docstring)."""
    f, reader = _open(path)
    linktype = reader.datalink()
    tcp = _TcpStreams()
    n = 0
    try:
        it = iter(reader)
        while True:
            try:
                ts, buf = next(it)
            except StopIteration:
                break
            except (ValueError, dpkt.dpkt.Error, struct.error) as err:
                raise InputFileError(f"capture {path} packet {n + 1}: cut short or malformed ({err})") from None
            n += 1
            try:
                yield from _queries_of(linktype, float(ts), buf, tcp)
            except IndexError:
                continue  # a frame cut short by the snap length: not a whole query
    finally:
        f.close()


def _queries_of(linktype: int, ts: float, buf: bytes, tcp: _TcpStreams) -> Iterator[RecordedQuery]:
    off = _ip_offset(linktype, buf)
    if off < 0:
        return
    version = buf[off] >> 4
    if version == 4:
        ihl = (buf[off] & 0x0F) * 4
        proto = buf[off + 9]
        client = _ntop(_AF_INET, buf[off + 12:off + 16])
        server = buf[off + 16:off + 20]
        if (buf[off + 6] & 0x3F) or buf[off + 7]:
            return  # an IP fragment: DNS queries are not fragmented in practice
        end = off + ((buf[off + 2] << 8) | buf[off + 3])
        l4 = off + ihl
    elif version == 6:
        proto = buf[off + 6]  # extension headers are not followed: queries do not carry them
        client = _ntop(_AF_INET6, buf[off + 8:off + 24])
        server = buf[off + 24:off + 40]
        end = off + 40 + ((buf[off + 4] << 8) | buf[off + 5])
        l4 = off + 40
    else:
        return
    if proto == _PROTO_UDP:
        msg = buf[l4 + 8:min(end, l4 + ((buf[l4 + 4] << 8) | buf[l4 + 5]))]
        qtype = question_qtype(msg)
        if qtype >= 0:
            yield make_query(ts, client, msg[2:], qtype, False)
    elif proto == _PROTO_TCP:
        data_off = l4 + (buf[l4 + 12] >> 4) * 4
        key = (client, buf[l4:l4 + 2], server, buf[l4 + 2:l4 + 4])
        seq = int.from_bytes(buf[l4 + 4:l4 + 8], "big")
        for msg in tcp.segment(key, seq, buf[l4 + 13], buf[data_off:end]):
            qtype = question_qtype(msg)
            if qtype >= 0:
                yield make_query(ts, client, msg[2:], qtype, True)
