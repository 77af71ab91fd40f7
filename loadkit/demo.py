"""`make demo` (``loadkit demo``, or ``python -m loadkit.demo``): the whole story with one command.

1. brings up a lab of its own (unbound, dovecot backend, 3 dovecot proxies in memory cgroups,
   haproxy) on one loopback address;
2. runs the shipped DNS burst scenario (``scenarios/burst_retry_storm.toml``): bursts overflow
   unbound's receive buffer, the drops show as RcvbufErrors, the clients retry;
3. runs an IMAP storm that ramps held sessions through haproxy until the proxies fall over
   (``scenarios/proxies_fall_over.toml`` without its safety abort). To keep the demo short the
   proxies are small, 3 x 96 MiB instead of the shipped 3 x 256 MiB;
4. builds the capacity report of release ``demo`` in ``reports/demo/``;
5. brings the lab down: always, also after an error, Ctrl-C or SIGTERM.

The scenarios are the shipped files with the demo lab's address, ports and cgroups filled in
(written next to the runs, in ``runs/demo/profiles/``), so what the demo shows is what
``loadkit run scenarios/...`` does against ``loadkit lab up``.

``loadkit demo incidents`` replays the three incidents of docs/incidents.md, each twice
on a lab of its own (as it happened, then with its mitigation) and prints the figures of both
runs; they are also written to ``runs/incidents/incidents.json``, and the table of the figures
(``--repeat R``: R replays side by side, with their spread) to ``incidents_table.md``:

1. proxies fall over together -> an admission limit per proxy (haproxy ``maxconn`` per server,
   the limit taken from the headroom fit of the first run);
2. burst -> buffer drops -> retry storm -> a larger ``so-rcvbuf`` (unbound held to a set CPU
   quota, so its drain rate during a burst is set rather than found); 2b, asked for by name, is the
   whole loop through the lab's firewall (:mod:`loadkit.lab.firewall_replay`), and 2c the loop
   holding itself (a full table in front of a deep queue) -> the platform's default buffer;
3. many small sources -> a ramp to the knee, the shipped load of 1.5 x the lab's measured
   capacity, then at that load a per-IP rate limit (unbound ``ip-ratelimit``, chosen by
   :func:`loadkit.model.source_limit`) plus capacity.

The DNS incidents run on labs with a CPU quota and state their load relative to the capacity the
lab measured (``dns-rate = "1.5 capacity"``), so the as-shipped runs overload and the mitigated
runs do not on a quiet machine and a busy one alike.

The command line (``--address``, ``--dir``, and the environment variables ``LOADKIT_DEMO_ADDRESS``
and ``LOADKIT_DEMO_DIR`` they default to) is read by ``loadkit.cli.demo``; this module takes
arguments.
"""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, NamedTuple

from loadkit.errors import LoadkitError
from loadkit.lab import Lab, LabConfig, LabStatus
from loadkit.model import fit_headroom
from loadkit.record import counters
from loadkit.record.reader import load_run
from loadkit.report import build_report

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "scenarios"

#: proxies of the demo lab: small, so the storm reaches fall-over in well under a minute
DEMO_PROXIES = 3
DEMO_PROXY_MEMORY_BYTES = 96 * MIB
#: held sessions the demo storm ramps to, and how fast (about 1.2 MiB each: ~75 per proxy fit)
DEMO_STORM_USERS = 360
DEMO_STORM_SPAWN_RATE = 8
DEMO_STORM_DURATION = "55s"
#: the forecast peak the demo's headroom is measured against
DEMO_FORECAST_PEAK_SESSIONS = 150
DNS_DURATION = "20s"
#: incident mitigations: an 8 MiB receive buffer (incidents 2 and 3); for incident 3 a per-IP
#: limit chosen by loadkit.model.source_limit from the sources' rate, plus capacity: this many
#: times the as-shipped lab's CPU quota and a second thread
MITIGATION_RCVBUF_BYTES = 8 * MIB
MITIGATION_CPU_FACTOR = 5
MITIGATION_DNS_THREADS = 2
#: the DNS CPU quota of the incident labs when the scenario names none ([lab] dns_cpu): unbound's
#: capacity is set, not whatever the machine leaves over, and measured at lab up
INCIDENT_DNS_CPU = 0.1
SOURCES_DURATION = "20s"
#: incident 3's ramp to the knee: from a quarter of the measured capacity to 2.5 times it, without
#: retries (so the loss is the server's), stopping where more than 1 % is lost
KNEE_RAMP = {"dns-rate": "0.25 capacity", "dns-ramp-to": "2.5 capacity", "dns-ramp-duration": 20,
             "dns-knee-loss": 0.01, "dns-knee-p99-ms": 1000, "dns-retries": 0}
