"""Events from successive samples: processes that appear, exit or restart, and OOM kills.

The incident that matters here is a set of proxies whose masters all died within a second and
failed again on restart, so each event carries its timestamp and enough detail to line it up
with the load: the PID and name, how many processes the group has left, and for an OOM kill the
cgroup's memory and limit at that moment.

- ``process_started`` / ``process_exited``: membership of a group changed between two samples.
  A burst of short-lived children (one dovecot login process per connection) is folded into one
  event per group and sample once it exceeds ``max_events_per_sample``, with the count; a
  process whose parent is not in the group (a master) always has an event of its own.
- ``process_restarted``: a process appears whose parent is not in the group (a new master, not a
  child spawned by one) and whose name matches a process that left the group within
  ``restart_window_s``.
- ``oom_kill``: the cgroup's OOM-kill counter rose (``memory.oom_control``/``memory.events``).
- ``warning`` with ``under_oom``: a v1 cgroup with the OOM killer disabled reached its limit and
  its processes are stalled.

The first sample only sets the baseline: processes running when the collector starts did not
"start" then.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping

from loadkit.schema import Event

from .cgroups import CgroupMemory
from .groups import ProcInfo


class EventTracker:
    def __init__(self, host: str, restart_window_s: float = 30.0, max_events_per_sample: int = 20) -> None:
        self.host = host
        self.restart_window_s = restart_window_s
        self.max_events_per_sample = max_events_per_sample
        self._members: dict[str, dict[int, ProcInfo]] | None = None
        self._recent_exits: dict[str, list[tuple[float, ProcInfo]]] = {}
        self._cgroups: dict[str, CgroupMemory | None] = {}

    def update(
        self,
        ts_unix_s: float,
        members: Mapping[str, Mapping[int, ProcInfo]],
        cgroup_readings: Mapping[str, CgroupMemory | None] | None = None,
    ) -> list[Event]:
        events: list[Event] = []
        current = {g: dict(m) for g, m in members.items()}
        if self._members is not None:
            for group, now in current.items():
                before = self._members.get(group, {})
                events += self._membership(ts_unix_s, group, before, now)
        self._members = current
        for group, reading in (cgroup_readings or {}).items():
            events += self._cgroup(ts_unix_s, group, reading)
        return events

    # -- processes ----------------------------------------------------------------------------

    def _membership(self, ts: float, group: str, before: Mapping[int, ProcInfo], now: Mapping[int, ProcInfo]) -> list[Event]:
        exited = [info for pid, info in before.items() if pid not in now or now[pid].create_time_unix_s != info.create_time_unix_s]
        started = [info for pid, info in now.items() if pid not in before or before[pid].create_time_unix_s != info.create_time_unix_s]
        recent = [(t, i) for t, i in self._recent_exits.get(group, []) if ts - t <= self.restart_window_s]
        recent += [(ts, info) for info in exited]
        restarts: list[tuple[ProcInfo, ProcInfo, float]] = []
        for info in started:
            if info.ppid in now:
                continue  # a child of a member: ordinary work, not a restart
            for k, (t_exit, old) in enumerate(recent):
                if old.name == info.name:
                    restarts.append((info, old, ts - t_exit))
                    del recent[k]
                    break
        self._recent_exits[group] = recent
        events = self._fold(ts, "process_exited", group, exited, len(now), set(before))
        events += self._fold(ts, "process_started", group, started, len(now), set(now))
        for info, old, down_s in restarts:
            events.append(
                Event(
                    ts,
                    "process_restarted",
                    group,
                    {
                        "host": self.host,
                        "pid": info.pid,
                        "name": info.name,
                        "previous_pid": old.pid,
                        "down_s": round(down_s, 3),
                        "group_procs_n": len(now),
                    },
                )
            )
        return events

    def _fold(self, ts: float, kind: str, group: str, infos: list[ProcInfo], procs_n: int, pids: set[int]) -> list[Event]:
        """One event per process; children beyond ``max_events_per_sample`` folded into one.

        A process whose parent is not in the group (a master, a server) always gets its own
        event: it is the one whose death matters.
        """
        if not infos:
            return []
        roots = [i for i in infos if i.ppid not in pids]
        children = [i for i in infos if i.ppid in pids]
        if len(infos) <= self.max_events_per_sample:
            roots, children = infos, []
        events = [
            Event(ts, kind, group, {"host": self.host, "pid": i.pid, "name": i.name, "ppid": i.ppid,
                                    # root: its parent is outside the group (a master, a server)
                                    "root": i.ppid not in pids, "group_procs_n": procs_n})
            for i in roots
        ]
        if children:
            events.append(
                Event(
                    ts,
                    kind,
                    group,
                    {
                        "host": self.host,
                        "count": len(children),
                        "names": dict(Counter(i.name for i in children)),
                        "pids": [i.pid for i in children[: self.max_events_per_sample]],
                        "group_procs_n": procs_n,
                    },
                )
            )
        return events

    # -- cgroups ------------------------------------------------------------------------------

    def _cgroup(self, ts: float, group: str, reading: CgroupMemory | None) -> list[Event]:
        before = self._cgroups.get(group)
        self._cgroups[group] = reading if reading is not None else before
        if reading is None or before is None:
            return []
        events = []
        if reading.oom_kills_n > before.oom_kills_n:
            events.append(
                Event(
                    ts,
                    "oom_kill",
                    group,
                    {
                        "host": self.host,
                        "count": reading.oom_kills_n - before.oom_kills_n,
                        "oom_kills_n": reading.oom_kills_n,
                        "cgroup_memory_bytes": reading.memory_bytes,
                        "cgroup_limit_bytes": reading.limit_bytes,
                    },
                )
            )
        if reading.under_oom and not before.under_oom:
            events.append(
                Event(
                    ts,
                    "warning",
                    group,
                    {
                        "host": self.host,
                        "under_oom": True,
                        "message": f"group {group}: memory cgroup at its limit with the OOM killer disabled; its processes are stalled",
                        "cgroup_memory_bytes": reading.memory_bytes,
                        "cgroup_limit_bytes": reading.limit_bytes,
                    },
                )
            )
        return events
