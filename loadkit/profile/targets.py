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
from typing import NamedTuple, Sequence

from loadkit.defaults import DEFAULT_ALLOWLIST
from loadkit.errors import TargetError, TargetNotAllowed

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