KNEE_DURATION = "30s"
#: the DNS forecast the demo's burst run is judged by: the incident's 4,000-query bursts must be
#: absorbed (the report judges a burst run per burst, not by its average rate)
DEMO_FORECAST_PEAK_BURST_QUERIES = 4000


class DemoInterrupted(Exception):
    """SIGTERM arrived: stop the running step and bring the lab down."""


def _say(message: str) -> None:
    print(f"demo: {message}", flush=True)


# --------------------------------------------------------------------------------------------
# profiles: the shipped scenarios, pointed at the demo lab
# --------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_toml(data: dict[str, dict[str, Any]]) -> str:
    """A profile (tables of plain values) as TOML text."""
    lines = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(v)}" for key, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def _scenario(name: str) -> dict[str, dict[str, Any]]:
    path = SCENARIOS / f"{name}.toml"
    if not path.exists():
        raise LoadkitError(f"scenario {path} is missing: the demo replays the shipped scenarios")
    with path.open("rb") as fh:
        return tomllib.load(fh)


def dns_profile(status: LabStatus) -> dict:
    """``burst_retry_storm`` against the demo lab's unbound."""
    p = _scenario("burst_retry_storm")
    p["run"].update(release="demo", duration=DNS_DURATION)
    p["targets"]["dns"] = str(status.dns)
    p["load"].setdefault("options", {})["dns-names-file"] = status.names_file
    p.setdefault("collect", {})["udp_ports"] = [status.dns.port]
    p["collect"]["groups"] = {"unbound": f"cmdline:unbound.*{Path(status.dir).name}"}
    return p


def storm_profile(status: LabStatus) -> dict:
    """``proxies_fall_over`` with IMAP only, no safety abort, ramped past the demo proxies' limit."""
    p = _scenario("proxies_fall_over")
    p["run"].update(
        release="demo",
        duration=DEMO_STORM_DURATION,
        description=f"IMAP ramp to fall-over of {DEMO_PROXIES} x {DEMO_PROXY_MEMORY_BYTES // MIB} MiB proxies",
    )
    p["targets"] = {"imap": str(status.imap), "allowlist": p["targets"].get("allowlist", ["127.0.0.0/8"])}
    p["load"].update(
        locustfile="locustfiles/imap_storm.py",
        host="imap",
        users=DEMO_STORM_USERS,
        spawn_rate=DEMO_STORM_SPAWN_RATE,
    )
    options = p["load"].setdefault("options", {})
    options["mail-accounts"] = status.accounts_file
    # logins as users spawn (not a herd after spawning), so sessions ramp while memory is sampled
    options["mail-arrival"] = f"rate:{2 * DEMO_STORM_SPAWN_RATE}"
    p["collect"]["groups"] = {
        proxy.name: f"cgroup:{proxy.cgroup}@{proxy.imap.port},{proxy.pop3.port}"
        for proxy in status.proxies
        if proxy.cgroup
    }
    p["collect"]["interval_s"] = 0.5
    # the point of the demo is the fall-over itself; the shipped scenario stops at 90 %
    p.pop("abort", None)
    p["gates"] = {"min_headroom_pct": 0, "forecast_peak_sessions": DEMO_FORECAST_PEAK_SESSIONS}
    p["lab"] = {"proxies": DEMO_PROXIES, "proxy_memory_bytes": DEMO_PROXY_MEMORY_BYTES}
    return p


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------


def run_scenario(profile: dict, name: str, runs_dir: Path, timeout_s: float, lab_dir: str | None = None) -> Path:
    """``loadkit run`` the profile (against the lab in ``lab_dir``, whose status it records and
    whose measured capacity resolves "1.5 capacity" rates); return the run directory it recorded."""
    profiles = runs_dir / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    path = profiles / f"{name}.toml"
    path.write_text(dump_toml(profile))
    before = {p.name for p in runs_dir.iterdir()}
    release = profile["run"]["release"]
    cmd = [sys.executable, "-m", "loadkit", "run", str(path), "--release", release, "--out", str(runs_dir)]
    cmd += ["--lab-dir", str(lab_dir)] if lab_dir else []
    _say(f"$ loadkit run {path} --release {release} --out {runs_dir}" + (f" --lab-dir {lab_dir}" if lab_dir else ""))
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        code = proc.wait(timeout=timeout_s)
    except BaseException:
        # Ctrl-C, SIGTERM or the time budget: stop the run gracefully (its record completes)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    new = sorted(
        (p for p in runs_dir.iterdir() if p.name not in before and (p / "manifest.json").exists()),
        key=lambda p: p.stat().st_mtime,
    )
    if not new:
        raise LoadkitError(f"loadkit run {path} left no run record (exit {code})")
    _say(f"run recorded in {new[-1]}: {_run_outcome(code)}")
    return new[-1]


