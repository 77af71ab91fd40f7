"""Retry amplification and the metastability verdict on simulated trigger-then-remove runs."""

from __future__ import annotations

import json

import pytest

from loadkit.errors import ModelError
from loadkit.model import MetastabilityResult, metastability, retry_amplification
from loadkit.record.reader import load_run
from model_synth import T0, write_retry_run


def test_amplification_matches_the_simulation(tmp_path):
    truth = write_retry_run(tmp_path / "run", metastable=False)
    amp = retry_amplification(load_run(tmp_path / "run"))
    before = amp[amp.index < truth["trigger_start_unix_s"]]
    assert before["amplification"].to_numpy() == pytest.approx(1.0)
    # during the trigger: 4000/s offered vs 2500/s capacity, half the drops retry: the drops settle
    # at 3000/s so offered = 4000 + 1500 -> amplification 1.375 (tolerance 2 %)
    late = amp[(amp.index > truth["trigger_start_unix_s"] + 10) & (amp.index <= truth["trigger_end_unix_s"])]
    assert late["amplification"].median() == pytest.approx(1.375, rel=0.02)
    assert late["answered_qps"].median() == pytest.approx(2500, rel=0.01)


def test_verdicts_separate_recovery_from_metastability(tmp_path):
    truth = write_retry_run(tmp_path / "ok", metastable=False)
    ok = metastability(load_run(tmp_path / "ok"))
    assert ok.verdict == "recovers"
    assert ok.trigger_end_unix_s == pytest.approx(truth["trigger_end_unix_s"], abs=1.0)
    assert 0 <= ok.recovery_s <= 3.0  # the retries drain within ~2 intervals

    write_retry_run(tmp_path / "stuck", metastable=True)
    stuck = metastability(load_run(tmp_path / "stuck"), truth["trigger_end_unix_s"])
    assert stuck.verdict == "metastable"
    assert stuck.post_amplification > 1.2 and stuck.post_goodput_ratio < 0.8
    assert stuck.recovery_s is None
    assert "metastable" in stuck.summary()

    write_retry_run(tmp_path / "calm", metastable=False, trigger_qps=2000.0)
    assert metastability(load_run(tmp_path / "calm")).verdict == "stable"


def test_trigger_from_events_and_json(tmp_path):
    truth = write_retry_run(tmp_path / "run", metastable=False)
    with (tmp_path / "run" / "events.jsonl").open("w") as fh:
        for phase in ("trigger_start", "trigger_end"):
            fh.write(json.dumps({"ts_unix_s": truth[phase + "_unix_s"], "kind": "warning",
                                 "source": "shape", "detail": {"phase": phase}}) + "\n")
    res = metastability(load_run(tmp_path / "run"))
    assert res.trigger_start_unix_s == truth["trigger_start_unix_s"]
    assert res.trigger_end_unix_s == truth["trigger_end_unix_s"]
    assert MetastabilityResult.from_json(res.to_json()) == res


def test_no_counters_or_too_short_is_a_model_error(tmp_path):
    write_retry_run(tmp_path / "run", metastable=False, after_s=2)
    with pytest.raises(ModelError, match="after the trigger"):
        metastability(load_run(tmp_path / "run"), T0 + 50)
    from model_synth import write_usl_run

    write_usl_run(tmp_path / "usl")
    with pytest.raises(ModelError, match="dns.original_sent"):
        retry_amplification(load_run(tmp_path / "usl"))
