"""The collector on the real lab: the acceptance figures of the observe stage.

- ``loadkit collect`` on the lab writes memory, RcvbufErrors and listen-overflow columns;
- a burst into a 16 KiB-rcvbuf unbound: the collector's drop deltas equal the kernel's;
- an IMAP session ramp on 64 MiB proxies: each proxy's cgroup memory rises with its sessions,
  and OOM kills (killer on) or proxy deaths (killer off) appear as timestamped events.

Other load on the same host moves the host-wide counters too, so host-wide deltas are checked
against direct kernel reads taken right around the collector's samples (equal when the host is
otherwise quiet, bracketed always) and the per-socket figures, which only this test's traffic
moves, are checked for equality.
"""

from __future__ import annotations

import csv
import imaplib
import os
import random
import signal
import socket
import time
from pathlib import Path

import dns.message
import pytest

from loadkit.cli import main as cli_main
from loadkit.observe.collector import Collector, CollectorConfig
from loadkit.observe.groups import parse_group_spec
from loadkit.profile.targets import check_target
from loadkit.record.reader import read_events, read_table

pytestmark = pytest.mark.lab

MiB = 1024 * 1024


def _kernel_rcvbuf_errors() -> int:
    """Udp RcvbufErrors read straight from /proc/net/snmp (independent of loadkit's parser)."""
    head, values = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Udp:")]
    return int(values[head.index("RcvbufErrors")])


def _kernel_socket_drops(address: str, port: int) -> int:
    """The ``drops`` column of every /proc/net/udp line bound to address:port."""
    want = f"{socket.inet_aton(address)[::-1].hex().upper()}:{port:04X}"
    total = 0
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == want:
            total += int(f[12])
    return total


def _accounts(status, n):
    with open(status.accounts_file, newline="") as fh:
        return [(r["user"], r["password"]) for r in csv.DictReader(fh)][:n]


def _skip_without_cgroups(status):
    if not status.cgroups.enabled:
        pytest.skip(f"no memory cgroups here: {status.cgroups.reason}")


# -- loadkit collect on the lab --------------------------------------------------------------------


def test_collect_on_the_lab_writes_memory_rcvbuf_and_listen_overflow_columns(lab, tmp_path, capsys):
    out = tmp_path / "collect"
    argv = ["collect", "--group", "proxies=dovecot", "--group", "dns=unbound",
            "--udp-port", str(lab.dns.port), "--interval", "0.5", "--duration", "5", "--out", str(out)]
    for p in lab.proxies:
        if p.cgroup:
            argv += ["--group", f"{p.name}=cgroup:{p.cgroup}@{p.imap.port},{p.pop3.port}"]
    assert cli_main(argv) == 0
    groups = read_table(out, "groups")
    net = read_table(out, "net")
    # 0, 0.5 ... 5.0 s; fewer when a busy host makes samples overrun (skipped, never bunched)
    assert 3 <= len(net) <= 11
    assert (net.ts_unix_s.diff().dropna() >= 0.45).all()
    for col in ("udp_rcvbuf_errors_n", "udp_rcvbuf_errors_n_delta", "tcp_listen_overflows_n",
                "tcp_listen_overflows_n_delta", "tcp_listen_drops_n"):
        assert col in net.columns
    for col in ("rss_bytes", "uss_bytes", "cgroup_memory_bytes", "cgroup_limit_bytes", "sessions_n"):
        assert col in groups.columns
    by_group = groups.groupby("group")
    assert by_group["procs_n"].min()["proxies"] >= 3 and by_group["procs_n"].min()["dns"] >= 1
    assert by_group["rss_bytes"].min()["dns"] > 0
    if lab.cgroups.enabled:
        for p in lab.proxies:
            rows = groups[groups.group == p.name]
            assert (rows.cgroup_memory_bytes > 0).all() and (rows.cgroup_limit_bytes == p.limit_bytes).all()
    socks = read_table(out, "sockets")
    assert set(socks.local_port) == {lab.dns.port} and lab.dns.host in set(socks.local_address)


# -- a UDP burst into a small receive buffer ------------------------------------------------------