def _run_outcome(code: int) -> str:
    """What ``loadkit run``'s exit status says, in words (0 passed; 1 a gate failed or it aborted)."""
    if code == 0:
        return "every gate passed"
    if code == 1:
        return "a gate failed or the run aborted (exit status 1)"
    return f"loadkit run exited with status {code}"


# --------------------------------------------------------------------------------------------
# the three incidents, each replayed twice: as it happened, then with its mitigation
# --------------------------------------------------------------------------------------------


def set_admission_limit(lab: Lab, limits: dict[str, int], backends: tuple[str, ...] = ("imap_proxies",)) -> None:
    """Cap the sessions haproxy sends to each proxy (``maxconn`` per server, set at runtime on
    the lab's admin stats socket). Connections above the cap wait in haproxy's queue and are
    closed when ``timeout queue`` passes: the proxy behind never sees them."""
    import socket

    for backend in backends:
        for proxy, limit in limits.items():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(str(lab.stats_socket))
                sock.sendall(f"set maxconn server {backend}/{proxy} {int(limit)}\n".encode())
                reply = sock.recv(4096).decode(errors="replace").strip()
            if reply:
                raise LoadkitError(f"haproxy refused 'set maxconn server {backend}/{proxy}': {reply}")


def mail_outcome(run_dir: Path) -> dict:
    """What a storm did to the proxies: OOM kills, proxies that fell over, peak memory, sessions."""
    run = load_run(run_dir)
    g = run.groups[run.groups["cgroup_limit_bytes"] > 0]
    per = g.groupby("group").agg(
        oom_kills=("cgroup_oom_kills_n", "max"),
        peak=("cgroup_memory_bytes", "max"),
        limit=("cgroup_limit_bytes", "max"),
        sessions=("sessions_n", "max"),
    )
    held = counters.gauge(run, "imap.held_sessions")
    fails = run.failures.groupby("failure_class")["failures_n"].sum().to_dict() if len(run.failures) else {}
    return {
        "run": run_dir.name,
        "oom_kills_n": int(per["oom_kills"].sum()),
        "proxies_oom_killed": int((per["oom_kills"] > 0).sum()),
        "proxies": int(len(per)),
        "peak_memory_fraction": float((per["peak"] / per["limit"]).max()),
        "max_sessions_per_proxy": int(per["sessions"].max()),
        "max_held_sessions": int(held.max()) if len(held) else 0,
        "logins_n": int(counters.total(run, "imap.logins")),
        "failures_by_class": {str(k): int(v) for k, v in fails.items()},
        "gates": _gates(run),
        "status": run.manifest.get("status"),
    }


def dns_outcome(run_dir: Path) -> dict:
    """Offered, answered, drops at the server's socket, retries, failures by class."""
    from loadkit.report.capacity import dns_run  # the report's own figures, not a second copy

    run = load_run(run_dir)
    figures = dns_run(run, []).to_dict()
    fails = run.failures.groupby("failure_class")["failures_n"].sum().to_dict() if len(run.failures) else {}
    requests_n = int(run.requests["requests_n"].sum()) if len(run.requests) else 0
    failures_n = int(run.requests["failures_n"].sum()) if len(run.requests) else 0
    keep = ("offered_queries_n", "original_queries_n", "retry_queries_n", "answered_queries_n", "drops_n",
            "drops_source", "retry_amplification_mean", "retry_amplification_max",
            "largest_burst_without_loss_queries")
    out = {"run": run_dir.name, **{k: figures.get(k) for k in keep}}
    # what the generator really sent per second while it sent (a busy machine's generator may fall
    # short of the rate it was given)
    frame = counters.counter_frame(run, ["dns.original_sent"])
    active = frame[frame["dns.original_sent"] > 0] if len(frame) else frame
    out["sent_original_qps"] = (float(active["dns.original_sent"].sum() / active["interval_s"].sum())
                                if len(active) else None)
    out.update(requests_n=requests_n, failures_n=failures_n,
               failure_ratio=failures_n / requests_n if requests_n else None,
               failures_by_class={str(k): int(v) for k, v in fails.items()},
               gates=_gates(run), status=run.manifest.get("status"))
    return out


