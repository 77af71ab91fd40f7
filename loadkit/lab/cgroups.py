"""Memory cgroups for the lab's proxies, v1 (``/sys/fs/cgroup/memory``) and v2 (unified).

Layout: ``<root>/loadkit/<lab-id>/proxyN``; ``<lab-id>`` makes two labs' groups distinct.
v1: ``memory.limit_in_bytes``, ``memory.usage_in_bytes``, ``memory.failcnt``,
``memory.oom_control`` (``oom_kill_disable``, ``oom_kill``). v2: ``memory.max``,
``memory.current``, ``memory.events`` (``max``, ``oom_kill``); v2 has no way to disable the OOM
killer, so there ``oom_kill=False`` sets ``memory.oom.group=1`` instead (the OOM killer takes
the whole proxy at once, which ends the same way: the proxy is gone).
"""

from __future__ import annotations

import errno
import math
import os
import signal
import time
from pathlib import Path
from typing import NamedTuple

from loadkit.observe import cgroups as observed

from .status import CgroupSupport

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "loadkit"


class Memory(NamedTuple):
    """A cgroup's memory figures (made by :func:`read_memory`); None where not available."""

    memory_bytes: int | None
    limit_bytes: int | None
    failcnt: int | None
    oom_kills: int | None


def detect(root: Path = CGROUP_ROOT) -> tuple[int | None, Path | None, str]:
    """``(version, memory hierarchy root, reason)``; version None when limits cannot be set."""
    version, hier, reason = _detect_controller(root, "memory", "memory.limit_in_bytes", ("cgroup v2", "cgroup v1"))
    return version, hier, reason if version is not None else f"{reason}: proxies run without memory limits"


def _detect_controller(root: Path, controller: str, v1_file: str,
                       in_effect: tuple[str, str]) -> tuple[int | None, Path | None, str]:
    """``(version, hierarchy root, reason)`` for one controller: v2 when the unified tree lists it,
    else v1 when its hierarchy has ``v1_file``; the reason is ``in_effect`` (v2, v1), or why the
    controller cannot be used (version None)."""
    if os.geteuid() != 0:
        return None, None, "not root"
    v2_controllers = root / "cgroup.controllers"
    if v2_controllers.exists():
        if controller in v2_controllers.read_text().split():
            return 2, root, in_effect[0]
        return None, None, f"cgroup v2 without the {controller} controller"
    v1 = root / controller
    if (v1 / v1_file).exists():
        return 1, v1, in_effect[1]
    return None, None, f"no {controller} cgroup controller mounted"


def support(version: int | None, reason: str, oom_kill: bool, limit_bytes: int) -> CgroupSupport:
    if version is None:
        return CgroupSupport(False, None, reason, oom_kill)
    text = f"{reason}: each proxy limited to {limit_bytes / 1048576:.0f} MiB"
    if not oom_kill:
        text += (
            ", OOM killer disabled (oom_kill_disable=1)"
            if version == 1
            else ", OOM killer cannot be disabled on cgroup v2: memory.oom.group=1 kills "
            "the whole proxy instead"
        )
    return CgroupSupport(True, version, text, oom_kill)


def create(version: int, hier: Path, lab_id: str, name: str, limit_bytes: int, oom_kill: bool) -> Path:
    """Create ``loadkit/<lab_id>/<name>`` with the memory limit; return its directory."""
    parent = hier / PARENT
    lab = parent / lab_id
    path = lab / name
    if version == 2:
        _enable_memory(hier)
        parent.mkdir(exist_ok=True)
        _enable_memory(parent)
        lab.mkdir(exist_ok=True)
        _enable_memory(lab)
        path.mkdir(exist_ok=True)
        (path / "memory.max").write_text(str(limit_bytes))
        if (path / "memory.swap.max").exists():
            # as on v1 without memsw: the limit is on memory, nothing is pushed to swap
            (path / "memory.swap.max").write_text("0")
        if not oom_kill:
            (path / "memory.oom.group").write_text("1")
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        if not oom_kill:
            (path / "memory.oom_control").write_text("1")
    return path


def _enable_memory(group: Path) -> None:
    ctl = group / "cgroup.subtree_control"
    if "memory" not in ctl.read_text().split():
        ctl.write_text("+memory")


def join(path: Path) -> None:
    """Move the calling process into the cgroup (run in the child before exec)."""
    with open(path / "cgroup.procs", "w") as f:
        f.write(str(os.getpid()))


def read_memory(version: int | None, path: Path | None) -> Memory:
    """The proxy group's figures, read with the collector's reader so the lab's status and a
    collector watching the same group never disagree."""
    if version is None or path is None or not path.exists():
        return Memory(None, None, None, None)
    try:
        m = observed.read_memory(path, version)
    except (OSError, ValueError):
        return Memory(None, None, None, None)
    return Memory(m.memory_bytes, m.limit_bytes or None, m.failcnt_n, m.oom_kills_n)


