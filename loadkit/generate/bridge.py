"""The one place where asyncio runs: one event loop per Locust process, in a real OS thread.

aioimaplib is asyncio; Locust is gevent. Two asyncio loops in two greenlets of one thread fail
("Cannot run the event loop while another loop is running"), so every greenlet of a process
shares one loop that runs in a real thread (gevent's original ``start_new_thread``) on the
original ``EpollSelector``. A greenlet hands a coroutine over with ``call_soon_threadsafe`` and
waits cooperatively on a gevent ``AsyncResult`` that the loop thread sets through the greenlet
hub's ``run_callback_threadsafe``; other greenlets keep running meanwhile.

Rules that keep this working, each learnt the hard way:

- The loop is created lazily by the first :func:`get_bridge` call of a process, so a Locust that
  forks (``--processes``) never inherits a loop thread that no longer exists in the child.
- The loop's executor (used by ``getaddrinfo``) runs its calls in real threads: a
  monkey-patched thread pool would be greenlets of a hub nobody runs, and lookups would hang.
- The loop's own wake-up pipe and every socket it connects are original (unpatched) sockets,
  so no gevent machinery is touched from the loop thread (:meth:`Bridge.open_socket`).
- Durations are measured on the loop (``perf_counter`` inside the coroutine): the hop between
  greenlet and loop grows to ~12 ms when a process is saturated and is not part of a phase.
- On shutdown every task still pending is cancelled and drained, and exceptions nobody
  retrieved are logged at debug level and counted, so quitting with thousands of sessions in
  flight prints no traceback per user.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket as _socket_mod
from typing import Any, Callable, Coroutine, TypeVar

import gevent
import gevent.event
from gevent.event import AsyncResult
from gevent.monkey import get_original

log = logging.getLogger(__name__)

T = TypeVar("T")

_start_new_thread = get_original("_thread", "start_new_thread")
_allocate_lock = get_original("_thread", "allocate_lock")
_EpollSelector = get_original("selectors", "EpollSelector")
_RealSocket = get_original("socket", "socket")
_real_socketpair = get_original("socket", "socketpair")


class BridgeClosed(RuntimeError):
    """The process's asyncio loop has been shut down; no more coroutines are accepted."""


class _ThreadLoop(asyncio.SelectorEventLoop):
    """A selector loop that never touches gevent: original self-pipe, real-thread executor."""

    def _make_self_pipe(self) -> None:  # noqa: D401 - asyncio's hook
        # the base class calls socket.socketpair(), which monkey-patching turns into gevent
        # sockets bound to a hub of this thread that never runs
        self._ssock, self._csock = _real_socketpair()
        self._ssock.setblocking(False)
        self._csock.setblocking(False)
        self._internal_fds += 1
        self._add_reader(self._ssock.fileno(), self._read_from_self)

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> asyncio.Future:
        if executor is not None:
            return super().run_in_executor(executor, func, *args)
        # a real thread per call: blocking calls here are rare (name lookups), and a patched
        # ThreadPoolExecutor would hand them to greenlets of a hub that is not running
        fut: asyncio.Future = self.create_future()

        def settle(ok: bool, value: Any) -> None:
            if fut.cancelled():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        def work() -> None:
            try:
                value, ok = func(*args), True
            except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine
                value, ok = err, False
            try:
                self.call_soon_threadsafe(settle, ok, value)
            except RuntimeError:  # loop closed meanwhile
                pass

        _start_new_thread(work, ())
        return fut


