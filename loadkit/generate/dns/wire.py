"""DNS queries built once, replies classified from raw bytes.

A query is built with dnspython once (``make_query(...).to_wire()``); on the hot path only its
two ID bytes change, so sending costs one bytes concatenation. A reply is never parsed with
dnspython on the hot path (``from_wire`` alone costs about 56 µs): the ID is bytes 0-1, the TC
bit is in byte 2 and the RCODE is the low nibble of byte 3 (RFC 1035 section 4.1.1).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import NamedTuple, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype

from loadkit.errors import InputFileError, ProfileError

#: ``ID_BYTES[i]`` is query ID ``i`` in network order, so patching an ID is one concatenation
ID_BYTES: tuple[bytes, ...] = tuple(i.to_bytes(2, "big") for i in range(65536))

# outcome codes of :func:`classify`, used as list indexes on the hot path
NOERROR = 0
NXDOMAIN = 1
SERVFAIL = 2
REFUSED = 3
RCODE_OTHER = 4
TRUNCATED = 5
#: outcome code -> name, for counters and reports
OUTCOME_NAMES: tuple[str, ...] = ("noerror", "nxdomain", "servfail", "refused", "rcode_other", "truncated")

# RCODE value -> outcome code; everything else is RCODE_OTHER
_RCODE_OUTCOME = [RCODE_OTHER] * 16
_RCODE_OUTCOME[0] = NOERROR
_RCODE_OUTCOME[2] = SERVFAIL
_RCODE_OUTCOME[3] = NXDOMAIN
_RCODE_OUTCOME[5] = REFUSED
RCODE_OUTCOME: tuple[int, ...] = tuple(_RCODE_OUTCOME)

#: kinds of prebuilt query: what answer counts as success
KIND_NAME = 0  #: a name from the names file: NOERROR is success
KIND_NXDOMAIN = 1  #: a name meant not to exist: NXDOMAIN is success
KIND_RANDOM_SUBDOMAIN = 2  #: a fresh random label under a zone each time: NXDOMAIN is success

#: length of the random label of random-subdomain queries (hex characters)
RANDOM_LABEL_LEN = 10
# offset of the random label in the wire query: 12-byte header, then its length byte
RANDOM_LABEL_OFFSET = 13


def reply_id(reply: bytes) -> int:
    """The 16-bit ID of a raw DNS message."""
    return (reply[0] << 8) | reply[1]


def _outcome_of_flags(flags: int) -> int:
    # TRUNCATED when the TC bit (bit 9 of the flags word) is set, else by RCODE (its low 4 bits)
    if flags & 0x0200:
        return TRUNCATED
    return RCODE_OUTCOME[flags & 0x0F]


#: outcome code of every flags word, by header byte 2 then byte 3: a reader at 100k replies/s
#: looks it up as ``OUTCOME_BY_FLAGS[reply[2]][reply[3]]``, which is all :func:`classify` does
#: (two small-int subscripts: as fast as testing the bits inline, and the rule stays here)
OUTCOME_BY_FLAGS: tuple[tuple[int, ...], ...] = tuple(
    tuple(_outcome_of_flags((high << 8) | low) for low in range(256)) for high in range(256)
)


def classify(reply: bytes) -> int:
    """Outcome code of a raw reply: TRUNCATED when the TC bit is set, else by RCODE; a reply
    shorter than the 12-byte header (cut short on the wire) is RCODE_OTHER, never an error."""
    if len(reply) < 12:
        return RCODE_OTHER
    return OUTCOME_BY_FLAGS[reply[2]][reply[3]]


#: failure class of an outcome code, for each kind of query: ``FAILURE_OF[kind][code]`` is ``None``
#: when the reply is what that query is meant to get (NOERROR; NXDOMAIN for a name meant not to
#: exist). The one rule for success, for UDP and TCP replies alike.
FAILURE_OF: tuple[tuple[str | None, ...], ...] = tuple(
    (
        None,
        "nxdomain_unexpected" if kind == KIND_NAME else None,
        "servfail",
        "refused",
        "rcode_other",
        "truncated",
    )
    for kind in (KIND_NAME, KIND_NXDOMAIN, KIND_RANDOM_SUBDOMAIN)
)


def failure_of(code: int, kind: int) -> str | None:
    """Failure class of a classified reply to a query of ``kind``, or ``None`` for success."""
    return FAILURE_OF[kind][code]


def rcode(reply: bytes) -> int:
    """The header RCODE (low 4 bits of byte 3; extended RCODEs in EDNS are not looked at)."""
    return reply[3] & 0x0F


def is_truncated(reply: bytes) -> bool:
    return bool(reply[2] & 0x02)


def parse_qtype(text: str) -> int:
    """A query type by name (``A``, ``aaaa``, ``TYPE65``) or a :class:`ProfileError`."""
    try:
        value = dns.rdatatype.from_text(text.strip().upper())
    except (dns.rdatatype.UnknownRdatatype, ValueError):
        raise ProfileError(f"qtype {text.strip()!r} is not a DNS query type (e.g. A, AAAA, MX, TXT)") from None
    if dns.rdatatype.is_metatype(value) and value != dns.rdatatype.ANY:
        raise ProfileError(f"qtype {text.strip()!r} cannot be queried (meta type)")
    return int(value)


def parse_qtype_mix(spec: str) -> list[tuple[str, float]]:
    """``"A:80,AAAA:20"`` or ``"A"`` -> ``[("A", 0.8), ("AAAA", 0.2)]`` (weights normalised)."""
    items: list[tuple[str, float]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight_s = part.partition(":")
        qtype = parse_qtype(name)
        weight = 1.0
        if weight_s:
            try:
                weight = float(weight_s)
            except ValueError:
                raise ProfileError(f"qtype mix {spec!r}: weight {weight_s!r} is not a number") from None
            if weight < 0:
                raise ProfileError(f"qtype mix {spec!r}: weight {weight_s} is negative")
        items.append((dns.rdatatype.to_text(qtype), weight))
    total = sum(w for _, w in items)
    if not items or total <= 0:
        raise ProfileError(f"qtype mix {spec!r} has no query type with a positive weight (e.g. A:80,AAAA:20)")
    return [(name, w / total) for name, w in items if w > 0]


def check_name(text: str) -> dns.name.Name:
    """A DNS name from text, or ValueError with the reason."""
    if not text or any(c.isspace() for c in text):
        raise ValueError("contains white space" if text else "is empty")
    try:
        name = dns.name.from_text(text)
    except dns.exception.DNSException as err:
        raise ValueError(str(err).rstrip(".")) from None
    return name


def load_names(path: str | Path) -> list[str]:
    """The names of a names file, a dnsperf query file or a query log (without their qtypes).

    The file is read by :func:`loadkit.generate.dns.query_files.load_queries`: a bad line raises
    :class:`InputFileError` naming file and line.
    """
    from loadkit.generate.dns.query_files import load_queries

    return [q.name for q in load_queries(path)]


def build_query(name: str, qtype: str | int, edns_payload_bytes: int = 1232, rd: bool = True) -> bytes:
    """Wire form of a query with ID 0 (``edns_payload_bytes`` 0 means no EDNS)."""
    use_edns = edns_payload_bytes > 0
    msg = dns.message.make_query(
        name,
        qtype,
        use_edns=0 if use_edns else False,
        payload=edns_payload_bytes if use_edns else None,
    )
    if not rd:
        msg.flags &= ~dns.flags.RD
    msg.id = 0
    return msg.to_wire()


def zone_of(names: Sequence[str]) -> str:
    """The common parent of the names (the zone random and NXDOMAIN names are made under)."""
    parsed = [dns.name.from_text(n) for n in names[:1000]]
    common = parsed[0].parent() if len(parsed[0]) > 1 else parsed[0]
    for n in parsed[1:]:
        while not n.is_subdomain(common):
            common = common.parent()
    return common.to_text()


class PreparedQuery(NamedTuple):
    """One prebuilt query: its wire form without the 2 ID bytes, and what it is meant to get."""

    tail: bytes  #: wire bytes after the ID
    kind: int  #: KIND_NAME, KIND_NXDOMAIN or KIND_RANDOM_SUBDOMAIN
    qtype_index: int  #: index into :attr:`QueryPool.qtypes` (the Locust request name)


class QueryPool:
    """A shuffled pool of prebuilt queries following a qtype mix and NXDOMAIN shares.

    The pool is built once before the first packet. Random-subdomain queries keep a fixed-length
    label that :meth:`wire` overwrites with a fresh counter value each time (cache-busting,
    like the "water torture" floods that hit resolvers), so no name is built on the hot path.
    """

    def __init__(
        self,
        names: Sequence[str | tuple[str, str | None]],
        qtype_mix: Sequence[tuple[str, float]],
        nxdomain_share: float = 0.0,
        random_subdomain_share: float = 0.0,
        edns_payload_bytes: int = 1232,
        size: int = 20000,
        seed: int | None = None,
        zone: str | None = None,
    ) -> None:
        for label, share in (("NXDOMAIN share", nxdomain_share), ("random-subdomain share", random_subdomain_share)):
            if not 0.0 <= share <= 1.0:
                raise ProfileError(f"{label} {share} is outside 0..1")
        if nxdomain_share + random_subdomain_share > 1.0:
            raise ProfileError(
                f"NXDOMAIN share {nxdomain_share} + random-subdomain share {random_subdomain_share} exceed 1"
            )
        if edns_payload_bytes and not 512 <= edns_payload_bytes <= 65535:
            raise ProfileError(f"EDNS buffer size {edns_payload_bytes} is outside 512..65535 (0 turns EDNS off)")
        if not names:
            raise ProfileError("no names to query")
        rng = random.Random(seed)
        # a name may come with its own qtype (a dnsperf query file's "name qtype"): that pair is
        # sent as written; the mix picks the qtype of bare names, NXDOMAIN and random queries
        entries = [(n, None) if isinstance(n, str) else (n[0], n[1]) for n in names]
        self.qtypes: list[str] = [q for q, _ in qtype_mix]
        weights = [w for _, w in qtype_mix]
        for _, pinned in entries:
            if pinned is not None and pinned not in self.qtypes:
                self.qtypes.append(pinned)
                weights.append(0.0)  # only its own names ask for it
        qtype_index = {q: i for i, q in enumerate(self.qtypes)}
        self.zone = zone or zone_of([n for n, _ in entries])
        size = max(size, 1)
        kinds = rng.choices(
            (KIND_NAME, KIND_NXDOMAIN, KIND_RANDOM_SUBDOMAIN),
            weights=(1.0 - nxdomain_share - random_subdomain_share, nxdomain_share, random_subdomain_share),
            k=size,
        )
        cache: dict[tuple[str, str], bytes] = {}
        templates = {q: build_query("x.", q, edns_payload_bytes) for q in self.qtypes}
        pool: list[PreparedQuery] = []
        name_order = entries
        rng.shuffle(name_order)
        for i, kind in enumerate(kinds):
            qi = rng.choices(range(len(self.qtypes)), weights=weights)[0]
            qtype = self.qtypes[qi]
            if kind == KIND_NAME:
                qname, pinned = name_order[i % len(name_order)]
                if pinned is not None:
                    qi, qtype = qtype_index[pinned], pinned
            elif kind == KIND_NXDOMAIN:
                # a label that does not exist in the zone; a few thousand distinct ones so the
                # server's negative cache sees a realistic mix
                qname = f"nx-{rng.getrandbits(40):010x}.{self.zone}"
            else:
                qname = f"{'0' * RANDOM_LABEL_LEN}.{self.zone}"
            key = (qname, qtype)
            if key not in cache:
                # the dnspython-built query for "x." with the name's wire form spliced in: the
                # same bytes as building each query, 50 times faster for 10,000 names
                tmpl = templates[qtype]
                cache[key] = tmpl[2:12] + dns.name.from_text(qname).to_wire() + tmpl[15:]
            pool.append(PreparedQuery(cache[key], kind, qi))
        self.queries: list[PreparedQuery] = pool
        self._random_counter = rng.getrandbits(32)

    def __len__(self) -> int:
        return len(self.queries)

    def fresh_tail(self, tail: bytes) -> bytes:
        """``tail`` with its random label replaced by the next counter value (random-subdomain)."""
        self._random_counter += 1
        label = b"%010x" % (self._random_counter & 0xFFFFFFFFFF)
        start = RANDOM_LABEL_OFFSET - 2
        return tail[:start] + label + tail[start + RANDOM_LABEL_LEN:]
