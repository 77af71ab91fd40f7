"""Login replay: dovecot's own login log and a CSV replayed against the lab with their timing."""

from __future__ import annotations

import argparse
import csv
import imaplib
import os
import poplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import gevent
import numpy as np
import pytest
from conftest import own_master
from locust.env import Environment

from loadkit.errors import InputFileError, ProfileError
from loadkit.generate.mail.login_replay import LoginReplay, settings_from_options
from loadkit.generate.mail.login_replay_input import read_login_log
from loadkit.record import counters
from loadkit.record.reader import load_run

REPO = Path(__file__).resolve().parents[1]
LOCUST = str(Path(sys.executable).with_name("locust"))
REPLAY = str(REPO / "locustfiles" / "login_replay.py")

# the lab's dovecot writes this (log_timestamp with microseconds); canned lines in its formats
BACKEND_LINES = """\
2026-11-29 12:30:00.100000 master: Info: Dovecot v2.3.19.1 starting up for imap, pop3
2026-11-29 12:30:00.250000 imap-login: Info: Login: user=<user0001>, method=PLAIN, rip=127.0.0.1, lip=127.0.0.1, mpid=11, secured, session=<AAAA>
2026-11-29 12:30:00.500000 imap-login: Info: Disconnected: Connection closed (no auth attempts in 0 secs): user=<>, rip=127.0.0.1, session=<ZZZZ>
2026-11-29 12:30:01.000000 pop3-login: Info: Login: user=<user0002>, method=PLAIN, rip=127.0.0.1, lip=127.0.0.1, mpid=12, secured, session=<BBBB>
2026-11-29 12:30:01.750000 imap(user0001)<11><AAAA>: Info: Disconnected: Logged out in=32 out=815
2026-11-29 12:30:02.000000 pop3(user0002)<12><BBBB>: Info: Disconnected: Logged out top=0/0, retr=0/0, del=0/3, size=4332
2026-11-29 12:30:03.000000 imap-login: Info: proxy(user0003,127.0.0.1:11143): Started proxying to <127.0.0.1> (0.005 secs): user=<user0003>, method=PLAIN, session=<CCCC>
2026-11-29 12:30:03.010000 imap-login: Info: Login: user=<user0003>, method=PLAIN, rip=127.0.0.1, mpid=13, secured, session=<CCCC>
2026-11-29 12:30:03.500000 imap-login: Info: proxy(user0003,127.0.0.1:11143): Disconnected by client (0s idle, in=1, out=2): user=<user0003>, session=<CCCC>
2026-11-29 12:30:04.000000 imap-login: Info: Login: user=<user0004>, method=PLAIN, rip=127.0.0.1, mpid=14, secured, session=<DDDD>
2026-11-29 12:30:06.000000 master: Info: the log ends here
"""


def test_dovecot_log_lines_become_timed_sessions(tmp_path: Path) -> None:
    path = tmp_path / "dovecot.log"
    path.write_text(BACKEND_LINES)
    log = read_login_log(path)
    assert log.kind == "dovecot"
    assert [(lg.user, lg.protocol) for lg in log.logins] == [
        ("user0001", "imap"), ("user0002", "pop3"), ("user0003", "imap"), ("user0004", "imap")]
    assert [round(lg.offset_s, 3) for lg in log.logins] == [0.0, 0.75, 2.75, 3.75]
    # held login -> its Disconnected line; a proxy's and its backend's line are one session; a
    # session still open when the log ends is held until its last line
    assert [round(lg.duration_s, 3) for lg in log.logins] == [1.5, 1.0, 0.5, 2.0]
    assert [lg.ended for lg in log.logins] == [True, True, True, False]
    assert log.logins[0].line == 2
    # a window: seconds from the first login, or a time of day on its day
    window = read_login_log(path, "0.5", "12:30:03.5")
    assert [lg.user for lg in window.logins] == ["user0002", "user0003"] and window.skipped_n == 2
    assert window.logins[0].offset_s == pytest.approx(0.25)
    # syslog's timestamps (no year, whole seconds) are read too
    syslog = tmp_path / "mail.log"
    syslog.write_text("Nov 29 12:30:00 host dovecot: imap-login: Login: user=<u1>, method=PLAIN, session=<S1>\n"
                      "Nov 29 12:30:02 host dovecot: imap(u1)<5><S1>: Disconnected: Logged out in=1 out=2\n")
    assert [(lg.user, lg.duration_s) for lg in read_login_log(syslog).logins] == [("u1", 2.0)]


