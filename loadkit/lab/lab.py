"""``Lab``: bring the local replica of the incident systems up, inspect it, bring it down.

Everything the lab starts is recorded in ``state.json`` in the lab directory (PID and start
time per process, cgroup directories, the runtime directory), written after each step, so
``down()`` stops exactly what ``up()`` started even after a partial start or from another
process (``Lab.from_dir``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from loadkit.defaults import ACCOUNTS_FILE_NAME, LAB_ZONE, NAMES_FILE_NAME, in_lab_dir, register_lab
from loadkit.errors import LabError
from loadkit.record.writer import write_json_atomic

from . import calibrate, cgroups, dns, firewall, mail, procs, supervisor
from .config import LabConfig
from .status import (CgroupSupport, ComponentStatus, DnsCpu, Endpoint, FirewallStatus, LabStatus,
                     ProxyStatus)

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
#: seconds each server gets to become ready
READY_TIMEOUT_S = 20.0


class Lab:
    """One lab, described by a :class:`LabConfig`, living in ``config.dir``."""

    def __init__(self, config: LabConfig | None = None) -> None:
        self.config = config or LabConfig()
        self.dir = Path(self.config.dir).absolute()
        self.config.dir = self.dir

    @classmethod
    def from_dir(cls, directory: Path | str) -> "Lab":
        """The lab recorded in ``directory`` (as started), or a default one to be started there."""
        directory = Path(directory).absolute()
        state = _read_state(directory / STATE_FILE)
        if state is None:
            return cls(LabConfig(dir=directory))
        cfg = LabConfig.from_dict({**state["config"], "dir": directory})
        return cls(cfg)

    # -- paths -----------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    names_file = in_lab_dir(NAMES_FILE_NAME)
    accounts_file = in_lab_dir(ACCOUNTS_FILE_NAME)

    @property
    def runtime_dir(self) -> Path:
        """Short directory for unix sockets (108-byte path limit) and mail storage."""
        digest = hashlib.sha1(str(self.dir).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"lk-{digest}"

    # -- up ----------------------------------------------------------------------------------------

    def up(self) -> LabStatus:
        """Start every component; if the lab is already running, report it unchanged."""
        state = _read_state(self.state_path)
        if state is not None:
            current = self.status()
            if current.running:
                diff = self._config_diff(state)
                if diff:
                    raise LabError(
                        f"lab in {self.dir} is running with other settings ({diff}); "
                        f"run 'loadkit lab down --dir {self.dir}' first"
                    )
                log.info("lab in %s is already running", self.dir)
                return current
            log.info("lab in %s is partly running: restarting it", self.dir)
            self.down()
        cfg = self.config
        # what the firewall needs is checked before anything starts (one line, nothing to undo)
        nft = firewall.check_prerequisites() if cfg.firewall_sessions else None
        procs.check_ports_free(cfg.address, cfg.all_ports(), cfg.dns_ports())
        for sub in ("conf", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        run = self.runtime_dir
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(mode=0o755, parents=True)
        version, hier, reason = cgroups.detect()
        cpu = cgroups.detect_cpu() if (cfg.dns_cpu or cfg.proxy_cpu) else (None, None, "")
        if (cfg.dns_cpu or cfg.proxy_cpu) and cpu[0] is None:
            raise LabError(f"--dns-cpu/--proxy-cpu need a cpu cgroup controller and root ({cpu[2]})")
        state = {
            "config": cfg.to_dict(),
            "runtime_dir": str(run),
            "started_unix_s": time.time(),
            "cgroups": {"version": version, "hier": str(hier) if hier else None, "reason": reason},
            "cpu_cgroups": {"version": cpu[0], "hier": str(cpu[1]) if cpu[1] else None},
            "components": [],
        }
        self._write_state(state)
        register_lab(self.dir, cfg.lab_id)  # so load code run from anywhere finds this lab
        try:
            if nft is not None:
                # recorded before it exists, so a failed up still removes it at down
                state["firewall"] = {"family": firewall.family(cfg), "table": firewall.table_name(cfg)}
                self._write_state(state)
                firewall.create(cfg, nft)
            self._start_dns(state)
            self._start_mail(state)
            if cfg.proxy_restart_after_s:
                started = procs.start(supervisor.command(self.dir), self.dir / "logs" / "supervisor.log")
                state["supervisor"] = {"pid": started.pid, "create_time_s": started.create_time_s}
                self._write_state(state)
        except BaseException:
            self.down()
            raise
        return self.status()

    def _config_diff(self, state: dict[str, Any]) -> str:
        """``"proxies 3 -> 5, ..."`` between the running lab's settings and ours ('' if none)."""
        mine = self.config.to_dict()
        theirs = {**state["config"], "dir": mine["dir"]}
        return ", ".join(f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in mine.items()
                         if theirs.get(k) != v)

    def _write_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state_path, state)

    def _record(self, state: dict[str, Any], name: str, started: procs.Started, ports: list[int],
                cgroup: Path | None = None, cpu_cgroup: Path | None = None) -> None:
        state["components"].append(
            {
                "name": name,
                "pid": started.pid,
                "create_time_s": started.create_time_s,
                "ports": ports,
                "cgroup": str(cgroup) if cgroup else None,
                "cpu_cgroup": str(cpu_cgroup) if cpu_cgroup else None,
            }
        )
        self._write_state(state)

    def _start_dns(self, state: dict[str, Any]) -> None:
        cfg = self.config
        conf = self.dir / "conf"
        include = dns.write_zone(cfg, conf, self.names_file)
        dns.write_tls_cert(cfg, conf)
        unbound_conf = dns.write_unbound_conf(cfg, conf, self.runtime_dir, include)
        log_path = self.dir / "logs" / "unbound.log"
        cpu_cgroup = self._cpu_cgroup(state, "unbound", cfg.dns_cpu)
        started = procs.start(["unbound", "-d", "-c", str(unbound_conf)], log_path,
                              preexec=(lambda: cgroups.join(cpu_cgroup)) if cpu_cgroup else None)
        self._record(state, "unbound", started, [*cfg.dns_ports(), cfg.dot_port, cfg.doh_port], cpu_cgroup=cpu_cgroup)
        procs.wait_until(
            lambda: dns.probe_query(cfg.address, cfg.dns_port),
            "unbound",
            READY_TIMEOUT_S,
            still_running=lambda: procs.alive(*started),
            log_path=log_path,
        )
        if cpu_cgroup is not None:
            names = [n for n in self.names_file.read_text().split() if n.startswith("h")]
            state["dns_capacity"] = calibrate.capacity(cfg.address, cfg.dns_port, names)
            self._write_state(state)

    def _cpu_cgroup(self, state: dict[str, Any], name: str, cores: float) -> Path | None:
        """A CPU cgroup with ``cores`` of quota for component ``name``, or None without a quota."""
        cpu = state.get("cpu_cgroups") or {}
        if not cores or cpu.get("version") is None:
            return None
        try:
            return cgroups.create_cpu(cpu["version"], Path(cpu["hier"]), self.config.lab_id, name, cores)
        except OSError as err:
            raise LabError(f"cannot set a CPU quota for {name} ({err.strerror or err})") from err

    def _start_mail(self, state: dict[str, Any]) -> None:
        cfg = self.config
        conf, logs, run = self.dir / "conf", self.dir / "logs", self.runtime_dir
        users = mail.write_accounts(cfg, run, self.accounts_file)
        mail_root = mail.write_maildirs(cfg, run)

        log_path = logs / "dovecot-backend.log"
        backend_conf = mail.write_backend_conf(cfg, conf, run, users, mail_root, log_path)
        self._start_dovecot(state, "dovecot-backend", backend_conf, list(cfg.backend_ports()),
                            log_path, cgroup=None)

        cg = state["cgroups"]
        for n in range(1, cfg.proxies + 1):
            log_path = logs / f"dovecot-proxy{n}.log"
            proxy_conf = mail.write_proxy_conf(cfg, n, conf, run, log_path)
            cgroup = None
            if cg["version"] is not None:
                try:
                    cgroup = cgroups.create(cg["version"], Path(cg["hier"]), cfg.lab_id,
                                            f"proxy{n}", cfg.proxy_memory_bytes, cfg.oom_kill)
                except OSError as err:
                    # e.g. a container that mounts the controller read-only: run without limits
                    log.warning("cannot create a memory cgroup (%s): proxies run without limits",
                                err)
                    cg.update(version=None, hier=None,
                              reason=f"cannot create memory cgroups ({err.strerror}): "
                              "proxies run without limits")
                    self._write_state(state)
            self._start_dovecot(state, f"proxy{n}", proxy_conf, list(cfg.proxy_ports(n)),
                                log_path, cgroup=cgroup,
                                cpu_cgroup=self._cpu_cgroup(state, f"proxy{n}", cfg.proxy_cpu))

        log_path = logs / "haproxy.log"
        haproxy_conf = mail.write_haproxy_conf(cfg, conf, self.stats_socket)
        started = procs.start(["haproxy", "-db", "-f", str(haproxy_conf)], log_path)
        self._record(state, "haproxy", started, [cfg.imap_port, cfg.pop3_port])

        def ready() -> bool:
            if not (procs.tcp_open(cfg.address, cfg.imap_port)
                    and procs.tcp_open(cfg.address, cfg.pop3_port)):
                return False
            stats = mail.haproxy_stats(self.stats_socket)
            return len(stats) == 2 * cfg.proxies and all(s.state == "UP" for s in stats)

        procs.wait_until(ready, "haproxy (with every proxy UP)", READY_TIMEOUT_S,
                         still_running=lambda: procs.alive(*started), log_path=log_path)

    def _start_dovecot(self, state: dict[str, Any], name: str, conf: Path, ports: list[int],
                       log_path: Path, cgroup: Path | None, cpu_cgroup: Path | None = None) -> None:
        cfg = self.config
        groups = [g for g in (cgroup, cpu_cgroup) if g is not None]

        def preexec() -> None:
            for group in groups:
                cgroups.join(group)

        started = procs.start(mail.dovecot_argv(conf), log_path.with_suffix(".out"),
                              preexec=preexec if groups else None)
        self._record(state, name, started, ports, cgroup, cpu_cgroup)
        procs.wait_until(
            lambda: all(procs.tcp_open(cfg.address, p) for p in ports),
            f"dovecot {name}",
            READY_TIMEOUT_S,
            still_running=lambda: procs.alive(*started),
            log_path=log_path,
        )

    @property
    def stats_socket(self) -> Path:
        return self.runtime_dir / "haproxy.sock"

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> LabStatus:
        """What is running now (a lab that is not up reports ``running=False``)."""
        cfg = self.config
        state = _read_state(self.state_path) or {"components": [], "cgroups": {}}
        cg = state.get("cgroups") or {}
        version = cg.get("version")
        support = (
            cgroups.support(version, cg.get("reason", ""), cfg.oom_kill, cfg.proxy_memory_bytes)
            if cg
            else CgroupSupport(False, None, "lab not started", cfg.oom_kill)
        )
        cpu_version = (state.get("cpu_cgroups") or {}).get("version")
        components = []
        for c in state["components"]:
            up = procs.alive(c["pid"], c["create_time_s"])
            mem = cgroups.read_memory(version, Path(c["cgroup"]) if c.get("cgroup") else None)
            components.append(
                ComponentStatus(c["name"], up, c["pid"], list(c["ports"]), *mem)
            )
        stats: dict[str, list[mail.ServerStat]] = {}
        if any(c.name == "haproxy" and c.up for c in components):
            for row in mail.haproxy_stats(self.stats_socket):
                stats.setdefault(row.server, []).append(row)
        proxies = []
        for c in components:
            if not c.name.startswith("proxy"):
                continue
            n = int(c.name[len("proxy"):])
            imap_port, pop3_port = cfg.proxy_ports(n)
            rows = stats.get(c.name)
            rec = next((s for s in state["components"] if s["name"] == c.name), {})
            cgroup = rec.get("cgroup")
            proxies.append(ProxyStatus(
                name=c.name,
                up=c.up,
                imap=Endpoint(cfg.address, imap_port),
                pop3=Endpoint(cfg.address, pop3_port),
                cgroup=cgroup,
                memory_bytes=c.memory_bytes,
                limit_bytes=c.limit_bytes,
                failcnt=c.failcnt,
                oom_kills=c.oom_kills,
                under_oom=cgroups.under_oom(version, Path(cgroup) if cgroup else None),
                sessions=sum(r.sessions for r in rows) if rows else None,
                haproxy_state="/".join(sorted({r.state for r in rows})) if rows else None,
                cpu_cores=cgroups.cpu_quota_cores(cpu_version, Path(rec["cpu_cgroup"]))
                if rec.get("cpu_cgroup") else None,
                restarts=supervisor.restarts(state).get(c.name, 0),
            ))
        expected = self._expected_components()
        fw = self._firewall_status(state)
        running = bool(components) and all(c.up for c in components) and (
            {c.name for c in components} >= set(expected)
        ) and (fw is None or fw.present)
        return LabStatus(
            dir=str(self.dir),
            running=running,
            components=components,
            dns=Endpoint(cfg.address, cfg.dns_port),
            dot=Endpoint(cfg.address, cfg.dot_port),
            doh=Endpoint(cfg.address, cfg.doh_port),
            imap=Endpoint(cfg.address, cfg.imap_port),
            pop3=Endpoint(cfg.address, cfg.pop3_port),
            names_file=str(self.names_file),
            accounts_file=str(self.accounts_file),
            proxies=proxies,
            cgroups=support,
            zone=LAB_ZONE,
            accounts=cfg.accounts,
            firewall=fw,
            dns_cpu=self._dns_cpu_status(state),
        )

    def _dns_cpu_status(self, state: dict[str, Any]) -> DnsCpu | None:
        if not self.config.dns_cpu:
            return None
        unbound = next((c for c in state["components"] if c["name"] == "unbound"), {})
        cal = state.get("dns_capacity")
        return DnsCpu(self.config.dns_cpu, unbound.get("cpu_cgroup"),
                      cal.get("capacity_qps") if cal else None, cal)

    def _firewall_status(self, state: dict[str, Any]) -> FirewallStatus | None:
        cfg = self.config
        if not cfg.firewall_sessions:
            return None
        rec = state.get("firewall")
        reading = firewall.read(rec["family"], rec["table"]) if rec else None
        return FirewallStatus(
            dns=Endpoint(cfg.address, cfg.firewall_dns_port),
            table=f"{firewall.family(cfg)} {firewall.table_name(cfg)}",
            size_n=cfg.firewall_sessions,
            udp_timeout_s=cfg.firewall_udp_timeout_s,
            present=reading is not None,
            entries_n=reading.entries_n if reading else None,
            drops_n=reading.drops_n if reading else None,
        )

    def _expected_components(self) -> list[str]:
        proxies = [f"proxy{n}" for n in range(1, self.config.proxies + 1)]
        return ["unbound", "dovecot-backend", *proxies, "haproxy"]

    # -- down ------------------------------------------------------------------------------------

    def down(self) -> None:
        """Stop what ``up`` started (by recorded PID), remove its cgroups and runtime dir.

        Safe to call when nothing is running.
        """
        state = _read_state(self.state_path)
        if state is None:
            return
        if state.get("supervisor"):
            # first, so no proxy is restarted while the lab goes down; then the state it left
            supervisor.stop(state["supervisor"])
            state = _read_state(self.state_path) or state
        errors = []
        # reverse start order: the entrance (haproxy) first, DNS last
        comps = state.get("components", [])
        for c in comps:
            if c.get("cgroup"):
                # a proxy stalled at its limit (OOM killer off) cannot even exit: lift the limit
                cgroups.release(Path(c["cgroup"]))
        # the entrance first, so no health check or client starts a login process on a proxy
        # whose master is shutting down (it would wait seconds for services already gone)
        entrance = [procs.Started(c["pid"], c["create_time_s"]) for c in comps
                    if c["name"] == "haproxy"]
        rest = [procs.Started(c["pid"], c["create_time_s"]) for c in reversed(comps)
                if c["name"] != "haproxy"]
        try:
            procs.stop_all(entrance)
            if entrance:
                time.sleep(0.2)  # let login processes spawned for the last checks finish
            procs.stop_all(rest)
        except OSError as err:
            errors.append(f"stopping the lab's processes: {err}")
        for c in state.get("components", []):
            if procs.alive(c["pid"], c["create_time_s"]):
                errors.append(f"{c['name']} (pid {c['pid']}) is still running")
        for c in state.get("components", []):
            for key in ("cgroup", "cpu_cgroup"):
                if not c.get(key) or not Path(c[key]).exists():
                    continue  # none, or (cgroup v2) the memory group already removed
                # anything still in the lab's own cgroup is ours (a child that left the group)
                for pid in cgroups.procs(Path(c[key])):
                    procs.kill_pid(pid)
                try:
                    cgroups.remove(Path(c[key]))
                except OSError as err:
                    errors.append(f"cgroup {c[key]}: {err}")
        fw = state.get("firewall")
        if fw:
            try:
                firewall.remove(fw["family"], fw["table"])
            except LabError as err:
                errors.append(str(err))
        run = state.get("runtime_dir")
        if run and Path(run).name.startswith("lk-"):
            shutil.rmtree(run, ignore_errors=True)
        if errors:
            raise LabError("lab down left something behind: " + "; ".join(errors))
        self.state_path.unlink(missing_ok=True)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise LabError(f"lab state file {path} is unreadable ({err}); remove it and retry") from err
