"""One p99 everywhere: the latency table of a run record, its percentiles, the gates and `runs show`.

Synthetic records are written through RunWriter; the lab tests make real runs with `loadkit run`
(DNS) and plain `locust -f ... --record-dir` (IMAP) and compare every figure of the same run.
"""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loadkit.record import latency
from loadkit.record.catalog import show_run
from loadkit.record.reader import load_run
from loadkit.record.writer import RunWriter
from loadkit.run.gates import evaluate
from loadkit.schema import (
    LATENCY_BUCKET_ERROR,
    LatencyBucket,
    RequestInterval,
    latency_bucket,
    latency_bucket_upper_s,
    nearest_rank,
)

ROOT = Path(__file__).parent.parent


def _write_run(run_dir: Path, intervals: list[tuple[float, str, str, list[float]]]) -> Path:
    """A run with one RequestInterval and its LatencyBucket rows per (ts, type, name, latencies)."""
    w = RunWriter(run_dir)
    w.start(run_dir.name, "synthetic", "r1", started_unix_s=1000.0)
    for ts, request_type, name, samples in intervals:
        counts: dict[int, int] = {}
        for s in samples:
            counts[latency_bucket(s)] = counts.get(latency_bucket(s), 0) + 1
        w.add(RequestInterval(ts, 1.0, request_type, name, len(samples), 0, 0, 0, 0, 0, 0, max(samples)))
        for b, c in sorted(counts.items()):
            w.add(LatencyBucket(ts, 1.0, request_type, name, b, c, "fine"))
        w.flush()
    w.finish("completed", ended_unix_s=1000.0 + len(intervals) + 1)
    return run_dir


def test_a_one_second_retry_reads_above_one_second_and_fails_the_gate(tmp_path: Path) -> None:
    # 4.5 % of the queries answered after a 1 s timeout and a retry, the rest at 80 µs
    run_dir = _write_run(tmp_path / "r", [
        (1001.0, "DNS", "A", [80e-6] * 955 + [1.0005] * 45),
        (1002.0, "DNS", "A", [80e-6] * 1000),  # a quiet interval does not dilute the run's p99
    ])
    p99 = latency.percentile_s(run_dir, 0.99)
    assert 1.0005 <= p99 <= 1.0005 * (1 + LATENCY_BUCKET_ERROR)
    [gate] = evaluate(run_dir, {"p99_latency_s": 1.0})
    assert gate["passed"] is False and gate["value"] == p99
    assert "bucket upper edge" in gate["detail"] and "2,000 requests" in gate["detail"]
    # runs show gives the figure the gate compared, with the same words
    info = show_run(str(run_dir), tmp_path)
    assert info["latency"]["p99_s"] == p99 and info["latency"]["p99_label"] == gate["detail"]
    [row] = info["requests"].to_dict(orient="records")
    assert row["p99_s"] == p99 and row["latency_source"] == "fine"
    assert "worst_interval_p99_s" not in row  # no second p99 beside it