def test_burst_into_16k_rcvbuf_unbound_drop_deltas_equal_the_kernels(make_lab):
    status = make_lab(dns_rcvbuf_bytes=16384, dns_names=200, accounts=10, proxies=1)
    host, port = status.dns
    target = check_target(f"{host}:{port}", 53)  # loopback only, as every generator does
    names = [n.strip() for n in Path(status.names_file).read_text().split() if n.strip()][:200]
    wire = []
    for i in range(2000):  # prebuilt: the loop below only calls sendto
        q = dns.message.make_query(names[i % len(names)], "A")
        q.id = random.randrange(65536)
        wire.append(q.to_wire())
    collector = Collector(CollectorConfig(udp_ports=[port], host="lab"))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.bind((host, 0))
        k1a, d1a = _kernel_rcvbuf_errors(), _kernel_socket_drops(host, port)
        s1 = collector.sample()
        k1b, d1b = _kernel_rcvbuf_errors(), _kernel_socket_drops(host, port)
        # up to three bursts: on a loaded machine the send loop can be slowed enough for unbound
        # to keep up with one (CI once saw a burst of 2,000 drop nothing)
        for _ in range(3):
            for q in wire:
                client.sendto(q, (target.address, target.port))
            time.sleep(1.0)  # let unbound drain what it kept
            if _kernel_socket_drops(host, port) > d1b:
                break
        k2a, d2a = _kernel_rcvbuf_errors(), _kernel_socket_drops(host, port)
        s2 = collector.sample()
        k2b, d2b = _kernel_rcvbuf_errors(), _kernel_socket_drops(host, port)
    finally:
        client.close()
    sock_delta = s2.socket_drops_delta[(host, port)]
    # only this test sends to this lab's socket: its drops are exactly the kernel's
    assert d1a == d1b and d2a == d2b
    assert sock_delta == d2a - d1a > 0, "three 2,000-query bursts into a 16 KiB buffer dropped nothing"
    sock = next(s for s in s2.sockets if (s.local_address, s.local_port) == (host, port))
    assert sock.drops_n == d2a
    # host-wide: the collector's delta is the kernel's, within the reads taken around it
    net_delta = s2.net_delta["udp_rcvbuf_errors_n"]
    assert k2a - k1b <= net_delta <= k2b - k1a
    assert net_delta >= sock_delta
    assert s2.net.udp_rcvbuf_errors_n - s1.net.udp_rcvbuf_errors_n == net_delta


# -- an IMAP session ramp on memory-limited proxies --------------------------------------------------


class Sessions:
    """Held IMAP sessions through haproxy (stdlib imaplib, logged in and idle)."""

    def __init__(self, status):
        self.status = status
        self.accounts = _accounts(status, 10000)
        self.held: list[imaplib.IMAP4] = []
        self.failures: list[Exception] = []

    def open(self, n: int) -> None:
        for _ in range(n):
            user, password = self.accounts[len(self.held) + len(self.failures)]
            try:
                m = imaplib.IMAP4(self.status.imap.host, self.status.imap.port, timeout=5)
                m.login(user, password)
                self.held.append(m)
            except (OSError, imaplib.IMAP4.error) as err:
                self.failures.append(err)

    def close(self) -> None:
        for m in self.held:
            try:
                m.shutdown()
            except OSError:
                pass
        self.held.clear()


def _proxy_groups(status):
    return [parse_group_spec(f"{p.name}=cgroup:{p.cgroup}@{p.imap.port},{p.pop3.port}") for p in status.proxies]


def test_proxy_cgroup_memory_rises_with_its_sessions_then_oom_kills_are_events(make_lab):
    status = make_lab(proxy_memory_bytes=64 * MiB, accounts=400, dns_names=100)
    _skip_without_cgroups(status)
    collector = Collector(CollectorConfig(groups=_proxy_groups(status), interval_s=0.2, full_memory_interval_s=None))
    sessions = Sessions(status)
    steps = []
    try:
        for _ in range(4):  # 0, 15, 30, 45 sessions: 0 to 15 per proxy, under the limit
            time.sleep(0.5)
            steps.append({g.group: g for g in collector.sample().groups})
            sessions.open(15)
        time.sleep(0.5)
        steps.append({g.group: g for g in collector.sample().groups})
        assert not sessions.failures
        for p in status.proxies:
            mem = [s[p.name].cgroup_memory_bytes for s in steps]
            sess = [s[p.name].sessions_n for s in steps]
            assert sess[0] == 0 and sess[-1] >= 10, (p.name, sess)
            assert all(b > a for a, b in zip(mem, mem[1:])), (p.name, mem)  # rises every step
            per_session = (mem[-1] - mem[0]) / (sess[-1] - sess[0])
            assert 0.2 * MiB < per_session < 5 * MiB, (p.name, per_session / MiB)
        # the storm: push on past the limit with the sampler running; the kernel kills logins
        collector.start()
        t_storm = time.time()
        for _ in range(12):
            sessions.open(15)
            if len(sessions.failures) >= 10:
                break
        time.sleep(1.0)
    finally:
        collector.stop()
        sessions.close()
    events, _ = collector.events_since(0)
    ooms = [e for e in events if e.kind == "oom_kill"]
    assert ooms, f"no OOM kill after {len(sessions.held)} sessions and {len(sessions.failures)} failures"
    assert all(t_storm <= e.ts_unix_s <= time.time() for e in ooms)
    assert {e.source for e in ooms} <= {p.name for p in status.proxies}
    assert all(e.detail["cgroup_limit_bytes"] == 64 * MiB for e in ooms)
    # the killed login processes (health-check logins may come and go during the ramp too)
    assert [e for e in events if e.kind == "process_exited" and e.ts_unix_s >= t_storm]


