"""The capacity report: figures, regressions against a baseline, the CLI, and its errors.

Runs are synthetic (tests/runfactory.py) with known parameters, so each figure can be checked:
3 proxies of 256 MiB, 20 MiB base and 1.2 MiB per session fall over at 3 * 236 / 1.2 ≈ 590
concurrent sessions.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest

from loadkit.cli import main
from loadkit.errors import ReportError
from loadkit.record.reader import load_run
from loadkit.report import build_report, check_run, find_runs
from loadkit.report.analysis import summarize
from loadkit import resources
from loadkit.report.build import NOTEBOOK_NAME
from loadkit.report.summary import ReportSummary
from runfactory import MIB, write_dns_run, write_mail_run

FALL_OVER_SESSIONS = 3 * (256 - 20) / 1.2
NOTEBOOK = resources.notebook(NOTEBOOK_NAME)


def test_headroom_figures_recover_the_known_fall_over(tmp_path):
    run = load_run(write_mail_run(tmp_path, forecast_peak_sessions=400))
    summary = summarize([run], release="r1")
    (imap,) = [m for m in summary.mail if m.service == "IMAP"]
    assert imap.first_failure_sessions == pytest.approx(FALL_OVER_SESSIONS, rel=0.03)
    assert imap.cascade_all_fail is True
    assert imap.headroom_pct == pytest.approx((FALL_OVER_SESSIONS / 400 - 1) * 100, abs=3)
    # admission limit keeps each proxy under 90 % of 256 MiB: 3 * (0.9 * 256 - 20) / 1.2
    assert imap.admission_limit_total_sessions == pytest.approx(3 * (0.9 * 256 - 20) / 1.2, rel=0.03)
    assert summary.verdict == "PASS"


def test_baseline_with_a_larger_memory_limit_flags_the_headroom_regression(tmp_path):
    current = load_run(write_mail_run(tmp_path, run_id="cur", release="r2"))
    bigger = load_run(
        write_mail_run(tmp_path, run_id="base", release="r1", limit_bytes=320 * MIB, peak_sessions=900)
    )
    summary = summarize([current], release="r2", baseline_runs=[bigger], baseline_release="r1")
    flagged = {(c.service, c.metric) for c in summary.regressions}
    assert ("IMAP", "first failure") in flagged
    assert ("IMAP", "headroom") in flagged
    first = next(c for c in summary.regressions if c.metric == "first failure")
    # 236 MiB -> 300 MiB of room above the base: the current release has ~21 % less capacity
    assert first.change == pytest.approx((236 / 300 - 1) * 100, abs=2)
    assert summary.verdict == "WARN"
    assert any("regressed" in r for r in summary.verdict_reasons)


def test_same_limit_baseline_is_not_a_regression(tmp_path):
    current = load_run(write_mail_run(tmp_path, run_id="cur", release="r2", seed=1))
    same = load_run(write_mail_run(tmp_path, run_id="base", release="r1", seed=2))
    summary = summarize([current], release="r2", baseline_runs=[same], baseline_release="r1")
    assert summary.changes, "comparable figures expected"
    assert summary.regressions == []
    assert summary.verdict == "PASS"


def test_dns_figures_count_drops_and_retries(tmp_path):
    run = load_run(write_dns_run(tmp_path, burst_queries=1200, rcvbuf_datagrams=256, duration_s=60))
    summary = summarize([run], release="r1")
    (dns,) = summary.dns
    # 6 bursts of 1200 into a 256-datagram buffer: 944 dropped each (the last burst has no retry yet)
    assert dns.drops_n == pytest.approx(6 * 944, abs=6)
    assert dns.retry_queries_n == pytest.approx(5 * 944, abs=6)
    assert dns.retry_amplification_max > 1.3
    assert dns.largest_burst_without_loss_queries == pytest.approx(256, abs=2)


def test_forecast_above_fall_over_fails_the_verdict(tmp_path):
    run = load_run(write_mail_run(tmp_path, forecast_peak_sessions=800))
    summary = summarize([run], release="r1")
    assert summary.verdict == "FAIL"
    assert any("forecast peak 800" in r for r in summary.verdict_reasons)


def test_failed_gate_fails_the_verdict(tmp_path):
    path = write_mail_run(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["gates"] = [{"name": "p99<=50ms", "passed": False, "value": 0.09, "limit": 0.05}]
    (path / "manifest.json").write_text(json.dumps(manifest))
    summary = summarize([load_run(path)], release="r1")
    assert summary.verdict == "FAIL"
    assert "gate p99<=50ms failed in run mail-run" in summary.verdict_reasons


def test_gate_not_evaluated_warns_but_does_not_fail(tmp_path):
    # the recorder writes passed=None when a gate could not be computed (e.g. no headroom fit)
    path = write_mail_run(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["gates"] = [{"name": "min_headroom_pct", "passed": None, "value": None, "limit": 20}]
    (path / "manifest.json").write_text(json.dumps(manifest))
    summary = summarize([load_run(path)], release="r1")
    assert summary.verdict == "WARN"
    assert "gate min_headroom_pct not evaluated in run mail-run" in summary.verdict_reasons


# -- errors a user can cause ----------------------------------------------------------------------


def test_missing_run_directory_is_one_line(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        check_run(tmp_path / "nope")


def test_incomplete_run_is_refused(tmp_path):
    path = write_mail_run(tmp_path, status="running")
    with pytest.raises(ReportError, match="incomplete"):
        check_run(path)


def test_run_without_requests_is_refused(tmp_path):
    path = write_mail_run(tmp_path)
    for part in (path / "requests").glob("*.parquet"):
        part.unlink()
    with pytest.raises(ReportError, match="no request statistics"):
        check_run(path)


def test_find_runs_by_release(tmp_path):
    write_mail_run(tmp_path, run_id="a", release="r1")
    write_dns_run(tmp_path, run_id="b", release="r1")
    write_mail_run(tmp_path, run_id="c", release="r2")
    assert sorted(p.name for p in find_runs("r1", tmp_path)) == ["a", "b"]
    with pytest.raises(ReportError, match="no runs of release 'r9'"):
        find_runs("r9", tmp_path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--runs", "{tmp}/missing"], "does not exist"),
        ([], "no runs of release 'r1'"),
        (["--runs", "{tmp}/running"], "incomplete"),
        (["--runs", "{tmp}/running", "--forecast-peak-qps", "-5"], "must be a positive number"),
        (["--runs", "{tmp}/running", "--baseline-runs", "{tmp}/running"], "needs --baseline"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    write_mail_run(tmp_path / "runs", run_id="other", release="r0")
    write_mail_run(tmp_path, run_id="running", status="running")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(["report", "--release", "r1", "--runs-dir", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if not line.startswith("report: ")]  # progress
    assert len(errors) == 1 and errors[0].startswith("loadkit: error: ")


def test_failing_notebook_keeps_the_executed_notebook(tmp_path):
    broken = nbformat.read(str(NOTEBOOK), as_version=4)
    broken.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('boom in the report')"))
    path = tmp_path / "broken.ipynb"
    nbformat.write(broken, str(path))
    run = write_mail_run(tmp_path / "runs", duration_s=60)
    with pytest.raises(ReportError, match="RuntimeError: boom in the report") as info:
        build_report("r1", [run], out_dir=tmp_path / "out", notebook=path)
    saved = tmp_path / "out" / "capacity_report.ipynb"
    assert str(saved) in str(info.value)
    executed = nbformat.read(str(saved), as_version=4)
    assert any(o.get("output_type") == "error" for c in executed.cells for o in c.get("outputs", []))


# -- the CLI end to end ---------------------------------------------------------------------------


def test_cli_builds_the_report_from_the_runs_dir(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    write_mail_run(runs, run_id="imap-r2", release="r2", duration_s=90)
    write_dns_run(runs, run_id="dns-r2", release="r2", duration_s=60)
    write_mail_run(runs, run_id="imap-r1", release="r1", duration_s=90, limit_bytes=320 * MIB, peak_sessions=900)
    monkeypatch.chdir(tmp_path)  # default --runs-dir ./runs and --out reports/R
    code = main(["report", "--release", "r2", "--baseline", "r1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report_dir = tmp_path / "reports" / "r2"
    assert out.startswith("WARN: reports/r2/index.html")
    assert "report: executing capacity_report.ipynb" in err  # progress lines
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["verdict"] == "WARN"
    assert ReportSummary.from_dict(summary).to_dict()["mail"] == summary["mail"]  # round trip
    assert {r["run_id"] for r in summary["runs"]} == {"imap-r2", "dns-r2"}
    assert [r["run_id"] for r in summary["baseline_runs"]] == ["imap-r1"]
    html = (report_dir / "index.html").read_text()
    assert "regression(s) against r1" in html
    assert "summarize(" not in html  # code cells are not rendered
    assert (report_dir / "capacity_report.ipynb").exists()


def test_cli_exit_1_when_the_verdict_is_fail(tmp_path, capsys):
    run = write_mail_run(tmp_path / "runs", duration_s=60, forecast_peak_sessions=None)
    code = main(["report", "--release", "r1", "--runs", str(run), "--out", str(tmp_path / "out"),
                 "--forecast-peak-sessions", "900"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.startswith("FAIL:")
    assert "forecast peak 900" in out


def test_dns_drops_are_the_target_sockets_not_the_whole_hosts(tmp_path):
    # another server on the host drops 500 datagrams a second; the report must not blame the target
    run = load_run(write_dns_run(tmp_path, duration_s=60, other_server_drops_per_s=500))
    (dns,) = summarize([run], release="r1").dns
    assert dns.drops_n == pytest.approx(6 * 944, abs=6)
    assert dns.host_rcvbuf_errors_n == pytest.approx(6 * 944 + 59 * 500, abs=6)
    assert dns.drops_source == "drops at 127.0.0.1:5353"


def _burst_options(path, size=1200, window_ms=0, gates=None):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["profile"]["load"] = {"options": {"dns-burst-size": size, "dns-burst-ms": window_ms}}
    manifest["profile"].pop("forecast_peak_qps", None)
    manifest["profile"]["gates"] = dict(gates or {})
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_dns_bursts_are_judged_by_burst_size(tmp_path):
    path = _burst_options(write_dns_run(tmp_path, duration_s=60, burst_queries=1200, rcvbuf_datagrams=256),
                          gates={"forecast_peak_burst_queries": 1000})
    summary = summarize([load_run(path)], release="r1")
    (dns,) = summary.dns_capacity
    assert dns.mode == "burst"
    assert dns.burst_queries == 1200
    assert dns.forecast_peak_burst_queries == 1000
    assert dns.largest_burst_without_loss_queries == pytest.approx(256, abs=2)  # the default buffer's 256 datagrams
    assert dns.headroom_pct == pytest.approx((256 / 1000 - 1) * 100, abs=1)
    assert dns.rcvbuf_needed_bytes == 1200 * 832
    # half of the 998,400 B needed, with 25 % headroom: 1200 × 832 × 1.25 / 2
    assert "so-rcvbuf ≥ 624,000 bytes" in dns.recommendation and "net.core.rmem_max" in dns.recommendation
    assert summary.verdict == "FAIL"


def test_dns_burst_offered_is_not_a_forecast(tmp_path):
    # issue 17 item 12: the DNS row's "forecast peak 4,000" was the burst sent, not a forecast
    path = _burst_options(write_dns_run(tmp_path, duration_s=60, burst_queries=1200, rcvbuf_datagrams=256))
    summary = summarize([load_run(path)], release="r1")
    (dns,) = summary.dns_capacity
    assert dns.burst_queries == 1200
    assert dns.forecast_peak_burst_queries is None and dns.forecast_peak_qps is None
    assert dns.headroom_pct is None
    assert summary.verdict == "WARN"
    assert any("bursts of 1,200 queries offered overflowed" in r for r in summary.verdict_reasons)


def test_dns_bursts_without_drops_pass_whatever_the_model_assumed(tmp_path):
    # a buffer large enough for the bursts: nothing dropped, even though the record has no
    # buffer size and the model would assume the platform default
    path = _burst_options(write_dns_run(tmp_path, duration_s=60, burst_queries=1200, rcvbuf_datagrams=5000))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["lab"] = {}
    (path / "manifest.json").write_text(json.dumps(manifest))
    summary = summarize([load_run(path)], release="r1")
    (dns,) = summary.dns_capacity
    assert summary.dns[0].drops_n == 0
    assert dns.largest_burst_without_loss_queries >= 1200 and dns.is_lower_bound
    assert summary.verdict == "PASS"
    (udp,) = [m for m in summary.models if m.model == "udp burst"]
    assert "lower bound" in udp.caveat


def test_notebook_runs_on_its_own_with_papermill(tmp_path):
    """Without a summary from `loadkit report`, the notebook computes it from the runs."""
    import papermill as pm

    from loadkit.report.build import _ipc_kernel_manager

    run = write_mail_run(tmp_path / "runs", duration_s=60)
    out = tmp_path / "executed.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out), parameters={"release": "r1", "run_dirs": [str(run)]},
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path),
                        kernel_manager_class=_ipc_kernel_manager(), shutdown_kernel="immediate")
    nb = nbformat.read(str(out), as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs if "data" in o)
    assert "Capacity report · release <b>r1</b>" in html
    assert "mail-run" in html


def test_a_login_process_ending_its_session_is_not_a_proxy_failure(tmp_path):
    # one login process per connection: children exit all the time; only an OOM kill or the
    # master's exit marks where a proxy failed
    from loadkit.report.analysis import first_failure_ts

    path = write_mail_run(tmp_path)
    run = load_run(path)
    oom = first_failure_ts(run)
    child_exit = {"ts_unix_s": run.events[0]["ts_unix_s"] + 10, "kind": "process_exited", "source": "proxy1",
                  "detail": {"pid": 4242, "name": "imap-login", "root": False}}
    run.events.insert(0, child_exit)
    assert first_failure_ts(run) == oom
    master_exit = dict(child_exit, detail={"pid": 4243, "name": "dovecot", "root": True})
    run.events.insert(0, master_exit)
    assert first_failure_ts(run)["proxy1"] == master_exit["ts_unix_s"]


# -- reports that mislead (issue 17 items 10-13) --------------------------------------------------


def _rewrite_groups(path, change):
    """Rewrite a run's groups table through the part writer, ``change(df)`` applied."""
    from loadkit.partfiles import PartWriter
    from loadkit.record.reader import read_table
    from loadkit.schema import RUN_LAYOUT

    df = change(read_table(path, "groups"))
    for part in (path / RUN_LAYOUT["groups"]).glob("*.parquet"):
        part.unlink()
    writer = PartWriter(path / RUN_LAYOUT["groups"])
    writer.extend(df.to_dict("records"))
    writer.flush()


