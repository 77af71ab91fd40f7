"""Process groups: the processes of one service, by name pattern or by memory cgroup.

A group is given as ``NAME=PATTERN``, ``NAME=cmdline:REGEX`` or ``NAME=cgroup:PATH``, each with
an optional ``@PORT,PORT`` (the group's listening ports; established TCP connections on them are
the group's client sessions, ``GroupSample.sessions_n``). The grammar is
:mod:`loadkit.profile.groupspec`, the same one a profile's ``[collect] groups`` is checked with:

- ``proxies=dovecot``: a regular expression searched in the process name (``comm``) and in the
  first word of its command line (``dovecot/imap-login``), like ``pgrep``;
- ``dns=cmdline:unbound.*lab``: searched in the whole command line (``pgrep -f``);
- ``proxy1=cgroup:/loadkit/proxy1@11243,11210``: every process in a memory cgroup and its
  descendants, plus the cgroup's memory, limit, failcnt and OOM-kill counters.

This is per-sample work, so it is kept cheap: the host's PIDs are listed once per sample, only
PIDs not seen before are classified (name and command line read once; a PID caught between
``fork`` and ``exec`` is looked at again a few times), and each member costs one read of
``/proc/PID/stat`` (state, CPU time and RSS together) and one ``listdir`` of its descriptors.
Socket inodes come from one ``readlink`` per descriptor and are looked up in one read of
``/proc/net/tcp`` per sample, and only when some member holds a socket, instead of psutil's
per-process ``net_connections`` which re-reads that table for every process. USS/PSS
(``memory_full_info``, which walks every mapping) is read at most every
``full_memory_interval_s``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import psutil

from loadkit.errors import CollectorError
# the one group-spec grammar (stdlib only, so the collector still runs alone on a target host)
from loadkit.profile.groupspec import GroupSpec, check_unique, parse_group_spec  # noqa: F401
from loadkit.schema import GroupSample

from . import cgroups
from .degrade import WarnOnce
from .procfs import CLOCK_TICKS, TCP_ESTABLISHED, PidStat, TcpSocket, parse_pid_stat, read_pid_stat

#: a PID classified this soon after it was created may still be between fork and exec
_YOUNG_S = 2.0
_RECHECKS = 3


class ProcInfo(NamedTuple):
    """A member process as the events tracker sees it."""

    pid: int
    name: str
    ppid: int
    create_time_unix_s: float


class _Proc:
    """A cached host process: its psutil handle, what it is, and its last CPU reading."""

    __slots__ = (
        "pid", "start_ticks", "_proc", "info", "argv0", "cmdline",
        "classified_at", "checks", "groups", "cpu_s", "cpu_at", "uss", "pss",
    )

    def __init__(self, pid: int, start_ticks: int, info: ProcInfo, argv0: str, cmdline: str) -> None:
        self.pid = pid
        self.start_ticks = start_ticks
        self._proc: psutil.Process | None = None
        self.info = info
        self.argv0 = argv0
        self.cmdline = cmdline
        self.classified_at = time.time()
        self.checks = 1
        self.groups: frozenset[str] = frozenset()
        self.cpu_s = -1.0
        self.cpu_at = 0.0
        self.uss = 0
        self.pss = 0

    @property
    def proc(self) -> psutil.Process:
        """psutil's handle, made only when needed (USS/PSS)."""
        if self._proc is None:
            self._proc = psutil.Process(self.pid)
        return self._proc


