"""Locust users for POP3 and IMAP login storms, their options, arrivals and reconnects.

A user is one mail client: it logs in, opens the mailbox, reads a little, holds the session for
a dwell time (or in IMAP IDLE until the test ends), logs out and comes back. Held sessions are
what fill a proxy's memory, so the number held right now is a gauge (``imap.held_sessions``,
``pop3.held_sessions``) next to counters of logins, lost sessions and users that gave up.

Options are Locust custom arguments (shown in the web UI), validated once per process in the
``init`` event: a bad value or a missing/malformed accounts file stops the run with one line
and exit status 2 before anything is sent. Targets are checked against the allowlist there too.

Arrivals: ``herd`` (every user starts its first login together, once spawning completes, then
loops) or ``rate:N`` (open loop: new logins start at N per second per Locust process,
independent of how fast sessions end; a slot that finds no free user is counted as
``<proto>.arrivals_late``). Reconnects after a failure: ``immediate``, ``fixed``, ``backoff``
(exponential with full jitter), each with a give-up count. A fast failure never spins: every
retry waits at least ``--mail-min-retry-delay`` and retries per process are capped by
``--mail-max-retry-rate``.

Accounts: each user keeps one account from the accounts file, taken round robin. With several
Locust processes (``--processes N`` or workers) each worker takes its own contiguous part of the
file (the master tells the workers how many there are when the test starts), so no two
workers log in with the same account; one process uses the whole file from its first line.
"""

from __future__ import annotations

import csv
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import gevent
import gevent.event
from locust import User, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner

from loadkit.errors import InputFileError, LoadkitError, ProfileError
from loadkit.generate import bridge
from loadkit.generate.metrics import metrics_for
from loadkit.generate.mail.classify import Phase, PhaseResult, Timeouts, classify
from loadkit.generate.mail.imap import ImapSession, ImapSpec
from loadkit.generate.mail.pop3 import Pop3Session, Pop3Spec
from loadkit.generate.wiring import (
    exit_on_user_error,
    note_target,
    print_user_error,
    targets_noted,
    tell_workers_their_count,
    worker_share,
)
from loadkit.profile.targets import target_spec, user_target

log = logging.getLogger(__name__)

_OPTIONS_ATTR = "loadkit_mail_options"
_SHARED_ATTR = "loadkit_mail_shared"


# --------------------------------------------------------------------------------------------
# accounts
# --------------------------------------------------------------------------------------------


