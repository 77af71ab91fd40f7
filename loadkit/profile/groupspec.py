"""The one grammar of a process group spec, shared by profiles and the collector.

A group is ``NAME=PATTERN``, ``NAME=cmdline:REGEX`` or ``NAME=cgroup:PATH``, each with an optional
``@PORT,PORT`` (the group's listening ports; established TCP connections on them are the group's
client sessions):

- ``proxies=dovecot``: a regular expression searched in the process name and the first word of
  its command line, like ``pgrep``;
- ``dns=cmdline:unbound.*lab``: searched in the whole command line (``pgrep -f``);
- ``proxy1=cgroup:/loadkit/proxy1@11243,11210``: every process in a memory cgroup.

An ``@`` splits off ports only when a list of port numbers follows it; otherwise it belongs to
the pattern or path (``m=user@example``, ``cgroup:/user.slice/user@1000.service``), except that a
comma after it means a port list, so ``@1143,imap`` is refused rather than read as a path. A pattern is
compiled here, so a bad one is refused when the profile or the command line is read, not found
mid-run. This module imports only the standard library and :mod:`loadkit.errors`: the collector
imports it on target hosts that have no Locust.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, NamedTuple

from loadkit.errors import CollectorError

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_PORTS_RE = re.compile(r"[0-9]+(,[0-9]+)*")


class GroupSpec(NamedTuple):
    """A parsed group spec (:func:`parse_group_spec`)."""

    name: str
    pattern: str  #: regular expression; "" for a cgroup group
    cgroup: str  #: cgroup path; "" for a pattern group
    ports: tuple[int, ...]  #: listening ports whose established connections are sessions
    full_cmdline: bool = False  #: match ``pattern`` against the whole command line

    def __str__(self) -> str:
        what = f"cgroup:{self.cgroup}" if self.cgroup else ("cmdline:" if self.full_cmdline else "") + self.pattern
        ports = "@" + ",".join(map(str, self.ports)) if self.ports else ""
        return f"{self.name}={what}{ports}"


def parse_group_spec(text: str) -> GroupSpec:
    """``NAME=PATTERN``, ``NAME=cmdline:REGEX``, ``NAME=cgroup:PATH``, each ``[@PORT,PORT]``.

    Raises :class:`CollectorError` with a one-line message naming the spec.
    """
    name, eq, rest = text.partition("=")
    name = name.strip()
    if not eq or not name or not rest.strip():
        raise CollectorError(
            f"group {text!r} is not NAME=PATTERN or NAME=cgroup:PATH (e.g. proxies=dovecot)"
        )
    if not _NAME_RE.fullmatch(name):
        raise CollectorError(f"group {text!r}: name {name!r} may use only letters, digits, '_', '.', '-'")
    ports: tuple[int, ...] = ()
    head, at, tail = rest.rpartition("@")
    if at and "," in tail and not _PORTS_RE.fullmatch(tail):  # a port list with a typo in it
        raise CollectorError(f"group {text!r}: after '@' give listening ports, e.g. @1143,1110")
    if at and _PORTS_RE.fullmatch(tail):
        rest = head
        ports = tuple(int(p) for p in tail.split(","))
        for port in ports:
            if not 1 <= port <= 65535:
                raise CollectorError(f"group {text!r}: port {port} is out of range 1-65535")
    if rest.startswith("cgroup:"):
        path = rest[len("cgroup:") :].strip()
        if not path:
            raise CollectorError(f"group {text!r}: cgroup: needs a path (e.g. cgroup:/loadkit/proxy1)")
        return GroupSpec(name, "", path, ports)
    full = rest.startswith("cmdline:")
    pattern = rest[len("cmdline:") :] if full else rest
    if not pattern.strip():
        raise CollectorError(f"group {text!r}: empty pattern (PATTERN, cmdline:REGEX or cgroup:PATH)")
    try:
        re.compile(pattern)
    except re.error as err:
        raise CollectorError(f"group {text!r}: pattern {pattern!r} is not a regular expression ({err})") from None
    return GroupSpec(name, pattern, "", ports, full)


def check_unique(specs: Iterable[GroupSpec]) -> None:
    """Refuse two groups with one name (their samples could not be told apart)."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise CollectorError(f"group name {spec.name!r} is given twice; each group needs its own name")
        seen.add(spec.name)


def parse_groups(groups: Mapping[str, str] | Iterable[str | GroupSpec] | None) -> list[GroupSpec]:
    """``{"p1": "cgroup:/x@1143"}`` or ``["p1=cgroup:/x@1143", ...]`` -> checked specs, names unique."""
    if not groups:
        return []
    if isinstance(groups, Mapping):
        specs = [parse_group_spec(f"{name}={spec}") for name, spec in groups.items()]
    else:
        specs = [g if isinstance(g, GroupSpec) else parse_group_spec(g) for g in groups]
    check_unique(specs)
    return specs
