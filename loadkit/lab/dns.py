"""The lab's DNS server: unbound with a static local zone ``lab.test.``, refusing recursion.

The zone is generated deterministically (the same names and answers for the same size) from
the documentation address ranges only (RFC 5737 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24
and RFC 3849 2001:db8::/32), so nothing a load test learns from it points at a real host.
Names are a mix: 70 % A, 10 % AAAA, 10 % MX, 10 % TXT.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path

from loadkit.defaults import LAB_ZONE
from loadkit.errors import LabError

from .config import LabConfig

#: the three IPv4 documentation networks (RFC 5737); host parts 1..254 are used
_V4_NETS = ("192.0.2", "198.51.100", "203.0.113")


def zone_records(n_names: int) -> list[tuple[str, str, str]]:
    """``(name, rrtype, rdata)`` for ``n_names`` names in the lab zone (deterministic)."""
    zone = LAB_ZONE
    records: list[tuple[str, str, str]] = []
    for i in range(n_names):
        kind = i % 10
        if kind < 7:
            name = f"h{i:05d}.{zone}"
            net = _V4_NETS[i % 3]
            records.append((name, "A", f"{net}.{1 + (i // 3) % 254}"))
        elif kind == 7:
            name = f"v6-{i:05d}.{zone}"
            records.append((name, "AAAA", f"2001:db8::{i:x}"))
        elif kind == 8:
            name = f"mx{i:05d}.{zone}"
            records.append((name, "MX", f"10 mail.{zone}"))
        else:
            name = f"txt{i:05d}.{zone}"
            records.append((name, "TXT", f'"loadkit lab record {i}"'))
    return records


def write_zone(cfg: LabConfig, conf_dir: Path, names_path: Path) -> Path:
    """Write the unbound local-data include and the names file; return the include's path."""
    records = zone_records(cfg.dns_names)
    zone = LAB_ZONE
    lines = [
        f'local-zone: "{zone}" static',
        f'local-data: "{zone} 3600 IN SOA ns.{zone} hostmaster.{zone} 1 3600 600 86400 300"',
        f'local-data: "{zone} 3600 IN NS ns.{zone}"',
        f'local-data: "ns.{zone} 3600 IN A 192.0.2.53"',
        f'local-data: "mail.{zone} 3600 IN A 192.0.2.25"',
    ]
    for name, rrtype, rdata in records:
        # single quotes outside, so TXT data keeps its own double quotes
        lines.append(f"local-data: '{name} 300 IN {rrtype} {rdata}'")
    path = conf_dir / "lab.test.conf"
    path.write_text("\n".join(lines) + "\n")
    # names file: one name per line, no trailing dot, the form load tests read
    names_path.write_text("".join(f"{name.rstrip('.')}\n" for name, _, _ in records))
    return path


#: the lab's DNS-over-TLS key and self-signed certificate, made in the lab's conf directory
TLS_KEY_FILE = "unbound-tls.key"
TLS_CERT_FILE = "unbound-tls.pem"


def write_tls_cert(cfg: LabConfig, conf_dir: Path) -> tuple[Path, Path]:
    """A P-256 key and a self-signed certificate for ``lab.test`` and the lab's address (kept
    when already there: a restarted lab keeps its certificate). Made by openssl, which unbound's
    own ``unbound-control-setup`` uses too."""
    key, cert = conf_dir / TLS_KEY_FILE, conf_dir / TLS_CERT_FILE
    if key.exists() and cert.exists():
        return key, cert
    san = f"DNS:{LAB_ZONE.rstrip('.')},IP:{cfg.address}"
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
           "-nodes", "-days", "365", "-subj", f"/CN={LAB_ZONE.rstrip('.')}", "-addext",
           f"subjectAltName={san}", "-keyout", str(key), "-out", str(cert)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    except FileNotFoundError:
        raise LabError("openssl is not installed: the lab needs it for its DNS-over-TLS certificate "
                       "(apt-get install openssl)") from None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        detail = getattr(err, "stderr", b"") or b""
        raise LabError(f"openssl could not make the lab's TLS certificate: "
                       f"{detail.decode(errors='replace').strip().splitlines()[-1:] or err}") from err
    return key, cert


