"""A small POP3 client on gevent sockets, timed and classed phase by phase.

``poplib`` blocks on one socket timeout for everything and raises ``error_proto`` for every
negative reply; a storm needs a deadline per phase and to know whether the server closed before
its greeting or after the login. This client is a few lines of RFC 1939 on a gevent socket, so
thousands of sessions share one Locust process cooperatively (no asyncio needed). Each method is
one Locust request and returns a :class:`~loadkit.generate.mail.classify.PhaseResult`; nothing
raises at the user.
"""

from __future__ import annotations

import ssl
import time
from typing import Callable, NamedTuple

import gevent
from gevent import socket as gsocket

from loadkit.generate.mail.classify import (
    Phase,
    PhaseResult,
    PhaseTimeout,
    ProtocolError,
    ServerClosed,
    ServerReply,
    Timeouts,
    classify,
)

_MAX_LINE = 8192


class Pop3Spec(NamedTuple):
    """What a POP3 session connects to and does (built once per Locust process)."""

    address: str  #: numeric address, already checked against the allowlist
    port: int
    tls: str = "off"  #: "off", "tls" (implicit, POP3S) or "starttls" (STLS)
    ssl_context: ssl.SSLContext | None = None
    timeouts: Timeouts = Timeouts()
    uidl: bool = True
    retr: bool = True  #: RETR one message (the first) when the mailbox has any


