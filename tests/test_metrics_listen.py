"""The load side's /metrics on a headless run (``--metrics-listen``), and failure labels that stay
one series per message."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loadkit.plugin.metrics_route import LABEL_MAX, failure_label

ROOT = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.lab
def test_a_headless_run_serves_its_metrics_where_asked_and_stops_serving_at_the_end(lab, tmp_path: Path) -> None:
    host, port = lab.dns
    listen = _free_port()
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "locustfiles" / "dns_burst.py"), "--headless",
           "-u", "1", "-r", "1", "-t", "6s", "--host", f"{host}:{port}", "--dns-names-file", str(lab.names_file),
           "--dns-rate", "200", "--metrics-listen", f"127.0.0.1:{listen}", "--stop-timeout", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    offered = 0.0
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None and offered <= 0:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{listen}/metrics", timeout=2).read().decode()
                offered = next((float(line.split()[-1]) for line in text.splitlines()
                                if line.startswith("loadkit_dns_offered_total ")), 0.0)
            except OSError:
                pass  # not listening yet
            time.sleep(0.3)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert offered > 0, "the load side's offered counter was scraped while the run went on"
    assert proc.returncode in (0, 1), err[-2000:]
    with pytest.raises(OSError):  # and the server went with the run
        urllib.request.urlopen(f"http://127.0.0.1:{listen}/metrics", timeout=2)


def test_metrics_listen_beyond_loopback_is_one_line_before_any_load(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "locustfiles" / "dns_burst.py"), "--headless",
           "-u", "1", "-r", "1", "-t", "2s", "--host", "127.0.0.1:9", "--dns-names-file", str(tmp_path / "n.txt"),
           "--metrics-listen", "0.0.0.0:9646"]
    (tmp_path / "n.txt").write_text("a.lab.test.\n")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    [line] = [ln for ln in res.stderr.splitlines() if ln.startswith("loadkit: error:")]
    assert "--metrics-listen 0.0.0.0:9646: only a loopback address" in line and "Traceback" not in res.stderr


def test_long_failure_messages_that_share_their_start_stay_two_series() -> None:
    start = "x" * 200
    a, b = failure_label(start + "first"), failure_label(start + "second")
    assert a != b and len(a) == len(b) == LABEL_MAX
    assert failure_label("timeout") == "timeout"  # a short class is itself
