"""The incident on the lab: proxies in small memory cgroups under a held-session storm.

A proxy holds one login process per session, so its cgroup charge grows with the sessions it
holds until the limit. With the OOM killer on, the kernel kills login processes and their
clients see EOF; with it disabled (``oom_kill=False``, cgroup v1) the proxy stalls at its limit
or its master exits, and either way haproxy's health check marks it DOWN.
"""

from __future__ import annotations

import csv
import imaplib
import time
from pathlib import Path

import pytest

from loadkit.lab import Lab

pytestmark = pytest.mark.lab

MiB = 1024 * 1024
#: small enough that ~20 held sessions fill it (about 1.2 MiB per session plus the master)
SMALL_LIMIT = 32 * MiB


def _storm(status, max_sessions=80):
    """Hold IMAP sessions through haproxy until logins fail; return (held, failures)."""
    with open(status.accounts_file, newline="") as f:
        accounts = [(r["user"], r["password"]) for r in csv.DictReader(f)]
    held, failures = [], []
    for user, password in accounts[:max_sessions]:
        try:
            m = imaplib.IMAP4(status.imap.host, status.imap.port, timeout=3)
            m.login(user, password)
            held.append(m)
        except (OSError, imaplib.IMAP4.error) as err:
            failures.append(err)
            if len(failures) >= 3:
                break
    return held, failures


def _still_alive(m):
    try:
        return m.noop()[0] == "OK"
    except (OSError, imaplib.IMAP4.abort, imaplib.IMAP4.error):
        return False


def _close(held):
    for m in held:
        try:
            m.shutdown()
        except OSError:
            pass


def _skip_without_cgroups(status):
    if not status.cgroups.enabled:
        pytest.skip(f"no memory cgroups here: {status.cgroups.reason}")


def test_oom_killer_kills_login_processes(make_lab):
    status = make_lab(proxies=1, proxy_memory_bytes=SMALL_LIMIT, accounts=100, dns_names=100)
    _skip_without_cgroups(status)
    assert status.proxies[0].limit_bytes == SMALL_LIMIT
    held, failures = _storm(status)
    try:
        after = Lab.from_dir(status.dir).status().proxies[0]
        # the storm went past the limit: the kernel hit it and killed processes in the group
        assert after.failcnt > 0
        assert after.oom_kills is None or after.oom_kills > 0
        # the victims' clients see EOF: a login in the storm or a session it already held
        dead = [m for m in held if not _still_alive(m)]
        assert failures or dead, "no session failed although the proxy is over its memory limit"
        assert after.up  # the master survives; its login processes were the victims
        assert after.memory_bytes <= SMALL_LIMIT
    finally:
        _close(held)


def test_without_oom_killer_the_proxy_stalls_and_haproxy_marks_it_down(make_lab):
    status = make_lab(proxies=1, proxy_memory_bytes=SMALL_LIMIT, oom_kill=False,
                      accounts=100, dns_names=100)
    _skip_without_cgroups(status)
    if status.cgroups.version == 1:
        cg = Path(status.proxies[0].cgroup)
        assert "oom_kill_disable 1" in (cg / "memory.oom_control").read_text()
        assert "OOM killer disabled" in status.cgroups.reason
    held, failures = _storm(status)
    try:
        assert failures
        # haproxy checks every second and needs two failures (~3 s); a loaded machine runs its
        # checks late, so the wait is generous (it ends as soon as the proxy is down)
        deadline = time.monotonic() + 30
        while True:
            proxy = Lab.from_dir(status.dir).status().proxies[0]
            if proxy.haproxy_state == "DOWN" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert proxy.haproxy_state == "DOWN"
        # it hit the limit and nothing was killed to make room: the proxy either stalls at the
        # limit or its dovecot master gives up and exits (both seen here, timing-dependent)
        assert proxy.failcnt > 0
        assert (not proxy.up) or proxy.memory_bytes > 0.9 * SMALL_LIMIT, proxy
        if status.cgroups.version == 1:
            assert proxy.oom_kills in (0, None)
    finally:
        _close(held)
    # down copes with a proxy stalled at its limit: nothing left, cgroup gone
    lab = Lab.from_dir(status.dir)
    lab.down()
    assert not Path(status.proxies[0].cgroup).exists()
    assert not lab.status().components
