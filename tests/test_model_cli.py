"""`loadkit fit`: summary on stdout, JSON written, one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys


from loadkit.cli import main
from loadkit.model import HeadroomResult, MetastabilityResult
from model_synth import write_headroom_run, write_manifest, write_retry_run, write_usl_run


def test_fit_headroom_prints_summary_and_writes_json(tmp_path, capsys):
    write_headroom_run(tmp_path / "run")
    out = tmp_path / "headroom.json"
    assert main(["fit", "headroom", str(tmp_path / "run"), "--out", str(out), "--forecast-peak", "400"]) == 0
    printed, *caveat_lines = capsys.readouterr().out.strip().splitlines()
    assert printed.startswith("all 3 proxies fall over at ≈ ")
    res = HeadroomResult.from_json(out.read_text())
    assert res.summary() == printed
    # every caveat the result carries is printed in words under the summary
    assert caveat_lines == [f"  caveat: {c}" for c in res.caveats if c not in printed]
    assert res.forecast_peak_sessions == 400


def test_fit_other_kinds(tmp_path, capsys):
    write_usl_run(tmp_path / "usl")
    assert main(["fit", "usl", str(tmp_path / "usl")]) == 0
    assert capsys.readouterr().out.startswith("USL sigma=")
    write_retry_run(tmp_path / "a", metastable=False)
    write_retry_run(tmp_path / "b", metastable=True)
    out = tmp_path / "retries.json"
    assert main(["fit", "retries", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.strip().splitlines() if not ln.startswith("  caveat: ")]
    assert lines[0].startswith("retry-recovers: recovers") and lines[1].startswith("retry-metastable: metastable")
    verdicts = [MetastabilityResult.from_dict(d).verdict for d in json.loads(out.read_text())]
    assert verdicts == ["recovers", "metastable"]
    assert main(["fit", "udp-burst", str(tmp_path / "a"), "--rcvbuf", "16384"]) == 0
    assert "rcvbuf 16384 B holds 19 datagrams" in capsys.readouterr().out
    assert main(["fit", "anomalies", str(tmp_path / "a"), "--delta"]) == 0
    assert "udp_rcvbuf_errors_n:" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["fit", "headroom", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    write_manifest(tmp_path / "empty", "empty", "x")
    assert main(["fit", "headroom", str(tmp_path / "empty")]) == 2
    assert "no collector group samples" in capsys.readouterr().err
    write_headroom_run(tmp_path / "run")
    assert main(["fit", "headroom", str(tmp_path / "run"), "--weight", "proxy1"]) == 2
    assert "PROXY=NUMBER" in capsys.readouterr().err
    assert main(["fit", "usl", str(tmp_path / "run")]) == 2
    assert "no request intervals" in capsys.readouterr().err


def test_installed_command_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "loadkit", "fit", "retries", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr
