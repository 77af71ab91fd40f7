"""IMAP sessions with aioimaplib, run on the bridge's asyncio loop and timed there.

A session is created in a greenlet; its coroutines (:meth:`ImapSession.open`,
:meth:`ImapSession.logout`, :meth:`ImapSession.abort`) run on the process's single asyncio
loop through :mod:`loadkit.generate.bridge`. Each Locust request (``connect+greeting``,
``LOGIN``, ``SELECT``, ``FETCH``, ``IDLE``, ``LOGOUT``) is timed with ``perf_counter`` on the
loop, so the greenlet-to-loop hop is never part of a phase.

aioimaplib 2.0 needs care under a storm, and all of it is handled here:

- the client connects from its constructor, so the protocol is driven directly, on the loop,
  over an original socket connected by the loop (see :meth:`Bridge.open_socket`);
- ``login``/``select`` return a Response whose ``result`` (``OK``/``NO``/``BAD``) is checked;
- a reset, BYE or close after login does not fail the pending command (it waits for its
  timeout): :class:`_Protocol` fails every pending command when the connection is lost;
- the library's own ``wait_hello_from_server`` timeout can hang (cancelling it waits for a lock
  the greeting task holds), so every phase has a loadkit deadline and, when it passes, the
  transport is aborted and the session discarded, without awaiting the library's task.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any, Awaitable, Callable, NamedTuple

import aioimaplib
from aioimaplib.aioimaplib import Command, extract_exists

from loadkit.generate.bridge import Bridge, Signal
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

#: headers fetched by the FETCH phase: what a client lists in a message index
FETCH_ITEMS = "(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)])"


class ImapSpec(NamedTuple):
    """What an IMAP session connects to and does (built once per Locust process)."""

    address: str  #: numeric address, already checked against the allowlist
    port: int
    tls: str = "off"  #: "off", "tls" (implicit, IMAPS) or "starttls"
    ssl_context: ssl.SSLContext | None = None
    timeouts: Timeouts = Timeouts()
    mailbox: str = "INBOX"
    fetch_n: int = 3  #: messages whose headers FETCH reads; 0 skips FETCH
    idle: bool = False  #: hold the session in IDLE instead of plain silence


class _Protocol(aioimaplib.IMAP4ClientProtocol):
    """aioimaplib's protocol, told about greetings and connection loss."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lost_signal: Signal | None) -> None:
        super().__init__(loop)
        self.ready: asyncio.Future = loop.create_future()  #: greeted and capabilities known
        self.lost: asyncio.Future = loop.create_future()  #: result: the exception or None
        self._lost_signal = lost_signal

    def _handle_line(self, line: bytes, current_cmd: Any) -> Any:
        if self.state == aioimaplib.CONNECTED and line and not self.ready.done():
            # a BYE greeting makes aioimaplib raise inside a task nobody awaits; catch it here
            if line.startswith(b"* BYE"):
                self.ready.set_exception(ServerReply("BYE", line[5:].decode(errors="replace").strip()))
                self.state = aioimaplib.LOGOUT
                return None
            if not line.startswith((b"* OK", b"* PREAUTH")):
                self.ready.set_exception(ProtocolError(f"unexpected greeting {line[:60]!r}"))
                self.state = aioimaplib.LOGOUT
                return None
        return super()._handle_line(line, current_cmd)

    def data_received(self, data: bytes) -> None:
        # aioimaplib raises (Abort, ValueError...) on a line it cannot parse; raised out of here
        # the transport would log a traceback and report a plain EOF: class it as what it is
        try:
            super().data_received(data)
        except Exception as err:  # noqa: BLE001 - the server's bytes, not our bug
            self._fail_all(ProtocolError(f"unparseable server data: {type(err).__name__}: {err}"[:200]))
            if self.transport is not None:
                self.transport.abort()

    def _fail_all(self, err: Exception) -> None:
        """Fail whoever waits: the greeting, the session's loss watch and every pending command."""
        if not self.lost.done():
            self.lost.set_result(err)
        if not self.ready.done():
            self.ready.set_exception(err)
        # fail every pending command now instead of at its timeout
        pending = [self.pending_sync_command, *self.pending_async_commands.values()]
        for cmd in pending:
            if cmd is not None and not cmd._event.is_set():
                cmd._exception = err
                cmd.close(b"", "KO")
        if self._lost_signal is not None:
            self._lost_signal.set_threadsafe()

    async def welcome(self, command: bytes) -> None:
        try:
            await super().welcome(command)
        except Exception as err:  # noqa: BLE001 - handed to whoever waits for ready
            if not self.ready.done():
                self.ready.set_exception(err)
            return
        if not self.ready.done():
            self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        # None is a clean EOF; an OSError (reset, ...) is classed by its errno
        err: Exception = exc if isinstance(exc, OSError) else ServerClosed(str(exc or "EOF"))
        self._fail_all(err)
        super().connection_lost(exc)


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


