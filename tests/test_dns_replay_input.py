"""The replay's readers and plan without a lab: canned recordings (pcap written by dpkt, BIND and
unbound log lines), bad files, windows, copies and the mapping of clients to source addresses.
The same readers against recordings made by real tools are in test_dns_replay.py."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import dns.flags
import dns.message
import dpkt
import pytest
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.event import Events

from loadkit.errors import InputFileError, LoadkitError
from loadkit.generate.dns import replay, replay_users
from loadkit.generate.dns.replay_input import read_queries

TARGET = "127.0.0.1:5353"


def _query(name: str, qtype: str = "A", qid: int = 7) -> bytes:
    m = dns.message.make_query(name, qtype, use_edns=0, payload=1232)
    m.id = qid
    return m.to_wire()


def _ip4(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    return dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, data=l4, ttl=64).pack()


def _eth(ip: bytes, ethertype: int = 0x0800) -> bytes:
    return b"\x00" * 12 + struct.pack("!H", ethertype) + ip


def _udp(sport: int, dport: int, payload: bytes) -> bytes:
    return dpkt.udp.UDP(sport=sport, dport=dport, data=payload, ulen=8 + len(payload)).pack()


def _tcp(sport: int, dport: int, seq: int, payload: bytes, flags: int = dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH) -> bytes:
    return dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, flags=flags, data=payload, off=5).pack()


def write_pcap(path: Path, packets: list[tuple[float, bytes]], nano: bool = False) -> Path:
    with path.open("wb") as f:
        w = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB, nano=nano)
        for ts, frame in packets:
            w.writepkt(frame, ts=ts)
    return path


@pytest.fixture
def mixed_pcap(tmp_path: Path) -> Path:
    """UDP queries from two clients, a reply (skipped), and a TCP client whose two length-prefixed
    queries are split across three segments, over 1.0 s."""
    q1, q2 = _query("a.lab.test."), _query("b.lab.test.", "AAAA")
    reply = bytearray(q1)
    reply[2] |= 0x80  # QR: a reply
    stream = b"".join(len(m).to_bytes(2, "big") + m for m in (_query("t1.lab.test."), _query("t2.lab.test.", "MX")))
    cut1, cut2 = 5, len(stream) - 9
    pkts = [
        (1000.0, _eth(_ip4("198.18.0.1", "198.18.0.53", 17, _udp(4000, 53, q1)))),
        (1000.1, _eth(_ip4("198.18.0.53", "198.18.0.1", 17, _udp(53, 4000, bytes(reply))))),
        (1000.2, _eth(_ip4("198.18.0.2", "198.18.0.53", 17, _udp(4001, 53, q2)))),
        (1000.3, _eth(_ip4("198.18.0.3", "198.18.0.53", 6, _tcp(5000, 53, 100, stream[:cut1])))),
        (1000.4, _eth(_ip4("198.18.0.3", "198.18.0.53", 6, _tcp(5000, 53, 100 + cut1, stream[cut1:cut2])))),
        (1000.5, _eth(_ip4("198.18.0.3", "198.18.0.53", 6, _tcp(5000, 53, 100 + cut1, stream[cut1:cut2])))),  # resent
        (1000.6, _eth(_ip4("198.18.0.3", "198.18.0.53", 6, _tcp(5000, 53, 100 + cut2, stream[cut2:])))),
        (1001.0, _eth(_ip4("198.18.0.1", "198.18.0.53", 17, _udp(4000, 53, _query("c.lab.test."))))),
    ]
    return write_pcap(tmp_path / "mixed.pcap", pkts)


def test_pcap_reader_takes_udp_and_tcp_queries_and_skips_replies(mixed_pcap: Path) -> None:
    qs = list(read_queries(mixed_pcap))
    assert [(q.client, q.qtype, q.tcp) for q in qs] == [
        ("198.18.0.1", 1, False), ("198.18.0.2", 28, False), ("198.18.0.3", 1, True), ("198.18.0.3", 15, True),
        ("198.18.0.1", 1, False),
    ]
    assert qs[0].tail == _query("a.lab.test.")[2:]  # the query's own bytes after its ID
    assert qs[3].tail == _query("t2.lab.test.", "MX")[2:]  # cut out of the reassembled stream
    # each complete when its last byte arrived
    assert (qs[2].ts_unix_s, qs[3].ts_unix_s) == (pytest.approx(1000.4), pytest.approx(1000.6))


def test_plan_windows_copies_and_source_addresses(mixed_pcap: Path) -> None:
    p = replay.plan(replay.ReplaySettings(host=TARGET, file=str(mixed_pcap), scale=2, first_source="127.9.9.1"))
    assert p.queries_n == 5 and p.tcp_n == 2
    assert p.clients == {"198.18.0.1": 0, "198.18.0.2": 1, "198.18.0.3": 2}  # first appearance
    assert p.qtypes == ["A", "AAAA", "MX"]  # the request names: the types the recording has
    assert p.addresses == [f"127.9.9.{i}" for i in range(1, 7)]  # 3 clients x 2 copies
    feed = replay.ReplayFeed(p)
    items = [feed.pop() for _ in range(feed.due(10.0) - feed.popped)]
    assert len(items) == 10
    # client c's copy k sends from address k * 3 + c, at the recorded offset
    assert [(round(i.offset_s, 3), p.addresses[i.sock]) for i in items[:2]] == [(0.0, "127.9.9.1"), (0.0, "127.9.9.4")]
    assert p.addresses[items[-1].sock] == "127.9.9.4" and round(items[-1].offset_s, 3) == 1.0
    # two workers: each sends the copies of its own addresses, together all of them
    shares = [replay.ReplayFeed(p, i, 2) for i in range(2)]
    got = [[s.pop() for _ in range(s.due(10.0) - s.popped)] for s in shares]
    assert sum(len(g) for g in got) == 10
    assert {p.addresses[it.sock * 2 + 0] for it in got[0]} <= set(p.addresses[0::2])
    # a window: from 0.15 s to 0.9 s after the first query, at double speed
    w = replay.plan(replay.ReplaySettings(host=TARGET, file=str(mixed_pcap), window_from="0.15", window_to="0.9",
                                          speed=2.0))
    assert w.queries_n == 3 and set(w.clients) == {"198.18.0.2", "198.18.0.3"}
    wf = replay.ReplayFeed(w)
    offsets = [round(wf.pop().offset_s, 3) for _ in range(wf.due(10.0) - wf.popped)]
    assert offsets == [0.025, 0.125, 0.225]  # (recorded time - window start) / speed


BIND_LOG = """\
29-Nov-2026 12:30:00.125 queries: info: client @0x7f5c3c0 192.0.2.7#53210 (www.example.net): query: www.example.net IN A +E(0)K (192.0.2.53)
29-Nov-2026 12:30:00.250 client 192.0.2.8#41000 (mx.example.net): query: mx.example.net IN MX -T (192.0.2.53)
29-Nov-2026 12:30:00.500 general: info: zone example.net/IN: loaded serial 1
29-Nov-2026 12:30:01.000 client @0x7f5c3c0 2001:db8::9#5300 (s.example.net): query: s.example.net IN AAAA +EDC (2001:db8::53)
"""


def test_bind_querylog_keeps_time_flags_and_transport(tmp_path: Path) -> None:
    path = tmp_path / "query.log"
    path.write_text(BIND_LOG)
    qs = list(read_queries(path))
    assert [q.client for q in qs] == ["192.0.2.7", "192.0.2.8", "2001:db8::9"]
    assert [round(q.ts_unix_s - qs[0].ts_unix_s, 3) for q in qs] == [0.0, 0.125, 0.875]
    assert [q.tcp for q in qs] == [False, True, False]
    m0, m1, m2 = (dns.message.from_wire(b"\x00\x00" + q.tail) for q in qs)
    assert m0.flags & dns.flags.RD and m0.edns == 0 and m0.question[0].rdtype == 1
    assert not m1.flags & dns.flags.RD and m1.edns == -1 and qs[1].qtype == 15
    assert m2.flags & dns.flags.CD and m2.ednsflags & dns.flags.DO and qs[2].qtype == 28


def test_unbound_log_spreads_each_second(tmp_path: Path) -> None:
    path = tmp_path / "unbound.log"
    lines = ["[1764419400] unbound[811:0] notice: init module 0: iterator"]
    lines += [f"[1764419400] unbound[811:0] info: 192.0.2.{i} n{i}.example.net. A IN" for i in range(1, 5)]
    lines += ["[1764419401] unbound[811:0] info: 192.0.2.1 n9.example.net. TXT IN"]
    path.write_text("\n".join(lines) + "\n")
    qs = list(read_queries(path))
    assert [q.ts_unix_s - 1764419400 for q in qs] == [0.125, 0.375, 0.625, 0.875, 1.5]
    assert qs[-1].qtype == 16 and not qs[0].tcp


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "is empty"),
        (b"\xd4\xc3\xb2\xa1" + b"\x02\x00", "is not a readable pcap/pcapng file"),
        # a frame stream: START control frame, then a 100-byte data frame with 3 bytes left
        (b"\x00\x00\x00\x00" b"\x00\x00\x00\x04" b"\x00\x00\x00\x02" b"\x00\x00\x00\x64" b"abc", "cut short"),
        (bytes(range(256)) * 4, "binary data"),
        (b"hello\nworld\n", "has no query lines"),
    ],
)
def test_bad_file_is_one_line_naming_it(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "bad.rec"
    path.write_bytes(content)
    with pytest.raises(InputFileError) as err:
        replay.plan(replay.ReplaySettings(host=TARGET, file=str(path)))
    assert str(path) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_capture_cut_short_names_the_packet(mixed_pcap: Path, tmp_path: Path) -> None:
    data = mixed_pcap.read_bytes()
    cut = tmp_path / "cut.pcap"
    last_frame_bytes = len(_eth(_ip4("198.18.0.1", "198.18.0.53", 17, _udp(4000, 53, _query("c.lab.test.")))))
    cut.write_bytes(data[:-(last_frame_bytes + 8)])  # the last packet's record header is incomplete
    with pytest.raises(InputFileError, match=r"cut\.pcap packet 8"):
        replay.plan(replay.ReplaySettings(host=TARGET, file=str(cut)))


def test_locustfile_init_refuses_a_bad_file_with_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "nothing.pcap"
    bad.write_bytes(b"\xa1\xb2\xc3\xd4garbage")
    events = Events()
    replay_users.install(events, replay.ReplaySettings())
    parser = LocustArgumentParser()
    events.init_command_line_parser.fire(parser=parser)
    opts = parser.parse_args(["--replay-file", str(bad), "--replay-speed", "2"])
    assert "replay_speed" in parser.args_included_in_web_ui  # every option shows in the web UI
    env = Environment(events=events, parsed_options=opts, host=TARGET)
    with pytest.raises(SystemExit) as exit_info:
        events.init.fire(environment=env, runner=None, web_ui=None)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loadkit: error: capture ") and str(bad) in err[0]


@pytest.mark.parametrize(
    "override, text",
    [
        ({"speed": 0.0}, "--replay-speed 0 must be a number > 0"),
        ({"scale": 0}, "--replay-scale 0 must be >= 1"),
        ({"window_from": "yesterday"}, "--replay-from 'yesterday' is neither seconds nor a time"),
        ({"window_from": "5", "window_to": "1"}, "--replay-to (1) is not after --replay-from (5)"),
        ({"file": ""}, "--replay-file is required"),
    ],
)
def test_bad_options_are_one_line(mixed_pcap: Path, override: dict, text: str) -> None:
    settings = replay.ReplaySettings(host=TARGET, file=str(mixed_pcap))
    for k, v in override.items():
        setattr(settings, k, v)
    with pytest.raises(LoadkitError) as err:
        replay.plan(settings)
    assert text in str(err.value)


def test_a_quiet_lead_in_does_not_cut_off_the_end(tmp_path: Path) -> None:
    # a window opened 500 s before the first query: offset 0 is the window's start, so the last
    # query is due 510 s / speed in, far past the 10 s the queries span; the sender's safety cap
    # must leave room for it, or the tail is never sent and the run still ends as completed
    pcap = write_pcap(tmp_path / "late.pcap", [
        (1000.0, _eth(_ip4("198.18.0.1", "198.18.0.53", 17, _udp(4000, 53, _query("a.lab.test."))))),
        (1010.0, _eth(_ip4("198.18.0.1", "198.18.0.53", 17, _udp(4000, 53, _query("b.lab.test."))))),
    ])
    for speed in (1.0, 4.0):
        p = replay.plan(replay.ReplaySettings(host=TARGET, file=str(pcap), window_from="1970-01-01T00:08:20Z",
                                              speed=speed))
        assert p.span_s == pytest.approx(10.0) and p.origin_unix_s == pytest.approx(500.0)
        feed = replay.ReplayFeed(p)
        last_s = [feed.pop() for _ in range(feed.due(1e9) - feed.popped)][-1].offset_s
        assert last_s == pytest.approx(510.0 / speed)
        assert replay.build_sender(p).max_duration_s > last_s
