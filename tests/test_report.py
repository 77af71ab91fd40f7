"""The capacity report: figures, regressions against a baseline, the CLI, and its errors.

Runs are synthetic (tests/runfactory.py) with known parameters, so each figure can be checked:
3 proxies of 256 MiB, 20 MiB base and 1.2 MiB per session fall over at 3 * 236 / 1.2 ≈ 590
concurrent sessions.
"""

from __future__ import annotations

import json

import nbformat
import pytest

from loadkit.cli import main
from loadkit.errors import ReportError
from loadkit.record.reader import load_run
from loadkit.report import build_report, check_run, find_runs
from loadkit.report.analysis import summarize
from loadkit.report.build import NOTEBOOK
from runfactory import MIB, write_dns_run, write_mail_run

FALL_OVER_SESSIONS = 3 * (256 - 20) / 1.2


def test_headroom_figures_recover_the_known_fall_over(tmp_path):
    run = load_run(write_mail_run(tmp_path, forecast_peak_sessions=400))
    summary = summarize([run], release="r1")
    (imap,) = [s for s in summary["services"] if s["service"] == "IMAP"]
    assert imap["first_failure"] == pytest.approx(FALL_OVER_SESSIONS, rel=0.03)
    assert imap["cascade_all_fail"] is True
    assert imap["headroom_pct"] == pytest.approx((FALL_OVER_SESSIONS / 400 - 1) * 100, abs=3)
    # admission limit keeps each proxy under 90 % of 256 MiB: 3 * (0.9 * 256 - 20) / 1.2
    assert imap["admission_limit"] == pytest.approx(3 * (0.9 * 256 - 20) / 1.2, rel=0.03)
    assert summary["verdict"] == "PASS"


def test_baseline_with_a_larger_memory_limit_flags_the_headroom_regression(tmp_path):
    current = load_run(write_mail_run(tmp_path, run_id="cur", release="r2"))
    bigger = load_run(
        write_mail_run(tmp_path, run_id="base", release="r1", limit_bytes=320 * MIB, peak_sessions=900)
    )
    summary = summarize([current], release="r2", baseline_runs=[bigger], baseline_release="r1")
    flagged = {(c["service"], c["metric"]) for c in summary["regressions"]}
    assert ("IMAP", "first failure") in flagged
    assert ("IMAP", "headroom") in flagged
    first = next(c for c in summary["regressions"] if c["metric"] == "first failure")
    # 236 MiB -> 300 MiB of room above the base: the current release has ~21 % less capacity
    assert first["change"] == pytest.approx((236 / 300 - 1) * 100, abs=2)
    assert summary["verdict"] == "WARN"
    assert any("regressed" in r for r in summary["verdict_reasons"])


def test_same_limit_baseline_is_not_a_regression(tmp_path):
    current = load_run(write_mail_run(tmp_path, run_id="cur", release="r2", seed=1))
    same = load_run(write_mail_run(tmp_path, run_id="base", release="r1", seed=2))
    summary = summarize([current], release="r2", baseline_runs=[same], baseline_release="r1")
    assert summary["changes"], "comparable figures expected"
    assert summary["regressions"] == []
    assert summary["verdict"] == "PASS"


def test_dns_figures_count_drops_and_retries(tmp_path):
    run = load_run(write_dns_run(tmp_path, burst_queries=1200, rcvbuf_datagrams=256, duration_s=60))
    summary = summarize([run], release="r1")
    (dns,) = summary["dns"]
    # 6 bursts of 1200 into a 256-datagram buffer: 944 dropped each (the last burst has no retry yet)
    assert dns["rcvbuf_errors_n"] == pytest.approx(6 * 944, abs=6)
    assert dns["retry_n"] == pytest.approx(5 * 944, abs=6)
    assert dns["retry_amplification_max"] > 1.3
    assert dns["largest_burst_without_loss"] == pytest.approx(256, abs=2)