def _gates(run: Any) -> dict:
    """Gate name -> measured value (and whether it passed), as ``loadkit run`` recorded them."""
    return {
        str(g.get("name")): f"{g.get('value')} ({'pass' if g.get('passed') else 'FAIL'})"
        for g in run.manifest.get("gates") or []
    }


def _print_outcome(title: str, outcome: dict) -> None:
    _say(f"  {title}:")
    for key, value in outcome.items():
        if isinstance(value, float):
            value = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
        _say(f"    {key} = {value}")


def _lab(work: Path, name: str, address: str, **overrides: Any) -> Lab:
    return Lab(LabConfig(dir=work / ".loadkit" / f"incident-{name}", address=address, **overrides))


def incident_proxies(work: Path, address: str, runs_dir: Path) -> dict:
    """1. Proxies fall over together; mitigation: an admission limit per proxy from the fit."""
    results: dict[str, Any] = {}
    lab = _lab(work, "proxies", address, proxies=DEMO_PROXIES, proxy_memory_bytes=DEMO_PROXY_MEMORY_BYTES)
    try:
        status = lab.up()
        profile = storm_profile(status)
        profile["run"]["release"] = "incident1"
        before = run_scenario(profile, "proxies_fall_over", runs_dir, timeout_s=240)
        profile["run"]["release"] = "incident1-mitigated"
        results["before"] = mail_outcome(before)
        fit = fit_headroom(load_run(before), admission_fraction=0.9)
        limits = {p.name: int(p.admission_limit_sessions) for p in fit.proxies}
        results["fit"] = fit.summary()
        results["admission_limits"] = limits
        lab.down()  # fresh proxies for the second run
        status = lab.up()
        set_admission_limit(lab, limits)
        _say(f"  admission limit per proxy from the fit: {limits} (haproxy maxconn per server)")
        after = run_scenario(profile, "proxies_fall_over_admission", runs_dir, timeout_s=240)
        results["after"] = mail_outcome(after)
        results["runs"] = [str(before), str(after)]
    finally:
        lab.down()
    return results


def _dns_cpu(scenario: dict) -> float:
    """The CPU quota a DNS scenario asks of its lab ([lab] dns_cpu), else the incidents' default."""
    cores = (scenario.get("lab") or {}).get("dns_cpu")
    return float(cores) if isinstance(cores, (int, float)) and cores > 0 else INCIDENT_DNS_CPU


def _capacity(status: LabStatus) -> float:
    """The lab's measured DNS capacity; a lab without one cannot replay a DNS incident fairly."""
    capacity = status.dns_cpu.capacity_qps if status.dns_cpu else None
    if not capacity:
        reason = status.cgroups.reason if status.dns_cpu is None else "its calibration found none"
        raise LoadkitError(f"the lab in {status.dir} measured no DNS capacity ({reason}); the DNS "
                           "incidents need a cpu cgroup controller (root) for --dns-cpu")
    return float(capacity)


def _resolved_rate(run_dir: Path, option: str = "dns-rate") -> float | None:
    """The figure a capacity-relative option was resolved to, from the run's manifest."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    row = ((manifest.get("profile") or {}).get("capacity_relative") or {}).get(option)
    return float(row["value_qps"]) if row else None


def incident_burst(work: Path, address: str, runs_dir: Path) -> dict:
    """2. Burst -> buffer drops -> retry storm; mitigation: a larger so-rcvbuf. Both labs hold
    unbound to the scenario's CPU quota, so how fast it drains a burst is set, not found."""
    results: dict[str, Any] = {}
    cores = _dns_cpu(_scenario("burst_retry_storm"))
    for label, rcvbuf in (("before", 0), ("after", MITIGATION_RCVBUF_BYTES)):
        lab = _lab(work, "burst", address, dns_rcvbuf_bytes=rcvbuf, dns_cpu=cores)
        try:
            status = lab.up()
            # the load is absolute (the burst against the buffer): the capacity is only reported,
            # and a busy machine's calibration may find none under the default buffer
            capacity = status.dns_cpu.capacity_qps if status.dns_cpu else None
            profile = dns_profile(status)
            profile["run"]["release"] = "incident2" if label == "before" else "incident2-mitigated"
            profile.setdefault("lab", {}).update(dns_rcvbuf_bytes=rcvbuf, dns_cpu=cores)
            run = run_scenario(profile, f"burst_retry_storm_rcvbuf_{rcvbuf}", runs_dir, timeout_s=180,
                               lab_dir=status.dir)
            options = profile["load"]["options"]
            results[label] = {"so_rcvbuf_bytes": rcvbuf or "platform default", "dns_cpu": cores,
                              "capacity_qps": capacity,
                              "base_rate_of_capacity": float(options["dns-rate"]) / capacity if capacity else None,
                              "burst_drain_s": float(options["dns-burst-size"]) / capacity if capacity else None,
                              **dns_outcome(run)}
        finally:
            lab.down()
    return results


