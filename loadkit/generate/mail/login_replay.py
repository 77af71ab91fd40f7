"""Replay the logins of a login log against a mail target, with their timing and durations.

What happened at 12:30 last Tuesday, as its clients did it: each recorded session logs in at its
recorded offset (divided by ``--replay-speed``), holds the session for its recorded duration
(divided by the same factor) and logs out. Open loop: a login starts when the log says, whatever
the server does with the ones before it; how late it started (the process was busy) is counted,
not caught up by moving the others.

Each session is one of the storm users' clients (:class:`~.users.ImapUser` /
:class:`~.users.Pop3User`: the same phases, failure classes, ``--mail-*`` options, Locust
requests and ``imap.*``/``pop3.*`` counters as ``imap_storm.py``/``pop_storm.py``), logging in as
the user of the log with that user's password from the accounts file (``--mail-accounts``, by
default the file of the lab that serves the target). The input is read by
:mod:`.login_replay_input`.

One scheduler per Locust process, from ``test_start``; with several workers, login ``i`` goes to
worker ``i mod count``. When the last session has ended, a headless run stops by itself: a
standalone process quits; a worker whose share has ended says so with its reports to the master
(:func:`~loadkit.generate.wiring.piggyback`), and a headless master quits when every worker has.
Counters: ``login_replay.started``, ``login_replay.late`` (started more than
:data:`LATE_S` after its time), gauge ``login_replay.max_lateness_s``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.pool
from locust import User, task

from loadkit.errors import InputFileError, LoadkitError, ProfileError
from loadkit.generate.metrics import metrics_for
from loadkit.generate.wiring import (WORKERS_OPTION, exit_on_user_error, note_target, piggyback,
                                     start_at_test_start, stop_at_test_stop, worker_share)

from .login_replay_input import LoginLog, ReplayLogin, read_login_log
from .users import ImapUser, MailUser, Pop3User

log = logging.getLogger(__name__)

#: a login that starts more than this after its scheduled time is counted late
LATE_S = 0.05
#: the key under which a worker tells its master that its share of the log has been replayed
_DONE_KEY = "loadkit_login_replay_done"


@dataclass(frozen=True)
class ReplaySettings:
    """The options of ``login_replay.py`` (Locust custom arguments)."""

    log_file: str = ""
    """dovecot login log, or CSV timestamp,protocol,user[,duration_s]"""
    speed: float = 1.0
    """replay this many times faster (offsets and session durations are divided by it)"""
    replay_from: str = ""
    """window start: seconds after the first login, a time (12:30:00) or a timestamp"""
    replay_to: str = ""
    """window end (same forms); logins at or after it are not replayed"""


def add_arguments(parser: Any) -> None:
    # on the parser itself, so the web UI lists them (see loadkit.generate.mail.users)
    parser.add_argument("--login-log", dest="login_log", default="",
                        help="dovecot log with imap-login/pop3-login Login lines, or a CSV with the header "
                        "timestamp,protocol,user[,duration_s]")
    parser.add_argument("--replay-speed", dest="replay_speed", default="1",
                        help="replay this many times faster (offsets and session durations divided by it)")
    parser.add_argument("--replay-from", dest="replay_from", default="",
                        help="window start: seconds after the first login (90), a time (12:30:00) or a timestamp")
    parser.add_argument("--replay-to", dest="replay_to", default="",
                        help="window end, the same forms; logins from then on are not replayed")


def settings_from_options(options: Any) -> ReplaySettings:
    raw = getattr(options, "replay_speed", "1") or "1"
    try:
        speed = float(raw)
    except (TypeError, ValueError):
        raise ProfileError(f"--replay-speed {raw!r} is not a number") from None
    if not (speed > 0 and math.isfinite(speed)):
        raise ProfileError(f"--replay-speed {raw} must be a number > 0")
    log_file = str(getattr(options, "login_log", "") or "")
    if not log_file:
        raise ProfileError("--login-log FILE is required: a dovecot login log or a CSV timestamp,protocol,user[,duration_s]")
    return ReplaySettings(log_file, speed, str(getattr(options, "replay_from", "") or ""),
                          str(getattr(options, "replay_to", "") or ""))


class _ReplayClient:
    """Mixin: a storm user that runs one recorded session (its account and hold time given)."""

    def __init__(self, environment: Any, account: tuple[str, str], hold_s: float) -> None:
        User.__init__(self, environment)  # not MailUser's: the account is the log's, not the next one
        self._shared = type(self).shared(environment)
        self.account = account
        self._failures_n = 0
        self.hold_s = hold_s

    def hold_session(self, session: Any, dwell_s: float | None) -> BaseException | None:
        return super().hold_session(session, self.hold_s)  # type: ignore[misc]


class ReplayImapClient(_ReplayClient, ImapUser):
    abstract = True


class ReplayPop3Client(_ReplayClient, Pop3User):
    abstract = True


CLIENTS: dict[str, type[MailUser]] = {"imap": ReplayImapClient, "pop3": ReplayPop3Client}


class LoginReplay:
    """One process's replay (see the module docstring)."""

    def __init__(self, environment: Any, settings: ReplaySettings) -> None:
        self.environment = environment
        self.settings = settings
        self.log: LoginLog = read_login_log(settings.log_file, settings.replay_from or None,
                                            settings.replay_to or None)
        self.passwords: dict[str, dict[str, str]] = {}
        for proto in sorted({lg.protocol for lg in self.log.logins}):
            # the target and the accounts file of each protocol, as the storm users find them
            shared = CLIENTS[proto].shared(environment)
            self.passwords[proto] = dict(shared.accounts)
        for lg in self.log.logins:
            if lg.user not in self.passwords[lg.protocol]:
                raise InputFileError(f"login log {self.log.path} line {lg.line}: user {lg.user!r} is not in the "
                                     "accounts file (pass --mail-accounts with that user's password)")
        self.sessions = gevent.pool.Group()
        self.greenlet: gevent.Greenlet | None = None
        #: (scheduled, actual) start offsets of this process's logins, in seconds from the start
        self.starts: list[tuple[float, float]] = []
        self.done = False

    def describe(self) -> str:
        lg = self.log.logins
        span = lg[-1].offset_s if lg else 0.0
        return (f"{len(lg)} logins from {self.log.path} ({self.log.kind}) over {span:.1f} s, "
                f"{self.log.skipped_n} outside the window, at x{self.settings.speed:g}")

    def mine(self) -> list[ReplayLogin]:
        index, count = worker_share(self.environment)
        return [lg for i, lg in enumerate(self.log.logins) if i % count == index]

    def start(self) -> None:
        for proto in self.passwords:
            note_target(self.environment, proto, CLIENTS[proto].shared(self.environment).target)
        self.greenlet = gevent.spawn(self.run)

    def run(self) -> None:
        """Start every login of this process at its time; wait for the sessions to end."""
        metrics = metrics_for(self.environment)
        speed = self.settings.speed
        t0 = time.perf_counter()
        max_late = 0.0
        metrics.set_max_gauge("login_replay.max_lateness_s", 0.0)
        for lg in self.mine():
            due = lg.offset_s / speed
            wait = due - (time.perf_counter() - t0)
            if wait > 0:
                gevent.sleep(wait)
            late = (time.perf_counter() - t0) - due
            self.starts.append((due, due + max(0.0, late)))
            metrics.add("login_replay.started")
            if late > LATE_S:
                metrics.add("login_replay.late")
            if late > max_late:
                max_late = late
                metrics.set_max_gauge("login_replay.max_lateness_s", late)
            password = self.passwords[lg.protocol][lg.user]
            client = CLIENTS[lg.protocol](self.environment, (lg.user, password), lg.duration_s / speed)
            self.sessions.spawn(client.one_session)
        self.sessions.join()
        self.done = True
        log.info("login replay done: %d sessions started, at most %.3f s late", len(self.starts), max_late)

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=True, timeout=5.0)
        # a session killed while held is aborted by its own finally (MailUser.one_session)
        self.sessions.kill(block=True, timeout=5.0)


