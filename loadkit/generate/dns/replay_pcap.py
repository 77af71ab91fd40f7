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


_PCAP_MAGICS = {  # magic -> (record header format, fraction divisor)
    b"\xa1\xb2\xc3\xd4": (">IIII", 1e6), b"\xd4\xc3\xb2\xa1": ("<IIII", 1e6),
    b"\xa1\xb2\x3c\x4d": (">IIII", 1e9), b"\x4d\x3c\xb2\xa1": ("<IIII", 1e9),
}


def _packets(path: Path, f) -> Iterator[tuple[float, bytes]]:
    """(timestamp, frame) of each packet. dpkt reads the file header (and all of pcapng); the
    records of classic pcap are read here with one struct unpack each, as dpkt builds a header
    object per packet (about a third of the cost of a replayed query)."""
    head = f.read(4)
    f.seek(0)
    try:
        reader = dpkt.pcapng.Reader(f) if head == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(f)
    except (ValueError, dpkt.dpkt.Error, struct.error) as err:
        raise InputFileError(f"capture {path} is not a readable pcap/pcapng file ({err})") from None
    yield reader.datalink(), b""  # the link type first
    n = 0
    if head not in _PCAP_MAGICS:
        it = iter(reader)
        while True:
            try:
                ts, buf = next(it)
            except StopIteration:
                return
            except (ValueError, dpkt.dpkt.Error, struct.error) as err:
                raise InputFileError(f"capture {path} packet {n + 1}: cut short or malformed ({err})") from None
            n += 1
            yield float(ts), buf
    fmt, divisor = _PCAP_MAGICS[head]
    unpack = struct.Struct(fmt).unpack
    read = f.read
    while True:
        h = read(16)
        if not h:
            return
        n += 1
        if len(h) < 16:
            raise InputFileError(f"capture {path} packet {n}: cut short (record header)")
        sec, frac, caplen, _ = unpack(h)
        buf = read(caplen)
        if len(buf) < caplen:
            raise InputFileError(f"capture {path} packet {n}: cut short ({len(buf)} of {caplen} bytes)")
        yield sec + frac / divisor, buf


def read_pcap(path: Path) -> Iterator[RecordedQuery]:
    """Queries of a pcap/pcapng capture in packet order (see the module docstring)."""
    try:
        f = path.open("rb")
    except OSError as err:
        raise InputFileError(f"capture {path} cannot be read: {err.strerror}") from err
    tcp = _TcpStreams()
    out: list[RecordedQuery] = []
    with f:
        packets = _packets(path, f)
        linktype = next(packets)[0]
        for ts, buf in packets:
            try:
                _decode(linktype, ts, buf, tcp, out)
            except IndexError:
                continue  # a frame cut short by the snap length: not a whole query
            if out:
                yield from out
                out.clear()


_names: dict[bytes, str] = {}


def _client(family: int, raw: bytes) -> str:
    # text form of a client address, kept (a capture's clients repeat; inet_ntop per packet adds up)
    name = _names.get(raw)
    if name is None:
        if len(_names) > 100_000:
            _names.clear()
        name = _names[raw] = _ntop(family, raw)
    return name


def _decode(linktype: int, ts: float, buf: bytes, tcp: _TcpStreams, out: list) -> None:
    """The queries in one frame, appended to ``out``."""
    off = _ip_offset(linktype, buf)
    if off < 0:
        return
    version = buf[off] >> 4
    if version == 4:
        ihl = (buf[off] & 0x0F) * 4
        proto = buf[off + 9]
        if (buf[off + 6] & 0x3F) or buf[off + 7]:
            return  # an IP fragment: DNS queries are not fragmented in practice
        client = _client(_AF_INET, buf[off + 12:off + 16])
        end = off + ((buf[off + 2] << 8) | buf[off + 3])
        l4 = off + ihl
        server = buf[off + 16:off + 20]
    elif version == 6:
        proto = buf[off + 6]  # extension headers are not followed: queries do not carry them
        client = _client(_AF_INET6, buf[off + 8:off + 24])
        end = off + 40 + ((buf[off + 4] << 8) | buf[off + 5])
        l4 = off + 40
        server = buf[off + 24:off + 40]
    else:
        return
    if proto == _PROTO_UDP:
        msg = buf[l4 + 8:min(end, l4 + ((buf[l4 + 4] << 8) | buf[l4 + 5]))]
        if len(msg) > 2 and not msg[2] & 0x80:  # QR = 0: a query (replies are most of the rest)
            qtype = question_qtype(msg)
            if qtype >= 0:
                out.append(make_query(ts, client, msg[2:], qtype, False))
    elif proto == _PROTO_TCP:
        data_off = l4 + (buf[l4 + 12] >> 4) * 4
        key = (client, buf[l4:l4 + 2], server, buf[l4 + 2:l4 + 4])
        seq = int.from_bytes(buf[l4 + 4:l4 + 8], "big")
        for msg in tcp.segment(key, seq, buf[l4 + 13], buf[data_off:end]):
            qtype = question_qtype(msg)
            if qtype >= 0:
                out.append(make_query(ts, client, msg[2:], qtype, True))
