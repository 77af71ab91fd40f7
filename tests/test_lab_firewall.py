"""The lab's stateful firewall in front of DNS: a real nftables session table on the lab's address.

Needs root and nft (as the lab's firewall does); skipped otherwise, except the one-line refusals,
which are what a user without them sees.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from loadkit.errors import LabError
from loadkit.lab import Lab, LabConfig

needs_nft = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                               reason="the lab's firewall needs root and nft")


def _soa_query(qid: int) -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"\x03lab\x04test\x00" + struct.pack("!HH", 6, 1)


def _flows(host: str, port: int, n: int, wait_s: float = 1.0) -> int:
    """Send one query from each of ``n`` new client sockets (n new flows); return how many answered."""
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.1.0.1", 0))  # the generator's loopback-source model: a loopback source address
        s.sendto(_soa_query(i), (host, port))
        socks.append(s)
    answered = 0
    for s in socks:
        s.settimeout(wait_s)
        try:
            answered += len(s.recv(512)) > 0
        except OSError:
            pass
        s.close()
        wait_s = 0.05  # the first wait covered every reply that was coming
    return answered


def _nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


@needs_nft
def test_session_table_admits_its_size_drops_the_rest_and_is_gone_after_down(make_lab, tmp_path):
    from loadkit.observe.collector import Collector, CollectorConfig
    from loadkit.record.reader import read_table

    status = make_lab(firewall_sessions=40, firewall_udp_timeout_s=60.0)
    fw = status.firewall
    assert fw is not None and fw.present and fw.size_n == 40
    assert fw.dns.port == status.dns.port + 1 and fw.dns.host == status.dns.host
    doc = status.to_dict()
    assert doc["firewall"]["dns"] == {"host": status.dns.host, "port": status.dns.port + 1}
    assert "127.0.0.0/8" in doc["allowlist"]

    # 100 new flows through the firewall: 40 sessions fit, 60 are dropped and counted
    assert _flows(fw.dns.host, fw.dns.port, 100) == 40
    # the plain port is not behind the firewall
    assert _flows(status.dns.host, status.dns.port, 100) == 100
    lab = make_lab.labs[-1]
    now = lab.status().firewall
    assert (now.entries_n, now.drops_n) == (40, 60)

    # the collector records the same figures as a 'firewall' table on its own clock
    out = tmp_path / "collect"
    collector = Collector(CollectorConfig(interval_s=0.2, out_dir=out))
    sample = collector.sample()
    collector.close()
    mine = [f for f in sample.firewall if f.firewall == now.table]
    assert len(mine) == 1 and (mine[0].entries_n, mine[0].size_n, mine[0].drops_n) == (40, 40, 60)
    assert mine[0].ts_unix_s == sample.ts_unix_s
    table = read_table(out, "firewall")
    row = table[table["firewall"] == now.table].iloc[-1]
    assert (row["entries_n"], row["size_n"], row["drops_n"]) == (40, 40, 60)

    # down: the table, its rules and the lab's processes and runtime dir are gone
    table_name = now.table.split()[1]
    assert table_name in _nft_tables()
    runtime = lab.runtime_dir
    pids = [c.pid for c in lab.status().components]
    lab.down()
    assert table_name not in _nft_tables()
    assert not runtime.exists() and not lab.state_path.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "unbound" not in Path(f"/proc/{pid}/cmdline").read_text()


@needs_nft
def test_an_entry_expires_after_the_udp_timeout(make_lab):
    import time

    status = make_lab(firewall_sessions=10, firewall_udp_timeout_s=1.0, accounts=10, proxies=1)
    fw = status.firewall
    assert _flows(fw.dns.host, fw.dns.port, 20) == 10
    time.sleep(1.5)  # every session has timed out: the table has room again
    assert make_lab.labs[-1].status().firewall.entries_n == 0
    from loadkit.observe.firewall import read_table

    family, table = fw.table.split()
    assert read_table(family, table).drops_n == 10  # nft by name, found on PATH
    assert _flows(fw.dns.host, fw.dns.port, 10) == 10


def test_without_nft_lab_up_fails_in_one_line_before_starting_anything(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()  # a PATH without nft (and without anything else)
    lab_dir = tmp_path / "lab"
    out = subprocess.run(
        [sys.executable, "-m", "loadkit", "lab", "up", "--dir", str(lab_dir), "--address", "127.0.9.77",
         "--firewall-sessions", "100"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": str(empty)},
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    if os.geteuid() == 0:
        assert "needs nft (Debian package nftables)" in out.stderr
    else:
        assert "needs root" in out.stderr
    assert not (lab_dir / "state.json").exists()


def test_without_root_the_firewall_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root") as err:
        Lab(LabConfig(dir=tmp_path, address="127.0.9.78", firewall_sessions=100)).up()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "state.json").exists()


@needs_nft
def test_collector_reads_the_table_from_a_locust_process(make_lab):
    """The live collector samples in a thread of gevent's pool, in a process holding thousands
    of sockets: the firewall reading must work there (gevent's subprocess cannot wait for a child
    off the main loop, and select() cannot take descriptors past 1024)."""
    status = make_lab(firewall_sessions=30, firewall_udp_timeout_s=60.0, accounts=10, proxies=1)
    assert _flows(status.firewall.dns.host, status.firewall.dns.port, 50) == 30
    table = status.firewall.table
    code = f"""
