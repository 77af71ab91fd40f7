"""The models against the real lab: UDP drop onset of unbound, and the metastability verdict.

Bursts are sent with a plain ``sendto`` loop of prebuilt wire queries. The sender and unbound are
pinned to one CPU for the burst: on loopback a server on another core drains a Python sender as
fast as it sends, so no burst would ever be "much faster than service". Pinned, the server runs
only between the sender's bursts, which is the regime the model describes (and the one a burst off
a network link puts a server in). Every affinity change is undone afterwards.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import dns.message
import pytest

from loadkit.model import udp_burst
from loadkit.profile.targets import check_target

pytestmark = [pytest.mark.lab, pytest.mark.slow]

BYTES_PER_DATAGRAM = 832


# ---------------------------------------------------------------------------------------------
# the socket, seen from /proc (psutil has none of this)
# ---------------------------------------------------------------------------------------------


def _proc_udp_key(address: str, port: int) -> str:
    return socket.inet_aton(address)[::-1].hex().upper() + f":{port:04X}"


def socket_queue_and_drops(address: str, port: int) -> tuple[int, int]:
    """(rx_queue bytes, drops) of the UDP socket bound to address:port, from /proc/net/udp."""
    key = _proc_udp_key(address, port)
    with open("/proc/net/udp") as fh:
        next(fh)
        for line in fh:
            f = line.split()
            if f[1] == key:
                return int(f[4].split(":")[1], 16), int(f[-1])
    raise AssertionError(f"no UDP socket on {address}:{port} in /proc/net/udp")


def rcvbuf_errors() -> int:
    with open("/proc/net/snmp") as fh:
        rows = [line.split() for line in fh if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def socket_rcvbuf(address: str, port: int) -> int:
    """The socket's sk_rcvbuf (``ss -m`` ``rb``): what the kernel actually uses."""
    out = subprocess.run(["ss", "-H", "-u", "-l", "-m", "-n", f"src {address}:{port}"],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    for part in out.replace("(", ",").replace(")", ",").split(","):
        if part.startswith("rb") and part[2:].isdigit():
            return int(part[2:])
    raise AssertionError(f"ss shows no rb for {address}:{port}: {out!r}")


@contextmanager
def one_cpu(*pids: int):
    """Pin this process and ``pids`` to one CPU; restore their affinities afterwards."""
    cpu = max(os.sched_getaffinity(0))
    saved = {pid: os.sched_getaffinity(pid) for pid in (0, *pids)}
    try:
        for pid in saved:
            os.sched_setaffinity(pid, {cpu})
        yield cpu
    finally:
        for pid, cpus in saved.items():
            try:
                os.sched_setaffinity(pid, cpus)
            except ProcessLookupError:
                pass


def prebuilt_queries(names_file: str, n: int = 2000) -> list[bytes]:
    wires = []
    with open(names_file) as fh:
        for i, line in zip(range(n), fh):
            msg = dns.message.make_query(line.strip(), "A")
            msg.id = i
            wires.append(msg.to_wire())
    return wires


class Burster:
    """A client socket that sends bursts of prebuilt queries and drains the answers."""

    def __init__(self, server: tuple[str, int], wires: list[bytes]) -> None:
        target = check_target(f"{server[0]}:{server[1]}", 53)
        self.dst = (target.address, target.port)
        self.wires = wires
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # answers must not drop here
        self.sock.bind((target.address, 0))
        self.sock.setblocking(False)

    def send(self, n: int) -> float:
        """Send ``n`` queries back to back; the burst's duration in seconds."""
        sendto, dst, wires, k = self.sock.sendto, self.dst, self.wires, len(self.wires)
        t0 = time.perf_counter()
        for i in range(n):
            sendto(wires[i % k], dst)
        return time.perf_counter() - t0

    def drain(self, quiet_s: float = 0.05, max_s: float = 1.0) -> int:
        got, deadline = 0, time.perf_counter() + max_s
        last = time.perf_counter()
        while time.perf_counter() < deadline and time.perf_counter() - last < quiet_s:
            try:
                self.sock.recv(4096)
                got += 1
                last = time.perf_counter()
            except BlockingIOError:
                time.sleep(0.002)
        return got

    def close(self) -> None:
        self.sock.close()


def measure_onset(address: str, port: int, wires: list[bytes], unbound_pid: int) -> dict:
    """Service rate during a burst, the socket's buffer, and the first burst size that drops."""
    rcvbuf = socket_rcvbuf(address, port)
    capacity_guess = max(2, rcvbuf // BYTES_PER_DATAGRAM)
    burster = Burster((address, port), wires)
    onsets, served_rates, arrival_rates = [], [], []
    snmp0 = rcvbuf_errors()
    sock_drops0 = socket_queue_and_drops(address, port)[1]
    try:
        with one_cpu(unbound_pid):
            # service during a burst: queue a loss-free burst, read the queue right after it
            for _ in range(5):
                m = max(2, capacity_guess // 2)
                window_s = burster.send(m)
                queued_bytes, _ = socket_queue_and_drops(address, port)
                served = max(0.0, m - queued_bytes / BYTES_PER_DATAGRAM)
                served_rates.append(served / window_s)
                burster.drain()
            # bursts of growing size (3 % steps) until the server socket's drops rise
            for _ in range(3):
                n = max(2, capacity_guess // 4)
                while n < 50 * capacity_guess:
                    before = socket_queue_and_drops(address, port)[1]
                    window_s = burster.send(n)
                    burster.drain()
                    dropped = socket_queue_and_drops(address, port)[1] - before
                    if dropped > 0:
                        onsets.append(n)
                        arrival_rates.append(n / window_s)
                        break
                    n = max(n + 1, int(n * 1.03))
    finally:
        burster.close()
    return {
        "rcvbuf_bytes": rcvbuf,
        "service_rate_in_burst_qps": sorted(served_rates)[len(served_rates) // 2],
        "arrival_rate_qps": sorted(arrival_rates)[len(arrival_rates) // 2] if arrival_rates else None,
        "onset": sorted(onsets)[len(onsets) // 2] if onsets else None,
        "socket_drops": socket_queue_and_drops(address, port)[1] - sock_drops0,
        "snmp_rcvbuf_errors": rcvbuf_errors() - snmp0,
    }


def _check_onset(m: dict) -> None:
    assert m["onset"] is not None, m
    model = udp_burst(m["rcvbuf_bytes"], m["service_rate_in_burst_qps"],
                      arrival_rate_qps=m["arrival_rate_qps"])
    predicted = model.max_burst_no_loss
    # acceptance: the model predicts the drop onset within ±20 %
    assert abs(predicted - m["onset"]) <= 0.2 * m["onset"], (predicted, m)
    # the drops are the kernel's receive-buffer errors, host-wide counter included
    assert m["snmp_rcvbuf_errors"] >= m["socket_drops"] > 0, m


def test_udp_drop_onset_default_buffer(lab):
    unbound = next(c for c in lab.components if c.name == "unbound")
    m = measure_onset(lab.dns.host, lab.dns.port, prebuilt_queries(lab.names_file), unbound.pid)
    print("default buffer:", m)
    # no so-rcvbuf: the platform default (net.core.rmem_default, 212,992 on most systems)
    assert m["rcvbuf_bytes"] == int(Path("/proc/sys/net/core/rmem_default").read_text())
    _check_onset(m)


def test_udp_drop_onset_16kib_buffer(make_lab):
    # so-rcvbuf 16 KiB; the kernel doubles a SO_RCVBUF request, so the socket has 32 KiB
    status = make_lab(dns_rcvbuf_bytes=16 * 1024, proxies=1, accounts=10)
    unbound = next(c for c in status.components if c.name == "unbound")
    m = measure_onset(status.dns.host, status.dns.port, prebuilt_queries(status.names_file), unbound.pid)
    print("16 KiB so-rcvbuf:", m)
    assert m["rcvbuf_bytes"] == 32 * 1024
    _check_onset(m)
