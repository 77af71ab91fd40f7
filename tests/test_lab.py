"""The lab against the real servers: DNS answers, REFUSED outside the zone, clean teardown."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import psutil
import pytest

from loadkit.errors import PortInUse, ProfileError
from loadkit.lab import Lab, LabConfig, parse_bytes
from loadkit.lab.dns import zone_records

pytestmark = pytest.mark.lab

DOC_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]


def _query(status, name, rrtype="A"):
    host, port = status.dns
    return dns.query.udp(dns.message.make_query(name, rrtype), host, port=port, timeout=2)


def test_dns_answers_names_from_the_names_file(lab):
    names = Path(lab.names_file).read_text().split()
    assert len(names) >= 10000
    records = {name.rstrip("."): (t, d) for name, t, d in zone_records(len(names))}
    # a spread of names across the file, every record type
    for name in names[:: len(names) // 40] + names[7:10]:
        rrtype, rdata = records[name]
        resp = _query(lab, name, rrtype)
        assert resp.rcode() == dns.rcode.NOERROR, name
        assert resp.answer, name
        answer = resp.answer[0]
        assert answer.rdtype == dns.rdatatype.from_text(rrtype)
        if rrtype == "A":
            assert any(ipaddress.ip_address(r.address) in n for r in answer for n in DOC_NETS)
            assert str(answer[0]) == rdata


def test_dns_refuses_outside_the_zone(lab):
    for name in ("example.com", "www.debian.org", "."):
        assert _query(lab, name).rcode() == dns.rcode.REFUSED
    assert _query(lab, "no-such-name.lab.test").rcode() == dns.rcode.NXDOMAIN


def test_up_twice_is_idempotent(lab):
    again = Lab.from_dir(lab.dir).up()
    assert again.running
    assert [c.pid for c in again.components] == [c.pid for c in lab.components]


def test_status_json_shape(lab):
    out = subprocess.run(
        [sys.executable, "-m", "loadkit", "lab", "status", "--json", "--dir", lab.dir],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["dns"] == {"host": lab.dns.host, "port": lab.dns.port}
    assert d["imap"]["port"] == lab.imap.port and d["pop3"]["port"] == lab.pop3.port
    assert d["accounts_file"] == lab.accounts_file
    names = {c["name"] for c in d["components"]}
    assert "unbound" in names
    for c in d["components"]:
        assert {"name", "up", "pid", "ports", "memory_bytes", "limit_bytes", "failcnt"} <= set(c)
        assert c["up"] is True


def test_down_leaves_no_process(make_lab):
    status = make_lab(dns_names=100, accounts=10, proxies=1)
    pids = [c.pid for c in status.components]
    lab = Lab.from_dir(status.dir)
    lab.down()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)
    assert not lab.status().running
    lab.down()  # safe when nothing runs


def test_port_clash_names_port_and_owner(lab, tmp_path):
    with pytest.raises(PortInUse) as err:
        Lab(LabConfig(dir=tmp_path / "second", address=lab.dns.host)).up()
    msg = str(err.value)
    assert str(lab.dns.port) in msg or str(lab.imap.port) in msg
    assert "unbound" in msg or "haproxy" in msg
    assert "\n" not in msg


def test_bad_option_values():
    with pytest.raises(ProfileError):
        LabConfig(address="10.0.0.1")
    with pytest.raises(ProfileError):
        LabConfig(proxies=0)
    with pytest.raises(ProfileError):
        parse_bytes("lots", "--proxy-memory")
    assert parse_bytes("256MiB") == 256 * 1024 * 1024
    assert parse_bytes("64M") == 64 * 1024 * 1024
    assert parse_bytes("1000") == 1000


def test_cli_bad_value_is_one_line_exit_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "loadkit", "lab", "up", "--dir", str(tmp_path), "--proxy-memory", "huge"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--proxy-memory" in out.stderr
