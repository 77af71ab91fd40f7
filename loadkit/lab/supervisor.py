"""The lab's proxy supervisor: restart a proxy that fell over, after a delay, a bounded number of times.

Incident 1's proxies were restarted while the login surge went on, and fell over again: the
restart itself is part of what a capacity test has to show. With ``LabConfig.proxy_restart_after_s``
set (``loadkit lab up --proxy-restart-after N``), ``up`` starts this supervisor as a process of
its own (recorded in the state file, stopped first by ``down``). Every :data:`POLL_S` it looks at
each proxy; a proxy has **fallen** when

- its dovecot master is gone (it exited, or the OOM killer took it), or
- it is stalled whole at its memory limit (cgroup v1 with the OOM killer disabled: ``under_oom``)
  for ``proxy_restart_after_s``, as a watchdog would treat a hung service.

``proxy_restart_after_s`` after it fell, the supervisor kills what is left in the proxy's cgroup
(lifting the limit first, so stalled tasks can run to their exit), puts the limit back, starts
dovecot again with the same configuration in the same cgroups, and writes the new PID to the state
file, so ``lab status`` and ``lab down`` see the proxy it now runs. Each proxy is restarted at most
``proxy_restarts_max`` times; each restart is a line in ``logs/supervisor.log`` and an entry in the
state file's ``restarts`` (``lab status`` counts them per proxy). A collector watching the proxy
sees the master exit and a new one start (``process_exited``, ``process_restarted``), and its
held sessions fall and climb again: the sawtooth.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from loadkit.record.writer import write_json_atomic

from . import cgroups, mail, procs
from .config import LabConfig

log = logging.getLogger(__name__)

#: seconds between looks at the proxies
POLL_S = 0.25
#: seconds the leftovers of a fallen proxy get to leave its cgroup before it is started again
DRAIN_TIMEOUT_S = 5.0


def command(lab_dir: Path) -> list[str]:
    """How ``Lab.up`` starts the supervisor of the lab in ``lab_dir`` (a process of its own)."""
    return [sys.executable, "-c", "import sys; from loadkit.lab.supervisor import main; main(sys.argv[1])",
            str(lab_dir)]


def main(lab_dir: str) -> None:
    """Supervise the lab in ``lab_dir`` until SIGTERM (``lab down``) or until the lab is gone."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s supervisor: %(message)s")
    stopping: list[int] = []
    # SIGTERM ends the loop between steps: a restart under way is finished and written down first
    signal.signal(signal.SIGTERM, lambda sig, _frame: stopping.append(sig))
    signal.signal(signal.SIGINT, lambda sig, _frame: stopping.append(sig))
    Supervisor(Path(lab_dir)).loop(lambda: bool(stopping))


