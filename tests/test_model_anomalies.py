"""Anomalies: a week with a daily 12:30 spike and a level shift; polling detection delays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from loadkit.errors import ModelError
from loadkit.model import AnomalyResult, find_anomalies
from model_synth import kpi_trace


def test_daily_1230_spike_and_level_shift_found():
    series, truth = kpi_trace(days=7)
    res = find_anomalies(series)
    assert len(res.spikes) == 7  # one per day
    for sp in res.spikes:
        sod = sp.start_unix_s % 86400
        assert sod == pytest.approx(truth["spike_at_s"], abs=60)  # tolerance: one sample
    assert res.daily_period is not None
    assert res.daily_period.time_of_day in ("12:32", "12:33")  # peak in the 12:30-12:35 spike
    assert res.daily_period.days_n == 7
    assert len(res.change_points) == 1
    cp = res.change_points[0]
    assert cp.ts_unix_s == pytest.approx(truth["shift_ts"], abs=3600)  # tolerance: one window
    assert cp.level_after - cp.level_before == pytest.approx(30, abs=3)


def test_polling_delay_hourly_never_sees_a_five_minute_spike():
    # the KPI drifts slowly (sd 2 over about an hour), as real KPIs do: an hourly mean moves by
    # a few units on its own, so a 5-minute +50 spike (+4 on the hour) does not stand out
    series, truth = kpi_trace(days=2, shift_day=None, wander=2.0)
    res = find_anomalies(series)
    assert res.detection_delay_s[3600] is None
    assert res.detected_spikes_n[3600] == 0
    # a 15-minute bucket mean is +16.7, well above its own baseline: seen at the end of the
    # bucket (the spike starts at 12:30, a bucket boundary, so the 12:30-12:45 mean reports at 12:45)
    assert res.detection_delay_s[900] == pytest.approx(900, abs=1)
    assert res.detection_delay_s[60] == pytest.approx(60, abs=1)
    assert "1 h: not detected" in res.summary()


def test_no_delay_taken_from_an_unrelated_later_crossing():
    # hourly polling never shows the daily 5-minute spikes; days later the level shifts by +30.
    # A global threshold counted that shift as the hourly "detection" of the first spike.
    series, truth = kpi_trace(days=7, wander=2.0, shift_day=4)
    res = find_anomalies(series)
    assert len(res.change_points) == 1
    assert res.detection_delay_s[3600] is None
    assert res.detected_spikes_n[3600] == 0
    assert res.detected_spikes_n[60] == len(res.spikes) == 7


def test_daily_cycle_is_not_a_string_of_level_shifts():
    series, _ = kpi_trace(days=7, shift_day=None, spike_height=0.0, daily_amplitude=20.0)
    res = find_anomalies(series)
    assert res.daily_pattern_removed
    assert res.change_points == []
    assert res.spikes == []
    # and a real shift on top of the cycle is still found, once
    series, truth = kpi_trace(days=7, shift_day=4, spike_height=0.0, daily_amplitude=20.0)
    res = find_anomalies(series)
    assert len(res.change_points) == 1
    assert res.change_points[0].ts_unix_s == pytest.approx(truth["shift_ts"], abs=3600)


def test_a_40_minute_plateau_at_50_sigma_is_found():
    series, truth = kpi_trace(days=3, shift_day=None, spike_height=0.0, plateau_s=2400.0,
                              plateau_height=50.0)
    res = find_anomalies(series)  # the window follows longest_spike_s (1 h) by default
    assert len(res.spikes) == 1
    sp = res.spikes[0]
    assert sp.start_unix_s == pytest.approx(truth["plateau_ts"], abs=60)
    assert sp.end_unix_s - sp.start_unix_s == pytest.approx(2400, abs=120)
    assert res.window_s >= 2 * 2400
    # a window too short for it (1 h, the old default) swallows most of it into the median
    short = find_anomalies(series, window_s=3600.0)
    assert sum(s.end_unix_s - s.start_unix_s for s in short.spikes) < 1800


def test_unix_index_json_round_trip_and_bad_input():
    series, _ = kpi_trace(days=2, shift_day=None)
    unix_s = (series.index - pd.Timestamp(0)) / pd.Timedelta(seconds=1)
    unix = pd.Series(series.to_numpy(), index=np.asarray(unix_s, dtype=float), name="x")
    res = find_anomalies(unix)
    assert len(res.spikes) == 2
    back = AnomalyResult.from_json(res.to_json())
    assert back == res
    assert set(back.detection_delay_s) == {3600, 900, 60}
    with pytest.raises(ModelError, match=">= 20"):
        find_anomalies(unix.iloc[:5])
    with pytest.raises(ModelError, match="Series"):
        find_anomalies([1, 2, 3])


def test_kpi_series_is_the_one_for_the_cli_and_the_report(tmp_path):
    from loadkit.model import kpi_series
    from loadkit.record.reader import load_run
    from model_synth import write_retry_run, write_usl_run

    write_usl_run(tmp_path / "usl")
    run = load_run(tmp_path / "usl")
    s = kpi_series(run)  # no table: the report's KPI, failed requests per interval (not DNS)
    assert s.name == "failed requests per interval"
    assert s.to_numpy() == pytest.approx(run.requests.groupby("ts_unix_s")["failures_n"].sum().to_numpy())
    write_retry_run(tmp_path / "dns", metastable=False)
    net = kpi_series(load_run(tmp_path / "dns"), "net", "udp_rcvbuf_errors_n", delta=True)
    assert (net >= 0).all() and len(net) == len(load_run(tmp_path / "dns").net) - 1
    with pytest.raises(ModelError, match="no column 'nope'"):
        kpi_series(run, "net", "nope")


def test_fit_anomalies_and_kpi_review_give_one_delay_for_one_series():
    from loadkit.model.kpi import review_kpi
    from loadkit.model.kpi_synth import synthetic_kpi

    # a daily cycle with a 10-minute spike at 12:30: a baseline of the buckets before each one
    # (the old method here) rode the cycle's slope and saw no spike at 15 min
    series = synthetic_kpi(days=3, seed=0).series
    res = find_anomalies(series, longest_spike_s=2400)
    review = review_kpi(series, longest_spike_s=2400, polling_s=(3600, 900, 60))
    assert res.spikes[0].start_unix_s == review.spikes[0].start_unix_s
    assert res.detection_delay_s == {int(v.interval_s): v.delays_s[0] for v in review.polling}
    assert res.detected_spikes_n == {int(v.interval_s): v.detected_n for v in review.polling}
    assert res.detection_delay_s[900] == pytest.approx(900, abs=1) and res.detected_spikes_n[900] == 3