def read_accounts(path: str | Path) -> list[tuple[str, str]]:
    """``(user, password)`` pairs from an accounts file, in either form users have:

    - CSV with the header ``user,password`` (the lab's ``accounts.csv``);
    - an imaptest-style users file, ``user:password`` a line (the password is everything after the
      first colon); blank lines and ``#`` comments are skipped.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(
            f"accounts file {p} does not exist (bring the lab up with `loadkit lab up`, "
            "or pass --mail-accounts FILE: CSV with a header line user,password, or user:password per line)"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputFileError(f"accounts file {p} cannot be read: {err}") from err
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
    if (":" in first and "," not in first.split(":", 1)[0]) or (not first and text.strip()):
        return _read_user_colon_password(p, lines)
    rows = list(csv.reader(lines))
    if not rows or [c.strip().lower() for c in rows[0]] != ["user", "password"]:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise InputFileError(f"accounts file {p} line 1: expected the header 'user,password', got {got!r} "
                             "(or user:password per line)")
    accounts = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1]:
            raise InputFileError(f"accounts file {p} line {lineno}: expected 'user,password', got {','.join(row)!r}")
        accounts.append((row[0].strip(), row[1]))
    if not accounts:
        raise InputFileError(f"accounts file {p} has a header but no accounts")
    return accounts


def _read_user_colon_password(p: Path, lines: list[str]) -> list[tuple[str, str]]:
    # imaptest's userfile: "user:password" per line; a password may itself hold colons
    accounts = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password or any(c.isspace() for c in user.strip()):
            # the password is never echoed: the message names the line and the user part only
            raise InputFileError(f"accounts file {p} line {lineno}: expected 'user:password', "
                                 f"got {user.strip()[:40]!r}{':...' if sep else ' with no password'}")
        accounts.append((user.strip(), password))
    if not accounts:
        raise InputFileError(f"accounts file {p} has no accounts")
    return accounts


def account_slice(accounts_n: int, index: int, count: int) -> range:
    """Positions in the accounts file that Locust process ``index`` of ``count`` logs in with.

    Each process takes its own contiguous part (worker 0 the first ``accounts_n / count``
    accounts, worker 1 the next ...), so workers never share an account while there are enough
    of them; one process takes them all. With fewer accounts than processes, sharing cannot be
    avoided: each process takes one account.
    """
    if count <= 1:
        return range(accounts_n)
    if accounts_n < count:
        j = index % accounts_n
        return range(j, j + 1)
    return range(index * accounts_n // count, (index + 1) * accounts_n // count)


# --------------------------------------------------------------------------------------------
# reconnect policy and arrivals
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconnectPolicy:
    """How long a client waits before the next login after ``failures_n`` failures in a row."""

    kind: str = "backoff"  #: "immediate", "fixed" or "backoff"
    delay_s: float = 1.0  #: fixed delay, or the first backoff step
    max_delay_s: float = 30.0  #: backoff cap
    give_up_n: int = 0  #: stop the user after this many failures in a row; 0 never
    min_delay_s: float = 0.1  #: floor under every retry, so a refusing server is not spun on

    KINDS: ClassVar[tuple[str, ...]] = ("immediate", "fixed", "backoff")

    def delay(self, failures_n: int, rng: random.Random) -> float:
        if self.kind == "immediate":
            d = 0.0
        elif self.kind == "fixed":
            d = self.delay_s
        else:  # "full jitter": uniform in [0, min(cap, base * 2^(n-1))]
            d = rng.uniform(0.0, min(self.max_delay_s, self.delay_s * 2 ** min(failures_n - 1, 30)))
        return max(self.min_delay_s, d)

    def gives_up(self, failures_n: int) -> bool:
        return self.give_up_n > 0 and failures_n >= self.give_up_n


class Pacer:
    """Hands out start times ``1/rate_per_s`` apart to the greenlets of one process.

    Open loop: a slot is not moved because a session is slow. A slot that nobody took in time is
    dropped (not caught up in a burst) and counted as late.
    """

    def __init__(self, rate_per_s: float) -> None:
        self.interval_s = 1.0 / rate_per_s
        self._next = time.monotonic()
        self.late_n = 0

    def wait(self) -> None:
        now = time.monotonic()
        if self._next < now - self.interval_s:
            self.late_n += int((now - self._next) / self.interval_s)
            self._next = now
        t = self._next
        self._next = t + self.interval_s
        if t > now:
            gevent.sleep(t - now)


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MailOptions:
    """Everything a mail storm is told, validated (from Locust's parsed options)."""

    accounts_file: Path | None = None  #: None: the accounts file of the lab that serves the target
    dwell_s: float | None = 5.0  #: None: hold until the test ends (IMAP in IDLE)
    fetch_n: int = 3  #: IMAP: FETCH headers of this many messages; POP3: RETR one if > 0
    pop3_uidl: bool = True
    arrival: str = "herd"  #: "herd" or "rate:N"
    reconnect: ReconnectPolicy = ReconnectPolicy()
    max_retry_rate_per_s: float = 200.0
    tls: str = "off"
    tls_verify: bool = False
    timeouts: Timeouts = Timeouts()

    @property
    def arrival_rate_per_s(self) -> float | None:
        return float(self.arrival.split(":", 1)[1]) if self.arrival.startswith("rate:") else None


def parse_timeouts(spec: str) -> Timeouts:
    """``"connect=5,login=10"`` -> :class:`Timeouts` (unnamed phases keep their defaults)."""
    values: dict[str, float] = {}
    phases = [f[: -len("_s")] for f in Timeouts._fields]
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in phases:
            raise ProfileError(
                f"--mail-timeouts: {part!r} is not PHASE=SECONDS with PHASE one of {', '.join(phases)}"
            )
        try:
            v = float(value)
        except ValueError:
            raise ProfileError(f"--mail-timeouts: {name}={value!r} is not a number of seconds") from None
        if not v > 0:
            raise ProfileError(f"--mail-timeouts: {name} must be > 0 seconds, got {value}")
        values[f"{name}_s"] = v
    return Timeouts()._replace(**values)


def options_from_parsed(parsed: Any) -> MailOptions:
    """Validate Locust's parsed options (attributes ``mail_*``) into :class:`MailOptions`."""
    base = MailOptions()
    if parsed is None:
        return base

    def get(name: str, default: Any) -> Any:
        v = getattr(parsed, name, None)
        return default if v is None or v == "" else v

    dwell_raw = str(get("mail_dwell", "5"))
    if dwell_raw.strip().lower() in ("idle", "end"):
        dwell_s = None
    else:
        try:
            dwell_s = float(dwell_raw)
        except ValueError:
            raise ProfileError(f"--mail-dwell {dwell_raw!r}: give seconds (e.g. 30) or 'idle'") from None
        if dwell_s < 0:
            raise ProfileError(f"--mail-dwell {dwell_raw}: must be >= 0 seconds")
    arrival = str(get("mail_arrival", "herd")).strip().lower()
    if arrival != "herd":
        rate = arrival.split(":", 1)[1] if arrival.startswith("rate:") else ""
        try:
            ok = float(rate) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ProfileError(f"--mail-arrival {arrival!r}: use 'herd' or 'rate:N' with N logins/s > 0")
    kind = str(get("mail_reconnect", base.reconnect.kind)).strip().lower()
    if kind not in ReconnectPolicy.KINDS:
        raise ProfileError(f"--mail-reconnect {kind!r}: use one of {', '.join(ReconnectPolicy.KINDS)}")
    nums = {}
    for opt, default, minimum in (
        ("mail_reconnect_delay", base.reconnect.delay_s, 0.0),
        ("mail_reconnect_max", base.reconnect.max_delay_s, 0.0),
        ("mail_min_retry_delay", base.reconnect.min_delay_s, 0.0),
        ("mail_max_retry_rate", base.max_retry_rate_per_s, 1e-9),
        ("mail_give_up", base.reconnect.give_up_n, 0),
        ("mail_fetch", base.fetch_n, 0),
    ):
        raw = get(opt, default)
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise ProfileError(f"--{opt.replace('_', '-')} {raw!r} is not a number") from None
        if v < minimum:
            raise ProfileError(f"--{opt.replace('_', '-')} {raw}: must be >= {minimum:g}")
        nums[opt] = v
    tls = str(get("mail_tls", "off")).strip().lower()
    if tls not in ("off", "tls", "starttls"):
        raise ProfileError(f"--mail-tls {tls!r}: use off, tls or starttls")
    return MailOptions(
        accounts_file=Path(get("mail_accounts", "")) if get("mail_accounts", "") else None,
        dwell_s=dwell_s,
        fetch_n=int(nums["mail_fetch"]),
        pop3_uidl=not bool(getattr(parsed, "pop3_no_uidl", False)),
        arrival=arrival,
        reconnect=ReconnectPolicy(
            kind=kind,
            delay_s=nums["mail_reconnect_delay"],
            max_delay_s=nums["mail_reconnect_max"],
            give_up_n=int(nums["mail_give_up"]),
            min_delay_s=nums["mail_min_retry_delay"],
        ),
        max_retry_rate_per_s=nums["mail_max_retry_rate"],
        tls=tls,
        tls_verify=bool(getattr(parsed, "mail_tls_verify", False)),
        timeouts=parse_timeouts(str(get("mail_timeouts", ""))),
    )


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any, **_kw: Any) -> None:
    """Custom Locust arguments of the mail storms (also shown in the web UI)."""
    # straight on Locust's parser, not an argument group: only the parser's own add_argument
    # marks an option for the web UI's custom parameters
    g = parser
    g.add_argument("--mail-accounts", default="",
                   help="accounts: CSV with header user,password, or an imaptest users file with "
                   "user:password per line (default: the accounts file of the loadkit lab that serves the target)")
    g.add_argument("--mail-dwell", default="5",
                   help="seconds a session is held after login, or 'idle' to hold it until the "
                   "test ends (IMAP: in IDLE)")
    g.add_argument("--mail-fetch", default="3",
                   help="IMAP: FETCH the headers of this many messages; POP3: RETR one message if > 0")
    g.add_argument("--pop3-no-uidl", action="store_true", default=False, help="POP3: skip UIDL")
    g.add_argument("--mail-arrival", default="herd",
                   help="'herd' (all users log in together, then loop) or 'rate:N' (open loop: "
                   "N new logins per second per Locust process)")
    g.add_argument("--mail-reconnect", default="backoff",
                   help="after a failure: immediate, fixed or backoff (exponential, full jitter)")
    g.add_argument("--mail-reconnect-delay", default="1.0",
                   help="fixed delay, or first backoff step, in seconds")
    g.add_argument("--mail-reconnect-max", default="30", help="backoff cap in seconds")
    g.add_argument("--mail-give-up", default="0",
                   help="a user stops after this many failed sessions in a row (0: never)")
    g.add_argument("--mail-min-retry-delay", default="0.1",
                   help="every retry waits at least this long (seconds), so refusals never spin")
    g.add_argument("--mail-max-retry-rate", default="200",
                   help="retries per second per Locust process, at most")
    g.add_argument("--mail-tls", default="off", help="off, tls (implicit) or starttls")
    g.add_argument("--mail-tls-verify", action="store_true", default=False,
                   help="verify the server certificate (off by default: staging certificates)")
    g.add_argument("--mail-timeouts", default="",
                   help="per-phase deadlines, e.g. connect=5,greeting=10,login=10,select=10,"
                   "fetch=10,logout=5")