class ImapSession:
    """One IMAP client session; create in a greenlet, run its coroutines on the bridge."""

    def __init__(self, spec: ImapSpec, lost_signal: Signal | None = None) -> None:
        self.spec = spec
        #: raised (from the loop) when the server closes or resets the connection
        self.lost_signal = lost_signal
        self.proto: _Protocol | None = None
        self.logged_in = False
        self.exists_n = 0
        self._idle_task: asyncio.Task | None = None

    # -- phases ------------------------------------------------------------------------------
    async def _step(self, phase: Phase, make: Callable[[], Awaitable[Any]]) -> Any:
        """Await ``make()`` within the phase deadline; a lost connection fails it at once."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(make())
        waiters: set[asyncio.Future] = {task}
        if self.proto is not None and phase is not Phase.CONNECT:
            waiters.add(self.proto.lost)
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=self.spec.timeouts.of(phase), return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # cancelled: the user is stopping
            task.cancel()
            task.add_done_callback(_consume)
            self._abort_transport()
            raise
        if task in done:
            return task.result()
        # never await the library's task after this: it may hold locks that are never released
        task.cancel()
        task.add_done_callback(_consume)
        if self.proto is not None and self.proto.lost in done:
            raise self.proto.lost.result()
        self._abort_transport()
        raise PhaseTimeout(phase)

    async def _request(
        self, name: str, steps: list[tuple[Phase, Callable[[], Awaitable[Any]]]]
    ) -> PhaseResult:
        t0 = time.perf_counter()
        phase = steps[0][0]
        length = 0
        try:
            for phase, make in steps:
                length += int(await self._step(phase, make) or 0)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - classed, never raised at the user
            self._abort_transport()
            return PhaseResult(name, phase, time.perf_counter() - t0, length, classify(err, phase))
        return PhaseResult(name, phase, time.perf_counter() - t0, length, None)

    async def _connect(self) -> int:
        loop = asyncio.get_running_loop()
        spec = self.spec
        sock = Bridge.open_socket(spec.address)
        try:
            await loop.sock_connect(sock, (spec.address, spec.port))
            self.proto = _Protocol(loop, self.lost_signal)
            ctx = spec.ssl_context if spec.tls == "tls" else None
            await loop.create_connection(
                lambda: self.proto, sock=sock, ssl=ctx, server_hostname=None if ctx is None else ""
            )
        except BaseException:
            sock.close()
            raise
        return 0

    async def _greeting(self) -> int:
        assert self.proto is not None
        await self.proto.ready
        return 0

    async def _starttls(self) -> int:
        proto = self.proto
        assert proto is not None
        loop = asyncio.get_running_loop()
        resp = await proto.execute(Command("STARTTLS", proto.new_tag(), loop=loop))
        _check(resp, "STARTTLS")
        transport = await loop.start_tls(
            proto.transport, proto, self.spec.ssl_context, server_hostname=""
        )
        proto.transport = transport
        await proto.capability()
        return 0

    async def _login(self, user: str, password: str) -> int:
        assert self.proto is not None
        resp = await self.proto.login(user, password)
        _check(resp, "LOGIN")
        self.logged_in = True
        return _length(resp)

    async def _select(self) -> int:
        assert self.proto is not None
        resp = await self.proto.select(self.spec.mailbox)
        _check(resp, "SELECT")
        self.exists_n = extract_exists(resp) or 0
        return _length(resp)

    async def _fetch(self) -> int:
        assert self.proto is not None
        n = min(self.spec.fetch_n, self.exists_n)
        resp = await self.proto.fetch(f"1:{n}", FETCH_ITEMS)
        _check(resp, "FETCH")
        return _length(resp)

    async def _idle_start(self) -> int:
        proto = self.proto
        assert proto is not None
        if "IDLE" not in proto.capabilities:
            raise ServerReply("NO", "server has no IDLE capability")
        loop = asyncio.get_running_loop()
        self._idle_task = loop.create_task(proto.idle())
        ack = loop.create_task(proto.wait_for_idle_response())
        done, _ = await asyncio.wait({self._idle_task, ack}, return_when=asyncio.FIRST_COMPLETED)
        if ack not in done:
            ack.cancel()
            ack.add_done_callback(_consume)
            resp = self._idle_task.result()  # raises if the connection was lost
            _check(resp, "IDLE")
            raise ServerReply(resp.result, "IDLE ended at once")
        return 0

    async def _idle_stop(self) -> int:
        proto = self.proto
        assert proto is not None and self._idle_task is not None
        if not self._idle_task.done():
            proto.idle_done()
        resp = await self._idle_task
        _check(resp, "IDLE")
        return 0

    async def _logout(self) -> int:
        assert self.proto is not None
        resp = await self.proto.logout()
        _check(resp, "LOGOUT")
        return _length(resp)

    # -- what greenlets call (through the bridge) ---------------------------------------------
    async def open(self, user: str, password: str) -> list[PhaseResult]:
        """connect+greeting (+STARTTLS), LOGIN, SELECT, FETCH, IDLE: stop at the first failure."""
        spec = self.spec
        results: list[PhaseResult] = []
        steps: list[tuple[str, list]] = [
            ("connect+greeting", [(Phase.CONNECT, self._connect), (Phase.GREETING, self._greeting)])
        ]
        if spec.tls == "starttls":
            steps.append(("STARTTLS", [(Phase.GREETING, self._starttls)]))
        steps.append(("LOGIN", [(Phase.LOGIN, lambda: self._login(user, password))]))
        steps.append(("SELECT", [(Phase.SELECT, self._select)]))
        if spec.fetch_n > 0:
            steps.append(("FETCH", [(Phase.FETCH, self._fetch)]))
        if spec.idle:
            steps.append(("IDLE", [(Phase.SELECT, self._idle_start)]))
        for name, phase_steps in steps:
            if name == "FETCH" and self.exists_n == 0:
                continue  # an empty mailbox has nothing to fetch
            result = await self._request(name, phase_steps)
            results.append(result)
            if not result.ok:
                break
        return results

    async def logout(self) -> list[PhaseResult]:
        """End IDLE if held, then LOGOUT; the connection is closed either way."""
        results = []
        if self._idle_task is not None:
            r = await self._request("IDLE", [(Phase.LOGOUT, self._idle_stop)])
            if not r.ok:
                return [r]
        results.append(await self._request("LOGOUT", [(Phase.LOGOUT, self._logout)]))
        self._abort_transport()
        return results

    async def abort(self) -> None:
        """Drop the connection without a word (user stopped, session discarded)."""
        self._abort_transport()

    def _abort_transport(self) -> None:
        if self._idle_task is not None and not self._idle_task.done():
            self._idle_task.cancel()
            self._idle_task.add_done_callback(_consume)
        proto = self.proto
        if proto is not None and proto.transport is not None:
            proto._lost_signal = None  # a loss we cause is not a server failure
            proto.transport.abort()


def _check(resp: Any, command: str) -> None:
    if resp.result != "OK":
        text = b" ".join(x for x in resp.lines if isinstance(x, (bytes, bytearray)))[:120]
        raise ServerReply(resp.result, f"{command}: {text.decode(errors='replace')}")


def _length(resp: Any) -> int:
    return sum(len(x) for x in resp.lines if isinstance(x, (bytes, bytearray)))
