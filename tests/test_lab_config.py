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
    assert len(set(cfg.all_ports())) == len(cfg.all_ports()) == 3 + 2 + 4
    assert cfg.lab_id == "127-0-9-1-2143"
    with pytest.raises(ProfileError, match="out of range"):
        LabConfig(imap_port=60000)
