"""Memory cgroup readers for cgroup v1 and v2, with an injectable root.

A proxy's memory cgroup is what the kernel charges and what the OOM killer acts on, so it is the
figure to plan from (summed RSS overstates a dovecot proxy's cost several times over because of
shared pages). Files read:

======================  =============================  =================================
figure                  v1 (``memory`` controller)     v2 (unified)
======================  =============================  =================================
memory in use           ``memory.usage_in_bytes``      ``memory.current``
limit                   ``memory.limit_in_bytes``      ``memory.max`` (``max`` = none)
limit hits              ``memory.failcnt``             ``memory.events`` ``max``
OOM kills               ``memory.oom_control``         ``memory.events`` ``oom_kill``
                        ``oom_kill`` (Linux >= 4.13)
under OOM (stalled)     ``memory.oom_control``         (no equivalent, 0)
                        ``under_oom``
member processes        ``cgroup.procs`` (this cgroup and every descendant)
======================  =============================  =================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from loadkit.observe.procfs import parse_keyed

#: where cgroup hierarchies are mounted; tests pass a canned tree
CGROUP_ROOT = "/sys/fs/cgroup"

#: v1 reports "no limit" as a huge page-aligned number (LONG_MAX rounded down to a page)
_V1_UNLIMITED = 1 << 62


class CgroupMemory(NamedTuple):
    """One memory cgroup at one instant (:func:`read_memory`)."""

    version: int  #: 1 or 2
    memory_bytes: int
    limit_bytes: int  #: 0 when unlimited
    failcnt_n: int
    oom_kills_n: int
    under_oom: bool  #: v1 with the OOM killer disabled: the cgroup is stalled at its limit
    oom_kill_disabled: bool


def resolve(path: str | os.PathLike, root: str | os.PathLike = CGROUP_ROOT) -> tuple[Path, int] | None:
    """The directory of memory cgroup ``path`` and its version, or None if it does not exist.

    ``path`` may be a directory (``/sys/fs/cgroup/memory/loadkit/proxy1``) or a path inside the
    hierarchy (``/loadkit/proxy1``, as in ``/proc/PID/cgroup``), looked up under
    ``ROOT/memory`` (v1), ``ROOT`` (v2) and ``ROOT/unified`` (v2 beside v1).
    """
    p = Path(path)
    candidates = [p] if p.is_absolute() else []
    rel = str(p).lstrip("/")
    root = Path(root)
    candidates += [root / "memory" / rel, root / rel, root / "unified" / rel]
    for cand in candidates:
        if (cand / "memory.usage_in_bytes").exists():
            return cand, 1
        if (cand / "memory.current").exists():
            return cand, 2
    return None


def _int_file(path: Path) -> int:
    return int(path.read_text().strip())


def _keyed_file(path: Path) -> dict[str, int]:
    return parse_keyed(path.read_text())


def read_memory(directory: str | os.PathLike, version: int) -> CgroupMemory:
    """Read one cgroup resolved by :func:`resolve`; ``OSError`` if it vanished.

    A counter file the kernel does not provide (``oom_kill`` before Linux 4.13) reads as 0.
    """
    d = Path(directory)
    if version == 1:
        usage = _int_file(d / "memory.usage_in_bytes")
        limit = _int_file(d / "memory.limit_in_bytes")
        failcnt = _int_file(d / "memory.failcnt")
        oom = _keyed_file(d / "memory.oom_control")
        return CgroupMemory(
            1,
            usage,
            0 if limit >= _V1_UNLIMITED else limit,
            failcnt,
            oom.get("oom_kill", 0),
            bool(oom.get("under_oom", 0)),
            bool(oom.get("oom_kill_disable", 0)),
        )
    usage = _int_file(d / "memory.current")
    raw_max = (d / "memory.max").read_text().strip()
    events = _keyed_file(d / "memory.events")
    return CgroupMemory(
        2,
        usage,
        0 if raw_max == "max" else int(raw_max),
        events.get("max", 0),
        events.get("oom_kill", 0),
        False,
        False,
    )


def read_pids(directory: str | os.PathLike) -> set[int]:
    """PIDs in the cgroup and all its descendants (``cgroup.procs`` of each)."""
    pids: set[int] = set()
    for dirpath, _dirnames, filenames in os.walk(directory):
        if "cgroup.procs" not in filenames:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as fh:
                pids.update(int(line) for line in fh if line.strip())
        except (OSError, ValueError):
            continue  # a child cgroup removed while walking
    return pids