def write_unbound_conf(cfg: LabConfig, conf_dir: Path, run_dir: Path, zone_include: Path) -> Path:
    """Write unbound.conf for this lab. Nothing outside the lab and runtime dirs is used."""
    v6 = ":" in cfg.address
    opts = [
        "server:",
        # one interface per port: the plain one, and the one behind the lab's firewall
        *(f"    interface: {cfg.address}@{port}" for port in cfg.dns_ports()),
        # DNS over TLS: an interface on tls-port serves TLS only (Android's Private DNS, RFC 7858)
        f"    interface: {cfg.address}@{cfg.dot_port}",
        f"    tls-port: {cfg.dot_port}",
        # DNS over HTTPS (RFC 8484; Debian's unbound is built with nghttp2): same key, HTTP/2 only
        f"    interface: {cfg.address}@{cfg.doh_port}",
        f"    https-port: {cfg.doh_port}",
        '    http-endpoint: "/dns-query"',
        f'    tls-service-key: "{conf_dir / TLS_KEY_FILE}"',
        f'    tls-service-pem: "{conf_dir / TLS_CERT_FILE}"',
        # TCP and TLS connections at once per thread (unbound's default, 10, refuses a handshake
        # storm of more than ten clients at once; each slot preallocates a 64 KiB buffer)
        "    incoming-num-tcp: 200",
        f"    port: {cfg.dns_port}",
        "    interface-automatic: no",
        f"    do-ip4: {'no' if v6 else 'yes'}",
        f"    do-ip6: {'yes' if v6 else 'no'}",
        "    do-udp: yes",
        "    do-tcp: yes",
        "    do-daemonize: no",
        '    chroot: ""',
        '    username: ""',
        f'    directory: "{conf_dir}"',
        f'    pidfile: "{run_dir / "unbound.pid"}"',
        '    logfile: ""',
        "    use-syslog: no",
        "    log-time-ascii: yes",
        "    verbosity: 1",
        f"    num-threads: {cfg.dns_threads}",
        # the zone is all local data: no validator, no trust anchor, no root hints needed
        '    module-config: "iterator"',
        "    access-control: 127.0.0.0/8 allow",
        "    access-control: ::1/128 allow",
        # only lab.test. is answered; everything else is REFUSED (no recursion to the internet)
        '    local-zone: "." refuse',
        "    minimal-responses: yes",
    ]
    if cfg.dns_rcvbuf_bytes:
        # unbound uses SO_RCVBUFFORCE when it can (root), else capped by net.core.rmem_max
        opts.append(f"    so-rcvbuf: {cfg.dns_rcvbuf_bytes}")
    if cfg.dns_ratelimit_qps:
        opts.append(f"    ip-ratelimit: {cfg.dns_ratelimit_qps}")
        # factor 0: every query over the limit is dropped (the default 10 lets 1 in 10 through)
        opts.append("    ip-ratelimit-factor: 0")
    if cfg.dns_log_queries:
        opts.append("    log-queries: yes")  # one line per query: a query log to replay
    opts.append(f'    include: "{zone_include}"')
    opts += ["remote-control:", "    control-enable: no"]
    if cfg.dns_dnstap_socket:
        # unbound writes dnstap only to a socket (no file output in 1.17): client queries only
        opts += ["dnstap:", "    dnstap-enable: yes", f'    dnstap-socket-path: "{cfg.dns_dnstap_socket}"',
                 "    dnstap-log-client-query-messages: yes"]
    path = conf_dir / "unbound.conf"
    path.write_text("\n".join(opts) + "\n")
    return path


def probe_query(address: str, port: int, timeout_s: float = 0.3) -> bool:
    """Does unbound answer an SOA query for the lab zone? (stdlib only: runs while starting)"""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in LAB_ZONE.rstrip(".").split(".")) + b"\0"
    query = struct.pack("!HHHHHH", 0x4C4B, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 6, 1)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout_s)
        try:
            s.sendto(query, (address, port))
            data = s.recv(4096)
        except OSError:
            return False
    return len(data) >= 12 and data[:2] == query[:2] and (data[3] & 0x0F) == 0
