"""Aggregated injection into Locust's stats: same figures as one event per request."""

from __future__ import annotations

import random

import pytest
from locust.env import Environment
from locust.stats import RequestStats, StatsEntry

from loadkit.generate.locust_stats import inject
from loadkit.schema import Failure


def per_event(stats: RequestStats, method: str, name: str, latencies_ms, failures) -> None:
    for ms in latencies_ms:
        stats.log_request(method, name, ms, 0)
    for cls, n in failures.items():
        for _ in range(n):
            stats.log_error(method, name, Failure(cls))


def test_inject_matches_per_request_logging() -> None:
    rng = random.Random(1)
    latencies_ms = [rng.choice([0, 1, 2, 3, 15, 150, 980, 2000]) for _ in range(5000)]
    failures = {"timeout": 40, "servfail": 7}
    ref = Environment().stats
    per_event(ref, "DNS", "A", latencies_ms, failures)

    env = Environment()
    pairs: dict[int, int] = {}
    for ms in latencies_ms:
        pairs[ms] = pairs.get(ms, 0) + 1
    n = inject(env, "DNS", "A", [(ms / 1000, c) for ms, c in pairs.items()], failures)
    assert n == 5000
    got, want = env.stats.get("A", "DNS"), ref.get("A", "DNS")
    for entry_got, entry_want in ((got, want), (env.stats.total, ref.total)):
        assert entry_got.num_requests == entry_want.num_requests
        assert entry_got.num_failures == entry_want.num_failures
        assert dict(entry_got.response_times) == dict(entry_want.response_times)
        assert entry_got.total_response_time == pytest.approx(entry_want.total_response_time)
        assert entry_got.min_response_time == entry_want.min_response_time
        assert entry_got.max_response_time == entry_want.max_response_time
        for q in (0.5, 0.95, 0.99):
            assert entry_got.get_response_time_percentile(q) == entry_want.get_response_time_percentile(q)
    errors = {e.error.failure_class: e.occurrences for e in env.stats.errors.values()}
    assert errors == failures
    assert {repr(e.error) for e in env.stats.errors.values()} == {repr(e.error) for e in ref.errors.values()}


def test_inject_keeps_sub_millisecond_means_and_serializes_for_the_master() -> None:
    env = Environment()
    inject(env, "DNS", "AAAA", [(0.00005, 1000)], {}, min_s=0.00004, max_s=0.0002, total_s=0.06)
    entry = env.stats.get("AAAA", "DNS")
    assert entry.avg_response_time == pytest.approx(0.06)  # ms: 60 µs average, not 0
    assert entry.min_response_time == pytest.approx(0.04)
    # the worker-to-master path: serialise, then extend a fresh entry on the "master"
    data = entry.get_stripped_report()
    master_stats = RequestStats()
    master = StatsEntry(master_stats, "AAAA", "DNS")
    master.extend(StatsEntry.unserialize(data, master_stats))
    assert master.num_requests == 1000 and master.response_times[0] == 1000
    assert inject(env, "DNS", "AAAA", [], {}) == 0


def test_an_unsupported_locust_stops_a_locustfile_with_one_line(tmp_path) -> None:
    # Locust 3.1.0 as the installed version: the DNS locustfile's install refuses it in one line
    # and exit status 2 (importing the module that writes Locust's internals no longer raises)
    import subprocess
    import sys
    from pathlib import Path

    locustfile = Path(__file__).resolve().parents[1] / "locustfiles" / "dns_burst.py"
    script = ("import importlib.metadata as m, sys\n"
              "real = m.version\n"
              "m.version = lambda name: '3.1.0' if name == 'locust' else real(name)\n"
              "from locust.main import main\n"
              f"sys.argv = ['locust', '-f', {str(locustfile)!r}, '--headless', '-t', '1s']\n"
              "main()\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if "MonkeyPatchWarning" not in line and "monkey.patch_all" not in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [line for line in lines if line.startswith("loadkit: error: ")] == [
        line for line in lines if line.strip()], proc.stderr
    assert "Locust 3.1.0 is not supported" in proc.stderr and ">=2.30,<3" in proc.stderr
