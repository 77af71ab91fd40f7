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
file, so ``lab status`` and ``lab down`` see the proxy it now runs. Proxies due in the same look
are cleared together and started one after another, and no look waits for a restarted one to
accept connections (later looks check), so in a mass fall-over the last is not restarted seconds
after the first. Each proxy is restarted at most
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
#: seconds a restarted proxy gets to accept connections before a warning says it does not
ACCEPT_TIMEOUT_S = 10.0


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
        #: restarted proxy name -> (process, its ports, monotonic deadline to accept connections)
        self.restarted: dict[str, tuple[Any, tuple[int, int], float]] = {}

    def loop(self, stop: Any) -> None:
        cfg = self.config
        log.info("watching %d proxies: restart after %.1f s, at most %d times each",
                 cfg.proxies, cfg.proxy_restart_after_s, cfg.proxy_restarts_max)
        while not stop():
            state = self._read()
            if state is None:
                return  # the lab is down
            due = []
            for comp in [c for c in state["components"] if c["name"].startswith("proxy")]:
                reason = self._due(state, comp)
                if reason is not None:
                    due.append((comp, reason))
            if due and not stop():
                # proxies found down in the same look are cleared as one and started one after the
                # other; nobody waits for a restarted one to accept connections (later looks check
                # that), so the last of a mass fall-over is not restarted seconds after the first
                self._clear_all([comp for comp, _reason in due])
                if stop():
                    return  # lab down is under way: start nothing new
                for comp, reason in due:
                    self._restart(state, comp, reason)
            self._check_restarted()
            time.sleep(POLL_S)

    def _due(self, state: dict[str, Any], comp: dict[str, Any]) -> str | None:
        """Why ``comp`` is to be restarted now (it has been down for the set time and has restarts
        left), else None."""
        name, cfg = comp["name"], self.config
        reason = self._fallen(state, comp)
        if reason is None:
            self.fallen_since.pop(name, None)
            return None
        since = self.fallen_since.setdefault(name, time.perf_counter())
        if time.perf_counter() - since < cfg.proxy_restart_after_s:
            return None
        done = state.setdefault("restarts", {}).setdefault(name, [])
        if len(done) >= cfg.proxy_restarts_max:
            if since != float("inf"):
                log.warning("%s %s; restart limit (%d) reached, left down", name, reason, cfg.proxy_restarts_max)
                self.fallen_since[name] = float("inf")  # said once
            return None
        self.fallen_since.pop(name, None)
        return reason

    def _fallen(self, state: dict[str, Any], comp: dict[str, Any]) -> str | None:
        if not procs.alive(comp["pid"], comp["create_time_s"]):
            return "exited"
        version = (state.get("cgroups") or {}).get("version")
        if comp.get("cgroup") and cgroups.under_oom(version, Path(comp["cgroup"])):
            return "stalled at its memory limit"
        return None

    def _restart(self, state: dict[str, Any], comp: dict[str, Any], reason: str) -> None:
        """Start a cleared proxy again; later looks check that it accepts connections."""
        name, cfg = comp["name"], self.config
        memory = Path(comp["cgroup"]) if comp.get("cgroup") else None
        cpu = Path(comp["cpu_cgroup"]) if comp.get("cpu_cgroup") else None
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
        done = state["restarts"][name]
        done.append({"ts_unix_s": time.time(), "reason": reason, "pid": started.pid, "previous_pid": previous})
        self._write(state)  # at once: lab down must find the new master even mid-restart
        log.info("%s %s; restarted (%d of at most %d): pid %d, was %d", name, reason, len(done),
                 cfg.proxy_restarts_max, started.pid, previous)
        self.restarted[name] = (started, cfg.proxy_ports(n), time.monotonic() + ACCEPT_TIMEOUT_S)

    def _check_restarted(self) -> None:
        """Forget each restarted proxy once it accepts connections on its ports; one warning for one
        that does not within :data:`ACCEPT_TIMEOUT_S`, or that exited at once."""
        for name, (started, ports, deadline) in list(self.restarted.items()):
            if not procs.alive(*started):
                log.warning("%s: the restarted pid %d exited at once; see %s", name, started.pid,
                            self.dir / "logs" / f"dovecot-{name}.log")
            elif all(procs.tcp_open(self.config.address, p) for p in ports):
                log.info("%s accepts connections again (pid %d)", name, started.pid)
            elif time.monotonic() > deadline:
                log.warning("%s restarted as pid %d but does not accept connections after %.0f s", name,
                            started.pid, ACCEPT_TIMEOUT_S)
            else:
                continue
            del self.restarted[name]

    def _clear_all(self, comps: list[dict[str, Any]]) -> None:
        """Stop what is left of fallen proxies: their masters and every process in their cgroups."""
        memories = [Path(c["cgroup"]) for c in comps if c.get("cgroup")]
        for memory in memories:
            cgroups.release(memory)  # stalled tasks can only die once they may allocate again
        procs.stop_all([procs.Started(c["pid"], c["create_time_s"]) for c in comps], timeout_s=1.0)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while memories and time.monotonic() < deadline:
            left = {memory: cgroups.procs(memory) for memory in memories}
            memories = [memory for memory, pids in left.items() if pids]
            for pid in (pid for pids in left.values() for pid in pids):  # in the lab's own cgroups: ours
                procs.kill_pid(pid)
            if memories:
                time.sleep(0.05)
        for memory in memories:
            log.warning("processes still in %s after %.0f s", memory, DRAIN_TIMEOUT_S)

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

