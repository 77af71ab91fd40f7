"""Every mail-session failure becomes one class token from :data:`loadkit.schema.FAILURE_CLASSES`.

What a storm must tell apart is *where* a session died: a proxy that is out of memory cannot
fork a login process and closes before greeting (``eof_before_greeting``); one whose login
process is OOM-killed closes a held session (``eof_after_login``); a proxy that is gone refuses
(``conn_refused``). Both the IMAP and POP3 clients raise the small exceptions below and call
:func:`classify` with the phase they were in.
"""

from __future__ import annotations

import errno
import re
import ssl
from enum import Enum
from typing import NamedTuple

from loadkit.schema import FAILURE_CLASSES, Failure


class Phase(str, Enum):
    """Session phases; each has its own timeout and its own ``timeout_<phase>`` class."""

    CONNECT = "connect"
    GREETING = "greeting"
    LOGIN = "login"
    SELECT = "select"  #: IMAP SELECT, POP3 STAT/UIDL: opening the mailbox
    FETCH = "fetch"  #: IMAP FETCH, POP3 RETR
    HOLD = "hold"  #: the session is held (dwell, IDLE); nothing is pending
    LOGOUT = "logout"


class ServerClosed(Exception):
    """The server closed the connection (EOF) while the client expected more."""


class ServerReply(Exception):
    """A negative reply: IMAP ``NO``/``BAD``/``BYE``, POP3 ``-ERR``; ``status`` is that word."""

    def __init__(self, status: str, text: str = "") -> None:
        super().__init__(f"{status} {text}".strip())
        self.status = status
        self.text = text


class PhaseTimeout(Exception):
    """The phase's own deadline passed (enforced by loadkit, never by the library)."""

    def __init__(self, phase: Phase | str) -> None:
        super().__init__(f"{Phase(phase).value} timed out")
        self.phase = Phase(phase)


class ProtocolError(Exception):
    """The server said something the client cannot parse."""


_RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED}
_REFUSED_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL}
_CLIENT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

# response codes of a server that is in trouble rather than refusing the credentials: IMAP
# RFC 5530 ([UNAVAILABLE] "Temporary authentication failure" from an overloaded dovecot), POP3
# RFC 3206 ([SYS/TEMP], [IN-USE]); these are "no", not "auth_rejected"
_TEMPORARY = re.compile(r"\[(UNAVAILABLE|SERVERBUG|LIMIT|INUSE|SYS/|IN-USE)", re.IGNORECASE)

_EOF_BY_PHASE = {
    Phase.CONNECT: "eof_before_greeting",
    Phase.GREETING: "eof_before_greeting",
    Phase.LOGIN: "eof_during_login",
}


def timeout_class(phase: Phase) -> str:
    """``timeout_<phase>``; a held session has no deadline, so HOLD never times out."""
    return f"timeout_{phase.value}"


def classify(err: BaseException, phase: Phase) -> Failure:
    """Map ``err`` raised during ``phase`` to a :class:`~loadkit.schema.Failure`.

    Unknown exceptions become ``protocol_error`` with the exception in ``detail`` (never a
    traceback at the user: Locust counts it like any other failure).
    """
    phase = Phase(phase)
    detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    token: str
    if isinstance(err, PhaseTimeout):
        token = timeout_class(err.phase)
    elif isinstance(err, ServerReply):
        status = err.status.upper()
        if status in ("BYE", "-ERR") and phase in (Phase.CONNECT, Phase.GREETING):
            # a refusal instead of a greeting: IMAP "* BYE", POP3 "-ERR" (RFC 1939 allows it)
            token = "bye_greeting"
        elif status == "BYE":
            token = "eof_after_login" if phase not in _EOF_BY_PHASE else _EOF_BY_PHASE[phase]
        elif status == "BAD":
            token = "bad"
        elif phase is Phase.LOGIN and not _TEMPORARY.search(err.text):
            token = "auth_rejected"  # NO or -ERR to LOGIN, USER or PASS: credentials refused
        else:
            token = "no"
    elif isinstance(err, (ServerClosed, EOFError, ssl.SSLEOFError)):
        token = _EOF_BY_PHASE.get(phase, "eof_after_login")
    elif isinstance(err, ssl.SSLError):
        token = "tls_error"
    elif isinstance(err, TimeoutError):  # socket timeout, asyncio.TimeoutError, ETIMEDOUT
        token = timeout_class(phase)
    elif isinstance(err, ConnectionRefusedError):
        token = "conn_refused"
    elif isinstance(err, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        token = "conn_reset"
    elif isinstance(err, OSError) and err.errno in _REFUSED_ERRNOS:
        token = "conn_refused"
    elif isinstance(err, OSError) and err.errno in _RESET_ERRNOS:
        token = "conn_reset"
    elif isinstance(err, OSError) and err.errno in _CLIENT_ERRNOS:
        token = "client_error"
    else:
        token = "protocol_error"
    assert token in FAILURE_CLASSES, token
    return Failure(token, detail)


class Timeouts(NamedTuple):
    """Deadline of each phase, in seconds (``--mail-timeouts connect=5,login=10,...``)."""

    connect_s: float = 5.0
    greeting_s: float = 10.0
    login_s: float = 10.0
    select_s: float = 10.0
    fetch_s: float = 10.0
    logout_s: float = 5.0

    def of(self, phase: Phase) -> float | None:
        """Deadline of ``phase``; None for HOLD (a held session waits as long as it is told)."""
        return None if phase is Phase.HOLD else getattr(self, f"{phase.value}_s")


class PhaseResult(NamedTuple):
    """One Locust request: a phase of a session, timed where the I/O happened."""

    name: str  #: Locust request name: "connect+greeting", "LOGIN", "PASS", "SELECT", ...
    phase: Phase
    elapsed_s: float
    response_length: int
    failure: Failure | None  #: None on success

    @property
    def ok(self) -> bool:
        return self.failure is None
