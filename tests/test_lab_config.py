"""The lab's settings, option parsing and cgroup handling, without starting any server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loadkit.errors import ProfileError
from loadkit.lab import LabConfig, parse_bytes


def test_bad_option_values():
    with pytest.raises(ProfileError):
        LabConfig(address="192.0.2.1")  # not loopback: refused
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


def test_cgroup_v2_tree_is_handled(tmp_path):
    """cgroup v2 on a machine that may run v1: the same code against a v2-shaped tree."""
    from loadkit.lab import cgroups

    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    for d in ("loadkit", "loadkit/lab-1"):
        (root / d).mkdir()
        (root / d / "cgroup.subtree_control").write_text("")
    version, hier, reason = cgroups.detect(root)
    assert (version, hier) == (2, root)
    path = cgroups.create(2, root, "lab-1", "proxy1", 64 * 1024 * 1024, oom_kill=False)
    assert (path / "memory.max").read_text() == str(64 * 1024 * 1024)
    assert (path / "memory.oom.group").read_text() == "1"
    assert (root / "cgroup.subtree_control").read_text() == "+memory"
    (path / "memory.current").write_text("1234567\n")
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 17\noom 2\noom_kill 3\n")
    mem = cgroups.read_memory(2, path)
    assert mem == cgroups.Memory(1234567, 64 * 1024 * 1024, 17, 3)
    text = cgroups.support(2, reason, False, 64 * 1024 * 1024).reason
    assert "cannot be disabled on cgroup v2" in text
    no_mem = tmp_path / "nomem"
    no_mem.mkdir()
    (no_mem / "cgroup.controllers").write_text("cpu io pids\n")
    assert cgroups.detect(no_mem)[0] is None


def test_derived_ports_follow_the_public_ones():
    cfg = LabConfig(address="127.0.9.1", imap_port=2143, pop3_port=2110, proxies=2)
    assert cfg.backend_ports() == (12143, 12110)
    assert cfg.proxy_ports(1) == (12243, 12210) and cfg.proxy_ports(2) == (12343, 12310)
    assert len(set(cfg.all_ports())) == len(cfg.all_ports()) == 3 + 2 + 2 + 4  # DNS, DoT+DoH, public, backend+proxies
    assert cfg.dot_port == 5853 and cfg.doh_port == 5854 and {5853, 5854} <= set(cfg.all_ports())
    assert cfg.lab_id == "127-0-9-1-2143"
    with pytest.raises(ProfileError, match="out of range"):
        LabConfig(imap_port=60000)


def test_firewall_and_cpu_settings_are_checked():
    cfg = LabConfig(address="127.0.9.1", dns_port=6353, firewall_sessions=100)
    # the firewalled DNS port is the plain one + 1, bound (UDP and TCP) and checked like the others
    assert cfg.firewall_dns_port == 6354 and cfg.dns_ports() == [6353, 6354]
    assert 6354 in cfg.all_ports()
    assert LabConfig().firewall_dns_port is None and LabConfig().dns_ports() == [5353]
    with pytest.raises(ProfileError, match="collide"):
        LabConfig(dns_port=1142, firewall_sessions=10)  # 1143 is IMAP
    for bad in ({"firewall_sessions": -1}, {"firewall_udp_timeout_s": 0},
                {"firewall_udp_timeout_s": "30"}, {"dns_cpu": -0.5}, {"proxy_cpu": 0.001}, {"dns_cpu": 0.005},
                {"dns_cpu": 65}):
        with pytest.raises(ProfileError):
            LabConfig(**bad)
    assert LabConfig(dns_cpu=0.02).dns_cpu == 0.02  # a longer CFS period keeps the kernel's 1 ms quota


def test_a_small_cpu_quota_lengthens_the_period_to_keep_the_kernels_1ms_minimum():
    from loadkit.lab.cgroups import CPU_PERIOD_US, cpu_period_us

    assert cpu_period_us(0.25) == CPU_PERIOD_US == 10_000  # 2.5 ms a 10 ms period
    assert cpu_period_us(0.1) == 10_000  # 1 ms a 10 ms period: the smallest at that period
    assert cpu_period_us(0.02) == 50_000 and cpu_period_us(0.01) == 100_000  # 1 ms a period
    assert cpu_period_us(0.0001) == 1_000_000  # the kernel's longest period


def test_firewall_ruleset_keys_sessions_by_client_address_and_port():
    from loadkit.lab import firewall

    v4 = firewall.ruleset(LabConfig(address="127.0.9.1", firewall_sessions=500,
                                    firewall_udp_timeout_s=2.5))
    assert "table ip loadkit_fw_127_0_9_1_5354 {" in v4
    assert "size 500" in v4 and "timeout 2500ms" in v4 and "flags dynamic,timeout" in v4
    assert "gc-interval 125ms" in v4  # expired entries leave within a twentieth of the timeout
    # only the firewalled port is filtered; known flows are refreshed, new ones admitted or counted
    assert "ip daddr 127.0.9.1 udp dport 5354 update @sessions { ip saddr . udp sport } accept" in v4
    assert "ip daddr 127.0.9.1 udp dport 5354 counter name new_flow_drops drop" in v4
    v6 = firewall.ruleset(LabConfig(address="::1", firewall_sessions=5))
    assert "table ip6 " in v6 and "ipv6_addr . inet_service" in v6 and "ip6 saddr . udp sport" in v6


def test_firewall_table_reading_parses_nft_json():
    from loadkit.observe import firewall as observed

    doc = [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "ip", "name": "loadkit_fw_x"}},
        {"counter": {"family": "ip", "name": "new_flow_drops", "table": "loadkit_fw_x",
                     "packets": 50, "bytes": 1450}},
        {"set": {"family": "ip", "name": "sessions", "table": "loadkit_fw_x", "size": 50,
                 "timeout": 5, "elem": [{"elem": {"val": {"concat": ["127.0.0.1", p]},
                                                 "expires": 4}} for p in range(1024, 1054)]}},
    ]
    assert observed.parse_table(doc, "ip", "loadkit_fw_x") == observed.FirewallReading(
        "ip", "loadkit_fw_x", 30, 50, 50, 5.0)
    with pytest.raises(ValueError, match="no set"):
        observed.parse_table(doc[:3], "ip", "loadkit_fw_x")


def test_cpu_quota_v1_and_v2_trees(tmp_path, monkeypatch):
    from loadkit.lab import cgroups

    monkeypatch.setattr(cgroups.os, "geteuid", lambda: 0)  # a canned tree: no privilege needed

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (v2 / "cgroup.subtree_control").write_text("memory")
    for d in ("loadkit", "loadkit/lab-1"):
        (v2 / d).mkdir()
        (v2 / d / "cgroup.subtree_control").write_text("")
    assert cgroups.detect_cpu(v2)[:2] == (2, v2)
    path = cgroups.create_cpu(2, v2, "lab-1", "unbound", 0.25)
    assert (path / "cpu.max").read_text() == f"{cgroups.CPU_PERIOD_US // 4} {cgroups.CPU_PERIOD_US}"
    assert (v2 / "loadkit" / "cgroup.subtree_control").read_text() == "+cpu"
    assert cgroups.cpu_quota_cores(2, path) == 0.25
    assert (path / "cpu.weight").read_text() == str(cgroups.CPU_WEIGHT_V2)  # its quota first
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cgroups.detect_cpu(v1)[:2] == (1, v1 / "cpu")
    path = cgroups.create_cpu(1, v1 / "cpu", "lab-1", "proxy1", 1.5)
    assert (path / "cpu.cfs_quota_us").read_text() == str(int(1.5 * cgroups.CPU_PERIOD_US))
    assert cgroups.cpu_quota_cores(1, path) == 1.5
    assert (path / "cpu.shares").read_text() == str(cgroups.CPU_SHARES_V1)
    assert cgroups.cpu_quota_cores(None, path) is None
