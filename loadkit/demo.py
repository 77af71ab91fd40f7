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
runs; they are also written to ``runs/incidents/incidents.json``:

1. proxies fall over together -> an admission limit per proxy (haproxy ``maxconn`` per server,
   the limit taken from the headroom fit of the first run);
2. burst -> buffer drops -> retry storm -> a larger ``so-rcvbuf``;
3. many small sources -> a per-IP rate limit (unbound ``ip-ratelimit``) plus capacity.

The command line (``--address``, ``--dir``, and the environment variables ``LOADKIT_DEMO_ADDRESS``
and ``LOADKIT_DEMO_DIR`` they default to) is read by ``loadkit.cli.demo``; this module takes
arguments.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

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
#: incident mitigations: an 8 MiB receive buffer; a per-IP limit above the 20 queries/s each
#: source of incident 3 sends (and, to show why, one below it)
MITIGATION_RCVBUF_BYTES = 8 * MIB
MITIGATION_RATELIMIT_QPS = 40
BLUNT_RATELIMIT_QPS = 10
#: incident 3's load: many sources, each small, with cache-missing random subdomains
SOURCES_DURATION = "20s"
SOURCES_LOAD = {"dns-sources": 300, "dns-source-qps": 20, "dns-random-subdomain-share": 0.3}
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


def run_scenario(profile: dict, name: str, runs_dir: Path, timeout_s: float) -> Path:
    """``loadkit run`` the profile; return the run directory it recorded."""
    profiles = runs_dir / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    path = profiles / f"{name}.toml"
    path.write_text(dump_toml(profile))
    before = {p.name for p in runs_dir.iterdir()}
    release = profile["run"]["release"]
    cmd = [sys.executable, "-m", "loadkit", "run", str(path), "--release", release, "--out", str(runs_dir)]
    _say(f"$ loadkit run {path} --release {release} --out {runs_dir}")
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


def incident_burst(work: Path, address: str, runs_dir: Path) -> dict:
    """2. Burst -> buffer drops -> retry storm; mitigation: a larger so-rcvbuf."""
    results: dict[str, Any] = {}
    for label, rcvbuf in (("before", 0), ("after", MITIGATION_RCVBUF_BYTES)):
        lab = _lab(work, "burst", address, dns_rcvbuf_bytes=rcvbuf)
        try:
            status = lab.up()
            profile = dns_profile(status)
            profile["run"]["release"] = "incident2" if label == "before" else "incident2-mitigated"
            profile.setdefault("lab", {})["dns_rcvbuf_bytes"] = rcvbuf
            run = run_scenario(profile, f"burst_retry_storm_rcvbuf_{rcvbuf}", runs_dir, timeout_s=180)
            results[label] = {"so_rcvbuf_bytes": rcvbuf or "platform default", **dns_outcome(run)}
        finally:
            lab.down()
    return results


def incident_sources(work: Path, address: str, runs_dir: Path) -> dict:
    """3. Many small sources; mitigation: a per-IP rate limit plus capacity (threads, buffer)."""
    results: dict[str, Any] = {}
    settings = (
        ("before", {}),
        # a limit below what each source sends refuses half of every source: the clients retry
        ("limit_below_source_rate", {"dns_ratelimit_qps": BLUNT_RATELIMIT_QPS}),
        # a limit above a normal client's rate, plus capacity: threads and a larger buffer
        ("after", {"dns_ratelimit_qps": MITIGATION_RATELIMIT_QPS, "dns_threads": 2,
                   "dns_rcvbuf_bytes": MITIGATION_RCVBUF_BYTES}),
    )
    for label, overrides in settings:
        lab = _lab(work, "sources", address, **overrides)
        try:
            status = lab.up()
            p = _scenario("many_small_sources")
            release = {"before": "incident3", "after": "incident3-mitigated"}.get(label, f"incident3-{label}")
            p["run"].update(release=release, duration=SOURCES_DURATION)
            p.setdefault("lab", {}).update(overrides)
            p["targets"]["dns"] = str(status.dns)
            p["load"]["options"].update(SOURCES_LOAD)
            p["load"]["options"]["dns-names-file"] = status.names_file
            p["collect"].update(udp_ports=[status.dns.port],
                                groups={"unbound": f"cmdline:unbound.*{Path(status.dir).name}"})
            p.setdefault("caps", {})["max_rate_qps"] = 50_000
            run = run_scenario(p, f"many_small_sources_{label}", runs_dir, timeout_s=180)
            results[label] = {"lab": overrides or "as shipped", **dns_outcome(run)}
        finally:
            lab.down()
    return results


INCIDENTS = (
    ("proxies fall over together", incident_proxies),
    ("burst -> buffer drops -> retry storm", incident_burst),
    ("many small sources", incident_sources),
)


def incidents(work: Path, address: str, only: list[int] | None = None) -> int:
    """Replay the incidents (``loadkit demo incidents [N ...]``); print what changed."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _replay_incidents(work, address, only)
    except (KeyboardInterrupt, DemoInterrupted):
        _say("interrupted; the labs are down")
        return 130


def _replay_incidents(work: Path, address: str, only: list[int] | None) -> int:
    runs_dir = work / "runs" / "incidents"
    runs_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for n, (title, replay) in enumerate(INCIDENTS, 1):
        if only and n not in only:
            continue
        _say(f"incident {n}: {title}")
        out[n] = replay(work, address, runs_dir)
        for key, value in out[n].items():
            if isinstance(value, dict) and "run" in value:
                _print_outcome(key, value)
    path = runs_dir / "incidents.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update({str(k): v for k, v in out.items()})
    path.write_text(json.dumps(previous, indent=2, default=str))
    _say(f"figures written to {path}")
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