def test_forecast_above_fall_over_fails_the_verdict(tmp_path):
    run = load_run(write_mail_run(tmp_path, forecast_peak_sessions=800))
    summary = summarize([run], release="r1")
    assert summary["verdict"] == "FAIL"
    assert any("forecast peak 800" in r for r in summary["verdict_reasons"])


def test_failed_gate_fails_the_verdict(tmp_path):
    path = write_mail_run(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["gates"] = [{"name": "p99<=50ms", "passed": False, "value": 0.09, "limit": 0.05}]
    (path / "manifest.json").write_text(json.dumps(manifest))
    summary = summarize([load_run(path)], release="r1")
    assert summary["verdict"] == "FAIL"
    assert "gate p99<=50ms failed in run mail-run" in summary["verdict_reasons"]


def test_gate_not_evaluated_warns_but_does_not_fail(tmp_path):
    # the recorder writes passed=None when a gate could not be computed (e.g. no headroom fit)
    path = write_mail_run(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["gates"] = [{"name": "min_headroom_pct", "passed": None, "value": None, "limit": 20}]
    (path / "manifest.json").write_text(json.dumps(manifest))
    summary = summarize([load_run(path)], release="r1")
    assert summary["verdict"] == "WARN"
    assert "gate min_headroom_pct not evaluated in run mail-run" in summary["verdict_reasons"]


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
    (dns,) = summarize([run], release="r1")["dns"]
    assert dns["rcvbuf_errors_n"] == pytest.approx(6 * 944, abs=6)
    assert dns["host_rcvbuf_errors_n"] == pytest.approx(6 * 944 + 59 * 500, abs=6)
    assert dns["drops_source"] == "drops at 127.0.0.1:5353"


def test_dns_bursts_are_judged_by_burst_size(tmp_path):
    path = write_dns_run(tmp_path, duration_s=60, burst_queries=1200, rcvbuf_datagrams=256)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["profile"]["load"] = {"options": {"dns-burst-size": 1200, "dns-burst-ms": 0}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    summary = summarize([load_run(path)], release="r1")
    (dns,) = [s for s in summary["services"] if s["service"] == "DNS"]
    assert dns["unit"] == "queries per burst"
    assert dns["forecast_peak"] == 1200
    assert dns["fall_over"] == pytest.approx(256, abs=2)  # the default buffer's 256 datagrams
    assert dns["headroom_pct"] == pytest.approx((256 / 1200 - 1) * 100, abs=1)
    assert dns["rcvbuf_needed_bytes"] == 1200 * 832
    assert summary["verdict"] == "FAIL"
    assert any("bursts of 1,200 queries overflow the receive buffer" in r for r in summary["verdict_reasons"])


def test_dns_bursts_without_drops_pass_whatever_the_model_assumed(tmp_path):
    # a buffer large enough for the bursts: nothing dropped, even though the record has no
    # buffer size and the model would assume the platform default
    path = write_dns_run(tmp_path, duration_s=60, burst_queries=1200, rcvbuf_datagrams=5000)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["profile"]["load"] = {"options": {"dns-burst-size": 1200, "dns-burst-ms": 0}}
    manifest["lab"] = {}
    (path / "manifest.json").write_text(json.dumps(manifest))
    summary = summarize([load_run(path)], release="r1")
    (dns,) = [s for s in summary["services"] if s["service"] == "DNS"]
    assert summary["dns"][0]["rcvbuf_errors_n"] == 0
    assert dns["fall_over"] >= 1200 and dns["fall_over_is_lower_bound"]
    assert dns["headroom_pct"] >= 0
    assert summary["verdict"] == "PASS"


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
    child_exit = {"ts_unix_s": run.events[0]["ts_unix_s"] - 100, "kind": "process_exited", "source": "proxy1",
                  "detail": {"pid": 4242, "name": "imap-login", "root": False}}
    run.events.insert(0, child_exit)
    assert first_failure_ts(run) == oom
    master_exit = dict(child_exit, detail={"pid": 4243, "name": "dovecot", "root": True})
    run.events.insert(0, master_exit)
    assert first_failure_ts(run)["proxy1"] == master_exit["ts_unix_s"]
