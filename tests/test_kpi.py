"""Production KPI review: the daily pattern, spikes, and what 1 h / 15 min / 1 min polling sees,
on synthetic series with known spikes (happy path and unlike it), from CSV and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from loadkit.cli import main
from loadkit.errors import ModelError, ProfileError
from loadkit.model.kpi import KpiReview, daily_pattern, polled_view, review_kpi
from loadkit.model.kpi_source import (
    KpiSourceError,
    parse_duration_s,
    parse_time_unix_s,
    parse_utc_offset_s,
    read_kpi_csv,
)
from loadkit.model.kpi_synth import VALIDATION_CASES, match_spikes, present_spikes, synthetic_kpi, validation_table


def write_csv(series: pd.Series, path, *, iso: bool = True, header: bool = True) -> None:
    ts = (pd.to_datetime(series.index, unit="s").strftime("%Y-%m-%dT%H:%M:%SZ") if iso
          else [f"{t:.0f}" for t in series.index])
    lines = (["timestamp,value"] if header else []) + [f"{t},{v:.3f}" for t, v in zip(ts, series.values)]
    path.write_text("\n".join(lines) + "\n")


def matched(review: KpiReview, injected: list[tuple[float, float]]) -> tuple[int, int]:
    return match_spikes(review.spikes, injected)


def test_daily_1230_spike_and_what_each_polling_interval_sees():
    syn = synthetic_kpi(days=7, spike_at="12:30", spike_s=600)
    r = review_kpi(syn.series)
    assert matched(r, syn.spikes) == (7, 0)
    assert r.daily_period is not None and r.daily_period.days_n == 7
    assert r.daily_start_time == "12:30"
    views = {v.interval_s: v for v in r.polling}
    # an hourly mean dilutes a 10-minute spike 6× and day-to-day variation hides it
    assert views[3600].detected_n == 0 and views[3600].peak_score < r.z_threshold
    # a 15-minute mean shows each spike at the end of the bucket it starts in
    assert views[900].detected_n == 7 and all(d == pytest.approx(900, abs=60) for d in views[900].delays_s)
    assert views[60].detected_n == 7 and all(d <= 120 for d in views[60].delays_s)
    assert all(v.false_alarms_n == 0 for v in r.polling)
    assert "daily at 12:3" in r.summary() and "1 h polling (mean): 0 of 7 spikes seen" in r.summary()
    back = KpiReview.from_json(r.to_json())
    assert back.polling[1].delays_s == views[900].delays_s and back.daily_period == r.daily_period


def test_daily_pattern_recovers_the_day_night_cycle():
    syn = synthetic_kpi(days=7, day_factor=0.0, wander=0.0)
    prof = daily_pattern(syn.series)
    hour = prof.index.to_numpy() / 3600.0
    truth = 1000.0 + 600.0 * np.cos(2 * np.pi * (hour - 14.0) / 24.0)
    err = np.abs(prof["baseline"].to_numpy() - truth)
    # the 12:30 spike stays out of the baseline; the median-smoothing flattens the peak a little
    assert float(np.max(err)) < 40.0, float(np.max(err))
    at_spike = prof.loc[12 * 3600 + 30 * 60: 12 * 3600 + 39 * 60]
    assert (at_spike["typical"] - at_spike["baseline"]).min() > 500  # every day's spike, not learned


def test_a_gauge_polled_every_15_min_misses_a_10_min_spike():
    syn = synthetic_kpi(days=5)
    r = review_kpi(syn.series, mode="sample")
    views = {v.interval_s: v for v in r.polling}
    # polls at 12:30 and 12:45 read 12:29 and 12:44: both outside the 12:30-12:39 spike
    assert views[900].detected_n == 0 and views[3600].detected_n == 0
    assert views[60].detected_n == 5
    pv = polled_view(syn.series, 900, "sample")
    assert len(pv) == 5 * 96 and not pv["stands_out"].any()


@pytest.mark.parametrize("case", [c for c in VALIDATION_CASES if c != "daily 12:30"])
def test_unlike_the_happy_path(case):
    kwargs, start = VALIDATION_CASES[case]
    syn = synthetic_kpi(seed=3, **kwargs)
    present = present_spikes(syn)  # not inside a gap
    r = review_kpi(syn.series)
    found, false = matched(r, present)
    print(f"{case}: injected {len(syn.spikes)} ({len(present)} in data), detected {len(r.spikes)}, "
          f"matched {found}, false {false}; {r.summary()}")
    assert (found, false) == (len(present), 0)
    assert r.daily_start_time == (start or "")
    if "gaps" in case:
        assert r.coverage < 0.9 and any("expected samples" in n for n in r.notes)
    if "flat" in case:
        assert "no daily pattern" in r.summary()
    if case == "flat and quiet":  # nothing else moves: even an hourly mean shows a 10-minute spike
        assert r.polling[0].interval_s == 3600 and r.polling[0].detected_n == 7


def test_validation_table_over_seeds():
    table = validation_table(seeds=range(2), cases={k: VALIDATION_CASES[k] for k in ("daily 12:30", "no spike")})
    print(table.to_string())
    assert table.loc["daily 12:30", "found"] == table.loc["daily 12:30", "injected"] == 14
    assert table["false"].sum() == 0 and (table["start_right"] == 2).all()
    assert table.loc["daily 12:30", "seen 15 min"] == 14 and table.loc["no spike", "false alarms 1 h"] == 0


def test_a_local_clock(capsys, tmp_path):
    """Spikes at 03:30 UTC are at 12:30 in Japan (UTC+09:00): the review says so on that clock,
    and its timestamps stay unix seconds."""
    syn = synthetic_kpi(days=5, spike_at="03:30")
    r = review_kpi(syn.series, utc_offset_s=9 * 3600)
    assert r.daily_start_time == "12:30" and matched(r, syn.spikes) == (5, 0)
    assert [s.start_unix_s for s in r.spikes] == [a for a, _ in syn.spikes]
    assert "daily at 12:3" in r.summary() and "UTC+09:00" in r.summary()
    assert review_kpi(syn.series).daily_start_time == "03:30"
    f = tmp_path / "kpi.csv"
    write_csv(syn.series, f)
    assert main(["kpi", "review", "--csv", str(f), "--utc-offset", "+09:00"]) == 0
    out = capsys.readouterr().out
    assert "starting 12:30" in out and "start (UTC+09:00)" in out
    assert main(["kpi", "review", "--csv", str(f), "--utc-offset", "+25:00"]) == 2
    assert "UTC offset '+25:00' is not +HH:MM" in capsys.readouterr().err


def test_counts_that_are_mostly_zero():
    """A receive-buffer drop counter per minute: 0 with the odd 1 or 2, and a burst of drops at
    12:30 each day; and a flat line with one excursion."""
    rng = np.random.default_rng(5)
    t = 1767571200.0 + np.arange(7 * 1440) * 60.0
    burst = (t % 86400 >= 45000) & (t % 86400 < 45300)
    drops = rng.poisson(0.05, len(t)) + np.where(burst, 150 + rng.poisson(30, len(t)), 0)
    r = review_kpi(pd.Series(drops.astype(float), index=t))
    assert len(r.spikes) == 7 and r.daily_start_time == "12:30", r.summary()
    flat = np.full(len(t), 7.0)
    flat[5000] = 9.5
    r = review_kpi(pd.Series(flat, index=t))
    assert [s.peak_unix_s for s in r.spikes] == [t[5000]]


def test_one_day_and_too_short_series():
    r = review_kpi(synthetic_kpi(days=1).series)
    assert len(r.spikes) == 1 and r.daily_period is None and "one day of data" in r.notes[0]
    with pytest.raises(ModelError, match="need >= 20"):
        review_kpi(synthetic_kpi(days=1).series.iloc[:10])
    with pytest.raises(ModelError, match="polling mode"):
        review_kpi(synthetic_kpi(days=1).series, mode="max")


def test_csv_iso_and_epoch_read_the_same(tmp_path):
    syn = synthetic_kpi(days=2)
    write_csv(syn.series, tmp_path / "iso.csv")
    write_csv(syn.series, tmp_path / "epoch.csv", iso=False, header=False)
    a, b = read_kpi_csv(tmp_path / "iso.csv"), read_kpi_csv(tmp_path / "epoch.csv")
    assert a.name == "value" and b.name == "epoch"
    assert np.array_equal(a.index.to_numpy(), syn.series.index.to_numpy())
    assert np.array_equal(a.to_numpy(), b.to_numpy())
    (tmp_path / "ms.csv").write_text("# exported\n\nts,rcvbuf_errors\n1767571200000,1\n1767571260000,\n"
                                     "2026-01-05T00:02:00+09:00,3\n")
    c = read_kpi_csv(tmp_path / "ms.csv")
    assert c.name == "rcvbuf_errors" and list(c.values) == [3.0, 1.0]  # the +09:00 time is earlier
    assert list(c.index) == [1767571200.0 - 9 * 3600 + 120, 1767571200.0]


@pytest.mark.parametrize("text, message", [
    ("timestamp,value\n2026-01-05T00:00:00Z,1\n2026-01-05T00:01:00Z,abc\n", "line 3: value 'abc' is not a number"),
    ("timestamp,value\n2026-01-05T00:00:00Z,1\nyesterday,2\n", "line 3: 'yesterday' is not a timestamp"),
    ("2026-01-05T00:00:00Z,1,7\n", "line 1: expected 2 fields"),
    ("timestamp,value\n", "has no timestamp,value lines"),
    ("1767571200,inf\n", "line 1: value 'inf' is not finite"),
])
def test_bad_csv_names_file_and_line(tmp_path, text, message):
    f = tmp_path / "kpi.csv"
    f.write_text(text)
    with pytest.raises(KpiSourceError, match=message):
        read_kpi_csv(f)


def test_times_and_durations():
    assert parse_utc_offset_s("+09:00") == 32400 and parse_utc_offset_s("-0530") == -19800
    assert parse_utc_offset_s("UTC+9") == 32400
    assert parse_duration_s("15m") == 900 and parse_duration_s("60") == 60 and parse_duration_s("1h") == 3600
    assert parse_time_unix_s("now-7d", now_unix_s=1e9) == 1e9 - 7 * 86400
    assert parse_time_unix_s("2026-01-05T00:00:00Z") == parse_time_unix_s("1767571200") == 1767571200.0
    with pytest.raises(ProfileError, match="duration must be more than 0"):
        parse_duration_s("0s")
    # one grammar with the profiles': compound durations and days both
    assert parse_duration_s("1h30m") == 5400 and parse_duration_s("7d") == 7 * 86400
    assert parse_time_unix_s("now-1d12h", now_unix_s=1e9) == 1e9 - 1.5 * 86400
    with pytest.raises(KpiSourceError, match="not a time"):
        parse_time_unix_s("last tuesday")


def test_cli_table_json_and_bad_input(tmp_path, capsys):
    syn = synthetic_kpi(days=4)
    f = tmp_path / "queries_per_s.csv"
    write_csv(syn.series, f, header=False)
    assert main(["kpi", "review", "--csv", str(f)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("KPI queries_per_s") and "daily at 12:3" in out
    rows = {ln.split()[0] + ln.split()[1]: ln.split() for ln in out.splitlines() if ln.strip().startswith(("1 h", "15 min", "1 min"))}
    assert rows["1h"][4] == "0/4" and rows["15min"][4] == "4/4" and rows["1min"][4] == "4/4"
    out_json = tmp_path / "r.json"
    assert main(["kpi", "review", "--csv", str(f), "--json", "--polling", "30m,5m", "--out", str(out_json)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["interval_s"] for p in doc["polling"]] == [1800, 300] and doc["polling"][1]["detected_n"] == 4
    assert KpiReview.from_json(out_json.read_text()).daily_start_time == "12:30"

    f.write_text(f.read_text() + "2026-02-01T00:00:00Z,12,5\n")
    lines_n = len(f.read_text().splitlines())
    assert main(["kpi", "review", "--csv", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"loadkit: error: KPI file {f} line {lines_n}: expected 2 fields (timestamp,value), got 3"
    assert main(["kpi", "review", "--prometheus", "http://192.0.2.1:9090", "--query", "up"]) == 2
    assert "outside the allowlist" in capsys.readouterr().err  # nothing sent off loopback
    assert main(["kpi", "review", "--csv", str(f), "--query", "up"]) == 2
    assert "--query goes with --prometheus" in capsys.readouterr().err


def test_kpi_review_notebook_executes(tmp_path):
    import papermill as pm

    from test_notebooks import NOTEBOOKS, _has_image, _outputs

    f = tmp_path / "kpi.csv"
    write_csv(synthetic_kpi(days=7, spike_at="03:30").series, f)  # 12:30 in UTC+09:00
    out_nb, out_json = tmp_path / "kpi_review.out.ipynb", tmp_path / "kpi.json"
    pm.execute_notebook(str(NOTEBOOKS / "kpi_review.ipynb"), str(out_nb), kernel_name="python3",
                        parameters={"csv_path": str(f), "name": "dns qps", "out_json": str(out_json),
                                    "utc_offset": "+09:00"},
                        progress_bar=False, cwd=str(tmp_path))
    text = _outputs(out_nb)
    assert "dns qps: 10080 points" in text and "daily at 12:3" in text and "(starting 12:30)" in text
    assert "UTC+09:00" in text and "spike start (UTC+09:00)" in text
    assert "1 h polling (mean): 0 of 7 spikes seen" in text and "15 min polling (mean): 7 of 7 spikes seen" in text
    assert KpiReview.from_json(out_json.read_text()).daily_start_time == "12:30"
    nb = json.loads(out_nb.read_text())
    images = sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    assert _has_image(out_nb) and images == 3  # daily pattern, spikes, polling panels


def test_table_summary_and_json_agree_on_whether_there_is_a_daily_pattern():
    flat = review_kpi(synthetic_kpi(days=2, daily_amplitude=0.0, wander=0.0, spike_at=None).series)
    shaped = review_kpi(synthetic_kpi(days=2, spike_at=None).series)
    from loadkit.cli.kpi import render_table

    for r, has in ((flat, False), (shaped, True)):
        assert r.has_pattern is has and r.to_dict()["has_pattern"] is has
        table = render_table(r)
        assert ("peak at" in table) is has and ("daily pattern: none beyond the noise" in table) is not has
        assert ("no daily pattern beyond the noise" in r.summary()) is not has


def test_sub_minute_polling_intervals_keep_their_value_and_label(tmp_path, capsys):
    t = 1.7e9 + np.arange(0, 1800, 0.25)  # 30 min sampled every 250 ms
    v = 100 + np.random.default_rng(1).normal(0, 3, len(t))
    v[(t >= t[0] + 900) & (t < t[0] + 960)] += 200  # one minute-long spike
    f = tmp_path / "fast.csv"
    f.write_text("".join(f"{a:.3f},{b:.3f}\n" for a, b in zip(t, v)))
    r = review_kpi(read_kpi_csv(f), longest_spike_s=120, polling_s=(0.5, 90))
    assert [p.interval_s for p in r.polling] == [0.5, 90.0]
    assert r.polling[0].summary().startswith("500 ms polling (mean): 1 of 1 spikes seen")
    assert r.polling[1].summary().startswith("90 s polling (mean): 1 of 1 spikes seen")
    assert main(["kpi", "review", "--csv", str(f), "--polling", "500ms,90s", "--longest-spike", "2m"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert ["500", "ms"] in rows and ["90", "s"] in rows


def test_cli_longest_spike_takes_a_compound_duration(tmp_path, capsys):
    f = tmp_path / "kpi.csv"
    write_csv(synthetic_kpi(days=2).series, f)
    assert main(["kpi", "review", "--csv", str(f), "--json", "--longest-spike", "1h30m"]) == 0
    assert json.loads(capsys.readouterr().out)["window_s"] == 3 * 5400


class _Redirector:
    """A loopback HTTP server: /away/... redirects outside the allowlist, /near/... to its own
    /api/..., which answers a one-point Prometheus matrix; it records the paths it was asked."""

    def __init__(self) -> None:
        import http.server
        import threading

        paths: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                paths.append(self.path)
                if self.path.startswith(("/away/", "/near/")):
                    host = "192.0.2.1:9090" if self.path.startswith("/away/") else "127.0.63.1:%d" % self.server.server_port
                    self.send_response(302)
                    self.send_header("Location", f"http://{host}/{self.path.split('/', 2)[2]}")
                    self.end_headers()
                    return
                body = json.dumps({"status": "success", "data": {"resultType": "matrix", "result": [
                    {"metric": {"__name__": "up"}, "values": [[1.7e9, "1"]]}]}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.paths = paths
        self.server = http.server.HTTPServer(("127.0.63.1", 0), Handler)
        self.url = f"http://127.0.63.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_prometheus_redirects_are_followed_only_inside_the_allowlist():
    from loadkit.errors import TargetNotAllowed
    from loadkit.model.kpi_source import query_prometheus

    srv = _Redirector()
    try:
        with pytest.raises(TargetNotAllowed, match="redirected to http://192.0.2.1:9090/api/v1/query_range"):
            query_prometheus(f"{srv.url}/away", "up", 1.7e9 - 60, 1.7e9, 60, allowlist="127.0.0.0/8",
                             timeout_s=5)
        assert len(srv.paths) == 1  # asked once; 192.0.2.1 never was
        s = query_prometheus(f"{srv.url}/near", "up", 1.7e9 - 60, 1.7e9, 60, allowlist="127.0.0.0/8", timeout_s=5)
        assert s.to_dict() == {1.7e9: 1.0} and [p.split("?")[0] for p in srv.paths[1:]] == [
            "/near/api/v1/query_range", "/api/v1/query_range"]
    finally:
        srv.close()