def under_oom(version: int | None, path: Path | None) -> bool | None:
    """v1 only: the group is at its limit and, the OOM killer being disabled, its tasks wait."""
    if version != 1 or path is None:
        return None
    try:
        return observed.read_memory(path, version).under_oom
    except (OSError, ValueError):
        return None


def procs(path: Path) -> list[int]:
    return sorted(observed.read_pids(path))


def release(path: Path) -> None:
    """Lift the group's limit and re-enable the OOM killer, so tasks stalled at the limit (OOM
    killer disabled) can run on to their exit when they are killed."""
    for name, value in (("memory.oom_control", "0"), ("memory.limit_in_bytes", "-1"),
                        ("memory.max", "max")):
        try:
            if (path / name).exists():
                (path / name).write_text(value)
        except OSError:
            pass


def remove(path: Path, timeout_s: float = 5.0) -> None:
    """Remove a proxy's cgroup, then its lab's and the ``loadkit`` parent when empty.

    A cgroup can only be removed once its processes are gone; exiting tasks can linger for a
    moment, so retry until ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while path.exists():
        try:
            path.rmdir()
        except OSError as err:
            if err.errno == errno.ENOENT:
                break
            if time.monotonic() > deadline:
                raise
            for pid in procs(path):  # ours: they are in the lab's own group
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)
    for parent in (path.parent, path.parent.parent):
        if parent.name and parent.exists():
            try:
                parent.rmdir()
            except OSError:
                break  # still holds another proxy's or another lab's group


# -- CPU quotas (issue: capacity set, not found) ------------------------------------------------

#: CFS period of the lab's CPU quotas. Short on purpose: a server throttled for the rest of a
#: 100 ms period (the kernel default) stops reading its socket for up to 75 ms at a quarter of a
#: core, and a 256-query receive buffer overflows in that gap at a few thousand q/s; a 10 ms period
#: keeps the gaps, and so the loss they cause, ten times shorter.
CPU_PERIOD_US = 10_000
#: The kernel's smallest quota (1 ms a period): below 0.1 of a core the period grows to keep it
CPU_QUOTA_MIN_US = 1000
#: and the longest period it takes (1 s): 0.001 of a core at the least
CPU_PERIOD_MAX_US = 1_000_000


def cpu_period_us(cores: float) -> int:
    """The CFS period for a quota of ``cores``: :data:`CPU_PERIOD_US`, or longer when that would
    ask for less than the kernel's 1 ms quota (0.02 of a core runs 1 ms in every 50 ms)."""
    return min(CPU_PERIOD_MAX_US, max(CPU_PERIOD_US, math.ceil(CPU_QUOTA_MIN_US / cores)))


#: A quota only caps: on a busy machine the server may not even get its quota, and its capacity
#: would again be what others leave. A weight 8 times the default (v1 shares 1024, v2 weight 100)
#: gives it its quota first, so the capacity stays what the quota sets.
CPU_SHARES_V1 = 8192
CPU_WEIGHT_V2 = 800


def detect_cpu(root: Path = CGROUP_ROOT) -> tuple[int | None, Path | None, str]:
    """``(version, cpu hierarchy root, reason)`` for CPU quotas; version None when unavailable."""
    return _detect_controller(root, "cpu", "cpu.cfs_quota_us",
                              ("cgroup v2 cpu.max", "cgroup v1 cpu.cfs_quota_us"))


def create_cpu(version: int, hier: Path, lab_id: str, name: str, cores: float) -> Path:
    """``loadkit/<lab_id>/<name>`` in the cpu hierarchy with a CFS quota of ``cores``; on v2 the
    same directory as the memory group of that name (one unified tree)."""
    lab = hier / PARENT / lab_id
    path = lab / name
    period_us = cpu_period_us(cores)
    quota_us = max(CPU_QUOTA_MIN_US, int(round(cores * period_us)))
    if version == 2:
        for group in (hier, hier / PARENT, lab):
            group.mkdir(exist_ok=True)
            ctl = group / "cgroup.subtree_control"
            if "cpu" not in ctl.read_text().split():
                ctl.write_text("+cpu")
        path.mkdir(exist_ok=True)
        (path / "cpu.max").write_text(f"{quota_us} {period_us}")
        (path / "cpu.weight").write_text(str(CPU_WEIGHT_V2))
    else:
        path.mkdir(parents=True, exist_ok=True)
        # the period first: a quota is checked against the period in force
        (path / "cpu.cfs_period_us").write_text(str(period_us))
        (path / "cpu.cfs_quota_us").write_text(str(quota_us))
        (path / "cpu.shares").write_text(str(CPU_SHARES_V1))
    return path


def cpu_quota_cores(version: int | None, path: Path | None) -> float | None:
    """The quota in force, in cores (None without one or when unreadable)."""
    if version is None or path is None:
        return None
    try:
        if version == 2:
            quota, period = (path / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        quota = int((path / "cpu.cfs_quota_us").read_text())
        return None if quota < 0 else quota / int((path / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