def set_options(environment: Any, options: MailOptions) -> None:
    """Give an environment its options directly (Locust used as a library, benchmarks)."""
    setattr(environment, _OPTIONS_ATTR, options)
    if hasattr(environment, _SHARED_ATTR):
        delattr(environment, _SHARED_ATTR)


def make_ssl_context(verify: bool, for_asyncio: bool) -> ssl.SSLContext:
    """A client context: gevent's for gevent sockets; for the asyncio loop the ``ssl`` module's
    (asyncio only calls ``wrap_bio``, which gevent leaves alone; the original class cannot be
    configured once ``ssl`` is patched: its property setters recurse)."""
    if for_asyncio:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    else:
        from gevent import ssl as gssl

        ctx = gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _tls_context(options: MailOptions, for_asyncio: bool) -> ssl.SSLContext | None:
    """The client context a session spec carries: None without TLS (``--mail-tls off``)."""
    return make_ssl_context(options.tls_verify, for_asyncio) if options.tls != "off" else None


# --------------------------------------------------------------------------------------------
# users
# --------------------------------------------------------------------------------------------


class _Shared:
    """Per-process state of one user class: options, accounts, target, pacers, herd gate."""

    def __init__(self, environment: Any, user_class: type["MailUser"]) -> None:
        options = getattr(environment, _OPTIONS_ATTR, None) or options_from_parsed(
            getattr(environment, "parsed_options", None)
        )
        self.options = options
        #: what the user asked for (``--target``/``--host``/None): a new test from the web UI
        #: with another Host or other options gets a fresh _Shared (see _follow_the_web_ui)
        self.asked = (target_spec(environment, user_class.protocol), options)
        # --target PROTOCOL=..., else --host, else the lab; the accounts follow the target's lab
        found = user_target(user_class.protocol, self.asked[0], tls=options.tls == "tls")
        self.target = found.target
        self.protocol = user_class.protocol
        self.accounts = read_accounts(found.file("accounts", options.accounts_file, "--mail-accounts"))
        self.spec = user_class.make_spec(self.target.address, self.target.port, options)
        rate = options.arrival_rate_per_s
        self.arrivals = Pacer(rate) if rate else None
        self.retries = Pacer(options.max_retry_rate_per_s)
        self.next_account = 0  #: users created so far in this process
        self.go = gevent.event.Event()
        runner = getattr(environment, "runner", None)
        if options.arrival != "herd" or runner is None:
            self.go.set()
        else:
            environment.events.spawning_complete.add_listener(lambda **_kw: self.go.set())
        self.metrics = metrics_for(environment)
        self.rng = random.Random()
        self.environment = environment

    def take_account(self) -> tuple[str, str]:
        """The account of the next user of this process, from this process's part of the file
        (:func:`account_slice`), round robin within it."""
        index, count = worker_share(self.environment)
        mine = account_slice(len(self.accounts), index, count)
        if self.next_account == 0:
            # noted when a user starts, not at the check in init: a worker's Host comes with the
            # master's first spawn, and a web-UI test may bring another
            note_target(self.environment, self.protocol, self.target)
        if self.next_account == 0 and count > 1:
            log.info("worker %d of %d logs in with accounts %d-%d of %d", index + 1, count, mine.start + 1,
                     mine.stop, len(self.accounts))
        account = self.accounts[mine[self.next_account % len(mine)]]
        self.next_account += 1
        return account


