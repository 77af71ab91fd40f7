"""The lab's stateful firewall in front of DNS: an nftables session table in the kernel's data path.

Incident 2's loop ran through a firewall whose session table the retries filled. The lab builds
one with nftables, as a table of its own (``loadkit_fw_<address>_<port>``) on the input path of the lab's
loopback address, guarding a second DNS port of the same unbound (``dns_port+1``; the plain port
stays unfiltered)::

    set sessions { type ipv4_addr . inet_service; size N; flags dynamic,timeout; timeout S }
    ip daddr A udp dport P update @sessions { ip saddr . udp sport } accept   # known or admitted
    ip daddr A udp dport P counter name new_flow_drops drop                   # table full

``update`` refreshes a known flow's timeout, as a stateful firewall does on every packet; a new
flow is added while the set has room, otherwise the rule does not match and the packet is dropped
and counted. The key is the client's address and port, so each source port a stub resolver picks
is a session of its own, and clients keep binding loopback source addresses (127.x.y.z) as they do
against the plain port: no routing, namespace or address is needed for the generator to reach it.
TCP to the firewalled port passes (incident 2 was UDP).

Only root can create the table, and only with ``nft`` (Debian package ``nftables``):
:func:`check_prerequisites` says which is missing before anything starts.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess

from loadkit.errors import LabError
from loadkit.observe import firewall as observed

from .config import LabConfig


def table_name(cfg: LabConfig) -> str:
    """``loadkit_fw_127_0_0_1_5354``: the endpoint it guards, so a run (or a model) that knows its
    DNS target picks its firewall among several labs' (:func:`loadkit.observe.firewall.table_for`)."""
    return observed.table_for(cfg.address, cfg.firewall_dns_port)


def family(cfg: LabConfig) -> str:
    return "ip6" if ipaddress.ip_address(cfg.address).version == 6 else "ip"


def check_prerequisites() -> str:
    """The path of ``nft``; :class:`LabError` naming what is missing otherwise."""
    if os.geteuid() != 0:
        raise LabError("--firewall-sessions needs root (the firewall is an nftables table); "
                       "run 'loadkit lab up' as root, or without --firewall-sessions")
    nft = observed.nft_binary()
    if nft is None:
        raise LabError("--firewall-sessions needs nft (Debian package nftables), "
                       "which is not on PATH; install it or run without --firewall-sessions")
    return nft


def ruleset(cfg: LabConfig) -> str:
    """The nft script that creates the lab's firewall table (see the module docstring)."""
    fam = family(cfg)
    addr_type = "ipv6_addr" if fam == "ip6" else "ipv4_addr"
    # whole milliseconds: nft takes "2500ms" but no decimal point
    timeout_ms = max(1, int(round(cfg.firewall_udp_timeout_s * 1000)))
    # an expired entry keeps its place until the set's garbage collection removes it (every second
    # by default): with a 2 s timeout that is up to half as long again, and the table held 5,100
    # sessions where Little's law said 3,400. A twentieth of the timeout keeps the lag under 5 %.
    gc_ms = min(1000, max(50, timeout_ms // 20))
    match = f"{fam} daddr {cfg.address} udp dport {cfg.firewall_dns_port}"
    return "\n".join([
        f"table {fam} {table_name(cfg)} {{",
        f"  set {observed.SESSIONS_SET} {{",
        f"    type {addr_type} . inet_service",
        f"    size {cfg.firewall_sessions}",
        "    flags dynamic,timeout",
        f"    timeout {timeout_ms}ms",
        f"    gc-interval {gc_ms}ms",
        "  }",
        f"  counter {observed.DROPS_COUNTER} {{ }}",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f"    {match} update @{observed.SESSIONS_SET} {{ {fam} saddr . udp sport }} accept",
        f"    {match} counter name {observed.DROPS_COUNTER} drop",
        "  }",
        "}",
        "",
    ])


def _nft(nft: str, args: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([nft, *args], input=script, capture_output=True, text=True,
                          timeout=observed.NFT_TIMEOUT_S, check=False)


def create(cfg: LabConfig, nft: str) -> tuple[str, str]:
    """Create the firewall table; return ``(family, table)``. A leftover table of the same lab
    (a crashed run) is replaced."""
    fam, name = family(cfg), table_name(cfg)
    remove(fam, name, nft)
    out = _nft(nft, ["-f", "-"], ruleset(cfg))
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["no message"])[0]
        raise LabError(f"cannot create the lab's firewall (nft: {first})")
    return fam, name


def remove(fam: str, name: str, nft: str | None = None) -> None:
    """Delete the table (its set, counter and rules go with it); a missing table is fine."""
    nft = nft or observed.nft_binary()
    if nft is None:
        raise LabError(f"cannot remove the lab's firewall table {fam} {name}: nft is not on PATH")
    if (fam, name) not in observed.list_tables(nft, name):
        return
    out = _nft(nft, ["delete", "table", fam, name])
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["no message"])[0]
        raise LabError(f"cannot remove the lab's firewall table {fam} {name} (nft: {first})")


def read(fam: str, name: str) -> observed.FirewallReading | None:
    """The table's fill now, or None when it is gone or unreadable."""
    nft = observed.nft_binary()
    if nft is None:
        return None
    try:
        return observed.read_table(fam, name, nft)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
