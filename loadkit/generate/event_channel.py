"""Generator events: things a load generator saw happen at one instant.

A DNS burst really leaving the process (how many queries, between which two send times) is an
event, not a counter: the run record keeps it as one :class:`~loadkit.schema.Event` line in
``events.jsonl``, on the same clock as the collector's samples. Generators do not know the
recorder: they :meth:`~GeneratorEvents.emit` into the per-process channel of
:func:`events_for`, and whoever records the run drains it (the recorder plugin,
``loadkit.plugin.recorder``, does once per watch interval). In distributed mode a worker's channel
is emptied into its ``report_to_master`` message and the master queues the events with its own
(:func:`loadkit.generate.wiring.attach`), so the record holds every worker's.

Events are rare (one per burst, not per query): ``emit`` is a deque append, safe from any thread.
The channel holds at most :data:`MAX_PENDING` undrained events (a run without a recorder keeps
emitting); older ones are dropped and counted.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from loadkit.generate.wiring import attach
from loadkit.schema import Event

_ENV_ATTR = "loadkit_generator_events"
_REPORT_KEY = "loadkit_events"

#: undrained events kept per process; beyond that the oldest are dropped (and counted)
MAX_PENDING = 10_000


class GeneratorEvents:
    """The event channel of one Locust process (see the module docstring)."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self._pending: collections.deque[Event] = collections.deque(maxlen=max_pending)
        #: events dropped because nobody drained the channel in time
        self.dropped_n = 0

    def emit(self, kind: str, source: str, detail: dict[str, Any], ts_unix_s: float | None = None) -> Event:
        """Queue an event (``ts_unix_s``: when it happened, default now)."""
        event = Event(time.time() if ts_unix_s is None else float(ts_unix_s), kind, source, dict(detail))
        self._put(event)
        return event

    def drain(self) -> list[Event]:
        """Every queued event, oldest first; the channel is empty afterwards."""
        out = []
        while True:
            try:
                out.append(self._pending.popleft())
            except IndexError:
                return out

    def _put(self, event: Event) -> None:
        if len(self._pending) == self._pending.maxlen:
            self.dropped_n += 1
        self._pending.append(event)

    # -- distributed mode -----------------------------------------------------------------------
    def _report(self) -> list[dict[str, Any]]:
        return [e._asdict() for e in self.drain()]

    def _merge_worker(self, client_id: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            detail = dict(row.get("detail") or {})
            detail.setdefault("worker", client_id)
            self._put(Event(float(row["ts_unix_s"]), str(row["kind"]), str(row["source"]), detail))


def events_for(environment: Any) -> GeneratorEvents:
    """The :class:`GeneratorEvents` of a Locust environment, created and wired on first use.

    Call it once in every process before the test starts (the recorder plugin does, in ``init``)
    so that a master listens for its workers' events from their first report.
    """
    return attach(environment, _ENV_ATTR, _REPORT_KEY, GeneratorEvents)