def _sources_profile(status: LabStatus, release: str, options: dict | None = None) -> dict:
    """``many_small_sources`` against an incident lab, with ``options`` over its own."""
    p = _scenario("many_small_sources")
    p["run"].update(release=release, duration=SOURCES_DURATION)
    p["targets"]["dns"] = str(status.dns)
    p["load"]["options"].update(options or {})
    p["load"]["options"]["dns-names-file"] = status.names_file
    p["collect"].update(udp_ports=[status.dns.port],
                        groups={"unbound": f"cmdline:unbound.*{Path(status.dir).name}"})
    return p


def incident_sources(work: Path, address: str, runs_dir: Path) -> dict:
    """3. Many small sources. On a lab held to the scenario's CPU quota: a ramp of the sources'
    rate to the knee (where drops begin), then the scenario as shipped (1.5 x the measured
    capacity); then, at that same load, the mitigation: a per-IP limit chosen from the sources'
    rate (:func:`loadkit.model.source_limit`) plus capacity (a larger quota, a second thread, a
    larger buffer)."""
    from loadkit.model.source_limit import source_limit

    shipped = _scenario("many_small_sources")
    cores = _dns_cpu(shipped)
    sources = int(shipped["load"]["options"]["dns-sources"])
    results: dict[str, Any] = {}
    lab = _lab(work, "sources", address, dns_cpu=cores)
    try:
        status = lab.up()
        capacity = _capacity(status)
        p = _sources_profile(status, "incident3-knee", KNEE_RAMP)
        p["run"]["duration"] = KNEE_DURATION
        p.pop("gates", None)
        p.pop("abort", None)  # the ramp stops itself at the knee
        knee_run = run_scenario(p, "many_small_sources_knee", runs_dir, timeout_s=180, lab_dir=status.dir)
        knee = counters.gauge(load_run(knee_run), "dns.knee_qps")
        knee_qps = float(knee.max()) if len(knee) else None
        results["knee"] = {"run": knee_run.name, "capacity_qps": capacity, "knee_qps": knee_qps,
                           "knee_per_source_qps": knee_qps / sources if knee_qps else None,
                           "knee_of_capacity": knee_qps / capacity if knee_qps else None}
        before = run_scenario(_sources_profile(status, "incident3"), "many_small_sources_before", runs_dir,
                              timeout_s=180, lab_dir=status.dir)
        rate = _resolved_rate(before) or capacity * 1.5
        results["before"] = {"lab": f"dns_cpu {cores:g}", "capacity_qps": capacity, "offered_rate_qps": rate,
                             "rate_of_capacity": rate / capacity, **dns_outcome(before)}
    finally:
        lab.down()
    limit = source_limit(sources, rate / sources, arrival="poisson", retries_n=2,
                         duration_s=20.0).recommended_limit_qps
    mitigation = {"dns_ratelimit_qps": int(limit), "dns_cpu": round(cores * MITIGATION_CPU_FACTOR, 3),
                  "dns_threads": MITIGATION_DNS_THREADS, "dns_rcvbuf_bytes": MITIGATION_RCVBUF_BYTES}
    _say(f"  per-IP limit from the sources' rate ({rate / sources:.1f} q/s each, Poisson): {limit} q/s; "
         f"capacity: {mitigation['dns_cpu']:g} core, {MITIGATION_DNS_THREADS} threads, 8 MiB buffer")
    lab = _lab(work, "sources", address, **mitigation)
    try:
        status = lab.up()
        # the as-shipped run's load, as a figure: relative to this lab it would be a bigger load
        p = _sources_profile(status, "incident3-mitigated", {"dns-rate": rate})
        p.setdefault("lab", {}).update(mitigation)
        after = run_scenario(p, "many_small_sources_after", runs_dir, timeout_s=180, lab_dir=status.dir)
        results["after"] = {"lab": mitigation, "offered_rate_qps": rate, "rate_of_capacity": rate / capacity,
                            **dns_outcome(after)}
    finally:
        lab.down()
    results["runs"] = [str(knee_run), str(before), str(after)]
    return results