class ProcessGroups:
    """Samples every group once per call of :meth:`sample`."""

    def __init__(
        self,
        specs: Iterable[GroupSpec],
        warn: WarnOnce,
        proc_root: str = "/proc",
        cgroup_root: str = cgroups.CGROUP_ROOT,
        full_memory_interval_s: float | None = 10.0,
        exclude_pids: Iterable[int] = (),
    ) -> None:
        self.specs = list(specs)
        check_unique(self.specs)
        self.warn = warn
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self.full_memory_interval_s = full_memory_interval_s
        self._exclude = {os.getpid(), *exclude_pids}
        self._regex = {
            s.name: re.compile(s.pattern) for s in self.specs if not s.cgroup
        }
        self._procs: dict[int, _Proc] = {}
        self._cgroup_dirs: dict[str, tuple[Path, int]] = {}
        self._last_full_memory = -1e18
        self._boot_time = psutil.boot_time()
        #: group -> {pid: ProcInfo} of the last sample, for the events tracker
        self.members: dict[str, dict[int, ProcInfo]] = {s.name: {} for s in self.specs}
        #: group -> cgroup reading of the last sample (None when the group has no cgroup)
        self.cgroup_readings: dict[str, cgroups.CgroupMemory | None] = {}

    def member_processes(self) -> dict[str, list[dict]]:
        """group -> its processes of the last sample (pid, name, command line), for a reader of
        the collector's endpoints to see what a spec matched; callable from another thread."""
        procs = dict(self._procs)  # one copy: the sampling thread may change the cache meanwhile
        out = {}
        for group, members in dict(self.members).items():
            out[group] = [{"pid": pid, "name": info.name,
                           "cmdline": procs[pid].cmdline if pid in procs else ""}
                          for pid, info in sorted(dict(members).items())]
        return out

    # -- classification -----------------------------------------------------------------------

    def _load(self, pid: int) -> _Proc | None:
        """Name, parent, start time and command line of ``pid``: two small reads, no psutil."""
        base = f"{self.proc_root}/{pid}"
        try:
            with open(f"{base}/stat", "rb") as fh:
                stat_text = fh.read().decode("utf-8", "replace")
            with open(f"{base}/cmdline", "rb") as fh:
                raw_cmd = fh.read()
            name = stat_text[stat_text.index("(") + 1 : stat_text.rindex(")")]
            st = parse_pid_stat(stat_text)
        except (FileNotFoundError, ProcessLookupError):
            return None
        except PermissionError:
            self.warn.warn("access_denied_classify", f"access denied reading process {pid}; processes like it are not grouped")
            return None
        except (OSError, ValueError, IndexError):
            return None
        argv = [a.decode("utf-8", "replace") for a in raw_cmd.rstrip(b"\0").split(b"\0")] if raw_cmd else []
        argv0 = argv[0] if argv else ""
        created = self._boot_time + st.start_ticks / CLOCK_TICKS
        return _Proc(pid, st.start_ticks, ProcInfo(pid, name, st.ppid, created), argv0, " ".join(argv))

    def _classify(self, entry: _Proc) -> frozenset[str]:
        hits = []
        for spec in self.specs:
            rx = self._regex.get(spec.name)
            if rx is None:
                continue
            if spec.full_cmdline:
                if rx.search(entry.cmdline):
                    hits.append(spec.name)
            elif rx.search(entry.info.name) or (entry.argv0 and (rx.search(entry.argv0) or rx.search(os.path.basename(entry.argv0)))):
                hits.append(spec.name)
        return frozenset(hits)

    def _refresh_patterns(self) -> None:
        """List host PIDs; classify new ones and re-check young ones (fork before exec)."""
        try:
            pids = set(psutil.pids())
        except OSError as err:
            self.warn.warn("pids", f"cannot list processes ({err}); pattern groups are empty")
            return
        for pid in list(self._procs):
            if pid not in pids:
                del self._procs[pid]
        now = time.time()
        for pid in pids:
            if pid in self._exclude:
                continue
            entry = self._procs.get(pid)
            if entry is None:
                entry = self._load(pid)
                if entry is None:
                    continue
                entry.groups = self._classify(entry)
                self._procs[pid] = entry
            elif not entry.groups and self._may_still_exec(entry, now):
                fresh = self._load(pid)
                if fresh is None:
                    del self._procs[pid]
                    continue
                if fresh.info.create_time_unix_s != entry.info.create_time_unix_s:
                    entry = fresh  # PID reused
                else:
                    fresh.checks = entry.checks + 1
                    fresh.cpu_s, fresh.cpu_at = entry.cpu_s, entry.cpu_at
                    fresh.classified_at = entry.classified_at if fresh.argv0 == entry.argv0 else now
                    entry = fresh
                entry.groups = self._classify(entry)
                self._procs[pid] = entry

    @staticmethod
    def _may_still_exec(entry: "_Proc", now: float) -> bool:
        """An unmatched PID is looked at again while it may still be between fork and exec: at
        every sample while it is younger than :data:`_YOUNG_S` (fast sampling would otherwise spend
        a fixed number of looks before a late exec), and at least :data:`_RECHECKS` times when
        it was first classified young (slow sampling)."""
        born = entry.info.create_time_unix_s
        return now - born < _YOUNG_S or (entry.checks < _RECHECKS and entry.classified_at - born < _YOUNG_S)

    def _cgroup_members(self, spec: GroupSpec) -> tuple[set[int], cgroups.CgroupMemory | None]:
        found = self._cgroup_dirs.get(spec.name)
        if found is None or not found[0].exists():
            found = cgroups.resolve(spec.cgroup, self.cgroup_root)
            if found is None:
                self.warn.warn(
                    f"cgroup_missing:{spec.name}",
                    f"group {spec.name}: memory cgroup {spec.cgroup} not found under {self.cgroup_root} "
                    "(not created yet, or no memory controller); its figures are 0 until it appears",
                )
                self._cgroup_dirs.pop(spec.name, None)
                return set(), None
            self._cgroup_dirs[spec.name] = found
        directory, version = found
        try:
            reading = cgroups.read_memory(directory, version)
        except (OSError, ValueError) as err:
            self.warn.warn(f"cgroup_read:{spec.name}", f"group {spec.name}: cannot read cgroup {directory} ({err})")
            reading = None
        pids = cgroups.read_pids(directory) - self._exclude
        return pids, reading

    # -- sampling -------------------------------------------------------------------------------

    def _socket_inodes(self, pid: int) -> tuple[int, list[int]]:
        """(open descriptors, socket inodes) of ``pid`` from ``/proc/PID/fd``."""
        fd_dir = f"{self.proc_root}/{pid}/fd"
        names = os.listdir(fd_dir)
        inodes = []
        for fd in names:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue  # closed between listdir and readlink
            if target.startswith("socket:["):
                inodes.append(int(target[8:-1]))
        return len(names), inodes

    def sample(
        self,
        ts_unix_s: float,
        host: str,
        tcp_sockets: list[TcpSocket] | Callable[[set[int]], list[TcpSocket]] | None,
    ) -> list[GroupSample]:
        """One :class:`GroupSample` per group; never raises for a vanished or denied process.

        ``tcp_sockets`` is the TCP table, or a function that reads it for a set of socket inodes;
        it is called only when some member holds a socket (watched ``sleep``s cost no table read).
        """
        if self._regex:
            self._refresh_patterns()
        now_perf = time.perf_counter()
        full_due = bool(self.full_memory_interval_s) and now_perf - self._last_full_memory >= (
            self.full_memory_interval_s or 0
        )
        if full_due:
            self._last_full_memory = now_perf
        partial = []
        all_inodes: set[int] = set()
        for spec in self.specs:
            reading = None
            if spec.cgroup:
                pids, reading = self._cgroup_members(spec)
                entries = []
                for pid in pids:
                    entry = self._procs.get(pid)
                    if entry is None:
                        entry = self._load(pid)
                        if entry is None:
                            continue
                        self._procs[pid] = entry
                    entries.append(entry)
                if not self._regex:  # nothing else prunes the cache
                    for pid in [p for p in self._procs if p not in pids and spec.name in self._procs[p].groups]:
                        del self._procs[pid]
                for entry in entries:
                    entry.groups = entry.groups | {spec.name}
            else:
                entries = [e for e in self._procs.values() if spec.name in e.groups]
            self.cgroup_readings[spec.name] = reading
            row, inodes = self._sample_group(spec, entries, reading, ts_unix_s, host, now_perf, full_due)
            partial.append((spec, row, inodes))
            all_inodes |= inodes
        tcp_by_inode: dict[int, TcpSocket] = {}
        if all_inodes and tcp_sockets is not None:
            table = tcp_sockets(all_inodes) if callable(tcp_sockets) else tcp_sockets
            tcp_by_inode = {s.inode: s for s in table}
        rows = []
        for spec, row, inodes in partial:
            established = other = sessions = 0
            ports = set(spec.ports)
            for inode in inodes:
                sock = tcp_by_inode.get(inode)
                if sock is None:
                    continue  # UDP, unix or a socket closed since the table was read
                if sock.state == TCP_ESTABLISHED:
                    established += 1
                    if sock.local_port in ports:
                        sessions += 1
                else:
                    other += 1
            rows.append(row._replace(tcp_established_n=established, tcp_other_n=other, sessions_n=sessions))
        return rows

    def _read_stat(self, pid: int) -> PidStat:
        return read_pid_stat(pid, self.proc_root)

    def _sample_group(self, spec, entries, reading, ts_unix_s, host, now_perf, full_due) -> tuple[GroupSample, set[int]]:
        procs_n = rss = uss = pss = fds = 0
        cpu_pct = 0.0
        inodes: set[int] = set()
        members: dict[int, ProcInfo] = {}
        for entry in entries:
            pid = entry.info.pid
            try:
                st = self._read_stat(pid)
                if st.state == "Z":
                    continue  # exited, not yet reaped: no longer a running member
                if st.start_ticks != entry.start_ticks:
                    self._procs.pop(pid, None)  # PID reused by another process: classify it again
                    continue
            except (FileNotFoundError, ProcessLookupError, psutil.NoSuchProcess):
                self._procs.pop(pid, None)
                continue  # vanished mid-sample: it is simply not a member any more
            except (PermissionError, psutil.AccessDenied) as err:
                self.warn.warn(
                    f"access_denied:{spec.name}",
                    f"group {spec.name}: access denied reading process {pid} ({err}); its figures are 0",
                )
                members[pid] = entry.info
                procs_n += 1
                continue
            except (OSError, ValueError, IndexError) as err:
                self.warn.warn(f"stat:{spec.name}", f"group {spec.name}: unreadable /proc/{pid}/stat ({err}); skipped")
                continue
            procs_n += 1
            members[pid] = entry.info
            rss += st.rss_bytes
            if entry.cpu_s >= 0 and now_perf > entry.cpu_at:
                cpu_pct += max(0.0, st.cpu_s - entry.cpu_s) / (now_perf - entry.cpu_at) * 100.0
            entry.cpu_s, entry.cpu_at = st.cpu_s, now_perf
            try:
                n, sock = self._socket_inodes(pid)
                fds += n
                inodes.update(sock)
            except FileNotFoundError:
                pass  # exited between the two reads
            except OSError as err:
                self.warn.warn(
                    f"fds:{spec.name}",
                    f"group {spec.name}: cannot list descriptors of process {pid} ({err}); "
                    "fds and TCP counts are partial",
                )
            if full_due:
                try:
                    full = entry.proc.memory_full_info()
                    entry.uss, entry.pss = full.uss, getattr(full, "pss", 0)
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    pass
                except (psutil.AccessDenied, OSError) as err:
                    self.warn.warn(f"uss:{spec.name}", f"group {spec.name}: USS/PSS not readable ({err}); recorded as 0")
            uss += entry.uss
            pss += entry.pss
        self.members[spec.name] = members
        row = GroupSample(
            ts_unix_s=ts_unix_s,
            host=host,
            group=spec.name,
            procs_n=procs_n,
            rss_bytes=rss,
            uss_bytes=uss,
            pss_bytes=pss,
            cpu_percent=round(cpu_pct, 3),
            fds_n=fds,
            tcp_established_n=0,
            tcp_other_n=0,
            sessions_n=0,
            cgroup_memory_bytes=reading.memory_bytes if reading else 0,
            cgroup_limit_bytes=reading.limit_bytes if reading else 0,
            cgroup_failcnt_n=reading.failcnt_n if reading else 0,
            cgroup_oom_kills_n=reading.oom_kills_n if reading else 0,
        )
        return row, inodes


