"""Login logs to replay: dovecot's own log, or a CSV of logins, read into a timed list.

Two inputs, told apart by their first line:

- **dovecot's log** (``log_path``/``info_log_path``, or syslog's copy): a session starts with
  ``imap-login: Login: user=<u>, ... session=<id>`` (or ``pop3-login``; a dovecot proxy writes
  ``proxy(u,...): Started proxying to ... session=<id>``) and ends with the line of the same
  ``session=<id>``: ``imap(u)<pid><id>: Disconnected: ...`` from the mail process, or
  ``proxy(u,...): Disconnected ...`` from a proxy. A session id seen twice (a proxy's and its
  backend's log concatenated) is one session. A session still open when the log ends is held
  until the log's last line. Every other line is skipped. Timestamps: ``2026-11-29 12:30:00.123456``
  (``log_timestamp = "%Y-%m-%d %H:%M:%S.%{usecs} "``, what the lab writes), the same without
  fractions, or syslog's ``Nov 29 12:30:00`` (no year: this year; whole seconds only).
- **CSV** with the header ``timestamp,protocol,user[,duration_s]``: ``timestamp`` in Unix seconds
  or ISO 8601, ``protocol`` imap or pop3 (pop), ``duration_s`` how long the session was held (empty
  or no column: 0, log in and out).

A window (``--replay-from``/``--replay-to``) keeps the logins that started in it: a bound is
seconds from the first login (``90``) or a timestamp (``2026-11-29 12:30:00``, ``12:30:00`` on the
first login's day). Offsets count from the window's start.

A line that should be a login but cannot be read is a :class:`~loadkit.errors.InputFileError`
naming the file and line; so is a file without any login.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import re
from pathlib import Path
from typing import NamedTuple

from loadkit.errors import InputFileError, ProfileError

#: protocols a login can be replayed with, and the names that mean each
PROTOCOLS = {"imap": "imap", "pop3": "pop3", "pop": "pop3"}


class ReplayLogin(NamedTuple):
    """One session of the log (made by :func:`read_login_log`)."""

    offset_s: float  #: start, seconds after the replay window's start
    ts_unix_s: float  #: start as recorded
    protocol: str  #: imap or pop3
    user: str
    duration_s: float  #: how long it was held, login to disconnect
    line: int  #: line of the login in the file (for messages)
    ended: bool  #: a disconnect was seen (else held until the log's end)


class LoginLog(NamedTuple):
    """The logins of one file inside the replay window, in start order."""

    path: Path
    kind: str  #: "dovecot" or "csv"
    logins: list  #: [ReplayLogin]
    window_start_unix_s: float
    skipped_n: int  #: logins outside the window


_ISO_TS = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?)")
_SYSLOG_TS = re.compile(r"^([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)")
# a login: the login process's Login line, or a proxy's Started proxying line
_LOGIN = re.compile(
    r"\b(?P<proto>imap|pop3)-login: (?:Info: )?"
    r"(?:Login: user=<(?P<user>[^>]*)>|proxy\((?P<puser>[^,)]*)[^)]*\): Started proxying)"
    r".*?\bsession=<(?P<sid>[^>]+)>"
)
# the end: the mail process's Disconnected line (session id in angle brackets after the pid),
# or a proxy's Disconnected line
_MAIL_END = re.compile(r"\b(?:imap|pop3)\([^)]*\)<\d+><(?P<sid>[^>]+)>: (?:Info: )?(?:Disconnected|Logged out)")
_PROXY_END = re.compile(r"\b(?:imap|pop3)-login: (?:Info: )?proxy\([^)]*\): Disconnected.*?\bsession=<(?P<sid>[^>]+)>")


def parse_timestamp(text: str, year: int | None = None) -> float:
    """Unix seconds from a dovecot/syslog/ISO timestamp (local time when it has no zone)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text.replace(" ", "T", 1) if "T" not in text else text).timestamp()
    except ValueError:
        pass
    stamp = dt.datetime.strptime(text, "%b %d %H:%M:%S")  # ValueError propagates
    return stamp.replace(year=year or dt.date.today().year).timestamp()


def _line_ts(line: str) -> float | None:
    m = _ISO_TS.match(line) or _SYSLOG_TS.match(line)
    return parse_timestamp(m.group(1)) if m else None


def parse_bound(text: str | None, first_unix_s: float, what: str) -> float | None:
    """A window bound as Unix seconds: seconds after the first login, a timestamp, or a time of
    day on the first login's day. None for no bound."""
    if text is None or not str(text).strip():
        return None
    s = str(text).strip()
    try:
        offset = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(offset):
            raise ProfileError(f"{what} {s!r} is not a number of seconds")
        return first_unix_s + offset
    if re.fullmatch(r"\d\d:\d\d(:\d\d(\.\d+)?)?", s):
        day = dt.datetime.fromtimestamp(first_unix_s).date().isoformat()
        s = f"{day} {s}"
    try:
        return parse_timestamp(s)
    except ValueError:
        raise ProfileError(
            f"{what} {text!r} is not seconds from the first login (90), a time (12:30:00) "
            "or a timestamp (2026-11-29 12:30:00)"
        ) from None