def test_bad_login_files_are_one_line_errors_naming_file_and_line(tmp_path: Path) -> None:
    cases = {
        "timestamp,protocol,user\n1000,imap,user0001\nyesterday,imap,user0002\n": r"bad\.csv line 3: timestamp",
        "timestamp,protocol,user,duration_s\n1000,smtp,user0001,1\n": r"bad\.csv line 2: protocol 'smtp'",
        "timestamp,protocol,user,duration_s\n1000,imap,user0001,-4\n": r"bad\.csv line 2: duration_s",
        "time,proto\n1000,imap\n": r"bad\.csv (has no logins|line 1)",
        "just some text\n": r"bad\.csv has no logins",
        "xx imap-login: Info: Login: user=<u>, session=<S>\n": r"bad\.csv line 1: no timestamp",
    }
    for text, message in cases.items():
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(InputFileError, match=message) as err:
            read_login_log(tmp_path / "bad.csv")
        assert "\n" not in str(err.value)
    (tmp_path / "ok.csv").write_text("timestamp,protocol,user\n1000,imap,user0001\n")
    with pytest.raises(ProfileError, match="--replay-from"):
        read_login_log(tmp_path / "ok.csv", "noon")
    with pytest.raises(InputFileError, match="does not exist"):
        read_login_log(tmp_path / "missing.log")


def test_csv_with_blank_lines_before_its_header_is_read_with_true_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "logins.csv"
    # a spreadsheet's export: a byte-order mark, blank lines before the header and between rows
    path.write_text("\ufeff\n\ntimestamp,protocol,user\n1000,imap,user0001\n\n1002,pop3,user0002\n", encoding="utf-8")
    log = read_login_log(path)
    assert log.kind == "csv" and [(lg.user, lg.line) for lg in log.logins] == [("user0001", 4), ("user0002", 6)]
    path.write_text("\n\ntimestamp,protocol,user\n1000,imap,user0001\n\nyesterday,imap,user0002\n")
    with pytest.raises(InputFileError, match=r"logins\.csv line 6: timestamp 'yesterday'"):
        read_login_log(path)
    path.write_text("\ntimestamp,protocol,user,when\n1000,imap,user0001,1\n")
    with pytest.raises(InputFileError, match=r"logins\.csv line 2: expected the header"):
        read_login_log(path)


def test_largest_lateness_and_burst_window_over_workers_are_the_largest_not_the_sum() -> None:
    from loadkit.generate.metrics import GeneratorMetrics

    workers = [GeneratorMetrics() for _ in range(3)]
    for i, w in enumerate(workers):
        w.set_max_gauge("login_replay.max_lateness_s", 0.01 * (i + 1))
        w.set_max_gauge("dns.burst_window_s", 0.002 * (i + 1))
        w.add_gauge("imap.held_sessions", 10)
        w.add("login_replay.started", 5)
    master = GeneratorMetrics()
    for i, w in enumerate(workers):
        master._merge_worker(f"w{i}", w._report())
    gauges = master.gauges()
    assert gauges["login_replay.max_lateness_s"] == pytest.approx(0.03)
    assert gauges["dns.burst_window_s"] == pytest.approx(0.006)
    assert gauges["imap.held_sessions"] == 30  # a level still adds up over workers
    assert master.counters()["login_replay.started"] == 15


