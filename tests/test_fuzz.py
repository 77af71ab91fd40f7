"""Parsers of what a server or the kernel sends, fed random and truncated bytes (hypothesis).

What arrives from a target under load can be anything: a datagram cut short, a proxy that dies
mid-line, a ``/proc`` file that changes while it is read. None of it may raise anything but
loadkit's own errors (a mail session's ``ProtocolError``/``ServerReply``/``ServerClosed``, a
``/proc`` file's ``ProcFormatError``), so that every failure is classed and counted rather than
ending a user or a collector sample with a foreign exception.
"""

from __future__ import annotations

import asyncio
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loadkit.errors import LoadkitError
from loadkit.generate.dns import wire
from loadkit.generate.mail import classify as mail_classify
from loadkit.generate.mail.classify import Phase, ProtocolError, ServerClosed, ServerReply
from loadkit.observe import procfs

CANNED = Path(__file__).parent / "data" / "proc"
# no example database: nothing is written into the work tree, each run draws afresh
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

#: mail exceptions that are loadkit's own: a failure's detail starts with one of these names
OWN_MAIL_ERRORS = (ProtocolError.__name__, ServerReply.__name__, ServerClosed.__name__, "PhaseTimeout")


def _truncations(data: bytes) -> list[bytes]:
    """A few prefixes of ``data``: cut at the start, the middle, one byte short."""
    return sorted({data[:n] for n in (0, 1, 2, 3, 11, 12, len(data) // 2, max(0, len(data) - 1))})


def _real_reply() -> bytes:
    import dns.message

    query = dns.message.make_query("www.lab.test", "A")
    return dns.message.make_response(query).to_wire()


# -- DNS: the reply classifier -------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=600))
@example(b"")
@example(b"\x12")
@example(b"\x12\x34\x81")
def test_dns_classify_never_raises_on_random_or_truncated_replies(reply: bytes) -> None:
    for data in [reply, *_truncations(reply), *_truncations(_real_reply())]:
        code = wire.classify(data)
        assert 0 <= code < len(wire.OUTCOME_NAMES)
        for kind in (wire.KIND_NAME, wire.KIND_NXDOMAIN, wire.KIND_RANDOM_SUBDOMAIN):
            assert wire.failure_of(code, kind) in (None, *wire.FAILURE_OF[kind])
    # a reply too short for a header is "other", as the sender has always counted it
    assert wire.classify(b"\x00\x01\x81") == wire.RCODE_OTHER


def test_dns_classify_still_reads_real_headers() -> None:
    reply = bytearray(_real_reply())
    assert wire.classify(bytes(reply)) == wire.NOERROR
    reply[3] = (reply[3] & 0xF0) | 3
    assert wire.classify(bytes(reply)) == wire.NXDOMAIN
    reply[2] |= 0x02
    assert wire.classify(bytes(reply)) == wire.TRUNCATED


# -- mail: the failure classifier ----------------------------------------------------------------

@FUZZ
@given(st.text(max_size=12), st.text(max_size=200), st.sampled_from(list(Phase)))
def test_mail_classify_classes_any_server_reply(status: str, text: str, phase: Phase) -> None:
    failure = mail_classify.classify(ServerReply(status, text), phase)
    assert failure.failure_class in mail_classify.FAILURE_CLASSES
    failure = mail_classify.classify(ProtocolError(text), phase)
    assert failure.failure_class == "protocol_error"


# -- mail: the POP3 client's response parsing ---------------------------------------------------

class _FakeSocket:
    """Serves ``data`` in ``chunk``-byte reads, then EOF; swallows what the client sends."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data = data
        self.chunk = max(1, chunk)

    def recv(self, _n: int) -> bytes:
        out, self.data = self.data[: self.chunk], self.data[self.chunk :]
        return out

    def sendall(self, _data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def _pop3_session(data: bytes, chunk: int):
    from loadkit.generate.mail.pop3 import Pop3Session, Pop3Spec

    session = Pop3Session(Pop3Spec("127.0.0.1", 110))
    session.sock = _FakeSocket(data, chunk)
    return session


def _pop3_lines() -> st.SearchStrategy[bytes]:
    word = st.sampled_from([b"+OK", b"-ERR", b"+OK 3 120", b"+OK x", b".", b"..", b"+OK -1 2", b"+OK 99999999999999999999"])
    noise = st.binary(max_size=40)
    line = st.one_of(word, noise, st.tuples(word, noise).map(lambda t: t[0] + b" " + t[1]))
    return st.lists(line, max_size=12).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


@FUZZ
@given(st.one_of(st.binary(max_size=2000), _pop3_lines()), st.integers(1, 64))
@example(b"+OK\r\n+OK\r\n+OK\r\n+OK 1\r\n", 3)
@example(b"+OK\r\n" + b"x" * 9000, 4096)
def test_pop3_parsing_raises_only_its_own_errors(data: bytes, chunk: int) -> None:
    for cut in [data, *_truncations(data)]:
        # each phase after the greeting reads the stream as its reply ...
        phases = [lambda s: s.login("user0001", "pw"), lambda s: s.stat(), lambda s: s.uidl(),
                  lambda s: s.retr(1), lambda s: s.quit()]
        results = [phase(_pop3_session(cut, chunk)) for phase in phases]
        # ... and in a session's order, reading on, until the first failure (as open() does)
        session = _pop3_session(cut, chunk)
        for phase in phases:
            results.append(phase(session))
            if not results[-1].ok:
                break
        for r in results:
            assert r.failure is None or r.failure.detail.startswith(OWN_MAIL_ERRORS), r.failure.detail
        session = _pop3_session(cut, chunk)
        try:
            session._status("greeting")
            session._multiline()
        except (ProtocolError, ServerReply, ServerClosed):
            pass


# -- mail: the IMAP client's greeting and response handling (aioimaplib underneath) --------------

class _FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def write(self, _data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, _name: str, default=None):
        return default


def _imap_lines() -> st.SearchStrategy[bytes]:
    word = st.sampled_from([b"* OK", b"* PREAUTH", b"* BYE", b"* CAPABILITY IMAP4rev1 IDLE", b"A001 OK",
                            b"* 3 EXISTS", b"* 1 FETCH (BODY[HEADER] {5}", b"{3}", b"* OK [ALERT]", b")"])
    noise = st.binary(max_size=40)
    line = st.one_of(word, noise, st.tuples(word, noise).map(lambda t: t[0] + b" " + t[1]))
    return st.lists(line, max_size=10).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


@FUZZ
@given(st.one_of(st.binary(max_size=1000), _imap_lines()), st.integers(1, 64))
@example(b"* BYE overloaded\r\n", 64)
@example(b"garbage\r\n", 3)
@example(b"* OK ready\r\n* CAPABILITY IMAP4rev1\r\n", 5)
def test_imap_greeting_handling_raises_only_its_own_errors(data: bytes, chunk: int) -> None:
    from loadkit.generate.mail.imap import _Protocol

    async def feed() -> None:
        loop = asyncio.get_running_loop()
        proto = _Protocol(loop, None)
        proto.connection_made(_FakeTransport())
        for i in range(0, len(data), chunk):
            proto.data_received(data[i : i + chunk])  # must not raise: the transport would log it
        await asyncio.sleep(0)  # let welcome() and friends run
        proto.connection_lost(None)
        await asyncio.sleep(0)
        for fut in (proto.ready, proto.lost):
            if fut.done() and not fut.cancelled() and fut.exception() is not None:
                assert isinstance(fut.exception(), (ProtocolError, ServerReply, ServerClosed, OSError)), fut.exception()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run(feed())


# -- /proc parsers (the root is injectable) ------------------------------------------------------

_TEXT_PARSERS = [
    procfs.parse_paired_table, procfs.parse_keyed, procfs.parse_udp, procfs.parse_tcp, procfs.parse_sockstat,
    procfs.parse_softnet, procfs.parse_meminfo, procfs.parse_cpu_times, procfs.parse_pid_stat,
]

#: canned files, so random edits start from the real layout and truncations cut real lines
_FILES = ["net/snmp", "net/netstat", "net/snmp6", "net/udp", "net/udp6", "net/tcp", "net/sockstat",
          "net/softnet_stat", "meminfo", "loadavg", "stat", "sys/net/netfilter/nf_conntrack_count",
          "sys/net/netfilter/nf_conntrack_max"]


def _canned(rel: str) -> str:
    path = CANNED / rel
    return path.read_text() if path.exists() else ""


def _proc_texts() -> st.SearchStrategy[str]:
    real = st.sampled_from(_FILES).map(_canned)
    cut = st.tuples(real, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])])
    spliced = st.tuples(real, st.text(alphabet=string.printable, max_size=30), st.floats(0, 1)).map(
        lambda t: t[0][: int(len(t[0]) * t[2])] + t[1] + t[0][int(len(t[0]) * t[2]):])
    raw = st.binary(max_size=400).map(lambda b: b.decode("ascii", "replace"))
    return st.one_of(real, cut, spliced, raw, st.text(alphabet=string.printable, max_size=300))


@FUZZ
@given(_proc_texts())
@example("cpu 1 2\n")
@example("1 (x) S 1")
@example("sl local_address\n 0: 0100:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 1 2 f 0 0\n")
def test_proc_parsers_raise_only_their_own_error(text: str) -> None:
    for parse in _TEXT_PARSERS:
        for cut in (text, text[: len(text) // 2]):
            try:
                parse(cut)
            except procfs.ProcFormatError as err:
                assert isinstance(err, LoadkitError) and isinstance(err, ValueError)  # callers catch ValueError
                assert "\n" not in str(err)


@FUZZ
@given(st.sampled_from(_FILES), st.binary(max_size=300))
def test_proc_readers_with_an_injected_root_raise_only_their_own_error(tmp_path_factory, rel: str, data: bytes) -> None:
    import shutil

    root = tmp_path_factory.mktemp("proc")
    shutil.copytree(CANNED, root, dirs_exist_ok=True)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
    readers = [procfs.read_snmp, procfs.read_netstat, procfs.read_snmp6, procfs.read_udp_sockets,
               procfs.read_tcp_sockets, procfs.read_sockstat, procfs.read_softnet, procfs.read_meminfo,
               procfs.read_loadavg, procfs.read_cpu_times, procfs.read_conntrack]
    for read in readers:
        try:
            read(str(root))
        except procfs.ProcFormatError:
            pass
        except FileNotFoundError:
            pass  # a file the canned root does not have: the collector warns once
    (root / "4242").mkdir(exist_ok=True)
    (root / "4242" / "stat").write_bytes(data)
    try:
        procfs.read_pid_stat(4242, str(root))
    except procfs.ProcFormatError:
        pass


def test_a_malformed_proc_file_is_a_value_error_the_collector_already_handles() -> None:
    with pytest.raises(procfs.ProcFormatError, match="stat"):
        procfs.parse_pid_stat("4242 (cut short")
    with pytest.raises(ValueError):
        procfs.parse_cpu_times("cpu 1 2 x\n")
