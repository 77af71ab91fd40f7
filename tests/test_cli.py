"""The ``loadkit`` command as a user meets it: help that exits 0 and says what options do, and a
reader that stops early (``| head``) ending the command quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadkit.record.synthetic import write_dns_run

REPO = Path(__file__).resolve().parents[1]
LOADKIT = [sys.executable, "-m", "loadkit"]


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "loadkit.demo", "--help"],
    [sys.executable, "-m", "loadkit.lab.smoke", "--help"],
    [*LOADKIT, "demo", "--help"],
    [*LOADKIT, "lab", "smoke", "--help"],
])
def test_help_of_the_runnable_modules_exits_0(command: list[str]) -> None:
    res = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: loadkit ")


def test_every_lab_up_option_says_what_it_does() -> None:
    res = subprocess.run([*LOADKIT, "lab", "up", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    for option, words in (("--dns-port PORT", "unbound's UDP and TCP port"),
                          ("--imap-port PORT", "haproxy's IMAP port"),
                          ("--pop3-port PORT", "haproxy's POP3 port"),
                          ("--dns-threads N", "unbound worker threads")):
        assert f"{option} {words}" in text, option


def test_demo_refuses_an_incident_that_does_not_exist_in_one_line() -> None:
    res = subprocess.run([*LOADKIT, "demo", "incidents", "4"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["loadkit: error: incident '4' does not exist: choose from 1, 2, 2b, 2c, 3"]


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for i in range(3):
        write_dns_run(runs, run_id=f"dns-{i}", duration_s=3, chunk_s=3)
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # like `| head` that has already read its lines: every write fails (EPIPE)
    try:
        res = subprocess.run([*LOADKIT, "runs", "list", "--json", "--dir", str(runs)], stdout=write_fd,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_fd)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.returncode == 141  # what a process ended by SIGPIPE reports, as `yes | head` does


@pytest.mark.parametrize("args, message", [
    (["lab", "up", "--dns-port", "abc"], "--dns-port 'abc' is not a whole number"),
    (["lab", "up", "--dns-cpu", "half"], "--dns-cpu 'half' is not a number"),
])
def test_a_bad_option_value_is_one_line_without_traceback(args: list[str], message: str) -> None:
    res = subprocess.run([*LOADKIT, *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"loadkit: error: {message}"]


def test_an_unknown_argument_is_reported_by_the_command_it_was_given_to(capsys) -> None:
    from loadkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["runs", "list", "runs"])  # a directory given where --dir is the option
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: loadkit runs list" in err and "loadkit runs list: error: unrecognized arguments: runs" in err
