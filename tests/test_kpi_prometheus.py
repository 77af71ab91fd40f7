"""The KPI review reads a real Prometheus: a week with a daily 12:30 spike is backfilled with
promtool into a fresh TSDB, Prometheus is started on loopback against it, and
`loadkit kpi review --prometheus` finds what the same series gives from a CSV file."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from loadkit.cli import main
from loadkit.model import kpi_source
from loadkit.model.kpi import review_kpi
from loadkit.model.kpi_source import KpiSourceError, query_prometheus
from loadkit.model.kpi_synth import synthetic_kpi
from prometheus_server import PrometheusServer

METRIC = "kpi_dns_queries_per_second"
DAYS = 7


def _iso(ts_unix_s: float) -> str:
    return pd.Timestamp(ts_unix_s, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    """(server, the series site="a" holds, its injected spikes); site="b" is a second series."""
    syn = synthetic_kpi(days=DAYS, seed=11, name=METRIC)
    other = synthetic_kpi(days=DAYS, seed=12, spike_at=None).series
    lines = [f"# TYPE {METRIC} gauge"]
    lines += [f'{METRIC}{{site="a"}} {v:.3f} {t:.0f}' for t, v in syn.series.items()]
    lines += [f'{METRIC}{{site="b"}} {v:.3f} {t:.0f}' for t, v in other.items()]
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    server.backfill("\n".join(lines) + "\n# EOF\n")
    with server:
        yield server, syn.series.round(3), syn.spikes


def test_review_from_prometheus_matches_the_csv_path(prom, capsys):
    server, series, injected = prom
    start, end = _iso(series.index[0]), _iso(series.index[-1])
    assert main(["kpi", "review", "--prometheus", server.url, "--query", f'{METRIC}{{site="a"}}',
                 "--start", start, "--end", end, "--step", "1m", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    local = review_kpi(series).to_dict()
    print(f"prometheus: {doc['summary']}")
    assert doc["points_n"] == len(series) == DAYS * 1440
    assert [s["start_unix_s"] for s in doc["spikes"]] == [s["start_unix_s"] for s in local["spikes"]]
    assert len(doc["spikes"]) == len(injected) and all(
        any(s["start_unix_s"] <= b and s["end_unix_s"] >= a for s in doc["spikes"]) for a, b in injected)
    assert doc["daily_start_time"] == "12:30" and doc["daily_period"]["days_n"] == DAYS
    seen = {p["interval_s"]: p["detected_n"] for p in doc["polling"]}
    assert seen == {p["interval_s"]: p["detected_n"] for p in local["polling"]}
    assert seen[900] == seen[60] == DAYS and seen[3600] < DAYS
    assert doc["name"] == METRIC and doc["source"].startswith(server.url)


def test_long_ranges_are_fetched_in_chunks(prom, monkeypatch):
    server, series, _ = prom
    t0, t1 = float(series.index[0]), float(series.index[0]) + 2 * 86400
    whole = query_prometheus(server.url, f'{METRIC}{{site="a"}}', t0, t1, 60)
    monkeypatch.setattr(kpi_source, "PROMETHEUS_MAX_POINTS", 700)  # 2,881 points -> 5 queries
    chunked = query_prometheus(server.url, f'{METRIC}{{site="a"}}', t0, t1, 60)
    assert len(whole) == 2 * 1440 + 1
    assert np.array_equal(chunked.index.to_numpy(), whole.index.to_numpy())
    assert np.array_equal(chunked.to_numpy(), whole.to_numpy())
    assert np.allclose(whole.to_numpy(), series.loc[t0:t1].to_numpy())


def test_prometheus_errors_are_one_line(prom, capsys):
    server, series, _ = prom
    start, end = _iso(series.index[0]), _iso(series.index[-1])
    base = ["kpi", "review", "--prometheus", server.url, "--start", start, "--end", end]
    assert main([*base, "--query", METRIC]) == 2
    err = capsys.readouterr().err
    assert "returned 2 series" in err and 'site="a"' in err and "sum(...)" in err
    assert main([*base, "--query", "sum(rate(" ]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loadkit: error: Prometheus query 'sum(rate(': bad_data") and "\n" not in err
    assert main([*base, "--query", "no_such_metric"]) == 2
    assert "returned no samples" in capsys.readouterr().err
    with pytest.raises(KpiSourceError, match="not after start"):
        query_prometheus(server.url, METRIC, 10.0, 5.0, 60)
