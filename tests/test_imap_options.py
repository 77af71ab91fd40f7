"""Storm options: accounts file, option values, arrival models and reconnect policies."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import gevent
import pytest
from locust.env import Environment

from loadkit.errors import InputFileError, ProfileError
from loadkit.generate.mail.users import (
    Pacer,
    ReconnectPolicy,
    options_from_parsed,
    read_accounts,
    set_options,
)
from mailfakes import FakeMailServer
from mailrun import TestImapUser, opts, storm, write_accounts

ROOT = Path(__file__).resolve().parents[1]
LOCUST = str(Path(sys.executable).with_name("locust"))


# -- accounts ------------------------------------------------------------------------------------


def test_accounts_file_is_read(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("user,password\nuser0001,s3cret\n\nuser0002,pw\n")
    assert read_accounts(p) == [("user0001", "s3cret"), ("user0002", "pw")]


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "does not exist"),
        ("", "line 1: expected the header 'user,password'"),
        ("login,pw\nu,p\n", "line 1: expected the header 'user,password', got 'login,pw'"),
        ("user,password\nu1,p1\nu2\n", "line 3: expected 'user,password', got 'u2'"),
        ("user,password\nu1,\n", "line 2: expected 'user,password'"),
        ("user,password\n", "has a header but no accounts"),
    ],
)
def test_bad_accounts_file_is_one_line_naming_file_and_line(tmp_path: Path, text, message) -> None:
    p = tmp_path / "accounts.csv"
    if text is not None:
        p.write_text(text)
    with pytest.raises(InputFileError) as err:
        read_accounts(p)
    assert message in str(err.value)
    assert str(p) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("locustfile", ["imap_storm.py", "pop_storm.py"])
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mail-accounts", "missing.csv"], "accounts file missing.csv does not exist"),
        (["--mail-dwell", "forever"], "--mail-dwell 'forever'"),
        (["--mail-arrival", "rate:0"], "--mail-arrival 'rate:0'"),
        (["--mail-reconnect", "sometimes"], "--mail-reconnect 'sometimes'"),
        (["--mail-timeouts", "login=-1"], "--mail-timeouts: login must be > 0"),
        (["--mail-tls", "ssl"], "--mail-tls 'ssl'"),
        (["--host", "192.0.2.1"], "outside the allowlist"),
    ],
)
def test_locust_stops_before_connecting_with_one_line(locustfile, extra, message, tmp_path: Path) -> None:
    accounts = write_accounts(tmp_path, 3)
    args = ["--mail-accounts", str(accounts), *extra]
    with FakeMailServer("imap" if "imap" in locustfile else "pop3", "ok") as fake:
        if "--host" not in extra:
            args += ["--host", fake.address]
        proc = subprocess.Popen(
            [LOCUST, "-f", str(ROOT / "locustfiles" / locustfile), "--headless", "-u", "1", "-t", "5s", *args],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            gevent.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
        assert fake.connections_n == 0  # nothing was sent
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("loadkit: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_options_are_locust_custom_arguments_shown_in_the_web_ui() -> None:
    from locust.argument_parser import LocustArgumentParser

    from loadkit.generate.mail.users import add_arguments

    parser = LocustArgumentParser()
    add_arguments(parser)
    shown = parser.args_included_in_web_ui
    for dest in ("mail_accounts", "mail_dwell", "mail_arrival", "mail_reconnect", "mail_give_up",
                 "mail_tls", "mail_timeouts"):
        assert dest in shown, dest
    assert "backoff" in shown["mail_reconnect"].help


def test_option_values_are_parsed() -> None:
    o = options_from_parsed(Namespace(
        mail_dwell="idle", mail_arrival="rate:25", mail_reconnect="fixed", mail_reconnect_delay="2",
        mail_give_up="4", mail_timeouts="connect=1.5, login=7", mail_tls="starttls", mail_fetch="0",
    ))
    assert o.dwell_s is None
    assert o.arrival_rate_per_s == 25.0
    assert o.reconnect.kind == "fixed" and o.reconnect.delay_s == 2.0 and o.reconnect.give_up_n == 4
    assert o.timeouts.connect_s == 1.5 and o.timeouts.login_s == 7.0 and o.timeouts.select_s == 10.0
    assert o.tls == "starttls" and o.fetch_n == 0
    with pytest.raises(ProfileError, match="--mail-give-up"):
        options_from_parsed(Namespace(mail_give_up="-1"))


# -- reconnect policies and arrivals ----------------------------------------------------------


def test_backoff_grows_with_full_jitter_under_its_cap() -> None:
    rng = random.Random(1)
    p = ReconnectPolicy(kind="backoff", delay_s=0.5, max_delay_s=8.0, min_delay_s=0.1)
    for n, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (40, 8.0)):
        delays = [p.delay(n, rng) for _ in range(300)]
        assert all(0.1 <= d <= ceiling for d in delays), n
        assert max(delays) > 0.8 * ceiling  # jitter spreads over the whole range
    assert ReconnectPolicy(kind="immediate", min_delay_s=0.1).delay(7, rng) == 0.1
    assert ReconnectPolicy(kind="fixed", delay_s=3.0).delay(7, rng) == 3.0
    assert ReconnectPolicy(give_up_n=3).gives_up(3) and not ReconnectPolicy(give_up_n=0).gives_up(99)


def test_pacer_spaces_starts_and_drops_missed_slots() -> None:
    pacer = Pacer(rate_per_s=20.0)
    starts = []
    for _ in range(5):
        pacer.wait()
        starts.append(time.monotonic())
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(g >= 0.04 for g in gaps)  # never earlier than its slot
    gevent.sleep(0.5)  # nobody came for ~10 slots
    pacer.wait()
    assert pacer.late_n >= 5


def test_open_loop_rate_bounds_new_logins(tmp_path: Path) -> None:
    accounts = write_accounts(tmp_path)
    with FakeMailServer("imap", "ok") as fake:
        started = time.monotonic()
        out = storm("imap", fake.address, opts(accounts, arrival="rate:10", dwell_s=0.1), users=20, seconds=2.0)
        ran_s = time.monotonic() - started
    logins = out["requests"]["LOGIN"]
    # 10 a second for as long as the storm really ran (a loaded machine oversleeps its 2 s); 20
    # users each free again 0.1 s after a login would make hundreds in a closed loop
    assert 0 < logins <= 10 * ran_s + 2


def test_open_loop_counts_arrivals_no_user_was_free_for(tmp_path: Path) -> None:
    accounts = write_accounts(tmp_path)
    with FakeMailServer("imap", "ok") as fake:
        out = storm("imap", fake.address, opts(accounts, arrival="rate:50", dwell_s=1.0), users=2, seconds=2.5)
    assert out["counters"]["imap.arrivals_late"] > 0


def test_herd_waits_until_every_user_is_spawned(tmp_path: Path) -> None:
    accounts = write_accounts(tmp_path)
    env = Environment(user_classes=[TestImapUser])
    first_login: list[float] = []
    spawned: list[float] = []
    env.events.request.add_listener(
        lambda name, **_kw: first_login.append(time.monotonic()) if name == "LOGIN" else None)
    env.events.spawning_complete.add_listener(lambda **_kw: spawned.append(time.monotonic()))
    with FakeMailServer("imap", "ok") as fake:
        env.host = fake.address
        set_options(env, opts(accounts, arrival="herd"))
        runner = env.create_local_runner()
        runner.start(6, spawn_rate=4)  # spawning takes ~1.5 s
        gevent.sleep(3.0)
        runner.quit()
    assert spawned and first_login
    assert min(first_login) >= spawned[0]


def test_the_web_ui_host_field_shows_the_default_target(tmp_path: Path, monkeypatch) -> None:
    """Without --host the users' class host is the target they resolved (Locust's web UI shows
    it in its Host field): here the lab that LOADKIT_LAB_DIR names, on its own address and port."""
    import json

    from loadkit.generate.mail import users as mail_users

    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    config = {"address": "127.0.60.1", "dns_port": 7353, "imap_port": 3143, "pop3_port": 3110}
    (lab_dir / "state.json").write_text(json.dumps({"config": config}))
    monkeypatch.setenv("LOADKIT_LAB_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.setenv("LOADKIT_LAB_DIR", str(lab_dir))

    class HostShownUser(mail_users.ImapUser):
        pass

    env = Environment(user_classes=[HostShownUser])
    set_options(env, opts(write_accounts(tmp_path)))
    mail_users._validate_before_running(env)
    assert HostShownUser.host == "127.0.60.1:3143"


def test_a_host_typed_in_the_web_ui_is_where_the_next_test_goes(tmp_path: Path, capsys) -> None:
    from loadkit.generate.mail import users as mail_users

    class WebUiUser(mail_users.ImapUser):
        pass

    env = Environment(user_classes=[WebUiUser], parsed_options=Namespace(
        mail_accounts=str(write_accounts(tmp_path)), target=[]))
    env.host = "127.0.0.1:1"
    mail_users._validate_before_running(env)
    assert str(WebUiUser.shared(env).target) == "127.0.0.1:1"
    env.host = "127.0.0.2"  # the Host field of the next test, no port: IMAP's 143
    mail_users._follow_the_web_ui(env)
    assert str(WebUiUser.shared(env).target) == "127.0.0.2:143"
    env.host = "192.0.2.1:143"  # outside the allowlist: one line, and the test does not run
    mail_users._follow_the_web_ui(env)
    assert env.process_exit_code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("loadkit: error: target 192.0.2.1:143 resolves to 192.0.2.1, outside the allowlist")