def read_login_log(path: str | Path, replay_from: str | None = None, replay_to: str | None = None) -> LoginLog:
    """The logins of a dovecot log or a login CSV inside the window (see the module docstring)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig", errors="replace")  # -sig: a spreadsheet's CSV starts with a BOM
    except FileNotFoundError:
        raise InputFileError(f"login log {p} does not exist") from None
    except OSError as err:
        raise InputFileError(f"login log {p} cannot be read: {err.strerror or err}") from err
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.lower().replace(" ", "").startswith("timestamp,"):
        kind, sessions = "csv", _read_csv(p, lines)
    else:
        kind, sessions = "dovecot", _read_dovecot(p, lines)
    if not sessions:
        raise InputFileError(
            f"login log {p} has no logins (expected dovecot 'imap-login: Login: user=<...>' lines or a CSV "
            "with the header timestamp,protocol,user[,duration_s])"
        )
    sessions.sort(key=lambda s: s[0])
    first_unix_s = sessions[0][0]
    lo = parse_bound(replay_from, first_unix_s, "--replay-from")
    hi = parse_bound(replay_to, first_unix_s, "--replay-to")
    if lo is not None and hi is not None and hi <= lo:
        raise ProfileError(f"--replay-to {replay_to} is not after --replay-from {replay_from}")
    kept = [s for s in sessions if (lo is None or s[0] >= lo) and (hi is None or s[0] < hi)]
    if not kept:
        raise ProfileError(f"no login of {p} lies in the window --replay-from {replay_from} --replay-to {replay_to}")
    start = lo if lo is not None else kept[0][0]
    logins = [ReplayLogin(ts - start, ts, proto, user, dur, lineno, ended)
              for ts, proto, user, dur, lineno, ended in kept]
    return LoginLog(p, kind, logins, start, len(sessions) - len(kept))


def _read_dovecot(p: Path, lines: list[str]) -> list[tuple]:
    opened: dict[str, list] = {}  # session id -> [ts, proto, user, duration, line, ended]
    last_ts = None
    for lineno, line in enumerate(lines, start=1):
        login = _LOGIN.search(line)
        end = None if login else (_MAIL_END.search(line) or _PROXY_END.search(line))
        if login is None and end is None:
            continue
        try:
            ts = _line_ts(line)
        except ValueError:
            ts = None
        if ts is None:
            raise InputFileError(f"login log {p} line {lineno}: no timestamp at the start of {line[:60]!r}")
        last_ts = ts if last_ts is None else max(last_ts, ts)
        if login is not None:
            sid = login.group("sid")
            if sid not in opened:  # a proxy's and its backend's line of one session
                user = login.group("user") if login.group("user") is not None else login.group("puser")
                if not user:
                    raise InputFileError(f"login log {p} line {lineno}: a login without a user name")
                opened[sid] = [ts, login.group("proto"), user, None, lineno, False]
        else:
            rec = opened.get(end.group("sid"))
            if rec is not None and not rec[5]:
                rec[3], rec[5] = max(0.0, ts - rec[0]), True
    for line in reversed(lines):  # the log's last timestamp: where a still-open session ends
        try:
            ts = _line_ts(line)
        except ValueError:
            continue
        if ts is not None:
            last_ts = ts if last_ts is None else max(last_ts, ts)
            break
    sessions = []
    for ts, proto, user, dur, lineno, ended in opened.values():
        sessions.append((ts, proto, user, dur if ended else max(0.0, last_ts - ts), lineno, ended))
    return sessions


def _read_csv(p: Path, lines: list[str]) -> list[tuple]:
    # blank lines are skipped, before the header too (as when the format was told); each row keeps
    # its line number in the file for messages
    numbered = [(lineno, line) for lineno, line in enumerate(lines, start=1) if line.strip()]
    rows = zip((lineno for lineno, _ in numbered), csv.reader(line for _, line in numbered))
    header_line, header_row = next(rows)
    header = [c.strip().lower() for c in header_row]
    if header[:3] != ["timestamp", "protocol", "user"] or len(header) > 4 or header[3:] not in ([], ["duration_s"]):
        raise InputFileError(f"login log {p} line {header_line}: expected the header timestamp,protocol,user[,duration_s], "
                             f"got {','.join(header)!r}")
    sessions = []
    for lineno, row in rows:
        if not row or not "".join(row).strip():
            continue
        where = f"login log {p} line {lineno}"
        if len(row) not in (3, 4):
            raise InputFileError(f"{where}: expected timestamp,protocol,user[,duration_s], got {','.join(row)!r}")
        try:
            ts = parse_timestamp(row[0])
        except ValueError:
            raise InputFileError(f"{where}: timestamp {row[0]!r} is not Unix seconds nor ISO 8601") from None
        proto = PROTOCOLS.get(row[1].strip().lower())
        if proto is None:
            raise InputFileError(f"{where}: protocol {row[1]!r} is not imap or pop3")
        user = row[2].strip()
        if not user:
            raise InputFileError(f"{where}: no user")
        dur = 0.0
        if len(row) == 4 and row[3].strip():
            try:
                dur = float(row[3])
            except ValueError:
                dur = -1.0
            if not (0 <= dur < math.inf):
                raise InputFileError(f"{where}: duration_s {row[3]!r} is not a number of seconds >= 0")
        sessions.append((ts, proto, user, dur, lineno, True))
    return sessions