class Supervisor:
    """Watches the proxies recorded in one lab's state file and restarts the fallen ones."""

    def __init__(self, lab_dir: Path) -> None:
        from .lab import STATE_FILE  # the Lab's own file name (lab.py imports this module)

        self.dir = lab_dir
        self.state_path = lab_dir / STATE_FILE
        state = self._read()
        if state is None:
            raise SystemExit(f"no lab state in {lab_dir}")
        self.config = LabConfig.from_dict({**state["config"], "dir": lab_dir})
        #: proxy name -> perf_counter() when it was first seen fallen (absent: up)
        self.fallen_since: dict[str, float] = {}

    def loop(self, stop: Any) -> None:
        cfg = self.config
        log.info("watching %d proxies: restart after %.1f s, at most %d times each",
                 cfg.proxies, cfg.proxy_restart_after_s, cfg.proxy_restarts_max)
        while not stop():
            state = self._read()
            if state is None:
                return  # the lab is down
            for comp in [c for c in state["components"] if c["name"].startswith("proxy")]:
                if stop():
                    break
                self._check(state, comp)
            time.sleep(POLL_S)

    def _check(self, state: dict[str, Any], comp: dict[str, Any]) -> None:
        name, cfg = comp["name"], self.config
        reason = self._fallen(state, comp)
        if reason is None:
            self.fallen_since.pop(name, None)
            return
        since = self.fallen_since.setdefault(name, time.perf_counter())
        if time.perf_counter() - since < cfg.proxy_restart_after_s:
            return
        done = state.setdefault("restarts", {}).setdefault(name, [])
        if len(done) >= cfg.proxy_restarts_max:
            if since != float("inf"):
                log.warning("%s %s; restart limit (%d) reached, left down", name, reason, cfg.proxy_restarts_max)
                self.fallen_since[name] = float("inf")  # said once
            return
        self._restart(state, comp, reason, len(done) + 1)
        self.fallen_since.pop(name, None)

    def _fallen(self, state: dict[str, Any], comp: dict[str, Any]) -> str | None:
        if not procs.alive(comp["pid"], comp["create_time_s"]):
            return "exited"
        version = (state.get("cgroups") or {}).get("version")
        if comp.get("cgroup") and cgroups.under_oom(version, Path(comp["cgroup"])):
            return "stalled at its memory limit"
        return None

    def _restart(self, state: dict[str, Any], comp: dict[str, Any], reason: str, nth: int) -> None:
        name, cfg = comp["name"], self.config
        memory = Path(comp["cgroup"]) if comp.get("cgroup") else None
        cpu = Path(comp["cpu_cgroup"]) if comp.get("cpu_cgroup") else None
        self._clear(comp, memory)
        if memory is not None:
            # the limit as up set it (release() lifted it so stalled tasks could exit)
            version, hier = state["cgroups"]["version"], Path(state["cgroups"]["hier"])
            cgroups.create(version, hier, cfg.lab_id, name, cfg.proxy_memory_bytes, cfg.oom_kill)
        groups = [g for g in (memory, cpu) if g is not None]

        def preexec() -> None:
            for group in groups:
                cgroups.join(group)

        n = int(name[len("proxy"):])
        # dovecot refuses to start while master.pid names a live PID, and a killed master whose
        # parent has not reaped it yet still has one (a zombie): the file is stale, the master gone
        (mail.proxy_base_dir(Path(state["runtime_dir"]), n) / "master.pid").unlink(missing_ok=True)
        conf = self.dir / "conf" / f"dovecot-{name}.conf"
        started = procs.start(mail.dovecot_argv(conf), self.dir / "logs" / f"dovecot-{name}.out",
                              preexec=preexec if groups else None)
        previous = comp["pid"]
        comp.update(pid=started.pid, create_time_s=started.create_time_s)
        state["restarts"][name].append({"ts_unix_s": time.time(), "reason": reason, "pid": started.pid,
                                        "previous_pid": previous})
        self._write(state)  # at once: lab down must find the new master even mid-restart
        log.info("%s %s; restarted (%d of at most %d): pid %d, was %d", name, reason, nth,
                 cfg.proxy_restarts_max, started.pid, previous)
        ports = cfg.proxy_ports(n)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S * 2
        while time.monotonic() < deadline and procs.alive(*started):
            if all(procs.tcp_open(cfg.address, p) for p in ports):
                return
            time.sleep(0.05)
        if procs.alive(*started):
            log.warning("%s restarted as pid %d but does not accept connections yet", name, started.pid)
        else:
            log.warning("%s: the restarted pid %d exited at once; see %s", name, started.pid,
                        self.dir / "logs" / f"dovecot-{name}.log")

    def _clear(self, comp: dict[str, Any], memory: Path | None) -> None:
        """Stop what is left of a fallen proxy: its master and every process in its cgroup."""
        if memory is not None:
            cgroups.release(memory)  # stalled tasks can only die once they may allocate again
        procs.stop(comp["pid"], comp["create_time_s"], timeout_s=1.0)
        if memory is None:
            return
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            left = cgroups.procs(memory)
            if not left:
                return
            for pid in left:  # in the lab's own cgroup: ours
                procs.kill_pid(pid)
            time.sleep(0.05)
        log.warning("%s: processes still in %s after %.0f s", comp["name"], memory, DRAIN_TIMEOUT_S)

    # -- the state file (shared with Lab; written whole and renamed, as Lab does) ------------------
    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    def _write(self, state: dict[str, Any]) -> None:
        if not self.state_path.exists():
            return  # the lab went down meanwhile: nothing to bring back
        write_json_atomic(self.state_path, state)


def restarts(state: dict[str, Any]) -> dict[str, int]:
    """Restarts per proxy so far, from a lab's state file."""
    return {name: len(done) for name, done in (state.get("restarts") or {}).items()}


def stop(record: dict[str, Any]) -> None:
    """Stop the supervisor ``Lab.up`` started (by its recorded PID) and wait for it."""
    procs.stop(record["pid"], record["create_time_s"], timeout_s=15.0)

