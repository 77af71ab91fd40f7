"""`loadkit lab up|status|down`: the local replica of the incident systems on loopback."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loadkit import defaults
from loadkit.cli._common import add_command
from loadkit.errors import ProfileError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "lab", None, "bring the local lab (unbound, dovecot proxies in memory cgroups, haproxy) up or down",
                    "The local lab: unbound DNS with the zone lab.test., a dovecot backend with test accounts, "
                    "dovecot proxies each in a memory cgroup, haproxy in front. Loopback only.")
    lab_sub = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    up = add_command(lab_sub, "up", _up, "start the lab (a running lab is reported unchanged)")
    _dir_option(up)
    _up_options(up)

    st = add_command(lab_sub, "status", _status,
                     "show the lab's components, endpoints and cgroups (exit status 1 if not running)")
    _dir_option(st)
    st.add_argument("--json", action="store_true", help="print one JSON object")

    down = add_command(lab_sub, "down", _down, "stop what 'lab up' started and remove its cgroups")
    _dir_option(down)

    smoke = add_command(lab_sub, "smoke", _smoke, "bring the lab up, send a little DNS, IMAP and POP3 without "
                        "Locust, bring it down (exit status 1 if a service did not answer)")
    _dir_option(smoke)
    smoke.add_argument("--keep", action="store_true", help="leave the lab running afterwards")


def _up_options(up: argparse.ArgumentParser) -> None:
    """What ``lab up`` can change: addresses and ports, unbound, accounts, proxies, firewall, CPU."""
    up.add_argument("--address", default=defaults.LAB_ADDRESS,
                    help="loopback address every service binds to (default %(default)s)")
    up.add_argument("--dns-port", metavar="PORT", type=_int_arg("--dns-port"), default=defaults.DNS_PORT,
                    help="unbound's UDP and TCP port (default %(default)s)")
    up.add_argument("--imap-port", metavar="PORT", type=_int_arg("--imap-port"), default=defaults.IMAP_PORT,
                    help="haproxy's IMAP port in front of the proxies; the dovecot backend listens on "
                    "this port + 10000, proxy N on this port + 10000 + 100 x N (default %(default)s)")
    up.add_argument("--pop3-port", metavar="PORT", type=_int_arg("--pop3-port"), default=defaults.POP3_PORT,
                    help="haproxy's POP3 port, proxies as for IMAP (default %(default)s)")
    up.add_argument("--dns-names", type=_int_arg("--dns-names"), default=10000,
                    help="names in the zone lab.test. (default %(default)s)")
    up.add_argument("--dns-rcvbuf", metavar="BYTES", default="0",
                    help="unbound's UDP receive buffer (so-rcvbuf), e.g. 4MiB; 0 = platform default")
    up.add_argument("--dns-ratelimit", metavar="QPS", type=_int_arg("--dns-ratelimit"), default=0,
                    help="per-client-address query limit (ip-ratelimit); excess is dropped; 0 = off")
    up.add_argument("--dns-threads", metavar="N", type=_int_arg("--dns-threads"), default=1,
                    help="unbound worker threads (num-threads; default %(default)s)")
    up.add_argument("--accounts", metavar="N", type=_int_arg("--accounts"), default=5000,
                    help="mail accounts user0001... (default %(default)s)")
    up.add_argument("--proxies", metavar="K", type=_int_arg("--proxies"), default=3,
                    help="dovecot proxies behind haproxy (default %(default)s)")
    up.add_argument("--proxy-memory", metavar="SIZE", default="256MiB",
                    help="memory cgroup limit per proxy, e.g. 256MiB, 64M, bytes (default %(default)s)")
    up.add_argument("--no-oom-kill", action="store_true",
                    help="disable the OOM killer in the proxy cgroups: a proxy at its limit "
                    "stalls whole or its master exits, and haproxy marks it DOWN, instead of "
                    "losing single login processes (as in the incident)")
    up.add_argument("--firewall-sessions", metavar="N", type=_int_arg("--firewall-sessions"),
                    default=0,
                    help="put a stateful firewall (nftables, needs root) with a session table of N "
                    "entries in front of DNS on --dns-port+1; new flows finding it full are "
                    "dropped; 0 = no firewall")
    up.add_argument("--firewall-udp-timeout", metavar="SECONDS",
                    type=_float_arg("--firewall-udp-timeout"), default=30.0,
                    help="seconds a firewall session lives after its flow's last packet "
                    "(default %(default)s)")
    up.add_argument("--dns-cpu", metavar="CORES", type=_float_arg("--dns-cpu"), default=0.0,
                    help="CPU quota of unbound in cores (e.g. 0.25), so its capacity is set, not "
                    "found; measured at up as dns.capacity_qps; 0 = no quota")
    up.add_argument("--proxy-cpu", metavar="CORES", type=_float_arg("--proxy-cpu"), default=0.0,
                    help="CPU quota of each dovecot proxy in cores; 0 = no quota")
    up.add_argument("--proxy-restart-after", metavar="SECONDS", type=_float_arg("--proxy-restart-after"),
                    default=0.0,
                    help="restart a proxy that fell over (master exited or OOM-killed, or stalled at its "
                    "memory limit) this many seconds later, as an operator would; 0 = leave it down")
    up.add_argument("--proxy-restarts-max", metavar="N", type=_int_arg("--proxy-restarts-max"), default=10,
                    help="at most N restarts per proxy with --proxy-restart-after (default %(default)s)")
    up.add_argument("--json", action="store_true", help="print the status as one JSON object")


def _dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=None,
                   help=f"lab directory (default {defaults.LAB_DIR}, or $LOADKIT_LAB_DIR)")


def _number_arg(option: str, kind: type = int, what: str = "a whole number"):
    """An argparse type: ``kind(text)``, or a one-line error naming the option."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise ProfileError(f"{option} {text!r} is not {what}") from None
    return parse


