"""Every load loop stops by itself: the recording plugin caps a test's length even without -t."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCUST = str(Path(sys.executable).with_name("locust"))
# a closed loopback port: queries are refused by the kernel, nothing listens
ARGS = ["-f", str(ROOT / "locustfiles" / "dns_burst.py"), "--headless", "--host", "127.0.0.1:9",
        "--dns-rate", "20", "--dns-burst-size", "0"]


def _names(tmp_path: Path) -> str:
    p = tmp_path / "names.txt"
    p.write_text("a.lab.test\nb.lab.test\n")
    return str(p)


def test_a_test_without_run_time_stops_at_the_cap(tmp_path):
    # without the cap this locust would run until the 120 s timeout and raise TimeoutExpired
    res = subprocess.run([LOCUST, *ARGS, "--dns-names-file", _names(tmp_path), "--max-run-time", "2s"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "reached the safety cap --max-run-time" in res.stderr
    assert "Traceback" not in res.stderr


def test_run_time_longer_than_the_cap_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([LOCUST, *ARGS, "--dns-names-file", _names(tmp_path), "-t", "3h"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert errors == ["loadkit: error: -t 10800s is longer than the safety cap --max-run-time 1h; "
                      "raise the cap if this target can take it"]


def test_a_bad_cap_is_one_line(tmp_path):
    res = subprocess.run([LOCUST, *ARGS, "--dns-names-file", _names(tmp_path), "--max-run-time", "soon"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "--max-run-time 'soon' is not a duration" in res.stderr and "Traceback" not in res.stderr
