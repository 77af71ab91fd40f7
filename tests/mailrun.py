"""Run the mail storm users inside the test process (Locust as a library) for a few seconds."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import gevent
from locust.env import Environment

from loadkit.generate.mail.classify import Timeouts
from loadkit.generate.mail.users import ImapUser, MailOptions, Pop3User, set_options
from loadkit.generate.metrics import metrics_for


class TestImapUser(ImapUser):
    """Concrete IMAP user for tests."""

    __test__ = False


class TestPop3User(Pop3User):
    """Concrete POP3 user for tests."""

    __test__ = False


FAST = Timeouts(connect_s=1, greeting_s=1, login_s=1, select_s=1, fetch_s=1, logout_s=1)


def write_accounts(folder: Path, n: int = 20) -> Path:
    path = folder / "accounts.csv"
    path.write_text("user,password\n" + "".join(f"user{i:04d},pw{i}\n" for i in range(1, n + 1)))
    return path


def storm(
    protocol: str,
    host: str,
    options: MailOptions,
    users: int = 5,
    seconds: float = 2.0,
    spawn_rate: float | None = None,
    during: Any = None,
    until: Any = None,
) -> dict:
    """Run ``users`` for ``seconds`` (or until ``until(env)`` is true, polled twice a second);
    return stats, errors, metrics and what was logged. ``during(env)`` runs at half time."""
    cls = TestImapUser if protocol == "imap" else TestPop3User
    env = Environment(user_classes=[cls], host=host)
    set_options(env, options)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        runner = env.create_local_runner()
        runner.start(users, spawn_rate=spawn_rate or users)
        seen = None
        if until is not None:
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end and not until(env):
                gevent.sleep(0.5)
        elif during is not None:
            gevent.sleep(seconds / 2)
            seen = during(env)
            gevent.sleep(seconds / 2)
        else:
            gevent.sleep(seconds)
        runner.quit()
        gevent.sleep(0.2)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    errors: dict[tuple[str, str], int] = {}
    for err in env.stats.errors.values():
        errors[(err.name, str(err.error))] = errors.get((err.name, str(err.error)), 0) + err.occurrences
    requests = {name: e.num_requests for (name, _t), e in env.stats.entries.items()}
    failures = {name: e.num_failures for (name, _t), e in env.stats.entries.items()}
    m = metrics_for(env)
    return {
        "errors": errors,
        "requests": requests,
        "failures": failures,
        "counters": m.counters(),
        "gauges": m.gauges(),
        "exceptions": dict(runner.exceptions),
        "records": records,
        "during": seen,
    }


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """Log records that carry a traceback, or warnings/errors (none expected from a storm)."""
    return [
        r.getMessage()
        for r in records
        if r.exc_info or "Traceback" in r.getMessage() or r.levelno >= logging.ERROR
    ]


def opts(accounts: Path, **kw: Any) -> MailOptions:
    base = MailOptions(accounts_file=accounts, timeouts=FAST, dwell_s=0.3)
    return replace(base, **kw)
