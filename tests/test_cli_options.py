"""Option values the command line refuses before anything runs: nan and inf (float() takes both,
and nan slips past every later range check), in argparse's one line and exit status 2. Ranges
are the models' to check, with their own messages, except where no model checks them."""

from __future__ import annotations

import argparse

import pytest

from loadkit.cli import build_parser, main


def _actions(parser: argparse.ArgumentParser, where: str = "loadkit"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{where} {name}")
        else:
            yield where, action


def test_no_option_takes_a_bare_float() -> None:
    bare = [f"{where} {'/'.join(a.option_strings)}" for where, a in _actions(build_parser()) if a.type is float]
    assert bare == []


@pytest.mark.parametrize("argv", [
    ["kpi", "review", "--csv", "x.csv", "--z", "nan"],
    ["kpi", "review", "--csv", "x.csv", "--z", "inf"],
    ["fit", "firewall", "run", "--size", "nan"],
    ["fit", "anomalies", "run", "--longest-spike", "inf"],
    ["fit", "headroom", "run", "--reconnect-overhead", "nan"],
    ["fit", "retries", "run", "--trigger-end", "inf"],
    ["fit", "udp-burst", "run", "--burst-window", "inf"],
    ["fit", "anomalies", "run", "--z", "0"],
    ["report", "--release", "r1", "--forecast-peak-qps", "NaN"],
])
def test_nan_inf_and_out_of_range_values_are_refused_in_one_line(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"argument {argv[-2]}: {argv[-1]!r} is not a finite number" in err.strip().splitlines()[-1]


def test_finite_values_still_parse() -> None:
    args = build_parser().parse_args(["fit", "headroom", "run", "--reconnect-overhead", "0",
                                      "--forecast-peak", "1e3"])
    assert args.reconnect_overhead == 0.0 and args.forecast_peak == 1000.0


def test_collect_refuses_a_nan_interval_in_one_line(capsys) -> None:
    assert main(["collect", "--full-memory-interval", "nan", "--duration", "1"]) == 2
    assert capsys.readouterr().err.strip() == \
        "loadkit: error: --full-memory-interval 'nan' is not a finite number of seconds"
