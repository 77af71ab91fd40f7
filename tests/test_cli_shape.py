"""The command line's shape: `fit KIND` subcommands with their own options, --json on stdout for
fit, run and collect, -v after the subcommand, collect's status line on a terminal, runs export."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest

from loadkit.cli import build_parser, main
from loadkit.record.reader import load_run
from loadkit.record.synthetic import write_headroom_run, write_mail_run

def test_each_fit_kind_has_only_its_own_options(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["fit", "udp-burst", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--rcvbuf" in text and "--burst-window" in text and "--json" in text
    assert "--policy" not in text and "--concurrency-metric" not in text and "--table" not in text
    # another kind's option is refused, not silently ignored
    with pytest.raises(SystemExit) as refused:
        main(["fit", "usl", "some-run", "--policy", "leastconn"])
    assert refused.value.code == 2
    assert "unrecognized arguments: --policy" in capsys.readouterr().err


def test_fit_json_is_the_result_on_stdout(tmp_path: Path, capsys) -> None:
    write_headroom_run(tmp_path / "run")
    out = tmp_path / "h.json"
    assert main(["fit", "headroom", str(tmp_path / "run"), "--json", "--out", str(out), "--forecast-peak", "400"]) == 0
    printed = json.loads(capsys.readouterr().out)  # nothing else on stdout
    assert printed == json.loads(out.read_text())
    assert printed["forecast_peak_sessions"] == 400


@pytest.mark.parametrize("argv", [
    ["runs", "list", "--dir", "RUNS", "-v"],
    ["fit", "headroom", "RUN", "-v"],
    ["collect", "--duration", "1", "-v"],
    ["-v", "runs", "list"],
])
def test_verbose_is_accepted_after_the_subcommand(argv) -> None:
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args([a for a in argv if a != "-v"]).verbose is False


def test_runs_export_writes_each_table_as_csv(tmp_path: Path, capsys) -> None:
    run_dir = write_mail_run(tmp_path / "runs")
    run = load_run(run_dir)
    out = tmp_path / "csv"
    assert main(["runs", "export", str(run_dir), "--csv", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "requests.csv" in report["files"] and "manifest.json" in report["files"]
    for name in ("requests", "generator", "groups"):
        if getattr(run, name).empty:
            continue
        with open(out / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(getattr(run, name))  # every row, every column
        assert set(rows[0]) == set(getattr(run, name).columns)
    assert json.loads((out / "manifest.json").read_text())["run_id"] == run.manifest["run_id"]
    # a run that is not there: one line, exit 2, nothing written
    assert main(["runs", "export", "nope", "--dir", str(tmp_path / "runs"), "--csv", str(tmp_path / "x")]) == 2
    assert "no run 'nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_run_json_prints_the_final_summary(monkeypatch, tmp_path: Path, capsys) -> None:
    # the command line's part only: the runner is replaced by its result
    from loadkit.run import runner

    (tmp_path / "x.py").write_text("# a locustfile the runner never starts here\n")
    profile = tmp_path / "p.toml"
    profile.write_text('[run]\nscenario = "s"\nduration = "1s"\n[targets]\ndns = "127.0.0.1:5353"\n'
                       '[load]\nlocustfile = "x.py"\nusers = 1\n')
    monkeypatch.setattr(runner, "plan_run", lambda *a, **k: type("Plan", (), {"targets": {}})())
    result = runner.RunResult(run_dir=tmp_path / "runs" / "20261129T000000-s-abcd", status="completed",
                              gates=[{"name": "p99_latency_s", "passed": True}], exit_code=0)
    monkeypatch.setattr(runner, "run_profile", lambda plan, **k: result)
    assert main(["run", str(profile), "--json", "--lab-dir", str(tmp_path / "no-lab")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"run_id": "20261129T000000-s-abcd", "run_dir": str(result.run_dir), "status": "completed",
                       "exit_code": 0, "gates": [{"name": "p99_latency_s", "passed": True}]}


class _Terminal(io.StringIO):
    """stderr as a terminal would be: isatty() is true."""

    def isatty(self) -> bool:
        return True


def test_collect_json_and_its_status_line_only_on_a_terminal(monkeypatch, capsys) -> None:
    args = ["collect", "--duration", "1.5", "--interval", "0.5", "--full-memory-interval", "0", "--json"]
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone
    assert summary["samples_n"] >= 1 and summary["out_dir"] is None
    status = terminal.getvalue()
    assert status.startswith("\r\x1b[Kcollect: ") and "samples" in status and status.endswith("\n")
    pipe = io.StringIO()  # a pipe or a log file: isatty() is false
    monkeypatch.setattr(sys, "stderr", pipe)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["samples_n"] >= 1
    assert "collect:" not in pipe.getvalue() and "\r" not in pipe.getvalue()