class MailUser(User):
    """Base of the storm users: one mail client looping over sessions."""

    abstract = True
    #: the protocol of the target this class takes (``--target PROTOCOL=...``, ``[targets]``);
    #: also its metrics' prefix (``imap.logins``) and, upper case, its Locust request_type
    protocol: ClassVar[str] = ""

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        shared = self.shared(environment)
        self._shared = shared
        self.account = shared.take_account()
        self._failures_n = 0

    @classmethod
    def shared(cls, environment: Any) -> _Shared:
        cache = getattr(environment, _SHARED_ATTR, None)
        if cache is None:
            cache = {}
            setattr(environment, _SHARED_ATTR, cache)
        if cls not in cache:
            cache[cls] = _Shared(environment, cls)
        return cache[cls]

    @classmethod
    def make_spec(cls, address: str, port: int, options: MailOptions) -> Any:
        raise NotImplementedError

    # -- reporting ------------------------------------------------------------------------------
    def fire(self, result: PhaseResult) -> None:
        self.environment.events.request.fire(
            request_type=self.protocol.upper(),
            name=result.name,
            response_time=result.elapsed_s * 1000.0,
            response_length=result.response_length,
            exception=result.failure,
            context={},
        )

    def count(self, metric: str, n: float = 1) -> None:
        self._shared.metrics.add(f"{self.protocol}.{metric}", n)

    def held(self, delta: int) -> None:
        self._shared.metrics.add_gauge(f"{self.protocol}.held_sessions", delta)

    # -- the loop -------------------------------------------------------------------------------
    @task
    def session(self) -> None:
        shared = self._shared
        shared.go.wait()
        if shared.arrivals is not None:
            before = shared.arrivals.late_n
            shared.arrivals.wait()
            if shared.arrivals.late_n > before:
                self.count("arrivals_late", shared.arrivals.late_n - before)
        ok = self.one_session()
        if ok:
            self._failures_n = 0
            return
        self._failures_n += 1
        policy = shared.options.reconnect
        if policy.gives_up(self._failures_n):
            self.count("gave_up")
            raise StopUser()
        gevent.sleep(policy.delay(self._failures_n, shared.rng))
        shared.retries.wait()

    def one_session(self) -> bool:
        """Log in, hold, log out; fire one request per phase; True if all went well.

        The held-sessions gauge is up exactly while a logged-in session is held; a session that
        is not closed cleanly is aborted, whatever happened.
        """
        session = self.new_session()
        holding = closed = False
        try:
            if not self._report_open(self.open_session(session)):
                return False
            holding = True
            self.held(+1)
            t0 = time.perf_counter()
            lost = self.hold_session(session, self._shared.options.dwell_s)
            holding = False
            self.held(-1)
            if lost is not None:
                self._report_lost(lost, time.perf_counter() - t0)
                return False
            results = self.close_session(session)
            closed = True
            for r in results:
                self.fire(r)
            return all(r.ok for r in results)
        finally:
            if holding:
                self.held(-1)
            self.abort_session(session, closed)

    # -- protocol hooks ---------------------------------------------------------------------------
    def new_session(self) -> Any:
        raise NotImplementedError

    def open_session(self, session: Any) -> list[PhaseResult]:
        """Connect, greet, log in (and SELECT/STAT...): the phases' results."""
        raise NotImplementedError

    def hold_session(self, session: Any, dwell_s: float | None) -> BaseException | None:
        """Hold for ``dwell_s`` (None: until the user stops); the error if the server dropped it."""
        raise NotImplementedError

    def close_session(self, session: Any) -> list[PhaseResult]:
        raise NotImplementedError

    def abort_session(self, session: Any, closed: bool) -> None:
        raise NotImplementedError

    def _report_open(self, results: list[PhaseResult]) -> bool:
        for r in results:
            self.fire(r)
            if r.name in ("LOGIN", "PASS"):
                self.count("login_attempts")
                if r.ok:
                    self.count("logins")
        return bool(results) and results[-1].ok

    def _report_lost(self, err: BaseException, held_s: float) -> None:
        self.count("sessions_lost")
        failure = classify(err, Phase.HOLD)
        self.fire(PhaseResult("hold", Phase.HOLD, held_s, 0, failure))


