"""Locust's cumulative stats -> per-interval rows (the recording plugin's arithmetic).

Run in a child interpreter: importing Locust monkey-patches the process that imports it.
"""

from __future__ import annotations

import json
import subprocess
import sys

from loadkit.schema import latency_bucket, latency_bucket_upper_s

SCRIPT = r"""
import json
from locust.stats import RequestStats
from loadkit.plugin.recorder import failure_intervals, interval_rows, request_intervals
from loadkit.schema import Failure

stats = RequestStats()
prev, prev_f, out = {}, {}, {}
for ms in [10] * 90 + [200] * 9 + [1000]:
    stats.log_request("DNS", "A", ms, 0)
for _ in range(3):
    stats.log_error("DNS", "A", Failure("timeout"))
stats.log_request("IMAP", "LOGIN", 5, 0)
rows, lat = interval_rows(stats.entries, prev, 100.0, 1.0)
out["first"] = [r._asdict() for r in rows]
out["first_lat"] = [b._asdict() for b in lat]
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


def _edge(latency_s: float) -> float:
    """The upper edge of the log bucket that holds ``latency_s``."""
    return latency_bucket_upper_s(latency_bucket(latency_s))


def test_interval_rows_are_deltas_with_percentiles_from_the_histogram_delta() -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    first = {r["name"]: r for r in out["first"]}
    a = first["A"]
    assert (a["requests_n"], a["failures_n"], a["request_type"]) == (100, 3, "DNS")
    # percentiles: Locust's rounded key at the top of its rounding step (10 ms holds up to 10.5 ms,
    # 200 ms up to 205 ms), at its log bucket's upper edge: never below what Locust was told
    assert a["latency_p50_s"] == _edge(0.0105) and a["latency_p95_s"] == _edge(0.205)
    assert 0.01 < a["latency_p50_s"] <= 0.0105 * 1.045
    assert a["latency_max_s"] == 1.0
    assert a["latency_mean_s"] == (90 * 10 + 9 * 200 + 1000) / 100 / 1000
    assert first["LOGIN"]["requests_n"] == 1
    assert [(f["failure_class"], f["failures_n"]) for f in out["first_f"]] == [("timeout", 3)]
    # the latency table holds the same requests, bucket by bucket
    buckets = {(r["name"], r["bucket_index"]): r["count_n"] for r in out["first_lat"]}
    assert sum(n for (name, _), n in buckets.items() if name == "A") == 100
    assert buckets[("A", latency_bucket(0.0105))] == 90 and buckets[("LOGIN", latency_bucket(0.0055))] == 1
    assert {r["source"] for r in out["first_lat"]} == {"locust"}
    # the second interval holds only what happened since the first
    [b] = out["second"]
    assert (b["name"], b["requests_n"], b["failures_n"]) == ("A", 10, 1)
    assert b["latency_p50_s"] == b["latency_p99_s"] == _edge(0.0205) and b["latency_max_s"] == 0.02
    assert [(f["failure_class"], f["failures_n"]) for f in out["second_f"]] == [("servfail", 1)]
    assert out["idle"] == []  # an interval without requests writes no rows
    [c] = out["after_reset"]  # Locust reset its stats: counting starts again from zero
    assert c["requests_n"] == 1 and c["latency_p50_s"] == _edge(0.0305)


FINE_SCRIPT = r"""
import json
from locust.stats import RequestStats
from loadkit.generate.dns.histogram import LatencyHistogram
from loadkit.plugin.recorder import interval_rows

stats = RequestStats()
fine = LatencyHistogram()
for s in [50e-6] * 98 + [1.0005, 3.0]:
    stats.log_request("DNS", "A", s * 1000, 0)
    fine.add(s)
rows, buckets = interval_rows(stats.entries, {}, 100.0, 1.0, {("DNS", "A"): fine})
print(json.dumps({"rows": [r._asdict() for r in rows], "buckets": [b._asdict() for b in buckets]}))
"""


def test_a_generators_fine_histogram_gives_the_rows_percentiles_and_buckets() -> None:
    res = subprocess.run([sys.executable, "-c", FINE_SCRIPT], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    [row] = out["rows"]
    assert {b["source"] for b in out["buckets"]} == {"fine"}
    assert sum(b["count_n"] for b in out["buckets"]) == 100
    # microseconds, not Locust's whole milliseconds; the retried 1.0005 s answer is not hidden
    assert 50e-6 <= row["latency_p50_s"] <= 50e-6 * 1.045
    assert 1.0005 <= row["latency_p99_s"] <= 1.0005 * 1.045
    assert row["latency_max_s"] == 3.0


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