def incident_firewall(work: Path, address: str, runs_dir: Path, which: str = "drains") -> dict:
    """2b. The whole loop of incident 2 through the lab's firewall (``scenarios/retry_storm_firewall.toml``)
    as shipped and with a larger receive buffer; 2c (``which="holds"``), the loop holding itself
    (``scenarios/retry_storm_firewall_holds.toml``) as shipped and with the platform's default
    buffer. Through :mod:`loadkit.lab.firewall_replay`: the cases, labs and profiles are that
    module's (it also predicts each verdict before the run)."""
    try:
        from loadkit.lab import firewall_replay as fw
    except ImportError as err:  # the firewall replay is not part of this version
        raise LoadkitError(f"incident 2b (the firewall loop) is not available here: {err}") from None
    results: dict[str, Any] = {}
    cases = fw.cases(which)
    name = "retry_storm_firewall_holds" if which == "holds" else "retry_storm_firewall"
    for label, case in (("before", cases[0]), ("after", cases[1])):
        lab = _lab(work, "firewall", address, **fw.lab_settings(case))
        try:
            status = lab.up()
            predicted = fw.predict(case, status)
            run = run_scenario(fw.profile(status, case), f"{name}_{label}", runs_dir,
                               timeout_s=300, lab_dir=status.dir)
            results[label] = {"case": case.label,
                              "capacity_qps": status.dns_cpu.capacity_qps if status.dns_cpu else None,
                              **dns_outcome(run), **fw.outcome(run, predicted)}
        finally:
            lab.down()
    return results


#: what can show an incident's failure in a run's outcome (:attr:`Incident.failure` names them)
FAILURE_SIGNS: dict[str, Callable[[dict], bool]] = {
    "oom": lambda o: (o.get("oom_kills_n") or 0) > 0,
    "drops": lambda o: (o.get("drops_n") or 0) > 0,  # at the server's socket
    "failed queries": lambda o: (o.get("failures_n") or 0) > 0,  # after all retries
    "firewall drops": lambda o: (o.get("firewall_drops_n") or 0) > 0,
    "verdict metastable": lambda o: o.get("verdict") == "metastable",
}


class Incident(NamedTuple):
    """One incident ``loadkit demo incidents`` replays."""

    title: str
    replay: Callable[[Path, str, Path], dict]  #: (work dir, lab address, runs dir) -> its outcomes
    #: the signs of :data:`FAILURE_SIGNS` any of which in a run's outcome shows the incident's failure
    failure: tuple[str, ...]


INCIDENTS = {
    "1": Incident("proxies fall over together", incident_proxies, ("oom",)),
    "2": Incident("burst -> buffer drops -> retry storm", incident_burst, ("drops", "failed queries")),
    "2b": Incident("the retry storm through the firewall's session table", incident_firewall,
                   ("drops", "failed queries", "firewall drops")),
    # its failure is the loop holding: drops alone also happen where it drains
    "2c": Incident("the retry loop holding itself: a full table in front of a deep queue",
                   lambda work, address, runs_dir: incident_firewall(work, address, runs_dir, "holds"),
                   ("verdict metastable",)),
    "3": Incident("many small sources", incident_sources, ("drops", "failed queries")),
}
#: what ``loadkit demo incidents`` replays without numbers (2b and 2c, the firewall loops, run 100 s
#: and 70 s per case and need nftables: ask for them by name)
DEFAULT_INCIDENTS = ("1", "2", "3")

#: per incident: the figures of the table (label, outcome key or function of the run's outcome and
#: the incident's whole result)
_DNS_FIGURES: list[tuple[str, Any]] = [
    ("lab capacity, q/s (measured at up)", "capacity_qps"),
    ("originals sent, q/s", "sent_original_qps"),
    ("drops at the server's socket", "drops_n"), ("retries", "retry_queries_n"),
    ("queries failed", "failures_n")]