class ImapUser(MailUser):
    """IMAP client: connect+greeting, LOGIN, SELECT, FETCH, [IDLE], hold, LOGOUT."""

    abstract = True
    protocol = "imap"

    @classmethod
    def make_spec(cls, address: str, port: int, options: MailOptions) -> ImapSpec:
        return ImapSpec(
            address, port, tls=options.tls, ssl_context=_tls_context(options, for_asyncio=True),
            timeouts=options.timeouts,
            fetch_n=options.fetch_n, idle=options.dwell_s is None,
        )

    def new_session(self) -> ImapSession:
        return ImapSession(self._shared.spec, bridge.Signal())

    def open_session(self, session: ImapSession) -> list[PhaseResult]:
        return bridge.get_bridge().run(session.open(*self.account))

    def hold_session(self, session: ImapSession, dwell_s: float | None) -> BaseException | None:
        # the signal is set from the loop when the server closes or resets the connection
        return _lost_error(session) if session.lost_signal.wait(dwell_s) else None

    def close_session(self, session: ImapSession) -> list[PhaseResult]:
        return bridge.get_bridge().run(session.logout())

    def abort_session(self, session: ImapSession, closed: bool) -> None:
        if not closed:
            bridge.get_bridge().spawn(session.abort())


def _lost_error(session: ImapSession) -> BaseException:
    proto = session.proto
    if proto is not None and proto.lost.done():
        return proto.lost.result()
    return EOFError("connection lost")


