"""What ``Lab.status()`` reports, as typed records, and their JSON and table forms."""

from __future__ import annotations

from typing import Any, NamedTuple


class Endpoint(NamedTuple):
    """A host and port a client connects to."""

    host: str
    port: int

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port}

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class ComponentStatus(NamedTuple):
    """One server process the lab started (made by ``Lab.status()``).

    The cgroup fields are set for proxies in a memory cgroup and ``None`` otherwise.
    """

    name: str
    up: bool
    pid: int
    ports: list[int]
    memory_bytes: int | None = None  #: cgroup memory charge (v1 usage_in_bytes, v2 current)
    limit_bytes: int | None = None  #: cgroup memory limit
    failcnt: int | None = None  #: times the limit was hit (v1 failcnt, v2 events "max")
    oom_kills: int | None = None  #: processes the OOM killer killed in the cgroup

    def to_dict(self) -> dict[str, Any]:
        return dict(self._asdict())


class ProxyStatus(NamedTuple):
    """One dovecot proxy behind haproxy (made by ``Lab.status()``)."""

    name: str
    up: bool
    imap: Endpoint
    pop3: Endpoint
    cgroup: str | None  #: cgroup directory, or None when running without limits
    memory_bytes: int | None
    limit_bytes: int | None
    failcnt: int | None
    oom_kills: int | None
    under_oom: bool | None  #: stalled at its limit with the OOM killer disabled (v1 under_oom)
    sessions: int | None  #: current sessions haproxy has open to it (stats ``scur``, IMAP+POP3)
    haproxy_state: str | None  #: haproxy's view of the server: UP, DOWN, ...
    cpu_cores: float | None = None  #: CFS quota in cores (``--proxy-cpu``), None without one
    restarts: int = 0  #: times the lab's supervisor restarted it after a fall (``--proxy-restart-after``)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self._asdict())
        d["imap"] = self.imap.to_dict()
        d["pop3"] = self.pop3.to_dict()
        return d


class CgroupSupport(NamedTuple):
    """Whether the proxies run under memory limits, and why not if they do not."""

    enabled: bool
    version: int | None  #: 1 or 2, None when no memory controller is usable
    reason: str  #: what is in effect, or why limits are off
    oom_kill: bool  #: False: OOM killer disabled in the proxy cgroups (v1 only)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._asdict())


class FirewallStatus(NamedTuple):
    """The stateful firewall in front of the lab's DNS (made by ``Lab.status()``)."""

    dns: Endpoint  #: the DNS endpoint behind the firewall (UDP and TCP; the firewall keeps UDP)
    table: str  #: nftables table, e.g. ``ip loadkit_fw_127_0_0_1_1143``
    size_n: int  #: session table size: new flows beyond it are dropped
    udp_timeout_s: float  #: seconds a session lives after its flow's last packet
    present: bool  #: the table exists in the kernel now
    entries_n: int | None  #: sessions in the table now
    drops_n: int | None  #: new flows dropped because the table was full, since ``up``

    def to_dict(self) -> dict[str, Any]:
        d = dict(self._asdict())
        d["dns"] = self.dns.to_dict()
        return d


class DnsCpu(NamedTuple):
    """unbound's CPU quota and the capacity it gives (made by ``Lab.status()``)."""

    cpu_cores: float  #: CFS quota in cores (0: none)
    cgroup: str | None  #: the CPU cgroup directory, None without a quota
    capacity_qps: float | None  #: answered q/s at < 1 % loss, measured at ``up``
    calibration: dict | None  #: how the capacity was measured (steps, loss)


class LabStatus(NamedTuple):
    """The whole lab (made by ``Lab.up()`` and ``Lab.status()``)."""

    dir: str
    running: bool  #: every component is up
    components: list[ComponentStatus]
    dns: Endpoint
    imap: Endpoint
    pop3: Endpoint
    names_file: str
    accounts_file: str
    proxies: list[ProxyStatus]
    cgroups: CgroupSupport
    zone: str
    accounts: int
    firewall: FirewallStatus | None = None  #: None: the lab has no firewall
    dns_cpu: DnsCpu | None = None  #: None: unbound runs without a CPU quota
    #: networks that hold every endpoint above: what a profile aimed at this lab allows
    allowlist: tuple = ("127.0.0.0/8", "::1/128")
    dot: Endpoint | None = None  #: DNS over TLS (unbound's tls-port; self-signed certificate)
    doh: Endpoint | None = None  #: DNS over HTTPS (HTTP/2, path /dns-query; the same certificate)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``loadkit lab status --json`` prints."""
        return {
            "dir": self.dir,
            "running": self.running,
            "components": [c.to_dict() for c in self.components],
            "dns": {
                **self.dns.to_dict(),
                # a set quota gives a measured capacity; without one, capacity is None
                "cpu_cores": self.dns_cpu.cpu_cores if self.dns_cpu else None,
                "capacity_qps": self.dns_cpu.capacity_qps if self.dns_cpu else None,
                "calibration": self.dns_cpu.calibration if self.dns_cpu else None,
                "dot": self.dot.to_dict() if self.dot else None,
                "doh": {**self.doh.to_dict(), "path": "/dns-query"} if self.doh else None,
            },
            "imap": self.imap.to_dict(),
            "pop3": self.pop3.to_dict(),
            "zone": self.zone,
            "names_file": self.names_file,
            "accounts_file": self.accounts_file,
            "accounts": self.accounts,
            "proxies": [p.to_dict() for p in self.proxies],
            "cgroups": self.cgroups.to_dict(),
            "firewall": self.firewall.to_dict() if self.firewall else None,
            "allowlist": list(self.allowlist),
        }

    def component(self, name: str) -> ComponentStatus:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_table(self) -> str:
        """A readable summary for ``loadkit lab status``."""
        lines = [
            f"lab in {self.dir}: {'running' if self.running else 'NOT running'}",
            f"  DNS   {self.dns}  DoT {self.dot}  DoH {self.doh}  zone {self.zone}  names file {self.names_file}",
            f"  IMAP  {self.imap}   POP3 {self.pop3}  ({self.accounts} accounts in "
            f"{self.accounts_file})",
            f"  cgroups: {self.cgroups.reason}",
            "",
            f"  {'component':<18} {'up':<4} {'pid':>7}  {'ports':<14} {'memory':>10} "
            f"{'limit':>10} {'failcnt':>8} {'oom kills':>9} {'sessions':>8}  haproxy",
        ]
        # per proxy: what haproxy makes of it, and the OOM kills its cgroup has counted
        proxies = {p.name: p for p in self.proxies}
        for c in self.components:
            oom, sessions, state = _proxy_columns(proxies.get(c.name))
            lines.append(
                f"  {c.name:<18} {'yes' if c.up else 'NO':<4} {c.pid:>7}  "
                f"{','.join(map(str, c.ports)):<14} {_mib(c.memory_bytes):>10} "
                f"{_mib(c.limit_bytes):>10} {_num(c.failcnt):>8} {oom:>9} {sessions:>8}  {state}"
            )
        return "\n".join(lines)


def _proxy_columns(p: ProxyStatus | None) -> tuple[str, str, str]:
    """OOM kills, sessions and haproxy's state of a proxy's row ('-' for other components)."""
    if p is None:
        return "-", "-", "-"
    state = p.haproxy_state or "-"
    if p.under_oom:
        state += " (stalled at its limit)"
    if p.restarts:
        state += f" (restarted {p.restarts}x)"
    return _num(p.oom_kills), _num(p.sessions), state


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.1f}MiB"


def _num(n: int | None) -> str:
    return "-" if n is None else str(n)