def test_proxy_stall_and_death_without_oom_killer_are_timestamped_events(make_lab, tmp_path):
    """With the OOM killer off the proxy stalls at its limit (``under_oom``) instead of losing
    login processes; when its master then dies, the exit is an event on the same timeline.

    The master is stopped by its PID here (the lab this test made started it): whether a
    stalled dovecot master exits on its own, and when, depends on the kernel and dovecot."""
    status = make_lab(proxies=1, proxy_memory_bytes=32 * MiB, oom_kill=False, accounts=200, dns_names=100)
    _skip_without_cgroups(status)
    if status.cgroups.version != 1:
        pytest.skip("the OOM killer can only be disabled on cgroup v1")
    proxy = status.proxies[0]
    master_pid = status.component(proxy.name).pid
    out = tmp_path / "collect"
    collector = Collector(CollectorConfig(groups=_proxy_groups(status), interval_s=0.2, out_dir=out, full_memory_interval_s=None))
    collector.start()
    sessions = Sessions(status)

    def seen(pred) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if any(pred(e) for e in collector.events_since(0)[0]):
                return True
            time.sleep(0.2)
        return False

    try:
        time.sleep(0.5)
        t_storm = time.time()
        for _ in range(10):
            sessions.open(10)
            if len(sessions.failures) >= 3:
                break
        # the kernel's own view, polled here: a stall that lasts several sampling intervals
        # must show up as an under_oom event
        control = Path(proxy.cgroup) / "memory.oom_control"
        sustained = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not sustained:
            if "under_oom 1" in control.read_text():
                time.sleep(0.6)
                sustained = "under_oom 1" in control.read_text()
            else:
                time.sleep(0.1)
        if sustained:
            assert seen(lambda e: e.kind == "warning" and e.detail.get("under_oom")), (
                f"a sustained stall was not reported ({collector.samples_n} samples, "
                f"last {time.time() - collector.latest.ts_unix_s:.1f} s ago)"
            )
        held = len(sessions.held)
        try:
            os.kill(master_pid, signal.SIGKILL)  # a process stalled in a memory cgroup still dies
        except ProcessLookupError:
            pass  # it exited on its own
        assert seen(lambda e: e.kind == "process_exited" and e.detail.get("pid") == master_pid), (
            f"master exit not reported ({collector.samples_n} samples, last "
            f"{time.time() - collector.latest.ts_unix_s:.1f} s ago, master alive: {Path(f'/proc/{master_pid}').exists()})"
        )
    finally:
        sessions.close()
        collector.stop()
    events = read_events(out)  # as written to events.jsonl
    death = next(e for e in events if e["kind"] == "process_exited" and e["detail"].get("pid") == master_pid)
    assert death["detail"]["name"] == "dovecot" and death["source"] == proxy.name
    assert t_storm <= death["ts_unix_s"] <= time.time() and held > 0
    stalls = [e for e in events if e["kind"] == "warning" and e["detail"].get("under_oom")]
    if sustained:
        assert t_storm <= stalls[0]["ts_unix_s"] <= death["ts_unix_s"]
        assert stalls[0]["detail"]["cgroup_limit_bytes"] == 32 * MiB
    assert not [e for e in events if e["kind"] == "oom_kill"]  # nothing was killed by the kernel
    groups = read_table(out, "groups")
    assert groups.cgroup_memory_bytes.max() > 0.9 * 32 * MiB
    assert groups.cgroup_failcnt_n_delta.sum() > 0  # the limit was hit, sample by sample
