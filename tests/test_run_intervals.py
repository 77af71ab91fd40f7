"""Locust's cumulative stats -> per-interval rows (the recording plugin's arithmetic).

Run in a child interpreter: importing Locust monkey-patches the process that imports it.
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json
from locust.stats import RequestStats
from loadkit.plugin.recorder import failure_intervals, request_intervals
from loadkit.schema import Failure

stats = RequestStats()
prev, prev_f, out = {}, {}, {}
for ms in [10] * 90 + [200] * 9 + [1000]:
    stats.log_request("DNS", "A", ms, 0)
for _ in range(3):
    stats.log_error("DNS", "A", Failure("timeout"))
stats.log_request("IMAP", "LOGIN", 5, 0)
out["first"] = [r._asdict() for r in request_intervals(stats.entries, prev, 100.0, 1.0)]
out["first_f"] = [r._asdict() for r in failure_intervals(stats.errors, prev_f, 100.0, 1.0)]
for ms in [20] * 10:
    stats.log_request("DNS", "A", ms, 0)
stats.log_error("DNS", "A", Failure("servfail"))
out["second"] = [r._asdict() for r in request_intervals(stats.entries, prev, 101.0, 1.0)]
out["second_f"] = [r._asdict() for r in failure_intervals(stats.errors, prev_f, 101.0, 1.0)]
out["idle"] = [r._asdict() for r in request_intervals(stats.entries, prev, 102.0, 1.0)]
stats.reset_all()
stats.log_request("DNS", "A", 30, 0)
out["after_reset"] = [r._asdict() for r in request_intervals(stats.entries, prev, 103.0, 1.0)]
print(json.dumps(out))
"""


def test_interval_rows_are_deltas_with_percentiles_from_the_histogram_delta() -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    first = {r["name"]: r for r in out["first"]}
    a = first["A"]
    assert (a["requests_n"], a["failures_n"], a["request_type"]) == (100, 3, "DNS")
    assert a["latency_p50_s"] == 0.01 and a["latency_p95_s"] == 0.2 and a["latency_max_s"] == 1.0
    assert a["latency_mean_s"] == (90 * 10 + 9 * 200 + 1000) / 100 / 1000
    assert first["LOGIN"]["requests_n"] == 1
    assert [(f["failure_class"], f["failures_n"]) for f in out["first_f"]] == [("timeout", 3)]
    # the second interval holds only what happened since the first
    [b] = out["second"]
    assert (b["name"], b["requests_n"], b["failures_n"]) == ("A", 10, 1)
    assert b["latency_p50_s"] == b["latency_p99_s"] == b["latency_max_s"] == 0.02
    assert [(f["failure_class"], f["failures_n"]) for f in out["second_f"]] == [("servfail", 1)]
    assert out["idle"] == []  # an interval without requests writes no rows
    [c] = out["after_reset"]  # Locust reset its stats: counting starts again from zero
    assert c["requests_n"] == 1 and c["latency_p50_s"] == 0.03


def test_status_line_shows_offered_answered_failures_and_target_memory() -> None:
    from loadkit.run.runner import format_status

    line = format_status({
        "elapsed_s": 3.2, "users": 5, "workers": 2, "requests_n": 100, "failures_n": 3,
        "failures_by_class": {"timeout": 3}, "memory": {"p1": [50, 100], "unbound": [115 * 2**20, 0]},
        "counters": {"dns.original_sent": 90, "dns.retry_sent": 10, "dns.answered": 97},
        "abort": {"reason": "cgroup_memory_fraction"},
    })
    assert line == ("[   3.2s]  users 5  workers 2  offered 100 answered 97  failures 3 (timeout 3)  "
                    "memory p1 50% unbound 115MiB  ABORT cgroup_memory_fraction")
    # without DNS counters, offered/answered come from Locust's requests and failures
    assert "offered 10 answered 8" in format_status({"requests_n": 10, "failures_n": 2})