_FIGURES: dict[str, list[tuple[str, Any]]] = {
    "1": [("proxies OOM-killed", "proxies_oom_killed"), ("login processes OOM-killed", "oom_kills_n"),
          ("sessions cut (eof_after_login)", lambda o, r: o["failures_by_class"].get("eof_after_login", 0))],
    "2": _DNS_FIGURES,
    "2b": [("firewall drops (new flows)", "firewall_drops_n"), ("table peak, entries", "table_peak_n"),
           *_DNS_FIGURES],
    "2c": [("goodput < 1/2 after the trigger, s", "goodput_below_half_s"),
           ("firewall drops (new flows)", "firewall_drops_n"), ("table peak, entries", "table_peak_n"),
           *_DNS_FIGURES],
    "3": [("knee: answered q/s where drops begin", lambda o, r: (r.get("knee") or {}).get("knee_qps")),
          ("per-IP limit, q/s", lambda o, r: (o.get("lab") or {}).get("dns_ratelimit_qps")
           if isinstance(o.get("lab"), dict) else None),
          *_DNS_FIGURES],
}


def _figure(outcome: dict, result: dict, key: Any) -> float | None:
    value = key(outcome, result) if callable(key) else outcome.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def failure_shown(number: str, outcome: dict) -> bool:
    """Did this run show the incident's failure: any of its :attr:`Incident.failure` signs?"""
    return any(FAILURE_SIGNS[sign](outcome) for sign in INCIDENTS[number].failure)


