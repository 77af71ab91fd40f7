"""The rendered report, opened in headless Chromium: every section is there with its plots, no
code and no error output."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from loadkit.report import build_report
from runfactory import MIB, write_dns_run, write_mail_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

#: section headings of notebooks/capacity_report.ipynb, in order
SECTIONS = (
    "Verdict and gates",
    "Headroom per service",
    "Models: predicted beside measured",
    "Proxy memory against sessions",
    "DNS: offered, answered and dropped queries",
    "Latency percentiles over time",
    "Anomalies",
    "Change against the baseline release",
    "Run manifests",
)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    profile.mkdir()
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    from test_report import _abort

    runs = [
        _abort(write_mail_run(root / "runs", run_id="imap-r2", release="r2", duration_s=90, peak_sessions=500),
               "cgroup_memory_fraction"),
        write_dns_run(root / "runs", run_id="dns-r2", release="r2", duration_s=60),
    ]
    baseline = [
        write_mail_run(root / "runs", run_id="imap-r1", release="r1", duration_s=90,
                       limit_bytes=320 * MIB, peak_sessions=900),
        write_dns_run(root / "runs", run_id="dns-r1", release="r1", duration_s=60),
    ]
    return build_report("r2", runs, baseline_dirs=baseline, baseline_release="r1", out_dir=root / "out")


def test_every_section_renders_with_its_plots(report, tmp_path):
    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", report.html.resolve().as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 50_000  # a blank page is a few kB
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    dom = _chromium(tmp_path, "--dump-dom", report.html.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    headings = [re.sub(r"<[^>]+>|¶", "", h).strip() for h in re.findall(r"<h2[^>]*>(.*?)</h2>", html, re.S)]
    assert list(SECTIONS) == headings
    # headroom bars, proxy memory, sessions, DNS, latency (2 runs), anomalies (the DNS run's drops;
    # the storm, stopped by its abort before any failure, has a flat series and no plot), changes
    images = re.findall(r'<img [^>]*src="data:image/png;base64,', html)
    assert len(images) >= 8
    # each section carries at least one plot, except the gates and manifests tables
    chunks = re.split(r"<h2[^>]*>", html)[1:]
    for title, chunk in zip(SECTIONS, chunks):
        if title in ("Verdict and gates", "Models: predicted beside measured", "Run manifests"):
            assert "<table" in chunk, title
        else:
            assert "data:image/png;base64," in chunk, f"section {title!r} has no plot"
    assert ">WARN<" in html  # the verdict banner
    assert "aborted as designed" in html  # the run's outcome, not a failure
    assert "Models: predicted beside measured" in html and "≈ " in html
    assert re.search(r"[1-9]\d* regression\(s\) against r1", html)
    assert "Traceback" not in html
    assert 'data-mime-type="application/vnd.jupyter.stderr"' not in html  # (the CSS names it too)
    # no code cells: the notebook's own source never reaches the page
    assert "load_run(" not in html and "import " not in html


def test_executed_notebook_has_no_error_or_stderr_output(report):
    nb = nbformat.read(str(report.notebook), as_version=4)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out.get("ename")
            assert not (out.get("output_type") == "stream" and out.get("name") == "stderr"), out.get("text")
