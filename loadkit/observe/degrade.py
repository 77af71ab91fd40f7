"""Warn once, record what can be recorded: how the collector degrades.

A file the kernel does not provide, a controller that is not mounted, a process that vanished or
denied access: the figure becomes 0 and the collector says so once per cause (not once per
second), both in the log and as a ``warning`` event so the run record shows the gap.
"""

from __future__ import annotations

import logging
import threading
import time

from loadkit.schema import Event

log = logging.getLogger("loadkit.observe")


class WarnOnce:
    """Remembers which causes were already reported; hands new ``warning`` events to the caller."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._seen: set[str] = set()
        self._pending: list[Event] = []
        self._lock = threading.Lock()

    def warn(self, key: str, message: str) -> bool:
        """Log ``message`` and queue a warning event, the first time ``key`` is seen only."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            self._pending.append(Event(time.time(), "warning", self.source, {"key": key, "message": message}))
        log.warning("%s (reported once)", message)
        return True

    def seen(self, key: str) -> bool:
        return key in self._seen

    def take(self) -> list[Event]:
        """Warning events queued since the last call."""
        with self._lock:
            events, self._pending = self._pending, []
        return events

    @property
    def keys(self) -> set[str]:
        return set(self._seen)