def test_windows_names_and_series(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "r", [
        (1001.0, "DNS", "A", [100e-6] * 100),
        (1001.0, "IMAP", "LOGIN", [0.05] * 10),
        (1001.0, "IMAP", "hold", [5.0] * 10),  # how long sessions were held: not a latency
        (1002.0, "DNS", "A", [2e-3] * 100),
        (1003.0, "DNS", "A", [100e-6] * 100),
    ])
    run = load_run(run_dir)
    edge = lambda s: latency_bucket_upper_s(latency_bucket(s))  # noqa: E731
    # the run as a RunData or a path: one computation either way
    assert latency.percentile_s(run, 0.5) == latency.percentile_s(run_dir, 0.5) == edge(100e-6)
    # the edge of the top bucket is capped at the window's exact maximum (one figure with the
    # generator's console line); a lower bucket keeps its edge
    assert latency.percentile_s(run, 0.99, request_type="IMAP") == 0.05 < edge(0.05)
    assert latency.percentile_s(run, 1.0) == 0.05 and latency.percentile(run, 0.5).requests_n == 310
    assert latency.percentile_s(run, 0.99, name="hold") == 5.0  # only when asked for by name
    assert latency.percentile_s(run, 0.99, name="A") == 2e-3
    # a window holds the intervals whose end falls in (start, end]
    assert latency.percentile_s(run, 0.99, start_unix_s=1001.0, end_unix_s=1002.0) == 2e-3
    assert latency.percentile_s(run, 0.99, start_unix_s=1002.0) == 100e-6
    nothing = latency.percentile(run, 0.99, start_unix_s=2000.0)
    assert nothing.value_s is None and "no requests" in nothing.label
    series = latency.percentile_series(run, 0.99, request_type="DNS")
    assert list(series["ts_unix_s"]) == [1001.0, 1002.0, 1003.0]
    assert list(series["requests_n"]) == [100, 100, 100]
    assert list(series["latency_s"]) == [100e-6, 2e-3, 100e-6]  # each interval capped at its own maximum
    by_name = latency.percentiles_by_name(run, (0.5, 0.99)).set_index("name")
    assert by_name.loc["A", "requests_n"] == 300 and by_name.loc["LOGIN", "p99_s"] == 0.05
    assert "hold" not in by_name.index
    with pytest.raises(ValueError):
        latency.percentile_s(run, 1.5)


def test_locust_keys_count_at_the_top_of_their_rounding_step() -> None:
    # Locust: whole ms below 100 ms, 10 ms below 1 s, 100 ms below 10 s, 1 s above
    assert [latency.locust_key_upper_s(k) for k in (0, 7, 99, 100, 990, 1000, 9900, 10000)] == [
        0.0005, 0.0075, 0.0995, 0.105, 0.995, 1.05, 9.95, 10.5]
    counts = latency.buckets_from_locust_ms({7: 3, 1000: 1, 5: 0})
    assert counts == {latency_bucket(0.0075): 3, latency_bucket(1.05): 1}
    # a key's whole step is below its bucket's upper edge: nothing under-reports
    for key in (0, 7, 99, 100, 150, 990, 1000, 4200, 10000, 59000):
        assert latency_bucket_upper_s(latency_bucket(latency.locust_key_upper_s(key))) > latency.locust_key_upper_s(key)


def test_a_run_recorded_before_the_latency_table_falls_back_to_locusts_csv(tmp_path: Path) -> None:
    w = RunWriter(tmp_path / "old")
    w.start("old", "smoke", "r0", started_unix_s=1000.0)
    w.add(RequestInterval(1001.0, 1.0, "DNS", "A", 10, 0, 0.001, 0.001, 0.001, 0.001, 0.98, 0.99))
    w.finish("completed", ended_unix_s=1002.0)
    # no CSV either: the gate is not evaluated and says why
    [gate] = evaluate(w.run_dir, {"p99_latency_s": 1.0})
    assert gate["passed"] is None and "no latency table" in gate["detail"]
    with (w.run_dir / "locust" / "locust_stats.csv").open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["Type", "Name", "Request Count", "50%", "99%"])
        out.writerow(["DNS", "A", "10", "1", "980"])
        out.writerow(["", "Aggregated", "10", "1", "980"])
    figure = latency.percentile(w.run_dir, 0.99)
    assert figure.value_s == 0.98 and figure.source == "locust_csv" and "from Locust's CSV" in figure.label
    assert latency.percentile_s(w.run_dir, 0.99, request_type="DNS", name="A") == 0.98
    assert latency.percentile(w.run_dir, 0.99, start_unix_s=1000.0).value_s is None  # no windows there
    [gate] = evaluate(w.run_dir, {"p99_latency_s": 1.0})
    assert gate["passed"] is True and "from Locust's CSV" in gate["detail"]
    info = show_run(str(w.run_dir), tmp_path)
    assert info["latency"]["p99_s"] == 0.98 and "p99_s" not in info["requests"].columns