class Bridge:
    """One asyncio loop in a real thread, and the calls greenlets use to run coroutines on it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = _ThreadLoop(_EpollSelector())
        self.loop.set_exception_handler(self._on_loop_exception)
        #: exceptions the loop reported that no coroutine retrieved (logged at debug level)
        self.unretrieved_errors_n = 0
        self._closed = False
        self._stopped = _allocate_lock()
        self._stopped.acquire()
        _start_new_thread(self._run, ())

    # -- the loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                self.loop.close()
            finally:
                self._stopped.release()

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # "Task exception was never retrieved" from a library's internal task (aioimaplib's
        # greeting task raises on a BYE greeting): one per session would flood the log
        self.unretrieved_errors_n += 1
        log.debug("asyncio: %s (%r)", context.get("message"), context.get("exception"))

    # -- calls from greenlets -------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop; wait for it cooperatively and return its result.

        The coroutine's exception is raised here. If the calling greenlet is killed (Locust
        stopping a user) or ``timeout`` passes, the task is cancelled on the loop.
        """
        if self._closed:
            coro.close()
            raise BridgeClosed("the asyncio bridge is shut down")
        result = AsyncResult()
        keeper = _keeper()
        hub_loop = keeper.hub_loop
        holder: list[asyncio.Task] = []

        def settle(task: asyncio.Task) -> None:
            if task.cancelled():
                hub_loop.run_callback_threadsafe(result.set_exception, asyncio.CancelledError())
                return
            err = task.exception()
            if err is None:
                hub_loop.run_callback_threadsafe(result.set, task.result())
            else:
                hub_loop.run_callback_threadsafe(result.set_exception, err)

        def start() -> None:
            task = self.loop.create_task(coro)
            holder.append(task)
            task.add_done_callback(settle)

        def cancel() -> None:
            if holder:
                holder[0].cancel()
            else:  # never started: close the coroutine so it is not reported as never awaited
                coro.close()

        self._call_soon(start, on_closed=coro.close)
        keeper.hold()
        try:
            return result.get(timeout=timeout)
        except BaseException:
            # GreenletExit, gevent.Timeout, KeyboardInterrupt: stop the work on the loop too
            if not result.ready():
                self._call_soon(cancel)
            raise
        finally:
            keeper.release()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start ``coro`` on the loop and do not wait (close a session from a ``finally``)."""
        if self._closed:
            coro.close()
            return

        def start() -> None:
            task = self.loop.create_task(coro)
            task.add_done_callback(_consume_result)

        self._call_soon(start, on_closed=coro.close)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule plain ``fn(*args)`` on the loop thread."""
        self._call_soon(lambda: fn(*args))

    def _call_soon(self, fn: Callable[[], None], on_closed: Callable[[], Any] | None = None) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:  # loop closed between the check and the call
            if on_closed is not None:
                on_closed()
            raise BridgeClosed("the asyncio bridge is shut down") from None

    # -- sockets ----------------------------------------------------------------------------------
    @staticmethod
    def open_socket(address: str) -> _socket_mod.socket:
        """A non-blocking original socket for ``address`` (IPv4 or IPv6 literal).

        Hand it to ``loop.sock_connect`` and then ``loop.create_connection(sock=...)``: asyncio's
        own ``socket.socket`` would be a gevent socket under monkey-patching.
        """
        family = _socket_mod.AF_INET6 if ":" in address else _socket_mod.AF_INET
        sock = _RealSocket(family, _socket_mod.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(_socket_mod.IPPROTO_TCP, _socket_mod.TCP_NODELAY, 1)
        return sock

    # -- shutdown -----------------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Cancel every task, drain them, stop the loop and wait (at most ``timeout_s``)."""
        if self._closed:
            return
        self._closed = True

        async def drain() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            # return_exceptions: a cancelled session is not an error worth a traceback
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout_s)

        def start() -> None:
            task = self.loop.create_task(drain())
            task.add_done_callback(lambda t: (_consume_result(t), self.loop.stop()))

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError:
            return
        # wait for the thread cooperatively when called from a greenlet
        deadline_s = timeout_s + 1.0
        waited_s = 0.0
        while not self._stopped.acquire(False):
            if waited_s >= deadline_s:
                log.warning("asyncio bridge did not stop within %.1f s", deadline_s)
                return
            gevent.sleep(0.01)
            waited_s += 0.01
        self._stopped.release()


class _HubKeeper:
    """Keeps a gevent hub alive while greenlets wait for the loop thread.

    ``run_callback_threadsafe`` wakes the hub through a watcher that does not count as
    activity, so a hub whose only greenlets are waiting on the loop would conclude that nothing
    can ever wake them and raise ``LoopExit``. A long timer that runs only while waits are
    pending tells it otherwise; libev counts a started watcher itself, so nothing is unbalanced
    however greenlets end.
    """

    def __init__(self, hub: Any) -> None:
        self.hub_loop = hub.loop
        self._timer = hub.loop.timer(3600.0, 3600.0)
        self._pending = 0

    def hold(self) -> None:
        self._pending += 1
        if self._pending == 1:
            self._timer.start(_noop)

    def release(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._timer.stop()


def _noop() -> None:
    pass


def _keeper() -> _HubKeeper:
    hub = gevent.get_hub()
    keeper = getattr(hub, "_loadkit_bridge_keeper", None)
    if keeper is None:
        keeper = _HubKeeper(hub)
        hub._loadkit_bridge_keeper = keeper
    return keeper


class Signal:
    """A flag the loop thread raises and a greenlet waits for (a held session was lost).

    Create it in the greenlet that will wait; :meth:`set_threadsafe` may be called from the loop.
    """

    __slots__ = ("_event", "_keeper")

    def __init__(self) -> None:
        self._event = gevent.event.Event()
        self._keeper = _keeper()

    def set_threadsafe(self) -> None:
        self._keeper.hub_loop.run_callback_threadsafe(self._event.set)

    def set(self) -> None:
        """Raise the flag from the greenlet side."""
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait cooperatively until set or ``timeout``; True if set."""
        self._keeper.hold()
        try:
            return self._event.wait(timeout)
        finally:
            self._keeper.release()


def _consume_result(task: asyncio.Future) -> None:
    # retrieve the outcome so asyncio does not log "exception was never retrieved"
    if not task.cancelled():
        err = task.exception()
        if err is not None:
            log.debug("background task failed: %r", err)


_bridge: Bridge | None = None
_bridge_lock = _allocate_lock()


def get_bridge() -> Bridge:
    """This process's bridge, created on first use (after any fork)."""
    global _bridge
    b = _bridge
    if b is not None and b.pid == os.getpid() and not b._closed:
        return b
    with _bridge_lock:
        if _bridge is None or _bridge.pid != os.getpid() or _bridge._closed:
            _bridge = Bridge()
        return _bridge


def shutdown(timeout_s: float = 5.0) -> None:
    """Shut this process's bridge down if it was started (idempotent)."""
    b = _bridge
    if b is not None and b.pid == os.getpid():
        b.shutdown(timeout_s)


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Shorthand for ``get_bridge().run(coro, timeout)``."""
    return get_bridge().run(coro, timeout)


atexit.register(shutdown, 2.0)
