"""Anomalies: a week with a daily 12:30 spike and a level shift; polling detection delays."""

from __future__ import annotations

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
    series, truth = kpi_trace(days=2, shift_day=None)
    res = find_anomalies(series)
    # a 5-minute +50 spike averages to +4 over an hour: under the threshold -> never
    assert res.detection_delay_s[3600] is None
    # a 15-minute bucket mean is +16.7, above the threshold: seen at the end of the bucket
    # (the spike starts at 12:30, a bucket boundary, so the 12:30-12:45 mean reports at 12:45)
    assert res.detection_delay_s[900] == pytest.approx(900, abs=1)
    assert res.detection_delay_s[60] == pytest.approx(60, abs=1)
    assert "1 h: never" in res.summary()


def test_unix_index_json_round_trip_and_bad_input():
    series, _ = kpi_trace(days=2, shift_day=None)
    unix = pd.Series(series.to_numpy(), index=series.index.astype("int64") / 1e9, name="x")
    res = find_anomalies(unix)
    assert len(res.spikes) == 2
    back = AnomalyResult.from_json(res.to_json())
    assert back == res
    assert set(back.detection_delay_s) == {3600, 900, 60}
    with pytest.raises(ModelError, match=">= 20"):
        find_anomalies(unix.iloc[:5])
    with pytest.raises(ModelError, match="Series"):
        find_anomalies([1, 2, 3])
