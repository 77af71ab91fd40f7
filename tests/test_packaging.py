"""The package as users install it: wheel and sdist contents, extras, the supported Locust range,
the collector on its own dependencies, and `loadkit report` from a wheel outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from loadkit import resources
from loadkit.generate import locust_compat

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent


def _requirement_names(reqs: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


# ---------------------------------------------------------------------------------------------
# Locust: the tested range, declared once
# ---------------------------------------------------------------------------------------------


def test_the_installed_locust_is_in_the_supported_range_and_has_every_internal_written() -> None:
    # fails loudly, with the range in the message, when the suite runs on an untested Locust
    version = locust_compat.check_locust_version()
    from locust.stats import RequestStats, StatsError

    entry = RequestStats().get("name", "DNS")
    missing = [f for f in locust_compat.STATS_ENTRY_FIELDS if not hasattr(entry, f)]
    error = StatsError("DNS", "name", "timeout")
    missing += [f"StatsError.{f}" for f in locust_compat.STATS_ERROR_FIELDS if not hasattr(error, f)]
    assert not missing, f"Locust {version} lacks the internals loadkit.generate.locust_stats writes: {missing}"


def test_pyproject_declares_the_range_the_code_checks() -> None:
    load = PYPROJECT["project"]["optional-dependencies"]["load"]
    assert f"locust{locust_compat.SUPPORTED_LOCUST}" in load, load


@pytest.mark.parametrize("version", ["2.29.3", "3.0.0", "1.6", "banana"])
def test_an_unsupported_locust_is_refused_in_one_line(version: str) -> None:
    with pytest.raises(locust_compat.UnsupportedLocust) as err:
        locust_compat.check_locust_version(version)
    msg = str(err.value)
    assert locust_compat.SUPPORTED_LOCUST in msg and "\n" not in msg
    assert locust_compat.check_locust_version("2.47.0") == "2.47.0"


# ---------------------------------------------------------------------------------------------
# extras and metadata
# ---------------------------------------------------------------------------------------------


def test_extras_split_the_collector_from_load_models_and_report() -> None:
    project = PYPROJECT["project"]
    base = _requirement_names(project["dependencies"])
    extras = project["optional-dependencies"]
    # a target host's install: no Locust, no pandas, no Jupyter
    assert base.isdisjoint({"locust", "pandas", "numpy", "scipy", "jupyter", "papermill", "matplotlib", "duckdb"})
    assert extras["collect"] == []
    assert "loadkit[load,report]" in extras["all"] and "loadkit[all]" in extras["dev"]  # make demo / make test
    assert project["license"] == "MIT"  # an SPDX expression
    assert (REPO / "loadkit" / "py.typed").is_file()


_BLOCKER = """
import sys, importlib.abc
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from loadkit.cli import main
sys.exit(main(sys.argv[2:]))
"""
#: import names of everything beyond the base dependencies
_NOT_BASE = ("pandas,numpy,scipy,duckdb,locust,gevent,dns,aioimaplib,dpkt,dnstap_pb,fstrm,matplotlib,ipykernel,"
             "nbclient,nbconvert,nbformat,papermill,jupyter_client,IPython,zmq,flask")


def _with_base_only(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKER, _NOT_BASE, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_the_collector_runs_on_the_base_dependencies_alone(tmp_path: Path) -> None:
    out = _with_base_only(["collect", "--duration", "1", "--interval", "0.5", "--out", "c", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["samples_n"] >= 1 and (tmp_path / "c").is_dir()
    # a subcommand whose extra is missing: one line naming the package and the extra, exit 2
    out = _with_base_only(["report", "--release", "r1"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "loadkit: error: loadkit report needs the Python package 'pandas', which is not installed: "
        "pip install 'loadkit[report]'"]


def test_locustfile_paths_for_locust_f(capsys) -> None:
    from loadkit.cli import main

    assert main(["locustfile", "dns_burst"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == REPO / "locustfiles" / "dns_burst.py" and path.is_file()
    assert {"dns_burst", "dns_flood", "imap_storm", "pop_storm"} <= set(resources.locustfile_names())
    assert main(["locustfile", "no_such"]) == 2
    assert "no locustfile 'no_such'" in capsys.readouterr().err
    # the scenarios the same way, and loadkit run takes a shipped one by name
    assert main(["scenario", "smoke"]) == 0
    assert Path(capsys.readouterr().out.strip()) == REPO / "scenarios" / "smoke.toml"
    assert {"smoke", "burst_retry_storm", "proxies_fall_over"} <= set(resources.shipped_names("scenarios"))
    assert main(["run", "no_such_scenario"]) == 2
    err = capsys.readouterr().err
    assert "profile no_such_scenario not found" in err and "smoke" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# the built artefacts, and a wheel installed outside the repository
# ---------------------------------------------------------------------------------------------


def _hatchling(args: list[str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hatchling", "build", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist built from the checkout, and the wheel built from that sdist (so the sdist is
    known to carry everything the wheel needs)."""
    pytest.importorskip("hatchling", reason="hatchling (in loadkit[dev]) builds the sdist and wheel")
    dist = tmp_path_factory.mktemp("dist")
    _hatchling(["-t", "sdist", "-d", str(dist)], REPO)
    (sdist,) = dist.glob("loadkit-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        root = names[0].split("/")[0]
        for shipped in ("notebooks/capacity_report.ipynb", "locustfiles/dns_burst.py", "scenarios/smoke.toml",
                        "loadkit/py.typed", "pyproject.toml"):
            assert f"{root}/{shipped}" in names, shipped
        tar.extractall(dist, filter="data")
    _hatchling(["-t", "wheel", "-d", str(dist)], dist / root)
    (whl,) = dist.glob("loadkit-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_carries_notebooks_locustfiles_and_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for nb in (REPO / "notebooks").glob("*.ipynb"):
        assert f"loadkit/_data/notebooks/{nb.name}" in names
    for lf in (REPO / "locustfiles").glob("*.py"):
        assert f"loadkit/_data/locustfiles/{lf.name}" in names
    for sc in (REPO / "scenarios").glob("*.toml"):
        assert f"loadkit/_data/scenarios/{sc.name}" in names
    assert "loadkit/py.typed" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "License-Expression: MIT" in metadata
    for extra in ("collect", "models", "load", "report", "all"):
        assert f"Provides-Extra: {extra}" in metadata


_CHECK_DEPS = """
import sys
from importlib.metadata import PackageNotFoundError, distribution, version
from packaging.requirements import Requirement
missing = []
for text in distribution("loadkit").requires or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": "report"}):
        continue
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            missing.append(f"{text} (have {version(req.name)})")
    except PackageNotFoundError:
        missing.append(text)
print("\\n".join(missing))
import loadkit, loadkit.resources as r
from jupyter_client.kernelspec import KernelSpecManager
kernel_python = KernelSpecManager().get_kernel_spec("python3").argv[0]  # the report's kernel
from loadkit.profile.profile import load_profile
smoke = load_profile(r.scenario("smoke"))  # a shipped scenario finds its locustfile beside it
print(loadkit.__file__, r.notebook("capacity_report"), r.locustfile("dns_burst"), r.scenario("smoke"),
      smoke.load.locustfiles[0], kernel_python)
"""


@pytest.mark.slow
def test_report_from_the_wheel_installed_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    # a fresh venv, no system site-packages; loadkit itself comes only from the wheel. Its
    # dependencies are the repository venv's installed packages, put on the path by a .pth file
    # (installing the report's ~900 MB of Jupyter again would take minutes); the check below
    # proves they satisfy every requirement the wheel declares for loadkit[report].
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps_site = Path(subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    # a path line only: the repository venv's own .pth files (its editable loadkit) are not run
    (site / "zz_loadkit_test_deps.pth").write_text(f"{deps_site}\n")
    # nbconvert's HTML templates are data files its install puts in the prefix's share/jupyter;
    # only they are borrowed (the repository venv's kernelspec would start its own Python)
    templates = Path(sys.prefix) / "share" / "jupyter" / "nbconvert"
    (venv / "share" / "jupyter").mkdir(parents=True)
    (venv / "share" / "jupyter" / "nbconvert").symlink_to(templates)
    install = subprocess.run([str(BIN / "pip"), "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]

    work = tmp_path / "elsewhere"  # not the repository, nothing of it on the path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "JUPYTER", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    check = subprocess.run([str(py), "-c", _CHECK_DEPS], cwd=work, env=env, capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    missing, where = check.stdout.rstrip("\n").split("\n")[-2:] if "\n" in check.stdout.strip() else ("", check.stdout)
    assert missing == "", f"loadkit[report] requirements not met: {missing}"
    *shipped, kernel_python = where.split()
    assert all(p.startswith(str(site)) for p in shipped), where  # the wheel's, not the checkout's
    assert Path(kernel_python).parent == venv / "bin", where  # so the notebook imports the wheel's loadkit too

    from loadkit.record.synthetic import write_mail_run

    run_dir = write_mail_run(work / "runs")
    (run_dir / "locust").mkdir(exist_ok=True)
    (run_dir / "locust" / "report.html").write_text("<html><body>Locust's own report</body></html>")
    proc = subprocess.run([str(venv / "bin" / "loadkit"), "report", "--release", "r1", "--runs", str(run_dir),
                           "--out", str(work / "report")], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    html = (work / "report" / "index.html").read_text()
    assert "Capacity report" in html or "capacity report" in html.lower()
    summary = json.loads((work / "report" / "summary.json").read_text())
    assert summary["release"] == "r1"
    # the run's Locust HTML is copied beside the report and linked from its runs table
    link = summary["runs"][0]["locust_html"]
    assert link == f"locust/{run_dir.name}.html" and f'href="{link}"' in html
    assert "Locust's own report" in (work / "report" / link).read_text()


def test_a_run_without_locust_html_gets_no_link(tmp_path: Path) -> None:
    from loadkit.record.reader import load_run
    from loadkit.record.synthetic import write_mail_run
    from loadkit.report.analysis import run_row

    run_dir = write_mail_run(tmp_path / "runs")
    assert run_row(load_run(run_dir)).locust_html == ""
    (run_dir / "locust").mkdir(exist_ok=True)
    (run_dir / "locust" / "report.html").write_text("<html></html>")
    assert run_row(load_run(run_dir)).locust_html == f"locust/{run_dir.name}.html"


def test_every_summary_json_key_is_documented_with_its_unit() -> None:
    # docs/summary-json.md lists each record's keys; a key added to the summary without a line
    # there fails here
    import dataclasses

    from loadkit.report import summary as S

    doc = (REPO / "docs" / "summary-json.md").read_text()
    missing = [f"{cls.__name__}.{f.name}"
               for cls in (S.ReportSummary, S.RunRow, S.GateRow, S.MailCapacity, S.DnsCapacity, S.DnsRun,
                           S.LatencyRow, S.AnomalyRow, S.ModelRow, S.Change)
               for f in dataclasses.fields(cls) if f"`{f.name}`" not in doc]
    assert not missing, f"not in docs/summary-json.md: {missing}"
    assert "`regressions`" in doc  # the summary's one computed key
