"""Target resolution and the allowlist: nothing is sent anywhere else.

Every generator calls :func:`check_target` before its first packet. A name is resolved once,
here, and *every* address it resolves to must be inside the allowlist (a name that resolves to
loopback and to a public address is refused: the resolver might pick either). The default
allowlist is loopback only; ``LOADKIT_ALLOWLIST`` (comma-separated networks) or a profile's
``allowlist`` widens it, for example to a staging subnet.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from loadkit import defaults
from loadkit.defaults import DEFAULT_ALLOWLIST, LabInfo, find_lab
from loadkit.errors import InputFileError, TargetError, TargetNotAllowed

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: the protocols loadkit's users speak, and the target names (profile ``[targets]``, ``--target``)
#: that mean each of them
PROTOCOL_NAMES = {"dns": "dns", "imap": "imap", "pop3": "pop3", "pop": "pop3"}
#: the port a target without one gets: the protocol's standard port, not the lab's (IANA)
STANDARD_PORTS = {"dns": 53, "imap": 143, "pop3": 110, "http": 80, "https": 443}
#: ... and with implicit TLS (``--mail-tls tls``): IMAPS, POP3S, DNS over TLS
IMPLICIT_TLS_PORTS = {"imap": 993, "pop3": 995, "dns": 853, "http": 443}


class Target(NamedTuple):
    """A resolved, allowed endpoint."""

    host: str  #: as the user wrote it
    address: str  #: the numeric address to send to
    port: int

    def __str__(self) -> str:
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{addr}:{self.port}"


def parse_allowlist(networks: Sequence[str] | str | None = None) -> tuple[Network, ...]:
    """Networks from a list, a comma-separated string, ``LOADKIT_ALLOWLIST`` or the default."""
    if networks is None:
        networks = os.environ.get("LOADKIT_ALLOWLIST") or DEFAULT_ALLOWLIST
    if isinstance(networks, str):
        networks = [n for n in (p.strip() for p in networks.split(",")) if n]
    parsed = []
    for net in networks:
        try:
            parsed.append(ipaddress.ip_network(net, strict=False))
        except ValueError as err:
            raise TargetError(f"allowlist entry {net!r} is not a network (e.g. 127.0.0.0/8)") from err
    return tuple(parsed)


def split_host_port(spec: str, default_port: int) -> tuple[str, int]:
    """``"h"``, ``"h:p"``, ``"[v6]:p"``, ``"scheme://h:p"`` -> ``(host, port)``."""
    s = spec.strip()
    if "://" in s:
        s = s.split("://", 1)[1]
    s = s.rstrip("/")
    if not s:
        raise TargetError(f"target {spec!r} has no host")
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif s.count(":") == 1:
        host, port_s = s.split(":")
    else:
        host, port_s = s, ""
    port = default_port
    if port_s:
        try:
            port = int(port_s)
        except ValueError:
            raise TargetError(f"target {spec!r}: port {port_s!r} is not a number") from None
        if not 0 < port < 65536:
            raise TargetError(f"target {spec!r}: port {port} is out of range 1-65535")
    return host, port


def resolve(host: str) -> list[str]:
    """All addresses ``host`` resolves to; a :class:`TargetError` naming the host otherwise."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_UDP)
    except (socket.gaierror, UnicodeError) as err:
        raise TargetError(f"target host {host!r} does not resolve: {err}") from err
    return sorted({info[4][0] for info in infos})


def check_target(
    spec: str, default_port: int, allowlist: Sequence[str] | str | None = None
) -> Target:
    """Resolve ``spec`` and refuse it unless every address is in the allowlist."""
    host, port = split_host_port(spec, default_port)
    nets = parse_allowlist(allowlist)
    addresses = resolve(host)
    for addr in addresses:
        ip = ipaddress.ip_address(addr)
        if not any(ip.version == n.version and ip in n for n in nets):
            allowed = ", ".join(str(n) for n in nets)
            raise TargetNotAllowed(
                f"target {spec} resolves to {addr}, outside the allowlist ({allowed}); "
                "nothing was sent. Add the staging network to the profile's allowlist or "
                "LOADKIT_ALLOWLIST if this target is yours to load."
            )
    return Target(host, addresses[0], port)