# -- real runs against the lab ---------------------------------------------------------------------


def _loadkit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadkit", *args], capture_output=True, text=True,
                          timeout=timeout)


#: 300 q/s plus a 200-query burst every 2 s: gentle, over in a few seconds
DNS_OPTIONS = "dns-rate = 300, dns-burst-size = 200, dns-burst-period = 2, dns-first-burst = 1"


@pytest.mark.lab
@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "two-workers"])
def test_gate_runs_show_and_percentile_give_one_p99_for_a_real_dns_run(lab, tmp_path: Path, workers: int) -> None:
    host, port = lab.dns
    profile = tmp_path / "p.toml"
    profile.write_text(f"""
[run]
scenario = "p99"
release = "t"
duration = "4s"
[targets]
dns = "{host}:{port}"
[load]
locustfile = "{ROOT}/locustfiles/dns_burst.py"
host = "dns"
users = 1
spawn_rate = 1
options = {{ dns-names-file = "{lab.names_file}", {DNS_OPTIONS} }}
[gates]
p99_latency_s = 0.5
p50_latency_s = 0.5
""")
    out = tmp_path / "runs"
    res = _loadkit("run", str(profile), "--out", str(out), *(["--workers", str(workers)] if workers else []))
    assert res.returncode in (0, 1), res.stderr
    [run_dir] = list(out.iterdir())
    run = load_run(run_dir)
    # the DNS generator's µs histograms reached the record (from the workers, through the master)
    assert set(run.latency["source"]) == {"fine"}
    # the buckets hold exactly the requests the run counted
    assert int(run.latency["count_n"].sum()) == int(run.requests["requests_n"].sum()) > 0
    p99 = latency.percentile_s(run, 0.99)
    gates = {g["name"]: g for g in run.manifest["gates"]}
    assert gates["p99_latency_s"]["value"] == p99
    shown = _loadkit("runs", "show", str(run_dir), "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["latency"]["p99_s"] == p99 and info["latency"]["p50_s"] == gates["p50_latency_s"]["value"]
    text = _loadkit("runs", "show", str(run_dir)).stdout
    assert gates["p99_latency_s"]["detail"] in text  # the same label, word for word
    # loopback answers are microseconds: Locust's whole milliseconds would have said 0 or 1 ms
    assert latency.percentile_s(run, 0.5) < 1e-3


@pytest.mark.lab
def test_a_plain_dns_run_records_its_target_prints_the_p99_runs_show_gives_and_can_be_scraped(
        lab, tmp_path: Path) -> None:
    host, port = lab.dns
    listen = _free_port()
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "locustfiles" / "dns_burst.py"), "--headless",
           "-u", "1", "-r", "1", "-t", "4s", "--host", f"{host}:{port}", "--dns-names-file", str(lab.names_file),
           "--dns-rate", "300", "--dns-burst-size", "100", "--dns-burst-period", "2", "--dns-first-burst", "1",
           "--record-dir", str(tmp_path / "runs"), "--run-id", "plain", "--stop-timeout", "2",
           "--metrics-listen", f"127.0.0.1:{listen}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    offered = 0.0
    try:  # a headless run has no web UI: --metrics-listen serves the load side's /metrics
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None and offered <= 0:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{listen}/metrics", timeout=2).read().decode()
                offered = next((float(line.split()[-1]) for line in text.splitlines()
                                if line.startswith("loadkit_dns_offered_total ")), 0.0)
            except OSError:
                pass  # not listening yet
            time.sleep(0.3)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, 1), stderr[-2000:]
    assert offered > 0, "the load side's offered counter was scraped while the run went on"
    run = load_run(tmp_path / "runs" / "plain")
    # no profile named the target: the record names where the generator sent
    assert run.manifest["targets"] == [f"udp://{host}:{port}"]
    shown = _loadkit("runs", "show", str(tmp_path / "runs" / "plain"))
    assert f"udp://{host}:{port}" in shown.stdout
    # the console's fine-histogram line and runs show give one p99 (the console in whole µs)
    [line] = [ln for ln in stderr.splitlines() if "DNS answer latency (fine histogram)" in ln]
    console_us = float(line.split("p99<=")[1].split("us")[0])
    failures = int(run.requests["failures_n"].sum())
    recorded_us = latency.percentile_s(run, 0.99) * 1e6
    if failures == 0:
        assert abs(recorded_us - console_us) <= 0.5, line
    else:  # the console counts answers; the record counts failures' (longer) waits too
        assert recorded_us >= console_us - 0.5, (line, recorded_us)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Locust's own percentiles of each entry of a --json-file, computed by Locust in a child
