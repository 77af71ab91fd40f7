"""The load side's /metrics on a headless run (``--metrics-listen``; a lab run scrapes it in
``test_latency``), and failure labels that stay one series per message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadkit.plugin.metrics_route import LABEL_MAX_CHARS, failure_label

ROOT = Path(__file__).parent.parent


def test_metrics_listen_beyond_loopback_is_one_line_before_any_load(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "locustfiles" / "dns_burst.py"), "--headless",
           "-u", "1", "-r", "1", "-t", "2s", "--host", "127.0.0.1:9", "--dns-names-file", str(tmp_path / "n.txt"),
           "--metrics-listen", "0.0.0.0:9646"]
    (tmp_path / "n.txt").write_text("a.lab.test.\n")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    [line] = [ln for ln in res.stderr.splitlines() if ln.startswith("loadkit: error:")]
    assert "--metrics-listen 0.0.0.0:9646: only a loopback address" in line and "Traceback" not in res.stderr
    cmd[cmd.index("0.0.0.0:9646")] = "localhost:abc"
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--metrics-listen 'localhost:abc' is not HOST:PORT" in res.stderr


def test_long_failure_messages_that_share_their_start_stay_two_series() -> None:
    start = "x" * 200
    a, b = failure_label(start + "first"), failure_label(start + "second")
    assert a != b and len(a) == len(b) == LABEL_MAX_CHARS
    assert failure_label("timeout") == "timeout"  # a short class is itself