def unmatched_groups(
    specs: Iterable[GroupSpec],
    proc_root: str = "/proc",
    cgroup_root: str = cgroups.CGROUP_ROOT,
    exclude_pids: Iterable[int] = (),
) -> list[str]:
    """What each group that matches nothing right now is missing, one phrase per group.

    A cgroup group needs its memory cgroup to exist (an empty one is fine: its memory still
    counts); a pattern group needs one process other than this one (the collector never counts
    itself). Nothing is sampled: one listing of the host's processes, one lookup per cgroup.
    """
    groups = ProcessGroups(specs, WarnOnce("collector"), proc_root, cgroup_root,
                           full_memory_interval_s=None, exclude_pids=exclude_pids)
    if groups._regex:
        groups._refresh_patterns()
    matched = set().union(*(p.groups for p in groups._procs.values()))
    missing = []
    for spec in groups.specs:
        if spec.cgroup:
            if cgroups.resolve(spec.cgroup, cgroup_root) is None:
                missing.append(f"group {spec.name}: no memory cgroup {spec.cgroup} under {cgroup_root}")
        elif spec.name not in matched:
            where = "command line" if spec.full_cmdline else "process name or first word of a command line"
            missing.append(f"group {spec.name}: no process matches {spec.pattern!r} ({where})")
    return missing


def check_groups_match(
    specs: Iterable[GroupSpec],
    proc_root: str = "/proc",
    cgroup_root: str = cgroups.CGROUP_ROOT,
    exclude_pids: Iterable[int] = (),
    allow_option: str = "--allow-missing",
) -> None:
    """The start-up check of ``loadkit collect`` and the plugin's ``--collect-group``: a group
    that matches nothing (a typo in a cgroup path or a pattern) is a one-line
    :class:`CollectorError` instead of a run that records zeros; ``allow_option`` is named as
    the way to start anyway (a service that is started after the collector)."""
    missing = unmatched_groups(specs, proc_root, cgroup_root, exclude_pids)
    if missing:
        raise CollectorError("; ".join(missing) + f" (check the spec, or pass {allow_option} to "
                             "start anyway and record zeros until it appears)")