def install(events: Any) -> None:
    """Wire the replay into a locustfile: options, checks at init, one scheduler per process."""

    @events.init_command_line_parser.add_listener
    def _add_arguments(parser: Any, **_kw: Any) -> None:
        add_arguments(parser)

    @events.init.add_listener
    def _on_init(environment: Any, runner: Any = None, **_kw: Any) -> None:
        _wire_done(environment)
        if type(runner).__name__ == "MasterRunner":
            return  # workers read the log themselves
        try:
            replay = LoginReplay(environment, settings_from_options(environment.parsed_options))
        except LoadkitError as err:
            exit_on_user_error(err)  # one line, before anything is sent
        environment.loadkit_login_replay = replay
        log.info("login replay: %s", replay.describe())

    @events.test_start.add_listener
    def _on_test_start(environment: Any, **_kw: Any) -> None:
        # run_single_user: the user runs the replay itself
        if start_at_test_start(environment, "loadkit_login_replay") and getattr(
                environment.parsed_options, "headless", False):
            gevent.spawn(_quit_when_done, environment.loadkit_login_replay, environment.runner)

    @events.test_stop.add_listener
    def _on_test_stop(environment: Any, **_kw: Any) -> None:
        stop_at_test_stop(environment, "loadkit_login_replay")


def _quit_when_done(replay: LoginReplay, runner: Any) -> None:
    # a headless replay ends with its log (a worker's share ends and it tells the master: _wire_done)
    if replay.greenlet is not None:
        replay.greenlet.join()
    if replay.done and type(runner).__name__ != "WorkerRunner":
        gevent.sleep(0.5)  # one more stats interval, so the last sessions reach the record
        runner.quit()


def _wire_done(environment: Any) -> None:
    """Workers report when their share has been replayed; a headless master quits once every
    worker it shared the log among has (their last sessions' figures ride on the same report)."""
    done: set[str] = set()
    quitting: list[bool] = []

    def report() -> dict | None:
        replay: LoginReplay | None = getattr(environment, "loadkit_login_replay", None)
        return {"done": 1} if replay is not None and replay.done else None

    def merge(client_id: str, _payload: Any) -> None:
        done.add(client_id)
        options, runner = environment.parsed_options, environment.runner
        count = int(getattr(options, WORKERS_OPTION, 0) or 0) or runner.worker_count
        if not quitting and getattr(options, "headless", False) and len(done) >= count:
            quitting.append(True)
            log.info("login replay: all %d workers have replayed their share of the log; stopping the test", count)
            gevent.spawn_later(0.5, runner.quit)

    piggyback(environment, _DONE_KEY, report, merge)


class LoginReplayUser(User):
    """Holds a user slot while the process's replay runs (the sessions are the replay's, started
    when the log says). Under ``run_single_user`` it runs the replay itself."""

    abstract = True

    @task
    def hold(self) -> None:
        env = self.environment
        if env.runner is not None:
            gevent.sleep(1.0)
            return
        replay: LoginReplay = env.loadkit_login_replay
        replay.run()
        print(f"login replay: {len(replay.starts)} sessions", flush=True)
        from locust.exception import StopUser

        raise StopUser()
