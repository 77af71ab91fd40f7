"""The lab's settings and the ports derived from them.

Every service of one lab binds to one loopback address, and every internal port is derived from
the public ones, so two labs on different loopback addresses (127.0.0.1 and 127.0.9.1, say) run
side by side without sharing anything.

Port scheme (defaults in brackets)::

    DNS (unbound, UDP+TCP)      dns_port                      [5353]
    IMAP / POP3 (haproxy)       imap_port / pop3_port         [1143 / 1110]
    backend dovecot             imap_port+10000 / pop3_port+10000        [11143 / 11110]
    proxy N (1-based) dovecot   imap_port+10000+100*N / pop3_port+10000+100*N
                                                              [11243/11210, 11343/11310, ...]
    haproxy stats               a unix socket in the runtime directory (no port)
    DNS behind the firewall     dns_port+1 (UDP+TCP, the same unbound) when firewall_sessions > 0
                                                              [5354]
    DNS over TLS (unbound)      dns_port+500                  [5853]
    DNS over HTTPS (unbound)    dns_port+501, path /dns-query [5854]
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadkit import defaults
from loadkit.errors import ProfileError

MiB = 1024 * 1024

#: offset of the backend dovecot ports from the public ones
BACKEND_PORT_OFFSET = 10000
#: step between the ports of successive proxies
PROXY_PORT_STEP = 100
#: more proxies than this would run the derived ports into each other
MAX_PROXIES = 50
#: a dovecot proxy with less memory than this cannot even start its master
MIN_PROXY_MEMORY_BYTES = 16 * MiB
#: offset of the firewalled DNS port from the plain one
FIREWALL_PORT_OFFSET = 1
#: a firewall entry's UDP timeout must lie in this range (seconds)
FIREWALL_TIMEOUT_RANGE_S = (0.1, 3600.0)
#: a fallen proxy is restarted after this many seconds (0 is "never")
RESTART_AFTER_RANGE_S = (0.1, 3600.0)


@dataclass
class LabConfig:
    """What one lab looks like. Field names are the CLI options without the dashes."""

    dir: Path = field(default_factory=lambda: defaults.LAB_DIR)
    """lab directory: configs, logs, state file, names and accounts files"""
    address: str = defaults.LAB_ADDRESS
    """loopback address every service binds to"""
    dns_port: int = defaults.DNS_PORT
    imap_port: int = defaults.IMAP_PORT
    pop3_port: int = defaults.POP3_PORT
    dns_names: int = 10000
    """names in the zone ``lab.test.`` (and lines in the names file)"""
    dns_rcvbuf_bytes: int = 0
    """unbound ``so-rcvbuf``; 0 keeps the platform default"""
    dns_ratelimit_qps: int = 0
    """unbound ``ip-ratelimit`` per client address; 0 is off. Excess queries are dropped."""
    dns_threads: int = 1
    accounts: int = 5000
    """mail accounts ``user0001``...; their passwords are in the accounts file"""
    proxies: int = 3
    """dovecot proxies behind haproxy, each in its own memory cgroup"""
    proxy_memory_bytes: int = 256 * MiB
    """memory limit of each proxy's cgroup"""
    oom_kill: bool = True
    """False: the kernel OOM killer is disabled in the proxy cgroups (v1), so a proxy at its
    limit stalls whole or its dovecot master exits, and haproxy marks it DOWN, as in the
    incident (v2 cannot disable the OOM killer: there the whole proxy cgroup is killed at once)"""
    firewall_sessions: int = 0
    """size of the stateful firewall's session table in front of DNS (port ``dns_port+1``); 0: no
    firewall. A new flow (client address and port) that finds the table full is dropped."""
    firewall_udp_timeout_s: float = 30.0
    """seconds a firewall session lives after its flow's last packet"""
    dns_cpu: float = 0.0
    """CPU quota of unbound in cores (CFS), e.g. 0.25; 0: no quota"""
    proxy_cpu: float = 0.0
    """CPU quota of each dovecot proxy in cores (CFS); 0: no quota"""
    proxy_restart_after_s: float = 0.0
    """restart a proxy that fell over (its master exited or was OOM-killed, or it stalled whole at
    its memory limit) this many seconds later, as an operator or watchdog would; 0: it stays down"""
    proxy_restarts_max: int = 10
    """at most this many restarts per proxy (a proxy that keeps falling is then left down)"""
    dns_log_queries: bool = False
    """unbound logs every query (``log-queries``) to its log, a query log a replay can read"""
    dns_dnstap_socket: str = ""
    """unbound sends dnstap client queries to this frame-streams socket ('' : no dnstap); a
    listener such as ``fstrm_capture`` writes them to a file a replay can read"""

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)
        self.validate()

    # -- validation ---------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise :class:`ProfileError` with a one-line message on the first bad value."""
        try:
            addr = ipaddress.ip_address(self.address)
        except ValueError as err:
            raise ProfileError(f"lab address {self.address!r} is not an IP address") from err
        if not addr.is_loopback:
            raise ProfileError(
                f"lab address {self.address} is not a loopback address (use 127.x.y.z or ::1)"
            )
        for name in ("dns_port", "imap_port", "pop3_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ProfileError(f"lab {name} {port!r} is not a port number (1-65535)")
        _at_least("dns_names", self.dns_names, 1)
        _at_least("dns_rcvbuf_bytes", self.dns_rcvbuf_bytes, 0)
        _at_least("dns_ratelimit_qps", self.dns_ratelimit_qps, 0)
        _at_least("dns_threads", self.dns_threads, 1)
        _at_least("accounts", self.accounts, 1)
        if self.accounts > 99999:
            raise ProfileError(f"lab accounts {self.accounts} is more than 99999")
        _at_least("proxies", self.proxies, 1)
        if self.proxies > MAX_PROXIES:
            raise ProfileError(f"lab proxies {self.proxies} is more than {MAX_PROXIES}")
        _at_least("proxy_memory_bytes", self.proxy_memory_bytes, MIN_PROXY_MEMORY_BYTES)
        _at_least("firewall_sessions", self.firewall_sessions, 0)
        lo, hi = FIREWALL_TIMEOUT_RANGE_S
        _number_in("firewall_udp_timeout_s", self.firewall_udp_timeout_s, lo, hi)
        if self.proxy_restart_after_s != 0:
            _number_in("proxy_restart_after_s", self.proxy_restart_after_s, *RESTART_AFTER_RANGE_S)
        _at_least("proxy_restarts_max", self.proxy_restarts_max, 1)
        for name in ("dns_cpu", "proxy_cpu"):
            value = getattr(self, name)
            # 0 is "no quota"; below 0.1 of a core the period grows past 10 ms to keep the kernel's
            # smallest quota (1 ms), so 0.01 runs 1 ms in every 100 ms (cgroups.cpu_period_us)
            if value != 0:
                _number_in(name, value, 0.01, 64.0)
        ports = self.all_ports()
        for port in ports:
            if not 1 <= port <= 65535:
                raise ProfileError(
                    f"lab port {port} derived from the public ports is out of range; "
                    "choose lower --imap-port/--pop3-port or fewer proxies"
                )
        if len(set(ports)) != len(ports):
            raise ProfileError(
                f"lab ports collide ({sorted(ports)}); choose other --dns/imap/pop3 ports"
            )

    # -- derived ------------------------------------------------------------------------------

    @property
    def lab_id(self) -> str:
        """Unique per running lab on this host: the address and IMAP port (cgroup names)."""
        return re.sub(r"[^0-9A-Za-z]+", "-", f"{self.address}-{self.imap_port}").strip("-")

    def backend_ports(self) -> tuple[int, int]:
        """(imap, pop3) of the backend dovecot."""
        return self.imap_port + BACKEND_PORT_OFFSET, self.pop3_port + BACKEND_PORT_OFFSET

    def proxy_ports(self, n: int) -> tuple[int, int]:
        """(imap, pop3) of proxy ``n`` (1-based)."""
        step = BACKEND_PORT_OFFSET + PROXY_PORT_STEP * n
        return self.imap_port + step, self.pop3_port + step

    @property
    def firewall_dns_port(self) -> int | None:
        """The DNS port behind the firewall, or None without a firewall."""
        return self.dns_port + FIREWALL_PORT_OFFSET if self.firewall_sessions else None

    @property
    def dot_port(self) -> int:
        """unbound's DNS-over-TLS port (TCP)."""
        return self.dns_port + defaults.DOT_PORT_OFFSET

    @property
    def doh_port(self) -> int:
        """unbound's DNS-over-HTTPS port (TCP; HTTP/2, path ``/dns-query``)."""
        return self.dns_port + defaults.DOH_PORT_OFFSET

    def dns_ports(self) -> list[int]:
        """The ports unbound binds for UDP and TCP: the plain one, then the firewalled one."""
        fw = self.firewall_dns_port
        return [self.dns_port] + ([fw] if fw is not None else [])

    def all_ports(self) -> list[int]:
        """Every TCP port the lab binds (DNS also binds UDP on :meth:`dns_ports`)."""
        ports = [*self.dns_ports(), self.dot_port, self.doh_port, self.imap_port, self.pop3_port, *self.backend_ports()]
        for n in range(1, self.proxies + 1):
            ports.extend(self.proxy_ports(n))
        return ports

    # -- (de)serialisation for the state file -------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dir"] = str(self.dir)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _at_least(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ProfileError(f"lab {name} {value!r} must be an integer >= {minimum}")


def _number_in(name: str, value: Any, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProfileError(f"lab {name} {value!r} must be a number from {lo:g} to {hi:g}")


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": MiB,  # 64M means MiB, as in most memory-limit syntaxes (docker, systemd)
    "mb": 1000**2,
    "mib": MiB,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_bytes(text: str | int, what: str = "size") -> int:
    """``"256MiB"``, ``"64M"``, ``"1.5GiB"``, ``"268435456"`` -> bytes.

    ``K``/``M``/``G`` alone are binary (as in memory-limit settings elsewhere); ``kB``/``MB``/``GB``
    are decimal.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if unit == "k":
        unit = "kib"
    if not m or unit not in _SIZE_UNITS:
        raise ProfileError(f"{what} {text!r} is not a size (e.g. 256MiB, 64M, 268435456)")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])