def _append_event(path, event):
    with (path / "events.jsonl").open("a") as fh:
        fh.write(json.dumps(event) + "\n")


def test_an_oom_kill_before_the_run_does_not_mark_it(tmp_path):
    # cumulative cgroup counters 94/93/95 from an earlier run, unchanged during this one
    path = write_mail_run(tmp_path, peak_sessions=400)  # below the fall-over: no OOM in this run
    before = {"proxy1": 94, "proxy2": 93, "proxy3": 95}

    def earlier_kills(df):
        df["cgroup_oom_kills_n"] = df["group"].map(before).astype("int64")
        return df

    _rewrite_groups(path, earlier_kills)
    started = json.loads((path / "manifest.json").read_text())["started_unix_s"]
    _append_event(path, {"ts_unix_s": started - 3600, "kind": "oom_kill", "source": "proxy1", "detail": {}})
    run = load_run(path)
    from loadkit.report import plots
    from loadkit.report.analysis import first_failure_ts

    assert first_failure_ts(run) == {}
    summary = summarize([run], release="r1")
    (fall,) = [m for m in summary.models if m.model == "headroom" and "fall over" in m.question]
    assert fall.measured.startswith("not reached")
    fig = plots.proxy_memory(run, summary.mail[0])
    scatter, timeline = fig.axes[:2]
    assert sum(len(c.get_offsets()) for c in scatter.collections) == 3 * 120  # every sample before any failure
    assert not [t for t in timeline.texts if t.get_text() == "OOM"]


