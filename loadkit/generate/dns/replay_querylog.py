"""DNS queries from a BIND ``querylog`` or an unbound ``log-queries`` log.

BIND (``category queries``, ``print-time yes``) writes, with milliseconds::

    29-Nov-2026 12:30:00.125 queries: info: client @0x7f5c 192.0.2.7#53210 (www.example.net): query: www.example.net IN A +E(0)K (192.0.2.53)

Its flags say what to rebuild: ``+``/``-`` recursion desired or not, ``E(n)`` EDNS, ``T`` TCP,
``D`` DNSSEC OK, ``C`` checking disabled (``S``, ``K``, ``V`` are signatures and cookies: not
rebuilt). unbound (``log-queries: yes``) writes one of::

    [1764419400] unbound[811:0] info: 192.0.2.7 www.example.net. A IN
    Nov 29 12:30:00 unbound[811:0] info: 192.0.2.7 www.example.net. A IN     (log-time-ascii)

unbound stamps whole seconds and no flags: its queries are rebuilt with RD and EDNS, and the
queries of one second are spread evenly over that second, in log order (the log cannot say
more; a capture or dnstap keeps the real timing). ``log-time-ascii`` has no year: the file's
modification year is taken (the year before when that would put the line in the future).
Lines that are not queries (start-up, warnings) are skipped; a file with no query at all is an
error naming the file.
"""

from __future__ import annotations

import calendar
import functools
import re
import struct
import time
from pathlib import Path
from typing import Iterator

import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype

from loadkit.errors import InputFileError

from .replay_input import RecordedQuery, make_query

BIND_QUERYLOG_LINE = re.compile(
    r"^(?P<ts>\d{2}-[A-Za-z]{3}-\d{4} \d{2}:\d{2}:\d{2}(?:\.\d+)?) .*?client (?:@\S+ )?"
    r"(?P<client>[0-9A-Fa-f:.]+)#\d+(?: \([^)]*\))?: (?:view \S+: )?query: "
    r"(?P<name>\S+) (?P<cls>\S+) (?P<type>\S+) (?P<flags>[+-]\S*)"
)
UNBOUND_QUERY_LINE = re.compile(
    r"^(?:\[(?P<epoch>\d+)\]|(?P<ascii>[A-Z][a-z]{2} [ \d]\d \d{2}:\d{2}:\d{2})) unbound\[[\d:]+\] "
    r"(?:info|query): (?P<client>[0-9A-Fa-f:.]+) (?P<name>\S+) (?P<type>\S+) (?P<cls>\S+)$"
)
#: most queries one second of an unbound log may hold (they are buffered to be spread)
_SECOND_MAX = 1_000_000
#: rebuilt wire queries kept for reuse (names repeat in real traffic)
_CACHE_MAX = 100_000


class _Builder:
    """Wire queries (after the ID) from name, type, class and flags, built once each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cache: dict[tuple, tuple[bytes, int]] = {}

    def tail(self, lineno: int, name: str, qtype: str, qclass: str, rd: bool, edns: int, do: bool,
             cd: bool) -> tuple[bytes, int]:
        key = (name, qtype, qclass, rd, edns, do, cd)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        try:
            t = dns.rdatatype.from_text(qtype)
            c = dns.rdataclass.from_text(qclass)
            qname = dns.name.from_text(name).to_wire()
        except (dns.exception.DNSException, ValueError) as err:
            raise InputFileError(f"query log {self.path} line {lineno}: {name} {qtype} {qclass} "
                                 f"is not a DNS question ({err})") from None
        # the header after the ID, the question, an OPT record: what dns.message.make_query
        # writes (the same bytes, checked by the tests), at a hundredth of its cost per name
        flags = (0x0100 if rd else 0) | (0x0010 if cd else 0)
        wire = struct.pack("!HHHHH", flags, 1, 0, 0, 1 if edns else 0) + qname + struct.pack("!HH", t, c)
        if edns:
            wire += b"\x00" + struct.pack("!HHIH", 41, edns, 0x8000 if do else 0, 0)
        if len(self.cache) >= _CACHE_MAX:
            self.cache.clear()
        hit = self.cache[key] = (wire, int(t))
        return hit


@functools.lru_cache(maxsize=4)  # lines of one second share their stamp; strptime is slow
def _bind_second(whole: str) -> int:
    return calendar.timegm(time.strptime(whole, "%d-%b-%Y %H:%M:%S"))  # BIND logs UTC or local: taken as UTC


def _bind_time(text: str) -> float:
    whole, _, frac = text.partition(".")
    return _bind_second(whole) + (float("0." + frac) if frac else 0.0)


@functools.lru_cache(maxsize=4)
def _ascii_time(text: str, year: int, mtime: float) -> float:
    t = time.mktime(time.strptime(f"{year} {text}", "%Y %b %d %H:%M:%S"))
    if t > mtime + 86400:
        t = time.mktime(time.strptime(f"{year - 1} {text}", "%Y %b %d %H:%M:%S"))
    return t


def read_querylog(path: Path, edns_bytes: int = 1232) -> Iterator[RecordedQuery]:
    """Queries of a BIND or unbound query log, in log order (see the module docstring)."""
    try:
        f = path.open("r", encoding="utf-8", errors="replace")
        mtime = path.stat().st_mtime
    except OSError as err:
        raise InputFileError(f"query log {path} cannot be read: {err.strerror}") from err
    year = time.localtime(mtime).tm_year
    build = _Builder(path)
    second: list[RecordedQuery] = []  # unbound: the queries of the current whole second
    found = 0
    with f:
        for lineno, line in enumerate(f, start=1):
            if "\0" in line:
                raise InputFileError(f"query log {path} line {lineno}: binary data (not a query log)")
            m = BIND_QUERYLOG_LINE.match(line)
            if m is not None:
                flags = m["flags"]
                edns = edns_bytes if "E" in flags else 0
                tail, qtype = build.tail(lineno, m["name"], m["type"], m["cls"], flags[0] == "+", edns,
                                         "D" in flags, "C" in flags)
                found += 1
                yield make_query(_bind_time(m["ts"]), m["client"], tail, qtype, "T" in flags)
                continue
            m = UNBOUND_QUERY_LINE.match(line.rstrip("\n"))
            if m is None:
                continue
            ts = float(m["epoch"]) if m["epoch"] else _ascii_time(m["ascii"], year, mtime)
            tail, qtype = build.tail(lineno, m["name"], m["type"], m["cls"], True, edns_bytes, False, False)
            if second and (ts != second[0].ts_unix_s or len(second) >= _SECOND_MAX):
                yield from _spread(second)
                second = []
            found += 1
            second.append(make_query(ts, m["client"], tail, qtype, False))
    if second:
        yield from _spread(second)
    if not found:
        raise InputFileError(f"query log {path} has no query lines (BIND querylog or unbound log-queries)")


def _spread(same_second: list[RecordedQuery]) -> Iterator[RecordedQuery]:
    """The queries of one logged second, evenly over it (the log keeps no finer time)."""
    n = len(same_second)
    for i, q in enumerate(same_second):
        yield q._replace(ts_unix_s=q.ts_unix_s + (i + 0.5) / n)