from gevent import monkey; monkey.patch_all()
import gevent, socket
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(1500)]
from loadkit.observe.collector import Collector, CollectorConfig
c = Collector(CollectorConfig(interval_s=0.5))
rows = []
for _ in range(4):
    rows += [f for f in gevent.get_hub().threadpool.apply(c.sample).firewall if f.firewall == {table!r}]
    gevent.sleep(0.3)
print(len(rows), rows[-1].entries_n, rows[-1].drops_n)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    n, entries, drops = map(int, out.stdout.split())
    assert n >= 3 and (entries, drops) == (30, 20), out.stderr


@needs_nft
def test_the_shipped_firewall_scenario_records_the_table_fill(make_lab, tmp_path):
    """scenarios/retry_storm_firewall.toml, shortened, against a lab with the firewall it names:
    the run finds the lab from its firewalled target and records the table on the run's clock."""
    import re

    from loadkit.record.reader import load_run

    repo = Path(__file__).resolve().parents[1]
    status = make_lab(firewall_sessions=13000, firewall_udp_timeout_s=60.0, accounts=10, proxies=1)
    text = (repo / "scenarios" / "retry_storm_firewall.toml").read_text()
    text = text.replace("127.0.0.1:", f"{status.dns.host}:").replace('"locustfiles/', f'"{repo}/locustfiles/')
    text = text.replace("\\\\.loadkit/lab/conf", re.escape(str(Path(status.dir) / "conf")).replace("\\", "\\\\"))
    profile = tmp_path / "retry_storm_firewall.toml"
    profile.write_text(text)
    out = subprocess.run([sys.executable, "-m", "loadkit", "run", str(profile), "--out", str(tmp_path / "runs"),
                          "--duration", "8s", "--release", "test"], capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 1), out.stderr
    [run_dir] = list((tmp_path / "runs").iterdir())
    run = load_run(run_dir)
    assert run.complete and run.manifest["lab"]["dir"] == status.dir  # found from port dns+1
    mine = run.firewall[run.firewall["firewall"] == status.firewall.table]
    assert len(mine) >= 2 and (mine["size_n"] == 13000).all()
    assert mine["entries_n"].max() > 2000  # the first 2,500-query burst went through it
    start, end = run.manifest["started_unix_s"], run.manifest["ended_unix_s"]
    assert mine["ts_unix_s"].between(start - 1, end + 1).all()
