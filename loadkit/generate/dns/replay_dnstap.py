"""DNS queries from a dnstap file: frame streams (fstrm) of dnstap protobuf messages.

unbound (built with ``--enable-dnstap``, as Debian's is) writes dnstap only to a socket; the
frame-streams tool ``fstrm_capture`` (Debian package ``fstrm-bin``) listens there and writes the
file read here. BIND (``dnstap-output file``) and Knot write such files themselves. The file is a
START control frame with the content type ``protobuf:dnstap.Dnstap``, data frames, then STOP.

The frames are cut by :class:`fstrm.FstrmCodec`, fed exactly the bytes it asks for (so its
buffer never holds more than one frame); each data frame is a ``Dnstap`` protobuf
(``dnstap_pb``). Client queries (``CLIENT_QUERY``, and ``STUB_QUERY``/``TOOL_QUERY`` that some
tools write) are kept with their recorded ``query_time``; the transport is TCP for TCP and DoT
(a replay's transport choice is the replay's, the recording only says "stream").
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import dnstap_pb
import fstrm
from google.protobuf.message import DecodeError

from loadkit.errors import InputFileError

from .replay_input import RecordedQuery, make_query, question_qtype

_QUERY_TYPES = {
    dnstap_pb.Message.Type.CLIENT_QUERY,
    dnstap_pb.Message.Type.STUB_QUERY,
    dnstap_pb.Message.Type.TOOL_QUERY,
}
_STREAM_PROTOCOLS = {dnstap_pb.TCP, dnstap_pb.DOT, dnstap_pb.DOH, dnstap_pb.DNSCryptTCP}
_CONTENT_TYPE = b"protobuf:dnstap.Dnstap"
#: a frame longer than this is not a dnstap message (the file is damaged)
_FRAME_MAX_BYTES = 1 << 20


def _frames(path: Path, f) -> Iterator[tuple[int, bytes]]:
    """(frame type, payload) of each frame: ``fstrm.FSTRM_DATA_FRAME`` payloads are messages."""
    codec = fstrm.FstrmCodec()
    n = 0
    while True:
        want = codec.pending_nb_bytes()
        if want > _FRAME_MAX_BYTES:
            raise InputFileError(f"dnstap file {path} frame {n + 1}: length {want} is not a frame stream's")
        data = f.read(want)
        if not data:
            if codec.buf or codec.df_length is not None:
                raise InputFileError(f"dnstap file {path} frame {n + 1}: cut short")
            return
        if not codec.append_and_process(data):
            continue
        try:
            kind, content_types, payload = codec.decode()
        except Exception as err:  # fstrm raises plain Exception for a malformed control frame
            raise InputFileError(f"dnstap file {path} frame {n + 1}: {err}") from None
        n += 1
        if kind != fstrm.FSTRM_DATA_FRAME and content_types and _CONTENT_TYPE not in content_types:
            raise InputFileError(f"dnstap file {path}: content type {content_types[0]!r} is not dnstap")
        yield kind, payload


def read_dnstap(path: Path) -> Iterator[RecordedQuery]:
    """Client queries of a dnstap file in file order (see the module docstring)."""
    try:
        f = path.open("rb")
    except OSError as err:
        raise InputFileError(f"dnstap file {path} cannot be read: {err.strerror}") from err
    frame = dnstap_pb.Dnstap()
    started = False
    n = 0
    with f:
        for kind, payload in _frames(path, f):
            if kind == fstrm.FSTRM_CONTROL_START:
                started = True
            if kind != fstrm.FSTRM_DATA_FRAME:
                continue
            n += 1
            if not started:
                raise InputFileError(f"dnstap file {path}: data before the START frame (not a frame stream)")
            try:
                frame.ParseFromString(payload)
            except DecodeError as err:
                raise InputFileError(f"dnstap file {path} message {n}: not a dnstap protobuf ({err})") from None
            m = frame.message
            if m.type not in _QUERY_TYPES or not m.query_message:
                continue
            msg = m.query_message
            qtype = question_qtype(msg)
            if qtype < 0:
                continue
            addr = m.query_address
            client = socket.inet_ntop(socket.AF_INET6 if len(addr) == 16 else socket.AF_INET, addr) \
                if len(addr) in (4, 16) else "0.0.0.0"
            yield make_query(m.query_time_sec + m.query_time_nsec * 1e-9, client, msg[2:], qtype,
                             m.socket_protocol in _STREAM_PROTOCOLS)
