"""The DNS query files users already have, read into ``(name, qtype)`` pairs.

One reader for every form ``--dns-names-file`` takes, told apart by their lines:

- a names file: one DNS name a line (the lab's ``names.txt``); the qtype comes from ``--dns-qtypes``;
- a dnsperf/resperf query file: ``name qtype`` a line (``www.example.com A``), as ``dnsperf -d``
  reads it; the line's qtype is sent for that name;
- a BIND query log (``querylog yes``): lines with ``query: NAME CLASS TYPE``;
- an unbound query log (``log-queries: yes``): lines ending ``info: ADDRESS NAME TYPE CLASS``.

Blank lines and ``#`` comments are skipped in names and query files; a line that is neither is an
error naming file and line. A query log also holds other messages (start-up, replies with
``log-replies``), so its lines that are no query are skipped; only a query line with a bad name or
type is an error. Only names and types are taken from a log; its timing is not replayed.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from loadkit.errors import InputFileError, ProfileError

# the one grammar of query log lines: the replay reader's (which also takes their timing)
from .replay_querylog import BIND_QUERYLOG_LINE, UNBOUND_QUERY_LINE

#: a file is read as a query log when one of its first lines is a query line
_LOG_SNIFF_LINES = 1000


class NameQuery(NamedTuple):
    """One entry of a names or query file (made by :func:`load_queries`)."""

    name: str  #: the DNS name as written
    qtype: str | None  #: the line's query type (canonical, e.g. ``AAAA``), None for a bare name


def load_queries(path: str | Path) -> list[NameQuery]:
    """Every query of a names file, a dnsperf/resperf query file or a BIND/unbound query log.

    Raises :class:`InputFileError` with a one-line message naming the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="strict")
    except FileNotFoundError:
        raise InputFileError(
            f"names file {p} does not exist (start the lab with `loadkit lab up` or pass --dns-names-file)"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputFileError(f"names file {p} cannot be read: {err}") from err
    lines = text.splitlines()
    log = _log_kind(lines)
    queries = _from_log(p, lines, log) if log else _from_query_file(p, lines)
    if not queries:
        what = f"query lines ({log} query log)" if log else "names (one DNS name, or 'name qtype', per line)"
        raise InputFileError(f"names file {p} has no {what}")
    return queries


def _log_kind(lines: list[str]) -> str | None:
    for raw in lines[:_LOG_SNIFF_LINES]:
        if UNBOUND_QUERY_LINE.match(raw):
            return "unbound"
        if BIND_QUERYLOG_LINE.match(raw):
            return "BIND"
    return None


def _from_query_file(p: Path, lines: list[str]) -> list[NameQuery]:
    from loadkit.generate.dns.wire import check_name

    out: list[NameQuery] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        try:
            check_name(fields[0])
        except ValueError as err:
            raise InputFileError(f"names file {p} line {lineno}: {line!r} is not a valid DNS name ({err})") from None
        if len(fields) == 1:
            out.append(NameQuery(fields[0], None))
            continue
        qtype = _qtype(fields[1]) if len(fields) == 2 else None
        if qtype is None:
            # the message the plain names file has always given, with the dnsperf form named too
            raise InputFileError(f"names file {p} line {lineno}: {line!r} is not a valid DNS name, nor "
                                 "'name qtype' as in a dnsperf query file")
        out.append(NameQuery(fields[0], qtype))
    return out


def _from_log(p: Path, lines: list[str], log: str) -> list[NameQuery]:
    from loadkit.generate.dns.wire import check_name

    pattern = UNBOUND_QUERY_LINE if log == "unbound" else BIND_QUERYLOG_LINE
    out: list[NameQuery] = []
    for lineno, raw in enumerate(lines, start=1):
        m = pattern.match(raw)
        if m is None:
            continue  # a log's other messages (start-up, log-replies lines)
        name, qtype_text = m["name"], m["type"]
        try:
            check_name(name)
        except ValueError as err:
            raise InputFileError(f"names file {p} line {lineno}: {log} query log names {name!r}, "
                                 f"not a valid DNS name ({err})") from None
        qtype = _qtype(qtype_text)
        if qtype is None:
            raise InputFileError(f"names file {p} line {lineno}: {log} query log type {qtype_text!r} "
                                 "is not a DNS query type")
        out.append(NameQuery(name, qtype))
    return out


def _qtype(text: str) -> str | None:
    """The canonical name of a query type, or None when ``text`` is none."""
    import dns.rdatatype

    from loadkit.generate.dns.wire import parse_qtype

    try:
        return dns.rdatatype.to_text(parse_qtype(text))
    except ProfileError:
        return None
