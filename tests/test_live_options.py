"""Abort and collector options act on plain ``locust -f`` runs, without ``--record-dir``.

Without a record the thresholds are checked on the same figures (the failure ratio per
``--record-interval``, a group's cgroup memory per collector sample) and an abort is a warning
line that stops the test; an option that cannot act stops the run at start with one line.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAP_STORM = REPO / "locustfiles" / "imap_storm.py"


def _refusing_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accounts(tmp_path: Path) -> Path:
    p = tmp_path / "accounts.csv"
    p.write_text("user,password\nu1,p1\nu2,p2\n")
    return p


def _locust(tmp_path: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(IMAP_STORM), "--headless", "--only-summary", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=timeout_s,
    )


def test_failure_ratio_abort_stops_a_plain_run_without_a_record(tmp_path: Path) -> None:
    port = _refusing_port()
    proc = _locust(tmp_path, "-u", "4", "-r", "4", "-t", "60s", "--host", f"127.0.0.1:{port}",
                   "--mail-accounts", str(_accounts(tmp_path)), "--abort-failure-ratio", "0.5",
                   "--abort-min-requests", "4", "--record-interval", "0.5")
    out = proc.stdout + proc.stderr
    # the abort's reason is logged, and the run ended by it, not by its run time
    assert "aborting run: failure_ratio on requests" in out, out[-2000:]
    assert "'threshold': 0.5" in out
    assert "--run-time limit reached" not in out
    assert "conn_refused" in out  # the failures the ratio counted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accounts.csv"]  # no record written


def test_memory_abort_without_a_collector_stops_at_start_in_one_line(tmp_path: Path) -> None:
    proc = _locust(tmp_path, "-u", "1", "-t", "5s", "--host", f"127.0.0.1:{_refusing_port()}",
                   "--mail-accounts", str(_accounts(tmp_path)), "--abort-cgroup-memory-fraction", "0.9")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == ["loadkit: error: --abort-cgroup-memory-fraction needs a collector to read the memory "
                      "from: --collect-group NAME=cgroup:PATH or --collector URL"]
    assert "conn_refused" not in proc.stdout + proc.stderr  # nothing was sent


def test_a_bad_collect_group_stops_at_start_not_mid_run(tmp_path: Path) -> None:
    proc = _locust(tmp_path, "-u", "1", "-t", "5s", "--host", f"127.0.0.1:{_refusing_port()}",
                   "--mail-accounts", str(_accounts(tmp_path)), "--collect-group", "dns=cmdline:unbound(lab")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("loadkit: error: group 'dns=cmdline:unbound(lab'")
    assert "is not a regular expression" in errors[0]


def test_the_collector_samples_and_shows_on_a_plain_run_without_a_record(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(IMAP_STORM), "--headless", "-u", "1", "-r", "1", "-t", "6s",
         "--host", f"127.0.0.1:{_refusing_port()}", "--mail-accounts", str(_accounts(tmp_path)),
         "--collect-group", "me=cmdline:pytest", "--collect-interval", "0.5"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("target: [")]
    assert lines and " me " in lines[-1] and "rss " in lines[-1], proc.stdout[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accounts.csv"]  # no record written
