"""/proc parsers: canned files with known values, and the live system within a tolerance."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import psutil
import pytest

from loadkit.observe import procfs

CANNED = Path(__file__).parent / "data" / "proc"


# -- canned files ------------------------------------------------------------------------------


def test_snmp_udp_counters_from_canned_file():
    snmp = procfs.read_snmp(CANNED)
    assert snmp["Udp"]["InDatagrams"] == 250431
    assert snmp["Udp"]["InErrors"] == 150891
    assert snmp["Udp"]["RcvbufErrors"] == 150890
    assert snmp["Udp"]["SndbufErrors"] == 1
    assert snmp["Udp"]["NoPorts"] == 12
    assert snmp["Tcp"]["MaxConn"] == -1  # signed values survive
    assert snmp["UdpLite"]["RcvbufErrors"] == 0


def test_paired_table_skips_misaligned_pairs():
    text = "Udp: A B C\nUdp: 1 2\nTcp: X\nTcp: 7\n"
    assert procfs.parse_paired_table(text) == {"Tcp": {"X": 7}}


def test_netstat_listen_overflows_from_canned_file():
    tcpext = procfs.read_netstat(CANNED)["TcpExt"]
    assert tcpext["ListenOverflows"] == 42
    assert tcpext["ListenDrops"] == 43
    assert tcpext["TCPBacklogDrop"] == 7
    assert procfs.read_netstat(CANNED)["IpExt"]["InOctets"] == 319798651


def test_snmp6_from_canned_file():
    snmp6 = procfs.read_snmp6(CANNED)
    assert snmp6["Udp6InDatagrams"] == 31
    assert snmp6["Udp6InErrors"] == 5
    assert snmp6["Udp6RcvbufErrors"] == 4


def test_udp_sockets_addresses_queues_and_drops():
    socks = procfs.read_udp_sockets(CANNED)
    by_addr = {(s.local_address, s.local_port): s for s in socks}
    lab = by_addr[("127.0.0.1", 5353)]
    assert lab.rx_queue_bytes == 0x340 and lab.drops_n == 17 and lab.inode == 42145
    assert by_addr[("127.0.3.1", 5353)].drops_n == 150873
    assert by_addr[("127.0.3.1", 5353)].rx_queue_bytes == 0x33F00
    assert by_addr[("0.0.0.0", 514)].tx_queue_bytes == 16
    assert by_addr[("::1", 5353)].drops_n == 1  # from udp6
    assert {s.local_port for s in procfs.read_udp_sockets(CANNED, ports=[514])} == {514}


def test_udp6_missing_is_not_an_error(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "udp").write_text((CANNED / "net" / "udp").read_text())
    assert len(procfs.read_udp_sockets(tmp_path)) == 3
    with pytest.raises(FileNotFoundError):
        procfs.read_udp_sockets(tmp_path / "nowhere")


def test_tcp_sockets_states_and_ports():
    socks = procfs.read_tcp_sockets(CANNED)
    states = [(s.local_port, s.state) for s in socks]
    assert (11227, 0x0A) in states  # LISTEN on 0x2BDB
    assert sum(1 for s in socks if s.state == procfs.TCP_ESTABLISHED and s.local_port == 11227) == 3
    listen = next(s for s in socks if s.state == 0x0A)
    assert listen.rx_queue_bytes == 5  # accept queue length for a listener
    assert procfs.TCP_STATES[socks[-1].state] == "ESTABLISHED"  # the tcp6 line


def test_sockstat_softnet_conntrack_meminfo_loadavg_stat():
    ss = procfs.read_sockstat(CANNED)
    assert ss["sockets"]["used"] == 205 and ss["UDP"] == {"inuse": 3, "mem": 57}
    soft = procfs.read_softnet(CANNED)
    assert [s.dropped_n for s in soft] == [2, 10] and soft[1].processed_n == 0x1C80
    assert procfs.read_conntrack(CANNED) == procfs.Conntrack(4711, 262144)
    mem = procfs.read_meminfo(CANNED)
    assert mem["MemAvailable"] == 24261112 * 1024 and mem["HugePages_Total"] == 0
    assert mem["SwapTotal"] - mem["SwapFree"] == 1024 * 1024
    assert procfs.read_loadavg(CANNED) == (1.13, 0.34, 0.16)
    cpu = procfs.read_cpu_times(CANNED)
    assert cpu.cpus_n == 2
    assert cpu.total_ticks == 11837 + 12 + 3946 + 125811 + 669 + 0 + 294 + 21
    assert cpu.busy_ticks == cpu.total_ticks - 125811 - 669


def test_conntrack_absent_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        procfs.read_conntrack(tmp_path)


# -- live system -------------------------------------------------------------------------------


def _direct_udp_rcvbuf_errors() -> int:
    """An independent read of Udp RcvbufErrors: find the column by name in the raw text."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def test_live_snmp_matches_a_direct_read():
    before = _direct_udp_rcvbuf_errors()
    parsed = procfs.read_snmp()["Udp"]["RcvbufErrors"]
    after = _direct_udp_rcvbuf_errors()
    # other load on the host may drop datagrams between the reads; never more than it did
    assert before <= parsed <= after


def test_live_meminfo_matches_psutil():
    mem = procfs.read_meminfo()
    vm = psutil.virtual_memory()
    assert mem["MemTotal"] == vm.total
    assert abs(mem["MemAvailable"] - vm.available) <= 64 * 1024 * 1024  # moving target


def test_live_own_udp_socket_is_found_with_its_queue_and_drops():
    """A socket we bind and overfill: /proc/net/udp shows its queue and the drops we caused."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        rx.bind(("127.0.5.1", 0))
        port = rx.getsockname()[1]
        for _ in range(200):
            tx.sendto(b"x" * 100, ("127.0.5.1", port))
        time.sleep(0.05)
        mine = [s for s in procfs.read_udp_sockets(ports=[port]) if s.local_address == "127.0.5.1"]
        assert len(mine) == 1
        assert mine[0].rx_queue_bytes > 0
        received = 0
        rx.setblocking(False)
        try:
            while True:
                rx.recv(200)
                received += 1
        except BlockingIOError:
            pass
        assert mine[0].drops_n == 200 - received
    finally:
        rx.close()
        tx.close()


def test_live_tcp_table_shows_a_listener_and_an_established_pair():
    srv = socket.create_server(("127.0.5.1", 0))
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.5.1", port))
    conn, _ = srv.accept()
    try:
        socks = [s for s in procfs.read_tcp_sockets() if s.local_port == port]
        states = sorted(procfs.TCP_STATES[s.state] for s in socks)
        assert states == ["ESTABLISHED", "LISTEN"]
    finally:
        for s in (conn, cli, srv):
            s.close()


def test_live_conntrack_when_present():
    if not Path("/proc/sys/net/netfilter/nf_conntrack_count").exists():
        pytest.skip("conntrack module not loaded on this host")
    ct = procfs.read_conntrack()
    assert 0 <= ct.count_n <= ct.max_n