def _int_arg(option: str):
    return _number_arg(option)


def _float_arg(option: str):
    return _number_arg(option, float, "a number")


def _up(args: argparse.Namespace) -> int:
    from loadkit.lab import Lab, LabConfig, parse_bytes

    cfg = LabConfig(
        dir=args.dir or defaults.LAB_DIR,
        address=args.address,
        dns_port=args.dns_port,
        imap_port=args.imap_port,
        pop3_port=args.pop3_port,
        dns_names=args.dns_names,
        dns_rcvbuf_bytes=parse_bytes(args.dns_rcvbuf, "--dns-rcvbuf"),
        dns_ratelimit_qps=args.dns_ratelimit,
        dns_threads=args.dns_threads,
        accounts=args.accounts,
        proxies=args.proxies,
        proxy_memory_bytes=parse_bytes(args.proxy_memory, "--proxy-memory"),
        oom_kill=not args.no_oom_kill,
        firewall_sessions=args.firewall_sessions,
        firewall_udp_timeout_s=args.firewall_udp_timeout,
        dns_cpu=args.dns_cpu,
        proxy_cpu=args.proxy_cpu,
        proxy_restart_after_s=args.proxy_restart_after,
        proxy_restarts_max=args.proxy_restarts_max,
    )
    status = Lab(cfg).up()
    print(json.dumps(status.to_dict(), indent=2) if args.json else status.to_table())
    return 0


def _status(args: argparse.Namespace) -> int:
    from loadkit.lab import Lab

    status = Lab.from_dir(args.dir or defaults.LAB_DIR).status()
    print(json.dumps(status.to_dict(), indent=2) if args.json else status.to_table())
    return 0 if status.running else 1


def _down(args: argparse.Namespace) -> int:
    from loadkit.lab import Lab

    lab = Lab.from_dir(args.dir or defaults.LAB_DIR)
    lab.down()
    print(f"lab in {lab.dir} is down")
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from loadkit.lab.smoke import run_smoke

    return run_smoke(args.dir or defaults.LAB_DIR, keep=args.keep)
