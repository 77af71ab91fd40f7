"""How the generators plug into a Locust process: worker share, master/worker piggyback, user errors.

Every generator needs the same three things from Locust, and each is done here once:

- :func:`worker_share`: which part of the configured totals this process makes (worker ``index``
  of ``count``). Locust gives each worker its index but not the number of workers, so the master
  puts that number into the options it sends with every spawn (:func:`tell_workers_their_count`,
  called from a ``test_start`` listener, which fires before Locust sends them).
- :func:`piggyback`: per-process data that must reach the master (counters, events, latency
  histograms) rides on Locust's ``report_to_master`` message under its own key, and the master
  merges what each worker sent in ``worker_report``. One pair of listeners per environment
  dispatches every key, so a generator only says what to send and how to merge it.
- :func:`exit_on_user_error` / :func:`print_user_error`: a bad option or input file is one line
  ``loadkit: error: ...`` on stderr and exit status 2, the same line the ``loadkit`` command prints
  and ``loadkit run`` looks for in a locustfile's output.

Nothing here imports the lab or the recorder.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, NoReturn, Protocol, TypeVar

from loadkit.errors import LoadkitError

log = logging.getLogger(__name__)

#: the hidden option a master sets at test start: how many workers share the load
WORKERS_OPTION = "loadkit_workers"
#: what every user-error line starts with (``loadkit run`` recognises a locustfile's by it)
USER_ERROR_PREFIX = "loadkit: error: "

_WARNED_ATTR = "loadkit_worker_share_warned"
_PIGGYBACK_ATTR = "loadkit_piggyback"


# -- worker share ---------------------------------------------------------------------------------


def _is_runner(runner: Any, kind: str) -> bool:
    # by class name, so that this module imports nothing from locust.runners at import time
    return any(cls.__name__ == kind for cls in type(runner).__mro__)


def worker_share(environment: Any) -> tuple[int, int]:
    """``(index, count)`` of this Locust process among the processes that make load.

    A standalone process (or no runner, as under ``run_single_user``) is ``(0, 1)``. A worker the
    master did not tell the count (a master without loadkit's generators) counts as the only one,
    with one warning per process.
    """
    runner = getattr(environment, "runner", None)
    if runner is None or not _is_runner(runner, "WorkerRunner"):
        return 0, 1
    count = int(getattr(environment.parsed_options, WORKERS_OPTION, 0) or 0)
    index = int(getattr(runner, "worker_index", -1))
    if count < 1 or index < 0:
        if not getattr(environment, _WARNED_ATTR, False):
            setattr(environment, _WARNED_ATTR, True)
            log.warning("the master did not say how many workers there are: this worker makes the whole load")
        return 0, 1
    return index % count, count


def tell_workers_their_count(environment: Any) -> None:
    """On a master, put the number of workers into the options the spawn message carries.

    Call it from a ``test_start`` listener; elsewhere it does nothing. Idempotent.
    """
    runner = getattr(environment, "runner", None)
    options = getattr(environment, "parsed_options", None)
    if runner is not None and options is not None and _is_runner(runner, "MasterRunner"):
        setattr(options, WORKERS_OPTION, runner.worker_count)


# -- master/worker piggyback ------------------------------------------------------------------------


class _Piggyback:
    """The report/merge pairs of one environment, keyed by their message key."""

    def __init__(self) -> None:
        self.handlers: dict[str, tuple[Callable[[], Any], Callable[[str, Any], None]]] = {}

    def on_report_to_master(self, client_id: str, data: dict, **_kw: Any) -> None:
        for key, (report, _merge) in self.handlers.items():
            payload = report()
            if payload:  # nothing to say: the message stays as Locust made it
                data[key] = payload

    def on_worker_report(self, client_id: str, data: dict, **_kw: Any) -> None:
        for key, (_report, merge) in self.handlers.items():
            if data.get(key):
                merge(client_id, data[key])


class Channel(Protocol):
    """A per-process object whose data travels to the master (metrics, events, histograms)."""

    def _report(self) -> Any: ...

    def _merge_worker(self, client_id: str, payload: Any) -> None: ...


C = TypeVar("C", bound=Channel)


def attach(environment: Any, attr: str, key: str, make: Callable[[], C]) -> C:
    """The ``make()`` object of this environment (stored as ``attr``), created on first use and
    piggybacked under ``key``: its ``_report()`` rides on each worker report, the master calls its
    ``_merge_worker(client_id, payload)``. Call it in ``init`` in every process, so a master
    merges its workers' data from their first report."""
    existing = getattr(environment, attr, None)
    if existing is not None:
        return existing
    channel = make()
    setattr(environment, attr, channel)
    piggyback(environment, key, channel._report, channel._merge_worker)
    return channel


def piggyback(environment: Any, key: str, report: Callable[[], Any], merge: Callable[[str, Any], None]) -> None:
    """Send ``report()`` to the master under ``key`` with every worker report; on the master,
    call ``merge(client_id, payload)`` for each worker report that carries ``key``.

    ``report`` runs on each worker's ``report_to_master`` (every few seconds and once at the end);
    an empty or ``None`` payload is not sent. ``merge`` runs on the master. Calling this again with
    the same key replaces that key's pair; every key shares one pair of Locust listeners.
    Payloads travel as msgpack: plain dicts, lists, numbers and strings.
    """
    hub = getattr(environment, _PIGGYBACK_ATTR, None)
    if hub is None:
        hub = _Piggyback()
        setattr(environment, _PIGGYBACK_ATTR, hub)
        environment.events.report_to_master.add_listener(hub.on_report_to_master)
        environment.events.worker_report.add_listener(hub.on_worker_report)
    hub.handlers[key] = (report, merge)


# -- where the load goes ----------------------------------------------------------------------------

_TARGETS_ATTR = "loadkit_targets"


class _Targets:
    """The endpoints this process's generators resolved (``scheme://address:port``), in the order
    they were first noted; a master holds its workers' too."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def add(self, url: str) -> None:
        if url not in self.urls:
            self.urls.append(url)

    def _report(self) -> list[str]:
        return list(self.urls)

    def _merge_worker(self, client_id: str, payload: Any) -> None:
        for url in payload:
            self.add(str(url))


def targets_noted(environment: Any) -> list[str]:
    """Where this run's load went, as its generators resolved it (on a master: as its workers
    did). Call it in ``init`` in every process, so that a master hears its workers from the start;
    a plain ``locust -f`` run records these as its targets."""
    return attach(environment, _TARGETS_ATTR, _TARGETS_ATTR, _Targets).urls


def note_target(environment: Any, scheme: str, target: Any) -> None:
    """Note that a generator of this process sends to ``target`` (``address:port``) by ``scheme``."""
    attach(environment, _TARGETS_ATTR, _TARGETS_ATTR, _Targets).add(f"{scheme}://{target}")


# -- user errors ------------------------------------------------------------------------------------


def print_user_error(err: LoadkitError | str) -> None:
    """Print a user error as its one line (``loadkit: error: ...``) on stderr."""
    print(f"{USER_ERROR_PREFIX}{err}", file=sys.stderr, flush=True)


def exit_on_user_error(err: LoadkitError | str) -> NoReturn:
    """Print a user error's line and exit the process with its exit status (2 for a message).

    For checks that run before any load (``init`` listeners): nothing has been sent yet, so a
    plain exit is clean. Once a test runs, use :func:`print_user_error` and quit the runner.
    """
    print_user_error(err)
    sys.exit(err.exit_code if isinstance(err, LoadkitError) else 2)


class _Startable(Protocol):
    def start(self) -> None: ...


def start_at_test_start(environment: Any, attr: str) -> bool:
    """The ``test_start`` step every generator shares: a master tells its workers their count; a
    load process starts the generator it keeps at ``environment.<attr>``, and a user error from
    that start is its one line, exit status 2 and the runner quit (the test has begun, so no
    ``sys.exit``). True when the generator started; False on a master, under ``run_single_user``
    (no runner: the user runs the generator itself) or after an error."""
    import gevent  # here: the rest of this module is plain Python, importable without Locust

    runner = environment.runner
    if _is_runner(runner, "MasterRunner"):
        tell_workers_their_count(environment)
        return False
    generator: _Startable | None = getattr(environment, attr, None)
    if generator is None or runner is None:
        return False
    try:
        generator.start()
    except LoadkitError as err:
        log.error("%s", err)
        print_user_error(err)
        environment.process_exit_code = 2
        gevent.spawn_later(0, runner.quit)
        return False
    return True


class _Stoppable(Protocol):
    def stop(self) -> None: ...


def stop_at_test_stop(environment: Any, attr: str) -> Any:
    """The ``test_stop`` step every generator shares: stop the generator kept at
    ``environment.<attr>`` and return it (None when this process keeps none)."""
    generator: _Stoppable | None = getattr(environment, attr, None)
    if generator is not None:
        generator.stop()
    return generator


__all__ = [
    "USER_ERROR_PREFIX",
    "WORKERS_OPTION",
    "attach",
    "exit_on_user_error",
    "piggyback",
    "print_user_error",
    "start_at_test_start",
    "stop_at_test_stop",
    "tell_workers_their_count",
    "worker_share",
]
