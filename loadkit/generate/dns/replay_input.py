"""Recorded DNS queries read from a capture, a dnstap file or a query log, one at a time.

Every reader yields :class:`RecordedQuery` records in file order and never holds the file in
memory: a capture of a million queries is read as it is replayed. The format is told from the
file's first bytes (pcap and pcapng magic numbers; a frame-streams control frame for dnstap;
text for query logs), or given. A file that is not what it claims raises
:class:`~loadkit.errors.InputFileError` naming the file and the place (packet, frame or line).

Readers: :mod:`.replay_pcap` (pcap/pcapng with dpkt, UDP and TCP), :mod:`.replay_dnstap`
(frame streams with dnstap protobuf messages, as unbound writes through ``fstrm_capture``) and
:mod:`.replay_querylog` (BIND ``querylog`` and unbound ``log-queries`` lines).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

from loadkit.errors import InputFileError, ProfileError

#: formats :func:`read_queries` knows (``auto`` tells them from the first bytes)
FORMATS = ("auto", "pcap", "dnstap", "querylog")

_PCAP_MAGICS = {b"\xa1\xb2\xc3\xd4", b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\x3c\x4d", b"\x4d\x3c\xb2\xa1"}
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
#: a frame-streams file starts with a control frame: a zero "data length" escape
_FSTRM_MAGIC = b"\x00\x00\x00\x00"


class RecordedQuery(NamedTuple):
    """One DNS query as recorded (made by every reader of this package)."""

    ts_unix_s: float  #: when the query was seen (capture time, dnstap query_time, log time)
    client: str  #: the recorded client's address (text form)
    tail: bytes  #: the query's wire form after its 2-byte ID: flags, question, EDNS as sent
    qtype: int  #: the question's type (1 = A ...)
    tcp: bool  #: it came over TCP


#: ``_new(RecordedQuery, (...))`` skips the generated ``__new__`` (one record per query)
_new = tuple.__new__


def make_query(ts_unix_s: float, client: str, tail: bytes, qtype: int, tcp: bool) -> RecordedQuery:
    return _new(RecordedQuery, (ts_unix_s, client, tail, qtype, tcp))


def question_qtype(msg: bytes) -> int:
    """The QTYPE of a wire message's first question, or -1 when the message is not a query
    with one (a reply, no question, a name that runs past the end)."""
    if len(msg) < 17 or msg[2] & 0x80 or not (msg[4] or msg[5]):
        return -1  # shorter than header + root name + type + class, a reply, or QDCOUNT 0
    i = 12
    n = len(msg)
    while i < n:
        length = msg[i]
        if length == 0:
            i += 1
            break
        if length & 0xC0:
            return -1  # a compression pointer in a question's name: not something a client sends
        i += length + 1
    else:
        return -1
    if i + 4 > n:
        return -1
    return (msg[i] << 8) | msg[i + 1]


def detect_format(path: Path) -> str:
    """``pcap``, ``dnstap`` or ``querylog`` from the file's first bytes."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise InputFileError(f"replay file {path} does not exist") from None
    except OSError as err:
        raise InputFileError(f"replay file {path} cannot be read: {err.strerror}") from err
    if head in _PCAP_MAGICS or head == _PCAPNG_MAGIC:
        return "pcap"
    if head == _FSTRM_MAGIC:
        return "dnstap"
    if not head:
        raise InputFileError(f"replay file {path} is empty")
    return "querylog"


def read_queries(path: str | Path, fmt: str = "auto", edns_bytes: int = 1232) -> Iterator[RecordedQuery]:
    """The queries of a recording, in file order (a generator: the file is read as it goes).
    ``edns_bytes`` is the EDNS buffer size of queries rebuilt from a query log that says EDNS
    was used (unbound's log does not say: its queries are rebuilt with it; 0 turns EDNS off)."""
    p = Path(path)
    if fmt not in FORMATS:
        raise ProfileError(f"option --replay-format {fmt!r} must be one of {', '.join(FORMATS)}")
    kind = detect_format(p) if fmt == "auto" else fmt
    if kind == "pcap":
        from .replay_pcap import read_pcap

        return read_pcap(p)
    if kind == "dnstap":
        from .replay_dnstap import read_dnstap

        return read_dnstap(p)
    from .replay_querylog import read_querylog

    return read_querylog(p, edns_bytes)