def test_a_headless_replay_over_two_workers_stops_when_both_shares_are_done(tmp_path: Path) -> None:
    # the master quits when each worker has reported its share of the log replayed, well before -t
    from mailfakes import FakeMailServer
    from mailrun import write_accounts

    accounts = write_accounts(tmp_path, 4)
    path = tmp_path / "logins.csv"
    path.write_text("timestamp,protocol,user,duration_s\n" + "".join(f"{1000 + 0.2 * i},pop3,user000{i + 1},0.1\n"
                                                                     for i in range(4)))
    with FakeMailServer("pop3", "ok") as fake:
        started = time.monotonic()
        proc = subprocess.Popen(
            [LOCUST, "-f", REPLAY, "--headless", "--processes", "2", *own_master(), "-u", "2", "-r", "2", "-t", "120s",
             "--only-summary", "--host", f"127.0.0.1:{fake.port}", "--mail-accounts", str(accounts),
             "--login-log", str(path), "--mail-fetch", "0"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            while proc.poll() is None and time.monotonic() - started < 100:
                gevent.sleep(0.1)  # the fake server runs in this process's greenlets meanwhile
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            _, err = proc.communicate(timeout=30)
        took_s = time.monotonic() - started
    assert proc.returncode == 0, err[-3000:]
    assert took_s < 60, err[-3000:]  # stopped with the log, not at -t 120s
    assert "all 2 workers have replayed their share of the log" in err
    assert fake.connections_n == 4


def _replay(lab, tmp_path: Path, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LOCUST, "-f", REPLAY, "--headless", "-u", "1", "-r", "1", "-t", "60s", "--only-summary", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=timeout_s,
        # the lab's IMAP and POP3 endpoints and its accounts file (LOADKIT_LAB_DIR)
        env={**os.environ, "LOADKIT_LAB_DIR": lab.dir, "PYTHONUNBUFFERED": "1"},
    )


def _environment(lab, monkeypatch, **options):
    """A Locust environment in this process with the replay's and the mail users' options."""
    monkeypatch.setenv("LOADKIT_LAB_DIR", lab.dir)  # the lab's endpoints and accounts file
    parsed = argparse.Namespace(login_log="", replay_speed="1", replay_from="", replay_to="", mail_fetch="0",
                                headless=True)
    for k, v in options.items():
        setattr(parsed, k, v)
    return Environment(parsed_options=parsed)


@pytest.mark.lab
def test_unknown_user_is_a_one_line_error_naming_the_line(lab, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "logins.csv"
    path.write_text("timestamp,protocol,user\n1000,imap,user0001\n1001,pop3,nobody\n")
    env = _environment(lab, monkeypatch)
    with pytest.raises(InputFileError) as err:
        LoginReplay(env, settings_from_options(argparse.Namespace(login_log=str(path))))
    assert str(err.value) == (f"login log {path} line 3: user 'nobody' is not in the accounts file "
                              "(pass --mail-accounts with that user's password)")
    with pytest.raises(ProfileError, match="--replay-speed"):
        settings_from_options(argparse.Namespace(login_log=str(path), replay_speed="0"))


def _passwords(lab) -> dict[str, str]:
    with open(lab.accounts_file, newline="") as f:
        return {row["user"]: row["password"] for row in csv.DictReader(f)}


def _original_traffic(lab, plan: list[tuple[float, str, str, float]]) -> None:
    """Real clients (stdlib imaplib/poplib) log in at the planned offsets and hold their sessions."""
    pw = _passwords(lab)
    t0 = time.monotonic()

    def one(offset_s: float, proto: str, user: str, hold_s: float) -> None:
        time.sleep(max(0.0, offset_s - (time.monotonic() - t0)))
        if proto == "imap":
            m = imaplib.IMAP4(lab.imap.host, lab.imap.port, timeout=10)
            m.login(user, pw[user])
            time.sleep(hold_s)
            m.logout()
        else:
            p = poplib.POP3(lab.pop3.host, lab.pop3.port, timeout=10)
            p.user(user)
            p.pass_(pw[user])
            time.sleep(hold_s)
            p.quit()

    threads = [threading.Thread(target=one, args=args) for args in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def _new_lines(path: Path, since_bytes: int) -> str:
    with open(path, "rb") as f:
        f.seek(since_bytes)
        return f.read().decode(errors="replace")


def _settle(path: Path) -> None:
    # dovecot's log process writes a moment after the event
    size = -1
    while size != path.stat().st_size:
        size = path.stat().st_size
        time.sleep(0.3)


@pytest.mark.lab
def test_dovecot_login_log_is_replayed_with_its_timing(lab, tmp_path: Path) -> None:
    backend_log = Path(lab.dir) / "logs" / "dovecot-backend.log"
    plan = [(0.0, "imap", "user0011", 0.6), (0.35, "pop3", "user0012", 0.3), (0.6, "imap", "user0013", 1.2),
            (1.2, "imap", "user0014", 0.2), (1.45, "pop3", "user0015", 0.8), (2.2, "imap", "user0016", 0.4),
            (2.5, "pop3", "user0017", 0.5), (3.1, "imap", "user0018", 0.3)]
    _settle(backend_log)
    mark = backend_log.stat().st_size
    _original_traffic(lab, plan)
    _settle(backend_log)
    original_path = tmp_path / "original.log"
    original_path.write_text(_new_lines(backend_log, mark))  # dovecot's own login log of that traffic
    original = read_login_log(original_path)
    assert [lg.user for lg in original.logins] == [p[2] for p in plan] and all(lg.ended for lg in original.logins)

    mark = backend_log.stat().st_size
    started = time.monotonic()
    proc = _replay(lab, tmp_path, "--login-log", str(original_path), "--mail-fetch", "0",
                   "--record-dir", str(tmp_path / "runs"), "--run-id", "replay")
    took_s = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took_s < 45  # it stopped when the last session ended, not at -t 60s
    _settle(backend_log)
    replayed_path = tmp_path / "replayed.log"
    replayed_path.write_text(_new_lines(backend_log, mark))
    replayed = read_login_log(replayed_path)
    assert [lg.user for lg in replayed.logins] == [lg.user for lg in original.logins]
    assert [lg.protocol for lg in replayed.logins] == [lg.protocol for lg in original.logins]
    # inter-arrival of the logins and hold times as dovecot saw them, replay vs original: the
    # median error within 100 ms, every one within 600 ms (both runs' logins cross haproxy, a
    # proxy and password checks, whose latency varies on a loaded machine)
    gaps_error = np.abs(np.diff([lg.offset_s for lg in replayed.logins]) - np.diff([lg.offset_s for lg in original.logins]))
    hold_error = np.abs(np.array([lg.duration_s for lg in replayed.logins]) - [lg.duration_s for lg in original.logins])
    assert np.median(gaps_error) < 0.1 and gaps_error.max() < 0.6, gaps_error
    assert np.median(hold_error) < 0.1 and hold_error.max() < 0.6, hold_error
    run = load_run(tmp_path / "runs" / "replay")
    assert counters.total(run, "login_replay.started") == len(plan)
    assert counters.total(run, "imap.logins") + counters.total(run, "pop3.logins") == len(plan)
    # the generator itself started every login on time (the rest of any error is the servers')
    assert counters.gauge(run, "login_replay.max_lateness_s").max() < 0.25


@pytest.mark.lab
def test_csv_is_replayed_in_its_window_at_its_speed(lab, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "logins.csv"
    rows = [(1000.0 + 2 * i, "imap" if i % 2 else "pop3", f"user00{21 + i}", 2.0) for i in range(6)]
    path.write_text("timestamp,protocol,user,duration_s\n" + "".join(f"{t},{p},{u},{d}\n" for t, p, u, d in rows))
    backend_log = Path(lab.dir) / "logs" / "dovecot-backend.log"
    _settle(backend_log)
    mark = backend_log.stat().st_size
    # logins 2 s apart at x4 from second 2 until before second 8: three, 0.5 s apart, each held 0.5 s
    opts = dict(login_log=str(path), replay_speed="4", replay_from="2", replay_to="8")
    env = _environment(lab, monkeypatch, **opts)
    replay = LoginReplay(env, settings_from_options(argparse.Namespace(**opts)))
    fired = []
    env.events.request.add_listener(lambda **kw: fired.append((kw["request_type"], kw["name"], kw["exception"])))
    gevent.spawn(replay.run).join(timeout=30)
    assert replay.done and [round(due, 3) for due, _ in replay.starts] == [0.0, 0.5, 1.0]
    assert all(actual - due < 0.25 for due, actual in replay.starts)
    assert [f for f in fired if f[2] is not None] == []
    assert {(t, n) for t, n, _ in fired} >= {("POP3", "PASS"), ("IMAP", "LOGIN"), ("IMAP", "LOGOUT"), ("POP3", "QUIT")}
    _settle(backend_log)
    (tmp_path / "seen.log").write_text(_new_lines(backend_log, mark))
    seen = read_login_log(tmp_path / "seen.log")
    assert [lg.user for lg in seen.logins] == ["user0022", "user0023", "user0024"]
    assert np.allclose(np.diff([lg.offset_s for lg in seen.logins]), 0.5, atol=0.25)
    assert np.allclose([lg.duration_s for lg in seen.logins], 0.5, atol=0.25)
