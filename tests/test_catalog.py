"""The catalog (`loadkit runs list | show`) over run records written with RunWriter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadkit.cli import main
from loadkit.errors import RecordError
from loadkit.record.catalog import find_run, list_runs, show_run
from loadkit.record.writer import RunWriter
from loadkit.schema import FailureInterval, RequestInterval


def make_run(runs: Path, run_id: str, scenario: str, release: str, started: float,
             requests: list[tuple[int, int]], status: str = "completed", gates: list | None = None) -> Path:
    w = RunWriter(runs / run_id)
    w.start(run_id, scenario, release, profile={"scenario": scenario}, targets=["udp://127.0.0.1:5353"],
            started_unix_s=started)
    for i, (n, f) in enumerate(requests):
        ts = started + i + 1
        w.add(RequestInterval(ts, 1.0, "DNS", "A", n, f, 0.001, 0.001, 0.002, 0.003, 0.004, 0.01))
        if f:
            w.add(FailureInterval(ts, 1.0, "DNS", "A", "timeout", f))
        w.flush()  # one part per interval, as a run writes them
    if status != "running":
        w.finish(status, ended_unix_s=started + len(requests) + 1)
    if gates is not None:
        w.update_manifest(gates=gates)
    if status == "aborted":
        w.event("abort", "proxy1", {"reason": "cgroup_memory_fraction"})
    return w.run_dir


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    make_run(d, "20260101T000000-smoke-aaaa", "smoke", "r1", 1000.0, [(100, 0), (200, 1)],
             gates=[{"name": "failure_ratio", "passed": True, "value": 0.003, "limit": 0.01, "detail": ""}])
    make_run(d, "20260102T000000-smoke-bbbb", "smoke", "r2", 2000.0, [(50, 5)],
             gates=[{"name": "failure_ratio", "passed": False, "value": 0.1, "limit": 0.01, "detail": ""}])
    make_run(d, "20260103T000000-storm-cccc", "burst_retry_storm", "r2", 3000.0, [(10, 0)], status="aborted")
    make_run(d, "20260104T000000-storm-dddd", "burst_retry_storm", "r2", 4000.0, [(7, 7)], status="running")
    (d / "not-a-run").mkdir()  # ignored: no manifest
    return d


def test_list_sums_requests_per_run_with_duckdb_and_sorts_by_start(runs: Path) -> None:
    table = list_runs(runs)
    assert list(table["run_id"].str[-4:]) == ["aaaa", "bbbb", "cccc", "dddd"]
    assert list(table["requests_n"]) == [300, 50, 10, 7]
    assert list(table["failures_n"]) == [1, 5, 0, 7]
    assert list(table["status"]) == ["completed", "completed", "aborted", "running"]
    assert list(table["gates"][:3]) == ["pass 1/1", "FAIL failure_ratio", "-"]
    assert table["duration_s"][0] == 3.0 and table["duration_s"].isna()[3]


def test_list_filters_by_release_and_scenario(runs: Path) -> None:
    assert list(list_runs(runs, release="r2")["run_id"].str[-4:]) == ["bbbb", "cccc", "dddd"]
    assert list(list_runs(runs, scenario="smoke")["run_id"].str[-4:]) == ["aaaa", "bbbb"]
    assert list(list_runs(runs, scenario="smoke", release="r2")["run_id"].str[-4:]) == ["bbbb"]
    assert list_runs(runs, release="nope").empty


def test_show_gives_per_name_totals_failures_and_events(runs: Path) -> None:
    info = show_run("20260101T000000-smoke", runs)  # a unique prefix will do
    assert info["manifest"]["release"] == "r1"
    row = info["requests"].iloc[0]
    assert (row["request_type"], row["name"], row["requests_n"], row["failures_n"]) == ("DNS", "A", 300, 1)
    assert info["failures"].iloc[0]["failure_class"] == "timeout"
    aborted = show_run(str(runs / "20260103T000000-storm-cccc"), runs)  # a path will do
    assert aborted["event_counts"]["abort"] == 1 and aborted["notable_events"][0]["source"] == "proxy1"


def test_catalog_does_not_import_locust() -> None:
    import subprocess
    import sys

    code = ("import sys, loadkit.record.catalog, loadkit.record.writer, loadkit.run.runner; "
            "print('locust' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stderr  # Locust monkey-patches whoever imports it


def test_find_run_errors_are_one_line(runs: Path, tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="ambiguous"):
        find_run("2026010", runs)
    with pytest.raises(RecordError, match="no run 'zzz'"):
        find_run("zzz", runs)
    with pytest.raises(RecordError, match="does not exist"):
        list_runs(tmp_path / "nowhere")


def test_cli_list_and_show(runs: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", "list", "--dir", str(runs), "--scenario", "smoke"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "FAIL failure_ratio" in out[2] and "storm" not in "".join(out)
    assert main(["runs", "list", "--dir", str(runs), "--json", "--release", "r1"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["requests_n"] == 300
    assert main(["runs", "show", "20260102", "--dir", str(runs)]) == 0
    text = capsys.readouterr().out
    assert "release r2" in text and "failure_ratio: 0.1 (limit <= 0.01) FAIL" in text
    assert main(["runs", "show", "zzz", "--dir", str(runs)]) == 2
    assert capsys.readouterr().err.startswith("loadkit: error: no run 'zzz'")
