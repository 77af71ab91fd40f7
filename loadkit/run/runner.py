"""The runner behind ``loadkit run``: one profile in, one run record and a verdict out.

Order of work, so that nothing is sent before it is allowed:

1. the profile is validated and the overrides applied, caps checked (:mod:`loadkit.profile.profile`);
2. :func:`plan_run` checks the run's own options (workers, master bind) and resolves every
   target and collector URL against the allowlist once
   (:func:`loadkit.profile.profile.resolve_targets`): a refusal raises before any process starts,
   and the :class:`RunPlan` it returns is what everything after uses (nothing is resolved again);
3. the run directory and its manifest (status ``running``) are written;
4. Locust runs headless as child processes (one local process, or a master and N workers) with
   the loadkit plugin options; the plugin writes the record as the run goes and stops the run on
   an abort threshold. A ``[load] shape`` reaches Locust as the first locustfile
   (:mod:`loadkit.generate.profile_shape`) and the JSON in ``LOADKIT_PROFILE_SHAPE``; a master
   listens on ``master_bind`` (loopback unless asked, checked by :func:`check_master_bind`).
   Each target named after a protocol reaches the users of that protocol as ``--target
   PROTOCOL=ADDRESS:PORT``. Children get ``LOADKIT_ALLOWLIST`` so every generator checks again,
   and die with the runner (``PR_SET_PDEATHSIG``) so a killed runner leaves no load behind;
5. the gates are evaluated on the finished record and written to the manifest and events.

SIGTERM/SIGINT to the runner is passed on to Locust as SIGTERM (graceful stop: the record is
completed with status ``interrupted``). Exit status: 0 passed, 1 a gate failed or the run was
aborted, 2 an error (bad profile, refused target, Locust failed, interrupted).
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from loadkit.errors import LoadkitError, ProfileError, TargetNotAllowed
from loadkit.generate.wiring import USER_ERROR_PREFIX  # imports nothing from Locust
from loadkit.profile.capacity import describe as describe_capacity_load, resolve_capacity
from loadkit.profile.profile import Profile, expand_target_refs, resolve_targets
from loadkit.profile.targets import PROTOCOL_NAMES, Target, check_target, parse_allowlist
from loadkit.run import gates as gates_mod
from loadkit.record.counters import offered_parts
from loadkit.record.writer import INTERRUPT_MARKER, STATUS_FILE, RunWriter, new_run_id
from loadkit.schema import RUN_LAYOUT

#: seconds Locust may take to start (and a master to see its workers) before the deadline counts
STARTUP_GRACE_S = 60.0

_SCHEMES = {"dns": "udp", "imap": "imap", "pop3": "pop3", "pop": "pop3", "http": "http"}

EXIT_PASSED, EXIT_GATE_FAILED, EXIT_ERROR = 0, 1, 2

#: the locustfile that turns ``[load] shape`` into Locust's shape class (first ``-f`` file)
#: (not imported here: importing Locust would monkey-patch the runner with gevent)
PROFILE_SHAPE_FILE = Path(__file__).resolve().parents[1] / "generate" / "profile_shape.py"
#: the environment variable it reads the shape from (``profile_shape.ENV_VAR``)
PROFILE_SHAPE_ENV = "LOADKIT_PROFILE_SHAPE"


class RunError(LoadkitError):
    """Locust could not be started or ended without a usable record."""


@dataclass
class RunResult:
    run_dir: Path
    status: str
    gates: list[dict] = field(default_factory=list)
    exit_code: int = EXIT_PASSED


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die when the runner dies
    except OSError:
        pass


def _free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


#: master bind addresses that mean "every interface": allowed without the allowlist check
WILDCARD_BINDS = ("0.0.0.0", "::")
#: where a distributed run's master listens unless told otherwise (this host only)
DEFAULT_MASTER_BIND = "127.0.0.1"


def check_master_bind(address: str, allowlist: Any = None) -> str:
    """The address a distributed run's master listens on, checked like a target.

    ``0.0.0.0``/``::`` (every interface) are taken as they are, and so is a loopback address
    (only this host can reach it: it sends nothing anywhere, so the allowlist, which is about
    where load goes, does not have to name it); any other address must be an IP address
    inside the allowlist (the profile's, else ``LOADKIT_ALLOWLIST``, else loopback).
    """
    address = address.strip().strip("[]")
    if address in WILDCARD_BINDS:
        return address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ProfileError(
            f"--master-bind {address!r} is not an IP address (e.g. 127.0.0.1, 192.0.2.10 or 0.0.0.0)"
        ) from None
    if ip.is_loopback:
        return str(ip)
    try:
        check_target(f"[{ip}]:1" if ip.version == 6 else f"{ip}:1", 1, allowlist)
    except TargetNotAllowed:
        nets = ", ".join(str(n) for n in parse_allowlist(allowlist))
        raise TargetNotAllowed(
            f"--master-bind {address} is outside the allowlist ({nets}); add the load network to "
            "the profile's allowlist or LOADKIT_ALLOWLIST, or bind 0.0.0.0 (every interface) "
            "or 127.0.0.1 (this host's workers only)"
        ) from None
    return str(ip)


@dataclass(frozen=True)
class RunPlan:
    """A profile with the run's own options checked and every target resolved, once.

    Made by :func:`plan_run`; the runner, the lab lookup and the manifest all use these
    resolved targets, so an address cannot change (or be refused) between the check and the load.
    """

    profile: Profile
    targets: dict[str, Target]  #: ``[targets]`` name -> resolved, allowed endpoint
    workers: int = 0
    master_bind: str = DEFAULT_MASTER_BIND
    master_port: int = 0


def plan_run(profile: Profile, workers: int = 0, master_bind: str | None = None,
             master_port: int = 0) -> RunPlan:
    """Check ``--workers``/``--master-bind``/``--master-port`` and resolve every target, once.

    Without workers there is no master to bind, so no bind is checked (and a bind or port given
    anyway is refused as meaningless); raises before anything is started or sent.
    """
    if workers < 0:
        raise ProfileError(f"--workers must be 0 or more, got {workers}")
    if not workers and ((master_bind or DEFAULT_MASTER_BIND) != DEFAULT_MASTER_BIND or master_port):
        raise ProfileError("--master-bind and --master-port need --workers N (a distributed run)")
    if not 0 <= master_port <= 65535:
        raise ProfileError(f"--master-port {master_port} is out of range 1-65535")
    bind = DEFAULT_MASTER_BIND
    if workers:
        bind = check_master_bind(master_bind or DEFAULT_MASTER_BIND, profile.allowlist)
    return RunPlan(profile, resolve_targets(profile), workers, bind, master_port)


def option_args(options: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """``{"rate-qps": 2000, "tcp": True, "source": ["a", "b"]}`` -> Locust arguments."""
    args: list[str] = []
    for key, value in options.items():
        flag = f"--{key}"
        value = expand_target_refs(value, resolved)
        for v in value if isinstance(value, list) else [value]:
            if v is True:
                args.append(flag)
            elif v is False:
                continue
            else:
                args += [flag, str(v)]
    return args


def locust_args(profile: Profile, resolved: dict[str, Any], run_root: Path, run_id: str,
                run_dir: Path) -> list[str]:
    """Arguments shared by a local Locust process and a master (not the workers' role flags)."""
    load = profile.load
    files = [str(f) for f in load.locustfiles]
    if load.shape:  # first, so its shape class is the one Locust uses (see profile_shape.py)
        files.insert(0, str(PROFILE_SHAPE_FILE))
    args = ["-f", ",".join(files), "--headless"]
    if not load.shape:  # a shape sets users and spawn rate itself; Locust would warn and ignore them
        args += ["-u", str(load.users), "-r", f"{load.spawn_rate:g}"]
    args += ["-t", f"{max(1, round(profile.duration_s))}s",
            "--stop-timeout", f"{profile.stop_timeout_s:g}",
            "--csv", str(run_dir / RUN_LAYOUT["locust"] / gates_mod.LOCUST_CSV_PREFIX),
            "--html", str(run_dir / RUN_LAYOUT["locust"] / "report.html"),
            "--only-summary", "--exit-code-on-error", "0",
            "--record-dir", str(run_root), "--run-id", run_id,
            "--scenario", profile.scenario, "--release", profile.release,
            "--record-interval", f"{profile.record_interval_s:g}"]
    c = profile.collect
    for name, spec in c.groups.items():
        args += ["--collect-group", f"{name}={spec}"]
    for port in c.udp_ports:
        args += ["--collect-udp-port", str(port)]
    for url in c.urls:
        args += ["--collector", url]
    if c.enabled:
        args += ["--collect-interval", f"{c.interval_s:g}"]
    if c.allow_missing:
        args += ["--collect-allow-missing"]
    a = profile.abort
    if a.cgroup_memory_fraction:
        args += ["--abort-cgroup-memory-fraction", f"{a.cgroup_memory_fraction:g}"]
    if a.failure_ratio:
        args += ["--abort-failure-ratio", f"{a.failure_ratio:g}", "--abort-min-requests", str(a.min_requests)]
    return args + user_args(profile, resolved)


def user_args(profile: Profile, resolved: dict[str, Any]) -> list[str]:
    """``--target``, ``--host`` and the profile's options: what every process that runs users needs.

    Every ``[targets]`` entry named after a protocol goes to that protocol's users as
    ``--target PROTOCOL=ADDRESS:PORT`` (resolved, with its port), so an IMAP+POP3 profile gives
    each class its own endpoint with or without ``[load] host``. Workers get these on their own
    command line too, because locustfiles read their options when the process starts (the
    ``init`` event), before the master's first message arrives.
    """
    args: list[str] = []
    for name, target in resolved.items():
        if name in PROTOCOL_NAMES:
            args += ["--target", f"{PROTOCOL_NAMES[name]}={target}"]
    host = profile.load.host
    if host:
        target = resolved[host.removesuffix(".address")]
        if host.endswith(".address"):  # each user class adds its own default port
            args += ["--host", f"[{target.address}]" if ":" in target.address else target.address]
        else:
            args += ["--host", str(target)]
    return args + option_args(profile.load.options, resolved)


def format_status(status: dict[str, Any]) -> str:
    """One line: elapsed, offered/answered, failures by class, target memory."""
    counters = status.get("counters", {})
    requests, failures = status.get("requests_n", 0), status.get("failures_n", 0)
    original, retry = offered_parts("dns")
    if original in counters:  # the DNS sender counts what it offered itself: originals + retries
        offered = counters.get(original, 0) + counters.get(retry, 0)
        answered = counters.get("dns.answered", requests - failures)
    else:
        offered, answered = requests, requests - failures
    parts = [f"[{status.get('elapsed_s', 0):6.1f}s]", f"users {status.get('users', 0)}"]
    if status.get("workers"):
        parts.append(f"workers {status['workers']}")
    parts.append(f"offered {offered:.0f} answered {answered:.0f}")
    by_class = status.get("failures_by_class") or {}
    fails = f"failures {failures}"
    if by_class:
        fails += " (" + ", ".join(f"{k} {v}" for k, v in by_class.items()) + ")"
    parts.append(fails)
    mem = status.get("memory") or {}
    shown = [f"{g} {m / l:.0%}" if l else f"{g} {m / 2**20:.0f}MiB" for g, (m, l) in mem.items() if m or l]
    if shown:
        parts.append("memory " + " ".join(shown))
    if status.get("abort"):
        parts.append(f"ABORT {status['abort'].get('reason')}")
    return "  ".join(parts)


class Runner:
    """Runs one validated profile; see the module docstring for the order of work."""

    def __init__(self, plan: RunPlan, out_dir: str | Path = "runs",
                 stream: TextIO | None = None, lab: dict | None = None) -> None:
        self.plan = plan
        self.master_bind = plan.master_bind
        self.master_port = plan.master_port
        self.profile = plan.profile
        self.out_dir = Path(out_dir)
        self.workers = plan.workers
        self.stream = stream if stream is not None else sys.stderr
        self.lab = lab or {}
        self.interrupted = threading.Event()
        self.procs: list[subprocess.Popen] = []
        self.run_dir: Path | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        nets = parse_allowlist(self.profile.allowlist)  # the profile's, else env, else loopback
        env["LOADKIT_ALLOWLIST"] = ",".join(str(n) for n in nets)
        env["LOADKIT_MAX_RATE_QPS"] = f"{self.profile.caps.max_rate_qps:g}"
        env["PYTHONUNBUFFERED"] = "1"
        env.pop(PROFILE_SHAPE_ENV, None)
        if self.profile.load.shape:  # workers get it too: the DNS users' rate follows the shape
            env[PROFILE_SHAPE_ENV] = json.dumps(
                {**self.profile.load.shape, "run_time_s": self.profile.duration_s})
        return env

    def _spawn(self, args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
        log = log_path.open("ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "locust", *args], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                preexec_fn=_set_pdeathsig,
            )
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def run(self) -> RunResult:
        resolved = self.plan.targets  # resolved and allowed once, by plan_run
        p = self.profile
        run_id = new_run_id(p.scenario)
        run_dir = self.out_dir / run_id
        self.run_dir = run_dir
        try:
            writer = RunWriter(run_dir)
        except OSError as err:
            raise RunError(f"cannot write the run record under {self.out_dir}: {err.strerror}") from err
        targets = [f"{_SCHEMES.get(k, 'tcp')}://{t}" for k, t in resolved.items()]
        writer.start(run_id, p.scenario, p.release, profile=p.to_dict(), targets=targets, lab=self.lab)
        env = self._env()
        args = locust_args(p, resolved, self.out_dir, run_id, run_dir)
        logs = run_dir / RUN_LAYOUT["locust"]
        self._print(f"run {run_id}: {p.scenario} ({p.release}) for {p.duration_s:g} s -> {run_dir}")
        for line in describe_capacity_load(p):
            self._print(f"load: {line}")
        if self.workers:
            wildcard = self.master_bind in WILDCARD_BINDS
            port = self.master_port or _free_port(self.master_bind)
            master = self._spawn(
                args + ["--master", "--master-bind-host", "*" if wildcard else self.master_bind,
                        "--master-bind-port", str(port),
                        "--expect-workers", str(self.workers), "--expect-workers-max-wait", "30"],
                logs / "master.log", env)
            connect = ("::1" if self.master_bind == "::" else "127.0.0.1") if wildcard else self.master_bind
            if not ipaddress.ip_address(self.master_bind).is_loopback:  # others may join
                shape_env = f"{PROFILE_SHAPE_ENV}='{env[PROFILE_SHAPE_ENV]}' " if p.load.shape else ""
                self._print(f"master listening on {self.master_bind} port {port}: remote workers run "
                            f"{shape_env}locust -f {args[1]} --worker --master-host <this host> "
                            f"--master-port {port}")
            worker_args = ["-f", args[1], "--worker", "--master-host", connect,
                           "--master-port", str(port), "--record-interval", f"{p.record_interval_s:g}",
                           *user_args(p, resolved)]
            for i in range(self.workers):
                self._spawn(worker_args, logs / f"worker-{i + 1}.log", env)
            log_path = logs / "master.log"
        else:
            master = self._spawn(args, logs / "locust.log", env)
            log_path = logs / "locust.log"
        deadline = time.monotonic() + p.duration_s + p.stop_timeout_s + STARTUP_GRACE_S
        self._wait(master, run_dir, deadline)
        return self._finish(master, writer, log_path)

    # -- while it runs ---------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def _wait(self, master: subprocess.Popen, run_dir: Path, deadline: float) -> None:
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        every = 1.0 if tty else 5.0
        next_status = time.monotonic() + every
        status_path = run_dir / STATUS_FILE
        sent_term = False
        while master.poll() is None:
            time.sleep(0.2)
            if (self.interrupted.is_set() or time.monotonic() > deadline) and not sent_term:
                sent_term = True
                if not self.interrupted.is_set():
                    self._print("run: deadline passed, stopping Locust")
                (run_dir / INTERRUPT_MARKER).write_text("")
                self._signal_all(signal.SIGTERM)
                kill_at = time.monotonic() + self.profile.stop_timeout_s + 15
                while master.poll() is None and time.monotonic() < kill_at:
                    time.sleep(0.2)
                if master.poll() is None:
                    self._signal_all(signal.SIGKILL)
            if time.monotonic() >= next_status:
                next_status += every
                try:
                    line = format_status(json.loads(status_path.read_text()))
                except (OSError, ValueError):
                    continue
                if tty:
                    self.stream.write("\r\033[K" + line)
                    self.stream.flush()
                else:
                    self._print(line)
        if tty:
            self.stream.write("\n")
        # workers leave when the master quits; make sure of it
        for proc in self.procs[1:]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    # -- after -----------------------------------------------------------------------------------
    def _finish(self, master: subprocess.Popen, writer: RunWriter, log_path: Path) -> RunResult:
        manifest = writer.read_manifest() or {}
        status = manifest.get("status", "running")
        interrupted = (writer.run_dir / INTERRUPT_MARKER).exists()
        if status == "running":  # the plugin never finished the record
            status = "interrupted" if interrupted else "failed"
            writer.event("run_ended", "runner", {"status": status, "locust_exit_code": master.returncode})
            writer.finish(status, complete=False)  # no end time: the record stays marked incomplete
        elif interrupted and status == "completed":
            status = "interrupted"
            writer.update_manifest(status=status)
        if status == "failed":
            raise RunError(self._locust_failure(log_path, master.returncode))
        results = gates_mod.evaluate(writer.run_dir, vars(self.profile.gates))
        if status == "aborted":
            results.append(_no_abort_gate(writer.run_dir))
        for r in results:
            writer.event("gate", r["name"], r)
        writer.update_manifest(gates=results)
        for r in results:
            self._print("gate " + gates_mod.describe(r))
        self._print(f"run {writer.run_dir.name}: {status}")
        if status == "interrupted":
            code = EXIT_ERROR
        elif any(r["passed"] is False for r in results):
            code = EXIT_GATE_FAILED
        else:
            code = EXIT_PASSED
        return RunResult(writer.run_dir, status, results, code)

    @staticmethod
    def _locust_failure(log_path: Path, code: int | None) -> str:
        try:
            lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        for line in reversed(lines):
            if "unrecognized arguments" in line:
                return (f"Locust does not know {line.split('unrecognized arguments:', 1)[1].strip()}: "
                        "check [load] options against the locustfile's options")
        for line in reversed(lines):
            if line.startswith(USER_ERROR_PREFIX):  # a locustfile refused an option: its own line
                return f"{line.removeprefix(USER_ERROR_PREFIX)} (nothing was run; see {log_path})"
        last = lines[-1] if lines else "no output"
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        run_dir = log_path.parent.parent  # <run>/locust/<log>
        if any((run_dir / RUN_LAYOUT["requests"]).glob("*.parquet")):  # it died mid-run
            return (f"Locust {how} mid-run: run {run_dir.name} is incomplete, it holds the intervals "
                    f"flushed before (see {log_path})")
        return f"Locust {how} before recording the run: {last} (see {log_path})"


def run_profile(plan: RunPlan | Profile, out_dir: str | Path = "runs",
                stream: TextIO | None = None, lab: dict | None = None) -> RunResult:
    """Run a planned profile (:func:`plan_run`; a bare profile is planned as a one-process run)
    with SIGTERM/SIGINT passed on to Locust as a graceful stop."""
    if isinstance(plan, Profile):  # refused here, before handlers are installed or anything made
        plan = plan_run(plan)
    # a rate stated as "1.5 capacity" becomes a figure from the lab's measured capacity, here,
    # before anything is made (no lab with a capacity: one line, nothing run)
    plan = dataclasses.replace(plan, profile=resolve_capacity(plan.profile, lab))
    runner = Runner(plan, out_dir, stream, lab)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, lambda *_a: runner.interrupted.set())
    try:
        return runner.run()
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
        runner._signal_all(signal.SIGKILL)  # nothing outlives the runner


def _no_abort_gate(run_dir: Path) -> dict:
    """The ``no_abort`` gate of an aborted run, by the report's rule (one rule for both): an abort the
    profile's own memory threshold was set to reach, before any proxy fell over, is the scenario's
    purpose and passes; any other abort fails. Imported here, not at the top: pandas and the
    report stage are needed only for aborted runs."""
    from loadkit.record.reader import load_run
    from loadkit.report.analysis import OUTCOME_DESIGNED_ABORT, abort_event, run_outcome

    run = load_run(run_dir)
    outcome, detail = run_outcome(run)
    if outcome == OUTCOME_DESIGNED_ABORT:
        return gates_mod.gate_result("no_abort", True, None, 0, f"aborted as designed: {detail}")
    reason = str((abort_event(run).get("detail") or {}).get("reason", ""))
    return gates_mod.gate_result("no_abort", False, None, 0, reason)