class Pop3User(MailUser):
    """POP3 client: connect+greeting, PASS (USER+PASS), STAT, UIDL, RETR, hold, QUIT."""

    abstract = True
    protocol = "pop3"

    @classmethod
    def make_spec(cls, address: str, port: int, options: MailOptions) -> Pop3Spec:
        return Pop3Spec(
            address, port, tls=options.tls, ssl_context=_tls_context(options, for_asyncio=False),
            timeouts=options.timeouts,
            uidl=options.pop3_uidl, retr=options.fetch_n > 0,
        )

    def new_session(self) -> Pop3Session:
        return Pop3Session(self._shared.spec)

    def open_session(self, session: Pop3Session) -> list[PhaseResult]:
        return session.open(*self.account)

    def hold_session(self, session: Pop3Session, dwell_s: float | None) -> BaseException | None:
        return None if session.hold(dwell_s) else EOFError("server closed a held session")

    def close_session(self, session: Pop3Session) -> list[PhaseResult]:
        return [session.quit()]

    def abort_session(self, session: Pop3Session, closed: bool) -> None:
        session.abort()  # closes the socket; harmless after QUIT


# --------------------------------------------------------------------------------------------
# process wiring
# --------------------------------------------------------------------------------------------


@events.init.add_listener
def _validate_before_running(environment: Any, **_kw: Any) -> None:
    """Options, accounts and targets are checked before the first user spawns."""
    targets_noted(environment)  # a master hears where its workers send from the start
    if isinstance(getattr(environment, "runner", None), MasterRunner):
        return  # a master runs no users; its workers check on their own host
    for cls in environment.user_classes or ():
        if isinstance(cls, type) and issubclass(cls, MailUser):
            try:
                shared = cls.shared(environment)
            except LoadkitError as err:
                exit_on_user_error(err)
            if not environment.host:  # the web UI's Host field shows where the load goes
                cls.host = str(shared.target)


@events.test_start.add_listener
def _follow_the_web_ui(environment: Any, **_kw: Any) -> None:
    """A test started from the web UI may come with another Host or other options than the ones
    checked at ``init``: check them again, and a bad one stops the test in one line."""
    runner = getattr(environment, "runner", None)
    cache = getattr(environment, _SHARED_ATTR, None)
    if isinstance(runner, MasterRunner) or not cache or getattr(environment, _OPTIONS_ATTR, None):
        return
    for cls, shared in list(cache.items()):
        try:
            options = options_from_parsed(getattr(environment, "parsed_options", None))
            if shared.asked != (target_spec(environment, cls.protocol), options):
                cache[cls] = _Shared(environment, cls)
                log.info("%s users now send to %s", cls.protocol.upper(), cache[cls].target)
        except LoadkitError as err:
            print_user_error(err)
            environment.process_exit_code = 2
            if runner is not None:
                gevent.spawn_later(0, runner.quit)
            return


@events.test_start.add_listener
def _tell_workers_their_count(environment: Any, **_kw: Any) -> None:
    """On a master: the worker count travels to the workers with the spawn message's options
    (``test_start`` fires before Locust sends them), so each worker takes its own accounts."""
    runner = getattr(environment, "runner", None)
    if isinstance(runner, MasterRunner) and environment.parsed_options is not None:
        tell_workers_their_count(environment)


@events.quitting.add_listener
def _stop_bridge(**_kw: Any) -> None:
    # sessions were aborted when their users stopped; drain whatever is left on the loop
    bridge.shutdown(timeout_s=3.0)


__all__ = [
    "ImapUser",
    "MailOptions",
    "MailUser",
    "Pacer",
    "Pop3User",
    "ReconnectPolicy",
    "account_slice",
    "make_ssl_context",
    "options_from_parsed",
    "read_accounts",
    "set_options",
    "worker_share",
]
