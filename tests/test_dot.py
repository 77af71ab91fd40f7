"""DNS over TLS and TCP clients (each its own connection) against the lab's unbound and fakes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import gevent
import gevent.socket
import pytest

from loadkit.errors import ProfileError
from loadkit.generate.dns.users import DnsSettings, build_sender, plan
from loadkit.record import counters
from loadkit.record.reader import load_run

REPO = Path(__file__).resolve().parents[1]
LOCUST = str(Path(sys.executable).with_name("locust"))
BURST = str(REPO / "locustfiles" / "dns_burst.py")


def _send(names_file: str, host: str, duration_s: float = 1.5, **kw):
    """A sender of the DNS users' plan, run in this process; returns it and its failures by class."""
    settings = DnsSettings(host=host, names_file=names_file, burst_size_n=0, stats_interval_s=0.5, **kw)
    fails: dict[str, int] = {}

    def on_interval(report) -> None:
        for t in report.qtypes:
            for k, v in t.failures.items():
                fails[k] = fails.get(k, 0) + v

    sender = build_sender(plan(settings), on_interval=on_interval)
    sender.max_duration_s = duration_s
    sender.open()
    try:
        sender.run()
    finally:
        sender.close()
    return sender, fails


@pytest.mark.lab
def test_dot_storm_is_recorded_with_full_and_resumed_handshakes(lab, tmp_path: Path) -> None:
    # 10 DoT clients, each closing its connection after 0.2 s idle and sending one query every
    # 0.5 s: every query after a client's first one comes on a new connection, which resumes
    assert lab.dot is not None and lab.to_dict()["dns"]["dot"] == {"host": lab.dot.host, "port": lab.dot.port}
    out = tmp_path / "runs"
    proc = subprocess.run(
        # 60 queries (3 s at 20 q/s), then idle until -t (which runs its full time since the
        # recorder refreshes the clock Locust arms it from: it had meant 2 s of -t 5s when loaded)
        [LOCUST, "-f", BURST, "--headless", "-u", "1", "-r", "1", "-t", "6s", "--only-summary", "--dns-max-queries", "60",
         "--dns-protocol", "dot", "--dns-sources", "10", "--dns-rate", "20", "--dns-burst-size", "0",
         "--dns-idle-timeout", "0.2", "--dns-timeout", "3", "--dns-retries", "0",
         "--record-dir", str(out), "--run-id", "dot"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        # no target given: the DoT endpoint of the lab in LOADKIT_LAB_DIR
        env={**os.environ, "LOADKIT_LAB_DIR": lab.dir, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = load_run(out / "dot")
    full = counters.total(run, "dns.tls_handshakes_full")
    resumed = counters.total(run, "dns.tls_handshakes_resumed")
    answered = counters.total(run, "dns.answered")
    connects = counters.total(run, "dns.stream_connects")
    assert answered >= 15, proc.stderr[-2000:]
    # every client's first handshake is full (at most one per client), later ones resume
    assert 1 <= full <= 10 and resumed >= 1
    assert full + resumed + counters.total(run, "dns.stream_connect_failures") == connects
    # a client reconnects only after its connection closed (idle here; by the server at most)
    closes = counters.total(run, "dns.stream_idle_closes") + counters.total(run, "dns.stream_server_closes")
    assert closes >= connects - 10 and counters.total(run, "dns.stream_idle_closes") >= 1
    assert "DNS-DOT" in proc.stderr + proc.stdout


@pytest.mark.lab
def test_dot_without_resumption_does_full_handshakes_and_tcp_keeps_connections(lab) -> None:
    dot = f"{lab.dot.host}:{lab.dot.port}"
    sender, fails = _send(lab.names_file, dot, protocol="dot", tls_resume="off", idle_timeout_s=0.1,
                          sources=5, rate_qps=20, timeout_s=3, retries=0)
    t = sender.totals
    assert t.get("dns.tls_handshakes_resumed", 0) == 0
    assert t["dns.tls_handshakes_full"] == t["dns.stream_connects"] >= 6  # reconnects after idle
    assert t["dns.answered"] >= 10 and not fails
    # TCP: 5 clients keep their connection for the whole run (no idle timeout): 5 connects
    plain = f"{lab.dns.host}:{lab.dns.port}"
    sender, fails = _send(lab.names_file, plain, protocol="tcp", idle_timeout_s=0, sources=5, rate_qps=100,
                          timeout_s=3, retries=0)
    assert sender.totals["dns.stream_connects"] == 5 and sender.totals["dns.answered"] >= 50 and not fails


@pytest.mark.lab
def test_the_lab_serves_dns_over_https_to_dnsperf(lab, tmp_path: Path) -> None:
    doh = lab.to_dict()["dns"]["doh"]
    assert doh == {"host": lab.doh.host, "port": lab.doh.port, "path": "/dns-query"}
    queries = tmp_path / "queries.txt"
    queries.write_text("".join(f"{name} A\n" for name in Path(lab.names_file).read_text().split()[:50]))
    proc = subprocess.run(["dnsperf", "-m", "doh", "-s", doh["host"], "-p", str(doh["port"]), "-d", str(queries),
                           "-n", "1", "-c", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Queries completed:    50 (100.00%)" in proc.stdout, proc.stdout


def _listener(handler) -> tuple[socket.socket, gevent.Greenlet]:
    srv = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            gevent.spawn(handler, conn)

    return srv, gevent.spawn(serve)


def test_dot_failure_classes(tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("a.example.test\n")
    # nothing listens: refused
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    _, fails = _send(str(names), f"127.0.0.1:{port}", protocol="dot", rate_qps=20, duration_s=0.5,
                     timeout_s=0.5, retries=0)
    assert set(fails) == {"conn_refused"}

    # a server that accepts and never speaks TLS: handshake timeout; one that hangs up: handshake error
    held: list = []
    silent, g1 = _listener(held.append)
    rude, g2 = _listener(lambda conn: conn.close())
    try:
        _, fails = _send(str(names), f"127.0.0.1:{silent.getsockname()[1]}", protocol="dot", rate_qps=10,
                         duration_s=0.5, timeout_s=0.3, retries=0)
        assert set(fails) == {"tls_handshake_timeout"} and sum(fails.values()) >= 3
        sender, fails = _send(str(names), f"127.0.0.1:{rude.getsockname()[1]}", protocol="dot", rate_qps=10,
                              duration_s=0.5, timeout_s=0.5, retries=0)
        assert set(fails) == {"tls_handshake_error"}
        assert sender.totals["dns.tls_handshake_failures"] == sender.totals["dns.stream_connect_failures"] >= 3
    finally:
        g1.kill()
        g2.kill()
        silent.close()
        rude.close()
        for conn in held:
            conn.close()


def test_transport_options_are_checked(tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("a.example.test\n")
    for bad, message in (({"protocol": "doh"}, "udp, tcp or dot"), ({"idle_timeout_s": -1}, "--dns-idle-timeout"),
                         ({"tls_resume": "yes"}, "--dns-tls-resume")):
        with pytest.raises(ProfileError, match=message):
            plan(DnsSettings(host="127.0.0.1:853", names_file=str(names), **bad))
    # a DoT target without a port takes the standard DoT port
    assert plan(DnsSettings(host="127.0.0.1", names_file=str(names), protocol="dot")).target.port == 853