def check_source_address(address: str, allowlist: Sequence[str] | str | None = None) -> None:
    """Client source addresses (many-sources mode) must be local loopback addresses too."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise TargetError(f"source address {address!r} is not an IP address") from None
    if not ip.is_loopback:
        nets = parse_allowlist(allowlist)
        if not any(ip.version == n.version and ip in n for n in nets):
            raise TargetNotAllowed(f"source address {address} is not loopback nor in the allowlist")


# ------------------------------------------------------------------------------------------------
# the target of a generator's users: --target PROTOCOL=..., else --host, else the lab
# ------------------------------------------------------------------------------------------------


def standard_port(name: str, tls: bool = False) -> int:
    """The standard port of a protocol (or a target named after one); 0 when there is none."""
    protocol = PROTOCOL_NAMES.get(name, name)
    return (IMPLICIT_TLS_PORTS if tls else STANDARD_PORTS).get(protocol, 0)


def parse_target_options(values: Sequence[str] | None) -> dict[str, str]:
    """``["imap=127.0.50.1:2143", "pop3=127.0.50.1"]`` (``--target``, repeatable) -> by protocol."""
    out: dict[str, str] = {}
    for value in values or ():
        name, eq, spec = str(value).partition("=")
        protocol = PROTOCOL_NAMES.get(name.strip().lower())
        if not eq or protocol is None or not spec.strip():
            raise TargetError(
                f"--target {value!r} is not PROTOCOL=HOST[:PORT] with PROTOCOL one of dns, imap, pop3 "
                "(e.g. --target imap=127.0.0.1:1143)"
            )
        out[protocol] = spec.strip()
    return out


def target_spec(environment: Any, protocol: str) -> str | None:
    """What the user said a ``protocol`` user class should send to, or None (the lab's default).

    ``--target PROTOCOL=HOST[:PORT]`` (what ``loadkit run`` passes for each ``[targets]`` entry
    named after a protocol) comes first, so that IMAP and POP3 classes in one run each get their
    own; then Locust's ``--host`` (also the web UI's Host field).
    """
    options = getattr(environment, "parsed_options", None)
    per_protocol = parse_target_options(getattr(options, "target", None))
    return per_protocol.get(protocol) or getattr(environment, "host", None) or None


class UserTarget(NamedTuple):
    """A user class's resolved, allowed endpoint, and the lab that serves it (None: not a lab)."""

    target: Target
    lab: LabInfo | None

    def file(self, kind: str, given: str | Path | None, option: str) -> Path:
        """The names or accounts file to use: the one given, else the target lab's.

        ``kind`` is ``"names"`` or ``"accounts"``; ``option`` names the option that gives one.
        """
        if given:
            return Path(given)
        if self.lab is None:
            raise InputFileError(
                f"no {kind} file given and no loadkit lab serves {self.target}: pass {option} FILE "
                f"(or bring a lab up on that address with `loadkit lab up`)"
            )
        return self.lab.names_file if kind == "names" else self.lab.accounts_file


def user_target(protocol: str, spec: str | None = None, tls: bool = False,
                allowlist: Sequence[str] | str | None = None) -> UserTarget:
    """Resolve and allow the endpoint a ``protocol`` user class sends to.

    ``spec`` (``"host"``, ``"host:port"``...) without a port takes the protocol's standard port
    (:func:`standard_port`, with ``tls`` for implicit TLS). No ``spec``: the lab's endpoint for the
    protocol (the lab in ``LOADKIT_LAB_DIR`` when one is up there, else the default lab's address
    and ports). The lab behind the target is looked up by its address and port
    (:func:`loadkit.defaults.find_lab`), not from the working directory.
    """
    protocol = PROTOCOL_NAMES[protocol]
    if spec:
        target = check_target(spec, standard_port(protocol, tls), allowlist)
    else:
        lab = find_lab()
        address = lab.address if lab else defaults.LAB_ADDRESS
        port = lab.port(protocol) if lab else defaults.lab_port(protocol)
        target = check_target(f"[{address}]:{port}" if ":" in address else f"{address}:{port}", port, allowlist)
    return UserTarget(target, find_lab(target.address, target.port))