def test_a_mixed_imap_pop3_storm_is_summed_and_labelled(tmp_path):
    from loadkit.partfiles import PartWriter
    from loadkit.record.reader import read_table
    from loadkit.report import plots
    from loadkit.report.analysis import held_sessions, run_service
    from loadkit.schema import RUN_LAYOUT

    path = write_mail_run(tmp_path, peak_sessions=500)
    # the same storm also logged in over POP3: its own requests and held-session gauge
    req = read_table(path, "requests")
    req = req[req["request_type"] == "IMAP"].assign(request_type="POP3")
    gen = read_table(path, "generator")
    pop3 = gen[gen["metric"] == "imap.held_sessions"].assign(metric="pop3.held_sessions")
    pop3 = pop3.assign(value=(pop3["value"] // 2).astype(float))
    for table, df in (("requests", req), ("generator", pop3)):
        writer = PartWriter(path / RUN_LAYOUT[table])
        writer.extend(df.to_dict("records"))
        writer.flush()
    run = load_run(path)
    imap_peak = gen[gen["metric"] == "imap.held_sessions"]["value"].max()
    assert run_service(run) == "IMAP+POP3"
    label, held = held_sessions(run)
    assert label == "IMAP+POP3"
    assert held.max() == pytest.approx(imap_peak + imap_peak // 2)
    summary = summarize([run], release="r1")
    assert [m.service for m in summary.mail] == ["IMAP+POP3"]
    fig = plots.sessions_over_time(run)
    (line,) = fig.axes[0].lines
    assert max(line.get_ydata()) == pytest.approx(imap_peak + imap_peak // 2)
    assert "IMAP+POP3" in fig.axes[0].get_title()


def _abort(path, reason, fraction=0.9):
    """Make a run end by an abort as ``loadkit run`` records it (event, status, no_abort gate)."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["status"] = "aborted"
    manifest["profile"]["abort"] = {"cgroup_memory_fraction": 0.9, "failure_ratio": 0.5, "min_requests": 50}
    manifest["gates"] = [{"name": "failure_ratio", "passed": True, "value": 0.0, "limit": 0.05, "detail": ""},
                         {"name": "no_abort", "passed": False, "value": None, "limit": 0, "detail": reason}]
    ts = manifest["ended_unix_s"] - 1
    detail = {"reason": reason, "threshold": 0.9}
    if reason == "cgroup_memory_fraction":
        detail.update(fraction=fraction, memory_bytes=int(fraction * 256 * MIB), limit_bytes=256 * MIB,
                      sample_unix_s=ts)
    (path / "manifest.json").write_text(json.dumps(manifest))
    _append_event(path, {"ts_unix_s": ts, "kind": "abort", "source": "proxy2", "detail": detail})
    return path


def test_a_designed_abort_is_its_own_verdict_not_a_failure(tmp_path):
    # proxies_fall_over ramps until a proxy reaches 90 % of its memory and stops there: its purpose
    path = _abort(write_mail_run(tmp_path, peak_sessions=500), "cgroup_memory_fraction")
    summary = summarize([load_run(path)], release="r1")
    (run,) = summary.runs
    assert run.outcome == "aborted as designed"
    assert "90 %" in run.outcome_detail or "90%" in run.outcome_detail
    no_abort = next(g for g in summary.gates if g.name == "no_abort")
    assert no_abort.outcome == "aborted as designed"
    assert summary.verdict == "PASS", summary.verdict_reasons
    assert not [r for r in summary.verdict_reasons if "abort" in r]
    assert any("aborted as designed" in n for n in summary.verdict_notes)
    # the model's prediction at the abort's memory fraction beside the sessions held at the abort
    (at_abort,) = [m for m in summary.models if "designed abort" in m.question]
    assert at_abort.predicted_value == pytest.approx(3 * (0.9 * 256 - 20) / 1.2, rel=0.03)
    assert at_abort.measured_value == pytest.approx(500 * 119 / 120, rel=0.03)


def test_an_abort_on_failures_still_fails(tmp_path):
    path = _abort(write_mail_run(tmp_path, peak_sessions=500), "failure_ratio")
    summary = summarize([load_run(path)], release="r1")
    assert summary.runs[0].outcome == "aborted"
    assert summary.verdict == "FAIL"
    assert summary.verdict_reasons == ["gate no_abort failed in run mail-run"]  # once, not twice


def test_a_memory_abort_that_came_after_an_oom_kill_still_fails(tmp_path):
    # the ramp passed 90 % and reached the OOM killer within one sample: not what it was set up for
    path = _abort(write_mail_run(tmp_path, peak_sessions=750), "cgroup_memory_fraction", fraction=1.0)
    summary = summarize([load_run(path)], release="r1")
    assert summary.runs[0].outcome == "aborted"
    assert summary.verdict == "FAIL"


def test_runs_of_different_labs_are_reported_side_by_side(tmp_path):
    small = load_run(write_mail_run(tmp_path, run_id="small", proxies=2, limit_bytes=64 * MIB, peak_sessions=60))
    big = load_run(write_mail_run(tmp_path, run_id="big"))
    summary = summarize([small, big], release="r1")
    rows = {m.run_ids[0]: m for m in summary.mail}
    assert set(rows) == {"small", "big"} and all(len(m.run_ids) == 1 for m in summary.mail)
    assert len(rows["small"].proxies) == 2 and len(rows["big"].proxies) == 3
    assert "2 proxies × 64 MiB" in rows["small"].setup and "3 proxies × 256 MiB" in rows["big"].setup
    assert rows["small"].first_failure_sessions == pytest.approx(2 * (64 - 20) / 1.2, rel=0.05)
    assert any("side by side" in n for n in summary.notes)


def test_a_baseline_is_compared_scenario_by_scenario(tmp_path):
    # the baseline ran another scenario whose requests answer 100x faster: nothing to compare
    cur = load_run(write_dns_run(tmp_path, run_id="storm", scenario="burst_retry_storm", release="r2"))
    base = load_run(write_dns_run(tmp_path, run_id="smoke", scenario="smoke", release="r1", burst_queries=10))
    summary = summarize([cur], release="r2", baseline_runs=[base], baseline_release="r1")
    assert summary.changes == []
    assert summary.verdict_reasons == [] or not [r for r in summary.verdict_reasons if "regressed" in r]
    assert any("no run of scenario 'burst_retry_storm'" in n for n in summary.notes)
    same = load_run(write_dns_run(tmp_path / "b", run_id="storm0", scenario="burst_retry_storm", release="r1"))
    summary = summarize([cur], release="r2", baseline_runs=[same, base], baseline_release="r1")
    assert {c.scenario for c in summary.changes} == {"burst_retry_storm"}


def test_the_p99_shown_is_a_whole_run_figure_and_says_so(tmp_path):
    # one slow interval: a request-weighted mean of per-interval p99s hides it
    run = load_run(write_mail_run(tmp_path, latency_spike_at_s=30))
    summary = summarize([run], release="r1")
    row = next(r for r in summary.latency if r.name == "LOGIN")
    login = run.requests[run.requests["name"] == "LOGIN"]
    assert row.p99_s == pytest.approx(login["latency_p99_s"].max())
    assert row.p99_source == "interval_max"
    assert "p99 over the whole run" in summary.latency_label and "upper bound" in summary.latency_label


def test_the_p99_comes_from_the_latency_histogram_when_the_run_has_one(tmp_path):
    from loadkit.record import latency
    from loadkit.record.writer import RunWriter
    from loadkit.schema import LatencyBucket, latency_bucket

    path = write_mail_run(tmp_path, duration_s=60)
    run0 = load_run(path)
    w = RunWriter(path)
    for ts in sorted(set(run0.requests["ts_unix_s"]))[:50]:
        # 98 fast logins and 2 slow ones per interval: the p99 is a slow one
        w.add(LatencyBucket(ts, 1.0, "IMAP", "LOGIN", latency_bucket(0.004), 98, "fine"))
        w.add(LatencyBucket(ts, 1.0, "IMAP", "LOGIN", latency_bucket(1.0005), 2, "fine"))
    w.flush()
    run = load_run(path)
    summary = summarize([run], release="r1")
    row = next(r for r in summary.latency if r.name == "LOGIN")
    assert row.p99_s == latency.percentile_s(run, 0.99, request_type="IMAP", name="LOGIN")
    assert row.p99_s >= 1.0005  # upper bucket edge: never under-reports
    assert row.p99_source == "fine"
    assert "≤ +4.4 %" in summary.latency_label


def test_every_model_row_has_predicted_measured_and_a_caveat_in_words(tmp_path):
    mail = load_run(write_mail_run(tmp_path, peak_sessions=400))  # never reaches the fall-over
    summary = summarize([mail], release="r1")
    (fall,) = [m for m in summary.models if m.model == "headroom" and "fall over" in m.question]
    assert fall.predicted_value == pytest.approx(FALL_OVER_SESSIONS, rel=0.03)
    assert fall.measured.startswith("not reached: the runs held at most")
    assert "extrapolat" in fall.caveat
    dns = load_run(write_dns_run(tmp_path, duration_s=60, burst_queries=1200))
    _burst_options(dns.path)
    summary = summarize([load_run(dns.path)], release="r1")
    (udp,) = [m for m in summary.models if m.model == "udp burst"]
    assert udp.predicted_value == pytest.approx(1200 - 256, abs=2)
    assert "dropped" in udp.measured
    retries = [m for m in summary.models if m.model == "retries"]
    assert retries and all(m.predicted and m.measured for m in retries)


def test_summary_json_round_trips_and_names_units(tmp_path):
    run = load_run(write_mail_run(tmp_path))
    summary = summarize([run], release="r1")
    data = json.loads(summary.to_json())
    assert ReportSummary.from_dict(data).to_dict() == data
    assert "first_failure_sessions" in data["mail"][0] and "first_failure" not in data["mail"][0]
    assert {"verdict", "verdict_reasons", "verdict_notes", "models", "regressions"} <= set(data)


def test_a_many_sources_run_gets_a_per_ip_limit_row(tmp_path):
    path = write_dns_run(tmp_path, scenario="many_small_sources", duration_s=30, burst_queries=0)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["profile"]["load"] = {"options": {"dns-sources": 2000, "dns-source-qps": 1, "dns-retries": 2}}
    manifest["profile"]["lab"] = {"dns_ratelimit_qps": 4}
    (path / "manifest.json").write_text(json.dumps(manifest))
    summary = summarize([load_run(path)], release="r1")
    rows = [m for m in summary.models if m.model == "source limit"]
    assert rows[0].predicted_value >= 4 and "of sources" in rows[0].predicted
    (applied,) = [m for m in rows if "run's per-IP limit of 4" in m.question]
    assert applied.predicted != "–" and applied.measured != "–"


def test_cli_forecast_burst_judges_the_dns_bursts(tmp_path, capsys):
    run = _burst_options(write_dns_run(tmp_path / "runs", duration_s=30, burst_queries=1200))
    code = main(["report", "--release", "r1", "--runs", str(run), "--out", str(tmp_path / "out"),
                 "--forecast-peak-burst-queries", "1000"])
    out = capsys.readouterr().out
    assert code == 1 and out.startswith("FAIL:")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dns_capacity"][0]["forecast_peak_burst_queries"] == 1000


def test_the_report_judges_bursts_as_sent_and_agrees_with_fit_udp_burst(tmp_path):
    # the profile asked for 1200 queries in 10 ms; the generator took 100 ms to send them (its
    # burst events say so, with the answers it read meanwhile): `loadkit fit udp-burst` and the
    # report must give the same loss and buffer for the same burst
    from loadkit import model

    path = _burst_options(write_dns_run(tmp_path, duration_s=60, burst_queries=1200), window_ms=10)
    started = json.loads((path / "manifest.json").read_text())["started_unix_s"]
    for i, second in enumerate(range(10, 61, 10)):
        first = started + second - 0.5
        _append_event(path, {"ts_unix_s": first, "kind": "burst", "source": "dns",
                             "detail": {"burst_index": i, "first_sent_unix_s": first, "last_sent_unix_s": first + 0.1,
                                        "window_s": 0.1, "sent_n": 1200, "answered_in_window_n": 400,
                                        "answers_read_unix_s": first + 0.1}})
    run = load_run(path)
    fit = model.fit_udp_burst(run)
    summary = summarize([run], release="r1")
    (d,) = summary.dns
    assert d.burst_window_s == pytest.approx(0.1) and d.burst_window_planned_s == pytest.approx(0.01)
    assert d.rcvbuf_needed_bytes == fit.needed_rcvbuf_bytes
    (udp,) = [m for m in summary.models if m.model == "udp burst"]
    assert udp.predicted_value == pytest.approx(fit.predicted_loss_n)
    assert "sent in 100 ms (the profile asked for 10 ms)" in udp.question
    assert f"{model.so_rcvbuf_for(fit.needed_rcvbuf_bytes):,}" in summary.dns_capacity[0].recommendation


def test_only_the_firewall_in_front_of_the_target_is_the_runs(tmp_path):
    # the collector samples every firewall table on the host: another lab's is not this run's
    from loadkit.record.writer import RunWriter
    from loadkit.schema import FirewallSample

    path = write_dns_run(tmp_path, duration_s=30)
    run0 = load_run(path)
    w = RunWriter(path)
    for i, ts in enumerate(sorted(set(run0.requests["ts_unix_s"]))):
        w.add(FirewallSample(ts, "runfactory", "ip loadkit_fw_other", 10_000, 10_000, 50 * i, 60.0))
        w.add(FirewallSample(ts, "runfactory", "ip loadkit_fw_mine", min(3000, 100 * i), 3000, 0, 30.0))
    w.flush()
    assert not [m for m in summarize([load_run(path)], release="r1").models if m.model == "firewall"]
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["lab"]["firewall"] = {"dns": ["127.0.0.1", 5353], "table": "ip loadkit_fw_mine"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    row, loop = [m for m in summarize([load_run(path)], release="r1").models if m.model == "firewall"]
    assert "3,000-entry session table" in row.question
    assert row.measured_value == 2900
    assert row.predicted_value is not None and loop.predicted.startswith(("yes", "no"))


def test_anomaly_row_says_when_polling_cannot_be_judged(tmp_path):
    from loadkit.report.models import anomaly_model_row
    from loadkit.report.summary import AnomalyRow

    short = AnomalyRow(run_id="r", series="drops", spikes=[{"ts_unix_s": 1.0}] * 6, daily_period=None,
                       change_points_n=0, detection_delay_s={}, summary="", source="")
    row = anomaly_model_row(short, "s")
    assert row.predicted == "not judged" and "shorter than the polling" in row.caveat
    long = AnomalyRow(run_id="r", series="drops", spikes=[{"ts_unix_s": 1.0}], daily_period=None,
                      change_points_n=0, detection_delay_s={"3600": None, "60": 45.0}, summary="", source="")
    row = anomaly_model_row(long, "s")
    assert row.predicted == "1 h polling: not detected, 1 min polling: after 45 s"
    assert row.caveat == "1 h polling would never have shown it"


def test_a_stepped_run_gets_usl_rows_with_their_caveat(tmp_path):
    from loadkit.record.synthetic import write_usl_run

    write_usl_run(tmp_path / "usl")
    run = load_run(tmp_path / "usl")
    rows = [m for m in summarize([run], release="r1").models if m.model == "usl"]
    assert rows[0].predicted_value == pytest.approx(rows[0].measured_value, rel=0.1)
    (peak,) = [m for m in rows if "N*" in m.question]
    assert peak.predicted_value == pytest.approx((0.97 / 2e-4) ** 0.5, rel=0.1)  # sqrt((1 - σ) / κ)
    flat = tmp_path / "flat"
    write_usl_run(flat, kappa=0.0, sigma=0.0, run_id="usl-flat")
    (row,) = [m for m in summarize([load_run(flat)], release="r1").models if m.model == "usl"]
    assert "κ not significantly above 0" in row.caveat


# -- a real run against the lab ---------------------------------------------------------------------


@pytest.mark.lab
@pytest.mark.slow
def test_the_shipped_fall_over_scenario_reports_its_designed_abort(make_lab, tmp_path):
    # scenarios/proxies_fall_over.toml as shipped, against a lab as shipped (3 × 256 MiB proxies;
    # with 64 MiB ones the ramp jumps past 90 % to the OOM killer within one sample, and the
    # report rightly calls that abort a failure): an IMAP+POP3 storm whose abort is its purpose
    import subprocess
    import sys

    from test_run_lab import ROOT, for_lab

    lab = make_lab()
    if not lab.cgroups.enabled:
        pytest.skip(f"no memory cgroups here: {lab.cgroups.reason}")
    profile = tmp_path / "proxies_fall_over.toml"
    profile.write_text(for_lab((ROOT / "scenarios" / "proxies_fall_over.toml").read_text(), lab))
    res = subprocess.run([sys.executable, "-m", "loadkit", "run", str(profile), "--out", str(tmp_path / "runs"),
                          "--release", "t", "--lab-dir", lab.dir], capture_output=True, text=True, timeout=300)
    # loadkit run judges the abort by the report's rule: as designed, so its no_abort gate passes
    assert res.returncode == 0, res.stderr
    assert "no_abort: n/a (limit <= 0) pass (aborted as designed" in res.stderr
    [run_dir] = list((tmp_path / "runs").iterdir())
    run = load_run(run_dir)
    assert run.manifest["status"] == "aborted"
    summary = summarize([run], release="t")
    assert summary.runs[0].outcome == "aborted as designed", summary.runs[0].outcome_detail
    assert summary.runs[0].service == "IMAP+POP3"
    assert [m.service for m in summary.mail] == ["IMAP+POP3"]
    assert not [r for r in summary.verdict_reasons if "abort" in r]
    assert summary.verdict in ("PASS", "WARN")
    # the model's sessions at the abort's memory fraction beside the sessions the proxies held
    (at_abort,) = [m for m in summary.models if "designed abort" in m.question]
    assert at_abort.predicted_value == pytest.approx(at_abort.measured_value, rel=0.15)


def test_a_lower_bound_capacity_below_the_forecast_is_no_negative_headroom() -> None:
    """A DNS capacity that is only a lower bound (nothing dropped) says nothing when the forecast
    is above it: no negative headroom, so no FAIL; above the forecast it still counts."""
    from loadkit.report.capacity import _headroom

    assert _headroom(300, 4000, is_lower_bound=True) is None
    assert _headroom(300, 4000, is_lower_bound=False) < 0
    assert _headroom(5000, 4000, is_lower_bound=True) == pytest.approx(25.0)


def test_missing_notebooks_break_only_the_report(tmp_path):
    """An installation without its notebooks still parses every subcommand; `loadkit report`
    says in one line what is missing (the notebook is resolved when a report is built)."""
    script = ("import pathlib, sys\n"
              "import loadkit.resources as r\n"
              "r.PACKAGE_DATA = r.SOURCE_TREE = pathlib.Path(sys.argv[1])\n"
              "from loadkit.cli import build_parser, main\n"
              "build_parser().parse_args(['runs', 'list'])\n"
              "sys.exit(main(['report', '--release', 'r1', '--runs', sys.argv[1]]))\n")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if not line.startswith("report: ")]
    assert errors == [f"loadkit: error: loadkit's notebooks are missing from this installation (looked in "
                      f"{tmp_path / 'notebooks'} and {tmp_path / 'notebooks'}); reinstall loadkit"]
