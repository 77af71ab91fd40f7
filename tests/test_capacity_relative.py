"""Load stated relative to the lab's measured DNS capacity (``dns-rate = "1.5 capacity"``): the
grammar, its resolution against a lab status, the one-line refusals, and one run against a lab
with a CPU quota that offers about 1.5 times the capacity its status reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadkit.cli import main
from loadkit.errors import ProfileError
from loadkit.profile.capacity import parse_expression, resolve_capacity
from loadkit.profile.profile import load_profile

HERE = Path(__file__).parent
REPO = HERE.parent
TINY = HERE / "locustfiles" / "tiny.py"

PROFILE = """\
[run]
scenario = "rel"
duration = "10s"
[targets]
dns = "127.0.0.1:5353"
[load]
locustfile = "{locustfile}"
users = 1
options = {{ {options} }}
[caps]
max_rate_qps = {cap}
"""


def _profile(tmp_path: Path, options: str, cap: float = 50_000, name: str = "rel.toml") -> Path:
    path = tmp_path / name
    path.write_text(PROFILE.format(locustfile=TINY, options=options, cap=cap))
    return path


def _lab(capacity: float | None, cores: float | None = 0.1) -> dict:
    """What ``loadkit run`` records as the lab: ``Lab.status().to_dict()`` (the parts read here)."""
    return {"dir": "/x/lab", "dns": {"host": "127.0.0.1", "port": 5353, "cpu_cores": cores,
                                     "capacity_qps": capacity}}


@pytest.mark.parametrize("text, factor", [("1.5 capacity", 1.5), ("2x capacity", 2.0), (" 0.25 × Capacity ", 0.25),
                                          ("3*capacity", 3.0), ("1e-1 capacity", 0.1)])
def test_expression_grammar(text: str, factor: float) -> None:
    assert parse_expression(text, "w") == pytest.approx(factor)


@pytest.mark.parametrize("text, says", [("capacity", "is not a capacity-relative rate"),
                                        ("one capacity", "'one' is not a number"),
                                        ("0 capacity", "more than 0"), ("-1 capacity", "more than 0"),
                                        ("nan capacity", "more than 0"), ("inf capacity", "more than 0"),
                                        ("1.5 capacities", "is not a capacity-relative rate")])
def test_bad_numbers_are_one_line_naming_the_option(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile(_profile(tmp_path, f'dns-rate = "{text}"'))
    message = str(info.value)
    assert "\n" not in message and "rel.toml" in message and "dns-rate" in message and says in message


def test_only_rate_options_can_be_relative(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="dns-burst-size.*only a single rate option"):
        load_profile(_profile(tmp_path, 'dns-burst-size = "2 capacity"'))


def test_resolution_replaces_the_expression_and_records_both(tmp_path: Path) -> None:
    p = load_profile(_profile(tmp_path, 'dns-rate = "1.5 capacity", dns-source-qps = "0.01 capacity", dns-burst-size = 10'))
    assert p.load.options["dns-rate"] == "1.5 capacity" and p.capacity_relative == {}
    r = resolve_capacity(p, _lab(14_239))
    assert r.load.options["dns-rate"] == 21_358 and r.load.options["dns-source-qps"] == 142
    assert r.load.options["dns-burst-size"] == 10
    row = r.to_dict()["capacity_relative"]["dns-rate"]
    assert row["expression"] == "1.5 capacity" and row["capacity_qps"] == 14_239 and row["value_qps"] == 21_358
    assert "/x/lab" in row["source"]
    assert r.to_dict()["load"]["options"]["dns-rate"] == 21_358  # what the generator was given
    # an explicit capacity (the demo's mitigated run keeps the as-shipped load) wins over the lab's
    fixed = resolve_capacity(p, _lab(99_999), capacity_qps=10_000, source="the as-shipped lab")
    assert fixed.load.options["dns-rate"] == 15_000
    # absolute profiles need no lab at all
    plain = load_profile(_profile(tmp_path, "dns-rate = 1000", name="plain.toml"))
    assert resolve_capacity(plain, None) is plain


@pytest.mark.parametrize("lab, says", [(None, "no running loadkit lab serves"),
                                       (_lab(None, cores=None), "has no CPU quota"),
                                       (_lab(None, cores=0.1), "calibration found no capacity")])
def test_no_capacity_known_is_one_line_naming_the_fix(tmp_path: Path, lab, says: str) -> None:
    p = load_profile(_profile(tmp_path, 'dns-rate = "1.5 capacity"'))
    with pytest.raises(ProfileError) as info:
        resolve_capacity(p, lab)
    message = str(info.value)
    assert "\n" not in message and says in message
    assert "dns-rate '1.5 capacity' needs a lab with --dns-cpu" in message
    assert "loadkit lab up --dns-cpu" in message


def test_the_resolved_rate_is_checked_against_the_caps(tmp_path: Path) -> None:
    p = load_profile(_profile(tmp_path, 'dns-rate = "1.5 capacity"', cap=20_000))
    with pytest.raises(ProfileError, match=r"dns-rate = 21358 exceeds \[caps\] max_rate_qps = 20000"):
        resolve_capacity(p, _lab(14_239))


def test_loadkit_run_without_a_capacity_is_one_line_and_records_nothing(tmp_path: Path, capsys) -> None:
    # no lab serves 127.0.0.1:5353 from this empty --lab-dir: refused before a run directory is made
    path = _profile(tmp_path, 'dns-rate = "1.5 capacity"')
    out = tmp_path / "runs"
    code = main(["run", str(path), "--out", str(out), "--lab-dir", str(tmp_path / "nolab")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("loadkit: error: ") and "\n" not in err
    assert "needs a lab with --dns-cpu" in err
    assert not out.exists() or not any(out.iterdir())


def test_the_report_names_the_expression_and_the_figure(tmp_path: Path) -> None:
    """A run whose load was relative to capacity is reported with both, as its setup: a lab that
    measured another capacity is another setup, never merged with this one."""
    from loadkit.record.reader import load_run
    from loadkit.record.synthetic import write_dns_run
    from loadkit.record.writer import RunWriter
    from loadkit.report.analysis import run_setup

    p = resolve_capacity(load_profile(_profile(tmp_path, 'dns-rate = "1.5 capacity"')), _lab(14_239))
    run_dir = write_dns_run(tmp_path / "runs", duration_s=20)
    plain = run_setup(load_run(run_dir))
    RunWriter(run_dir).update_manifest(profile=p.to_dict())
    setup = run_setup(load_run(run_dir))
    assert setup.startswith(plain[:-1]) and "dns-rate 1.5 capacity = 21,358 q/s of 14,239 q/s measured" in setup


def offered_qps(run_dir: Path) -> float:
    """The median of the original queries per second over the generator's full record intervals:
    the first interval with queries (a slow start, then the open-loop schedule catching up) and
    the last (cut by the stop) are left out."""
    from loadkit.record import counters
    from loadkit.record.reader import load_run

    frame = counters.counter_frame(load_run(run_dir), ["dns.original_sent"])
    active = frame[frame["dns.original_sent"] > 0]
    rates = (active["dns.original_sent"] / active["interval_s"]).tolist()[1:-1]
    assert len(rates) >= 2, f"too few full intervals to tell a rate: {frame}"
    return float(sorted(rates)[len(rates) // 2])


@pytest.mark.lab
def test_a_capacity_relative_run_offers_that_share_of_the_lab_capacity(lab, tmp_path: Path) -> None:
    """The runner resolves "1.5 capacity" from the lab status it is given and the generator offers
    about 1.5 times it. The shared lab has no CPU quota, so its status is given the capacity a
    quota lab would report, a modest 2,000 q/s that a loaded machine's generator still reaches
    (a quota lab measures about 10,000 q/s at a tenth of a core, more than a busy 2-core machine
    generates from one process)."""
    import io

    from loadkit.run.runner import plan_run, run_profile

    capacity = 2000.0
    status = lab.to_dict()
    status["dns"].update(cpu_cores=0.1, capacity_qps=capacity)
    path = tmp_path / "rel.toml"
    path.write_text(f"""\
[run]
scenario = "rel"
duration = "14s"
[targets]
dns = "{lab.dns}"
[load]
locustfile = "{REPO / 'locustfiles' / 'dns_burst.py'}"
host = "dns"
users = 1
options = {{ dns-rate = "1.5 capacity", dns-burst-size = 0, dns-names-file = "{lab.names_file}", dns-retries = 0 }}
""")
    log = io.StringIO()
    result = run_profile(plan_run(load_profile(path)), out_dir=tmp_path / "runs", stream=log, lab=status)
    assert result.status == "completed", log.getvalue()
    assert "load: dns-rate '1.5 capacity' = 3,000 q/s (1.5 × 2,000 q/s" in log.getvalue()
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    row = manifest["profile"]["capacity_relative"]["dns-rate"]
    assert (row["expression"], row["capacity_qps"], row["value_qps"]) == ("1.5 capacity", 2000, 3000)
    assert manifest["profile"]["load"]["options"]["dns-rate"] == 3000
    assert manifest["lab"]["dns"]["capacity_qps"] == capacity  # the status it was resolved against
    # generous, and still telling 1.5x from 1x and from 2x
    assert 1.25 * capacity <= offered_qps(result.run_dir) <= 1.75 * capacity