def incidents_table(replays: list[dict[str, dict]]) -> str:
    """The incident x {as shipped, mitigated} x replay table (Markdown), each figure per replay
    with its spread, and in how many replays each run showed the failure."""
    n = len(replays)
    head = ["incident", "run", "figure", *[f"replay {i + 1}" for i in range(n)], "median [min–max]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    verdicts = []
    for number in [k for k in INCIDENTS if any(k in r for r in replays)]:
        for label, title in (("before", "as shipped"), ("after", "mitigated")):
            outcomes = [r.get(number, {}).get(label) for r in replays]
            figures = [(f, k) for f, k in _FIGURES[number] if label == "before" or not f.startswith("knee")]
            for i, (figure, key) in enumerate(figures):  # the knee is the as-shipped lab's
                values = [_figure(o, r.get(number, {}), key) if o else None for o, r in zip(outcomes, replays)]
                got = sorted(v for v in values if v is not None)
                spread = (f"{statistics.median(got):,.0f} [{got[0]:,.0f}–{got[-1]:,.0f}]" if got else "-")
                cells = [f"{v:,.0f}" if v is not None else "-" for v in values]
                lines.append("| " + " | ".join([number if i == 0 and label == "before" else "",
                                                title if i == 0 else "", figure, *cells, spread]) + " |")
            shown = sum(failure_shown(number, o) for o in outcomes if o)
            verdicts.append(f"incident {number} {title}: the failure in {shown} of "
                            f"{sum(1 for o in outcomes if o)} replays")
    return "\n".join(lines + [""] + verdicts)


def incidents(work: Path, address: str, only: list[str] | None = None, repeat: int = 1) -> int:
    """Replay the incidents (``loadkit demo incidents [N ...] [--repeat R]``); print what changed."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _replay_incidents(work, address, only, repeat)
    except (KeyboardInterrupt, DemoInterrupted):
        _say("interrupted; the labs are down")
        return 130


def _replay_incidents(work: Path, address: str, only: list[str] | None, repeat: int) -> int:
    runs_dir = work / "runs" / "incidents"
    runs_dir.mkdir(parents=True, exist_ok=True)
    numbers = [str(n) for n in only] if only else list(DEFAULT_INCIDENTS)
    t0 = time.perf_counter()
    replays: list[dict[str, dict]] = []
    for r in range(repeat):
        out: dict[str, dict] = {}
        replays.append(out)
        for number in numbers:
            title, replay = INCIDENTS[number].title, INCIDENTS[number].replay
            _say(f"incident {number}: {title}" + (f" (replay {r + 1} of {repeat})" if repeat > 1 else ""))
            try:
                out[number] = replay(work, address, runs_dir)
            except LoadkitError as err:
                if repeat == 1:
                    raise
                # one replay that could not run (a lab that measured no capacity on a busy machine)
                # is a gap in the table, not the end of the others
                _say(f"  incident {number}, replay {r + 1}: not replayed: {err}")
                out[number] = {"error": str(err)}
                continue
            for key, value in out[number].items():
                if isinstance(value, dict) and "run" in value:
                    _print_outcome(key, value)
            (runs_dir / "incidents_replays.json").write_text(json.dumps(replays, indent=2, default=str))
    path = runs_dir / "incidents.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update({k: v for k, v in replays[-1].items()})
    if repeat > 1:
        previous["replays"] = replays
    path.write_text(json.dumps(previous, indent=2, default=str))
    table = incidents_table(replays)
    (runs_dir / "incidents_table.md").write_text(table + "\n")
    print(table, flush=True)
    _say(f"figures written to {path} and {runs_dir / 'incidents_table.md'} "
         f"({time.perf_counter() - t0:.0f} s)")
    return 0


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise DemoInterrupted("terminated")


def run_demo(work: Path, address: str) -> int:
    """The demo (``loadkit demo``, ``make demo``) in ``work`` on a lab at ``address``.

    A user error (a taken port, a missing scenario) is raised as :class:`LoadkitError` after the
    lab is down; Ctrl-C or SIGTERM bring the lab down and return 130.
    """
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, _on_sigterm)
    runs_dir = work / "runs" / "demo"
    if runs_dir.exists():
        shutil.rmtree(runs_dir)  # the demo's own runs only: a fresh story each time
    runs_dir.mkdir(parents=True)
    lab = Lab(LabConfig(dir=work / ".loadkit" / "demo-lab", address=address, proxies=DEMO_PROXIES,
                        proxy_memory_bytes=DEMO_PROXY_MEMORY_BYTES))
    try:
        report = _demo_steps(lab, address, runs_dir, work / "reports" / "demo", t0)
    except (KeyboardInterrupt, DemoInterrupted):
        _say("interrupted; bringing the lab down")
        return 130
    finally:
        try:
            lab.down()
            _say("lab down")
        except LoadkitError as err:
            print(f"loadkit: error bringing the lab down: {err}", file=sys.stderr)
    _print_verdict(report, t0)
    return 0


def _demo_steps(lab: Lab, address: str, runs_dir: Path, report_dir: Path, t0: float) -> Any:
    _say(f"bringing up the lab on {address} ({DEMO_PROXIES} dovecot proxies of "
         f"{DEMO_PROXY_MEMORY_BYTES // MIB} MiB each, small so the storm reaches fall-over quickly; "
         "the shipped scenarios use 256 MiB)")
    status = lab.up()
    if not status.cgroups.enabled:
        _say(f"warning: proxies run without memory limits ({status.cgroups.reason}); they will not fall over")
    _say(f"lab up in {time.perf_counter() - t0:.0f} s: DNS {status.dns}, IMAP {status.imap}")

    _say("1/3 DNS burst: 1,000 q/s plus 4,000-query bursts every 5 s into the default receive buffer")
    dns_run = run_scenario(dns_profile(status), "burst_retry_storm", runs_dir, timeout_s=180)

    _say(f"2/3 IMAP storm: ramp to {DEMO_STORM_USERS} held sessions at {DEMO_STORM_SPAWN_RATE}/s "
         "through haproxy until the proxies fall over")
    storm_run = run_scenario(storm_profile(status), "proxies_fall_over", runs_dir, timeout_s=240)

    _say("3/3 capacity report of release demo")
    return build_report("demo", [dns_run, storm_run], out_dir=report_dir,
                        forecast_peak_burst_queries=DEMO_FORECAST_PEAK_BURST_QUERIES, progress=lambda m: _say(f"report: {m}"))


def _print_verdict(report: Any, t0: float) -> None:
    summary = report.summary
    for line in summary.verdict_reasons:
        _say(f"  - {line}")
    for mail in summary.mail:
        _say(f"  {mail.service}: first proxy falls over at ≈ {mail.first_failure_sessions or 0:,.0f} sessions; "
             f"recommended: {mail.recommendation or '-'}")
    for dns in summary.dns_capacity:
        _say(f"  DNS: largest burst without loss ≈ {dns.largest_burst_without_loss_queries or 0:,.0f} queries; "
             f"recommended: {dns.recommendation or '-'}")
    _say(f"done in {time.perf_counter() - t0:.0f} s; verdict {report.verdict}")
    if report.verdict == "FAIL":
        _say("  (a FAIL is the finding, not a demo error: with the platform-default receive buffer the "
             "DNS bursts are dropped and retried, incident 2 of docs/incidents.md)")
    _say(f"the report is at {report.html}")


if __name__ == "__main__":  # python -m loadkit.demo: the command line is the CLI's
    from loadkit.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
