"""Prebuilt queries, raw reply classification, names files and qtype mixes."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from loadkit.errors import InputFileError, ProfileError
from loadkit.generate.dns import wire


def reply_bytes(query_id: int, rcode: int, tc: bool = False) -> bytes:
    q = dns.message.make_query("h00001.lab.test.", "A")
    q.id = query_id
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if tc:
        r.flags |= dns.flags.TC
    return r.to_wire()


@pytest.mark.parametrize(
    "rcode, expected",
    [
        (dns.rcode.NOERROR, wire.NOERROR),
        (dns.rcode.NXDOMAIN, wire.NXDOMAIN),
        (dns.rcode.SERVFAIL, wire.SERVFAIL),
        (dns.rcode.REFUSED, wire.REFUSED),
        (dns.rcode.FORMERR, wire.RCODE_OTHER),
        (dns.rcode.NOTIMP, wire.RCODE_OTHER),
    ],
)
def test_classify_by_rcode_from_raw_bytes(rcode: int, expected: int) -> None:
    raw = reply_bytes(0xBEEF, rcode)
    assert wire.classify(raw) == expected
    assert wire.rcode(raw) == rcode
    assert wire.reply_id(raw) == 0xBEEF


def test_tc_bit_wins_over_rcode() -> None:
    raw = reply_bytes(7, dns.rcode.NOERROR, tc=True)
    assert wire.is_truncated(raw)
    assert wire.classify(raw) == wire.TRUNCATED
    assert not wire.is_truncated(reply_bytes(7, dns.rcode.NOERROR))


def test_prebuilt_query_with_patched_id_parses_as_the_same_question() -> None:
    tail = wire.build_query("h00042.lab.test.", "AAAA", edns_payload_bytes=1232)[2:]
    msg = dns.message.from_wire(wire.ID_BYTES[0x1234] + tail)
    assert msg.id == 0x1234
    assert msg.question[0].name.to_text() == "h00042.lab.test."
    assert msg.question[0].rdtype == dns.rdatatype.AAAA
    assert msg.edns == 0 and msg.payload == 1232
    no_edns = dns.message.from_wire(wire.build_query("h1.lab.test.", "A", edns_payload_bytes=0))
    assert no_edns.edns == -1


def test_pool_splices_names_into_the_same_bytes_dnspython_builds() -> None:
    names = [f"h{i:05d}.lab.test." for i in range(50)]
    pool = wire.QueryPool(names, [("A", 0.5), ("MX", 0.5)], size=200, seed=3)
    for q in pool.queries:
        msg = dns.message.from_wire(b"\0\0" + q.tail)
        ref = wire.build_query(msg.question[0].name.to_text(), msg.question[0].rdtype)
        assert ref[2:] == q.tail
        assert pool.qtypes[q.qtype_index] == dns.rdatatype.to_text(msg.question[0].rdtype)


def test_pool_shares_and_zone() -> None:
    names = [f"h{i:05d}.lab.test." for i in range(100)]
    pool = wire.QueryPool(names, [("A", 1.0)], nxdomain_share=0.2, random_subdomain_share=0.3, size=5000, seed=1)
    assert pool.zone == "lab.test."
    kinds = [q.kind for q in pool.queries]
    assert abs(kinds.count(wire.KIND_NXDOMAIN) / 5000 - 0.2) < 0.03
    assert abs(kinds.count(wire.KIND_RANDOM_SUBDOMAIN) / 5000 - 0.3) < 0.03
    nx = next(q for q in pool.queries if q.kind == wire.KIND_NXDOMAIN)
    assert dns.message.from_wire(b"\0\0" + nx.tail).question[0].name.to_text().endswith(".lab.test.")


def test_random_subdomain_label_is_fresh_each_time() -> None:
    pool = wire.QueryPool(["a.example."], [("A", 1.0)], random_subdomain_share=1.0, size=10, seed=2)
    tail = pool.queries[0].tail
    seen = set()
    for _ in range(100):
        fresh = pool.fresh_tail(tail)
        name = dns.message.from_wire(b"\0\0" + fresh).question[0].name
        assert name.parent().to_text() == "example."
        seen.add(name.to_text())
    assert len(seen) == 100


def test_load_names_skips_comments_and_reports_bad_line(tmp_path) -> None:
    good = tmp_path / "names.txt"
    good.write_text("# lab names\nh1.lab.test\n\n  h2.lab.test.  \n")
    assert wire.load_names(good) == ["h1.lab.test", "h2.lab.test."]
    bad = tmp_path / "queries.txt"
    bad.write_text("h1.lab.test\n" * 11 + "exa mple.com\n")
    with pytest.raises(InputFileError) as err:
        wire.load_names(bad)
    msg = str(err.value)
    assert "queries.txt line 12" in msg and "'exa mple.com'" in msg and "\n" not in msg
    long_label = tmp_path / "long.txt"
    long_label.write_text("a" * 64 + ".example\n")
    with pytest.raises(InputFileError, match="line 1"):
        wire.load_names(long_label)
    with pytest.raises(InputFileError, match="does not exist"):
        wire.load_names(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(InputFileError, match="no names"):
        wire.load_names(empty)


def test_qtype_mix_parsing() -> None:
    assert wire.parse_qtype_mix("A:80,aaaa:20") == [("A", 0.8), ("AAAA", 0.2)]
    assert wire.parse_qtype_mix("MX") == [("MX", 1.0)]
    with pytest.raises(ProfileError, match="'FOO' is not a DNS query type"):
        wire.parse_qtype_mix("A:50,FOO:50")
    with pytest.raises(ProfileError, match="not a number"):
        wire.parse_qtype_mix("A:x")
    with pytest.raises(ProfileError, match="negative"):
        wire.parse_qtype_mix("A:-1")
    with pytest.raises(ProfileError):
        wire.parse_qtype_mix("")


def test_pool_rejects_bad_shares() -> None:
    with pytest.raises(ProfileError, match="outside 0..1"):
        wire.QueryPool(["a.example."], [("A", 1.0)], nxdomain_share=1.5)
    with pytest.raises(ProfileError, match="exceed 1"):
        wire.QueryPool(["a.example."], [("A", 1.0)], nxdomain_share=0.6, random_subdomain_share=0.6)
    with pytest.raises(ProfileError, match="EDNS"):
        wire.QueryPool(["a.example."], [("A", 1.0)], edns_payload_bytes=100)