class Pop3Session:
    """One POP3 session in the calling greenlet."""

    def __init__(self, spec: Pop3Spec) -> None:
        self.spec = spec
        self.sock: gsocket.socket | None = None
        self._buf = b""
        self.logged_in = False
        self.messages_n = 0

    # -- wire ----------------------------------------------------------------------------------
    def _recv_more(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise ServerClosed("EOF")
        self._buf += data

    def _readline(self) -> bytes:
        while True:
            i = self._buf.find(b"\r\n")
            if i >= 0:
                line, self._buf = self._buf[:i], self._buf[i + 2 :]
                return line
            if len(self._buf) > _MAX_LINE:
                raise ProtocolError("line too long")
            self._recv_more()

    def _status(self, what: str) -> bytes:
        """Read a status line: ``+OK ...`` returns it, ``-ERR ...`` raises ServerReply."""
        line = self._readline()
        if line.startswith(b"+OK"):
            return line
        if line.startswith(b"-ERR"):
            raise ServerReply("-ERR", f"{what}: {line[4:].decode(errors='replace').strip()}")
        raise ProtocolError(f"{what}: unexpected reply {line[:60]!r}")

    def _multiline(self) -> int:
        """Read a dot-terminated body after ``+OK``; return its size in bytes."""
        size = 0
        while True:
            i = self._buf.find(b"\r\n.\r\n")
            if self._buf.startswith(b".\r\n"):
                self._buf = self._buf[3:]
                return size
            if i >= 0:
                size += i + 2
                self._buf = self._buf[i + 5 :]
                return size
            # keep the last 4 bytes: the terminator may straddle two reads
            if len(self._buf) > 4:
                size += len(self._buf) - 4
                self._buf = self._buf[-4:]
            self._recv_more()

    def _command(self, line: str, what: str) -> bytes:
        assert self.sock is not None
        self.sock.sendall(line.encode() + b"\r\n")
        return self._status(what)

    # -- phases --------------------------------------------------------------------------------
    def _request(self, name: str, phase: Phase, body: Callable[[], int]) -> PhaseResult:
        t0 = time.perf_counter()
        limit = self.spec.timeouts.of(phase)
        timer = gevent.Timeout(limit, PhaseTimeout(phase)) if limit else None
        if timer is not None:
            timer.start()
        try:
            length = body()
        except gevent.Timeout as t:  # noqa: B030 - a foreign gevent timeout, not ours
            if t is not timer:
                raise
            self.abort()
            return PhaseResult(name, phase, time.perf_counter() - t0, 0, classify(PhaseTimeout(phase), phase))
        except Exception as err:  # noqa: BLE001 - classed, never raised at the user
            self.abort()
            return PhaseResult(name, phase, time.perf_counter() - t0, 0, classify(err, phase))
        finally:
            if timer is not None:
                timer.close()
        return PhaseResult(name, phase, time.perf_counter() - t0, length, None)

    def connect(self) -> PhaseResult:
        """connect+greeting (and STLS when asked); the connect part has its own deadline."""
        spec = self.spec

        def body() -> int:
            t_connect = spec.timeouts.connect_s
            try:
                self.sock = gsocket.create_connection((spec.address, spec.port), timeout=t_connect)
            except (TimeoutError, gsocket.timeout) as err:
                raise PhaseTimeout(Phase.CONNECT) from err
            self.sock.settimeout(None)  # deadlines are gevent.Timeouts per phase
            self.sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            if spec.tls == "tls":
                self.sock = _wrap(self.sock, spec.ssl_context)
            greeting = self._status("greeting")
            if spec.tls == "starttls":
                self._command("STLS", "STLS")
                self.sock = _wrap(self.sock, spec.ssl_context)
            return len(greeting)

        return self._request("connect+greeting", Phase.GREETING, body)

    def login(self, user: str, password: str) -> PhaseResult:
        """USER then PASS, as one request named ``PASS``."""

        def body() -> int:
            self._command(f"USER {user}", "USER")
            line = self._command(f"PASS {password}", "PASS")
            self.logged_in = True
            return len(line)

        return self._request("PASS", Phase.LOGIN, body)

    def stat(self) -> PhaseResult:
        def body() -> int:
            line = self._command("STAT", "STAT")
            parts = line.split()
            try:
                self.messages_n = int(parts[1])
            except (IndexError, ValueError):
                raise ProtocolError(f"STAT: unexpected reply {line[:60]!r}") from None
            return len(line)

        return self._request("STAT", Phase.SELECT, body)

    def uidl(self) -> PhaseResult:
        def body() -> int:
            self._command("UIDL", "UIDL")
            return self._multiline()

        return self._request("UIDL", Phase.SELECT, body)

    def retr(self, n: int = 1) -> PhaseResult:
        def body() -> int:
            self._command(f"RETR {n}", "RETR")
            return self._multiline()

        return self._request("RETR", Phase.FETCH, body)

    def quit(self) -> PhaseResult:
        def body() -> int:
            line = self._command("QUIT", "QUIT")
            return len(line)

        result = self._request("QUIT", Phase.LOGOUT, body)
        self.abort()
        return result

    def open(self, user: str, password: str) -> list[PhaseResult]:
        """connect+greeting, PASS, STAT, UIDL, RETR: stop at the first failure."""
        results = []
        steps = [self.connect, lambda: self.login(user, password), self.stat]
        if self.spec.uidl:
            steps.append(self.uidl)
        if self.spec.retr:
            steps.append(lambda: self.retr(1) if self.messages_n > 0 else None)
        for step in steps:
            r = step()
            if r is None:
                continue
            results.append(r)
            if not r.ok:
                break
        return results

    def hold(self, timeout_s: float | None) -> bool:
        """Hold the session silently; True if it lasted ``timeout_s``, False if the server left.

        A server that closes a held session makes the socket readable with EOF (or a stray
        ``-ERR`` line before closing, which counts the same).
        """
        sock = self.sock
        if sock is None:
            return False
        try:
            gsocket.wait_read(sock.fileno(), timeout=timeout_s)
        except gsocket.timeout:
            return True
        except Exception:  # noqa: BLE001 - closed under us: lost
            return False
        return False

    def abort(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def _wrap(sock: gsocket.socket, ctx: ssl.SSLContext | None) -> gsocket.socket:
    if ctx is None:
        raise ProtocolError("TLS requested without an SSL context")
    # a gevent.ssl context (see users.make_ssl_context) wraps the gevent socket cooperatively
    return ctx.wrap_socket(sock)