#: interpreter (importing Locust monkey-patches the process that imports it)
LOCUST_PERCENTILES = r"""
import json, sys
from locust.stats import calculate_response_time_percentile
out = []
for e in json.load(open(sys.argv[1])):
    times = {int(k): v for k, v in e["response_times"].items()}
    out.append({"type": e["method"], "name": e["name"], "n": e["num_requests"],
                **{str(q): calculate_response_time_percentile(times, e["num_requests"], q) for q in (0.5, 0.95, 0.99)}})
print(json.dumps(out))
"""


@pytest.mark.lab
def test_a_mail_runs_buckets_agree_with_locusts_own_percentiles(lab, tmp_path: Path) -> None:
    host, port = lab.imap
    stats_json = tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "locustfiles" / "imap_storm.py"), "--headless",
           "-u", "20", "-r", "20", "-t", "4s", "--host", f"{host}:{port}", "--mail-accounts", str(lab.accounts_file),
           "--record-dir", str(tmp_path / "runs"), "--run-id", "mail",
           "--json-file", str(stats_json.with_suffix("")),  # Locust adds .json
           "--stop-timeout", "2", "--mail-dwell", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode in (0, 1), res.stderr[-2000:]
    run = load_run(tmp_path / "runs" / "mail")
    assert run.manifest["targets"] == [f"imap://{host}:{port}"]  # where the users logged in
    assert set(run.latency["source"]) == {"locust"}  # mail requests are timed by Locust
    res = subprocess.run([sys.executable, "-c", LOCUST_PERCENTILES, str(stats_json)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    entries = [e for e in json.loads(res.stdout) if e["n"] >= 20]
    assert entries, "the storm completed requests"
    for e in entries:
        for q in (0.5, 0.95, 0.99):
            locust_ms = e[str(q)]
            # Locust ranks int(q n) + 1 where we rank ceil(q n): asked for Locust's rank, the answer is
            # exactly the bucket of the top of the rounding step of Locust's key
            q_locust = min(1.0, (int(e["n"] * q) + 1) / e["n"])
            got = latency.percentile(run, q_locust, request_type=e["type"], name=e["name"])
            assert got.requests_n == e["n"] and got.source == "locust"
            top_s = latency.locust_key_upper_s(locust_ms)
            assert got.value_s == latency_bucket_upper_s(latency_bucket(top_s)), (e["name"], q, got)
            assert locust_ms / 1000.0 < got.value_s <= top_s * (1 + LATENCY_BUCKET_ERROR)


def test_a_rank_asked_back_as_k_over_n_is_rank_k_despite_floating_point() -> None:
    # 7/25*25 is 7.000000000000001 in floating point; a plain ceil made it rank 8, one bucket high
    assert nearest_rank(7 / 25, 25) == 7
    assert all(nearest_rank(k / n, n) == k for n in range(1, 500) for k in range(1, n + 1))
    counts = {latency_bucket(0.001): 7, latency_bucket(0.010): 18}
    assert latency.percentile_of_counts(counts, 7 / 25) == latency_bucket_upper_s(latency_bucket(0.001))
    with pytest.raises(ValueError):
        nearest_rank(1.5, 10)
