"""Per-source rate limit (incident 3): refused sources, dropped queries and retries per limit;
the recommendation; and the model against a real flood into the lab's unbound ``ip-ratelimit``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from loadkit.errors import ModelError
from loadkit.model import SourceLimitResult, fit_source_limit, source_limit
from loadkit.record.reader import load_run
from loadkit.schema import RUN_LAYOUT

REPO = Path(__file__).resolve().parent.parent


def test_poisson_sources_recommended_limit_refuses_under_a_tenth_of_a_percent():
    res = source_limit(300, 4.0)  # the shipped scenario: 300 sources × 4 q/s
    # P(Poisson(4) > L) < 0.001 first at L = 11 (0.00092; at 10 it is 0.0028)
    assert res.recommended_limit_qps == 11
    row = res.row(11)
    assert row.refused_sources_share == pytest.approx(stats.poisson.sf(11, 4.0), rel=0.05)
    assert res.row(10) is None or res.row(10).refused_sources_share > 0.001
    # a limit at the mean refuses most sources and its drops come back as retries
    low = res.row(4)
    assert low.refused_sources_share > 0.37  # retries push it above P(N > 4) = 0.37
    assert low.retries_qps > 0.2 * 300 * 4 * low.refused_queries_share
    assert res.count_quantiles["p99.9"] == 11
    assert "per-IP limit 11 q/s" in res.summary()
    assert "Poisson" in " ".join(res.caveats)
    back = SourceLimitResult.from_json(res.to_json())
    assert back.recommended_limit_qps == 11 and back.row(4).limit_qps == 4


def test_generator_sources_are_more_regular_than_poisson():
    gen = source_limit(300, 4.0, arrival="generator", aggregate="poisson")
    poi = source_limit(300, 4.0, arrival="poisson")
    assert gen.recommended_limit_qps < poi.recommended_limit_qps
    assert gen.count_quantiles["p99.9"] <= 5


def test_bad_input_is_a_model_error():
    with pytest.raises(ModelError, match="must be > 0"):
        source_limit(10, 0.0)
    with pytest.raises(ModelError, match="arrival"):
        source_limit(10, 1.0, arrival="bursty")


def _manifest_run(tmp_path: Path, options: dict, lab: dict) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_LAYOUT["manifest"]).write_text(json.dumps({
        "run_id": "flood", "scenario": "many_small_sources", "status": "completed",
        "profile": {"load": {"options": options}, "lab": lab}}))
    return run_dir


def test_configuration_comes_from_the_manifest_and_says_so(tmp_path):
    run_dir = _manifest_run(tmp_path, {"dns-sources": 300, "dns-source-qps": 4, "dns-arrival": "poisson",
                                       "dns-retries": 1}, {})
    res = fit_source_limit(load_run(run_dir))
    assert res.sources_n == 300 and res.source_qps == 4.0
    assert "derived from the run's manifest" in res.basis
    assert "does not record per-source counts" in res.basis
    assert res.applied_limit_qps is None
    (tmp_path / "bare").mkdir()
    bare = _manifest_run(tmp_path / "bare", {}, {})
    with pytest.raises(ModelError, match="--sources and --source-qps"):
        fit_source_limit(load_run(bare))


# ------------------------------------------------------------------------------------------------
# against the lab: a real flood through `loadkit run` into unbound with ip-ratelimit
# ------------------------------------------------------------------------------------------------

FLOOD = """
[run]
scenario = "source_limit_check"
release = "test"
duration = "{duration}"

[targets]
dns = "{address}:{port}"
allowlist = ["127.0.0.0/8"]

[load]
locustfile = "{repo}/locustfiles/dns_burst.py"
host = "dns"
users = 1
spawn_rate = 1
options = {{ dns-sources = {sources}, dns-first-source = "{first}", dns-source-qps = {qps}, dns-burst-size = 0, dns-arrival = "poisson", dns-retries = 1, dns-timeout = 0.5 }}

[caps]
max_users = 1
max_duration_s = "1m"
max_rate_qps = 5000

[lab]
dns_ratelimit_qps = {limit}
"""


@pytest.mark.lab
@pytest.mark.slow
def test_predicted_refused_share_beside_measured_on_the_lab(make_lab, tmp_path):
    # 4 q/s per source against a limit of 3: about half the queries dropped, and every drop's retry
    # displaces a later query (at a limit equal to the rate the share is a few % and swings with
    # the sender's timing from run to run)
    limit = 3
    status = make_lab(dns_ratelimit_qps=limit, proxies=1, accounts=10)
    prefix = status.dns.host.rsplit(".", 1)[0]
    profile = tmp_path / "flood.toml"
    profile.write_text(FLOOD.format(duration="8s", address=status.dns.host, port=status.dns.port,
                                    repo=REPO, sources=200, first=f"{prefix}.10", qps=4, limit=limit))
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "loadkit", "run", str(profile), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    run_dir = next(out.iterdir())
    res = fit_source_limit(load_run(run_dir))
    print(res.summary())
    assert res.applied_limit_qps == limit
    predicted, measured = res.predicted_refused_queries_share, res.measured_refused_queries_share
    assert measured is not None and measured > 0.1  # the limit did refuse queries
    # tolerance: 5 points (8 s of a 200-source flood, queries outstanding at the end counted)
    assert abs(predicted - measured) <= 0.05
    assert f"at the run's limit {limit} q/s" in res.summary()


def test_cli_fit_source_limit(tmp_path, capsys):
    from loadkit.cli import main

    run_dir = _manifest_run(tmp_path, {"dns-sources": 300, "dns-source-qps": 4}, {"dns_ratelimit_qps": 5})
    out = tmp_path / "sl.json"
    assert main(["fit", "source-limit", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert "per-IP limit 11 q/s" in printed and "at the run's limit 5 q/s" in printed
    back = SourceLimitResult.from_json(out.read_text())
    assert back.applied_limit_qps == 5 and back.measured_refused_queries_share is None
    assert main(["fit", "source-limit", str(run_dir), "--sources", "10"]) == 2
    assert "--sources and --source-qps go together" in capsys.readouterr().err
