"""Incident 2's whole loop, replayed: the shipped firewall scenario and each mitigation on its own.

One case per lab: the scenario ``scenarios/retry_storm_firewall.toml`` as shipped, then with a
larger receive buffer, a shorter UDP timeout, a larger session table, and a client retry budget;
or (``cases("holds")``) ``scenarios/retry_storm_firewall_holds.toml``, the loop that holds itself,
and its mitigations.
For each case this module gives the lab's settings, the profile to run against that lab, the
verdict the firewall model predicts *before* the run (from the lab's calibrated DNS capacity, the
table's size and timeout, the receive buffer and the clients' retry options:
:func:`loadkit.model.firewall.firewall_model`), and, after the run, what it measured beside that
prediction (:func:`outcome`). Running the profile is the caller's (``loadkit run``, the demo, or
``benchmarks/firewall_replay.py``): the lab never starts Locust.

    for case in cases():
        lab = Lab(LabConfig(dir=..., address=..., **lab_settings(case)))
        status = lab.up()
        predicted = predict(case, status)
        run_dir = <loadkit run> profile(status, case)
        print(outcome(run_dir, predicted))
        lab.down()
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

from loadkit.errors import LoadkitError
from loadkit.model.firewall import FirewallResult, firewall_model
from loadkit.model.retries import DNS_OPTION_DEFAULTS
from loadkit.model.udp import buffer_datagrams

from .status import LabStatus

SCENARIOS_DIR = Path(__file__).resolve().parents[2] / "scenarios"
SCENARIO = SCENARIOS_DIR / "retry_storm_firewall.toml"
#: the loop that holds itself: the table admits more than the server serves, whose deep queue
#: answers past the stubs' timeout (docs/incidents.md, 2c)
HOLDS = SCENARIOS_DIR / "retry_storm_firewall_holds.toml"
#: the platform default receive buffer (``net.core.rmem_default``) a lab with ``dns_rcvbuf_bytes = 0`` keeps
DEFAULT_RCVBUF_PATH = "/proc/sys/net/core/rmem_default"


class ReplayCase(NamedTuple):
    """One replay: the scenario with some lab settings or client options changed."""

    label: str  #: "as shipped", "larger buffer", ...
    release: str  #: the run's release, so a report shows each case beside the others
    lab: dict[str, Any]  #: LabConfig fields over the scenario's ``[lab]`` table
    options: dict[str, Any]  #: load options over the scenario's ``[load] options``
    what: str  #: the mitigation in words
    path: Path = SCENARIO  #: the scenario the case changes


def scenario(path: Path = SCENARIO) -> dict[str, Any]:
    if not path.exists():
        raise LoadkitError(f"scenario {path} is missing: the firewall replay runs the shipped scenario")
    with path.open("rb") as fh:
        return tomllib.load(fh)


def cases(which: str = "drains") -> list[ReplayCase]:
    """A shipped scenario, then each mitigation of docs/incidents.md on its own: ``drains``, the
    incident's trigger (retry_storm_firewall.toml), or ``holds``, the loop that holds itself
    (retry_storm_firewall_holds.toml)."""
    if which == "holds":
        return holds_cases()
    if which != "drains":
        raise LoadkitError(f"firewall scenario {which!r}: expected 'drains' or 'holds'")
    return [
        ReplayCase("as shipped", "incident2b", {}, {}, "platform-default buffer, 13,000 sessions, 60 s UDP timeout"),
        ReplayCase("larger buffer", "incident2b-rcvbuf", {"dns_rcvbuf_bytes": 8 * 1024 * 1024}, {},
                   "unbound so-rcvbuf 8 MiB: the bursts no longer overflow it"),
        ReplayCase("shorter UDP timeout", "incident2b-timeout", {"firewall_udp_timeout_s": 10.0}, {},
                   "sessions live 10 s instead of 60 s"),
        ReplayCase("larger table", "incident2b-table", {"firewall_sessions": 40000}, {},
                   "40,000 sessions instead of 13,000"),
        ReplayCase("retry budget", "incident2b-budget", {}, {"dns-retry-budget": 0.05},
                   "clients retry at most 5 % of their originals over 10 s"),
    ]


def holds_cases() -> list[ReplayCase]:
    """retry_storm_firewall_holds.toml as shipped, then each of its mitigations on its own, and two
    changes that admit more and so do not help."""
    def case(label: str, release: str, lab: dict, options: dict, what: str) -> ReplayCase:
        return ReplayCase(label, release, lab, options, what, HOLDS)

    return [
        case("as shipped", "incident2c", {}, {}, "8 MiB so-rcvbuf at 0.02 core, 12,000 sessions of 3 s"),
        case("default buffer", "incident2c-rcvbuf", {"dns_rcvbuf_bytes": 0}, {},
             "the platform's receive buffer: answers wait a fraction of a second"),
        case("table admits less", "incident2c-admit", {"firewall_sessions": 3000, "firewall_udp_timeout_s": 2.0},
             {}, "3,000 sessions of 2 s admit 1,500 new flows/s, less than the server serves (and the "
                 "base load's 2,400 sessions fit)"),
        case("retry budget", "incident2c-budget", {}, {"dns-retry-budget": 0.1},
             "clients retry at most 10 % of their originals over 10 s"),
        case("larger table", "incident2c-table", {"firewall_sessions": 40000}, {},
             "40,000 sessions: the table never fills, the server's own storm remains"),
        case("shorter UDP timeout", "incident2c-timeout", {"firewall_udp_timeout_s": 1.0}, {},
             "sessions of 1 s admit 12,000 new flows/s: more, not less"),
    ]


def lab_settings(case: ReplayCase) -> dict[str, Any]:
    """The LabConfig fields of the case's lab: the scenario's ``[lab]`` table, then the case's."""
    return {**scenario(case.path).get("lab", {}), **case.lab}


def profile(status: LabStatus, case: ReplayCase, duration: str | None = None) -> dict[str, Any]:
    """The scenario as a profile dict (TOML tables) aimed at the lab of ``status``: its firewalled
    DNS endpoint, names file, receive-queue socket and unbound process; the case's options."""
    if status.firewall is None:
        raise LoadkitError("the firewall replay needs a lab with its firewall (--firewall-sessions)")
    p = copy.deepcopy(scenario(case.path))
    p["run"]["release"] = case.release
    if duration:
        p["run"]["duration"] = duration
    p["targets"]["dns"] = f"{status.firewall.dns.host}:{status.firewall.dns.port}"
    options = p["load"].setdefault("options", {})
    options.update(case.options)
    options["dns-names-file"] = status.names_file
    p.setdefault("collect", {})["udp_ports"] = [status.firewall.dns.port]
    conf = re.escape(str(Path(status.dir) / "conf"))
    p["collect"]["groups"] = {"unbound": f"cmdline:unbound -d -c {conf}/unbound\\.conf"}
    p["lab"] = lab_settings(case)
    return p


def _rcvbuf_bytes(lab: dict[str, Any]) -> float:
    """The server socket's sk_rcvbuf: an so-rcvbuf the kernel doubles (unbound forces it past
    net.core.rmem_max as root), else the platform default."""
    if lab.get("dns_rcvbuf_bytes"):
        return 2.0 * float(lab["dns_rcvbuf_bytes"])
    try:
        return float(Path(DEFAULT_RCVBUF_PATH).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 212_992.0  # Linux's default


def predict(case: ReplayCase, status: LabStatus | None = None, capacity_qps: float | None = None) -> FirewallResult:
    """The model's answer for the case before any run: the table's size and timeout and the
    server's receive buffer from the case's lab settings, the server's capacity from the lab's
    calibration (``status``, or ``capacity_qps``), the demand and retry options from the profile."""
    lab = lab_settings(case)
    # what the profile leaves out, the DNS generator's defaults (as the run will use)
    options = {**DNS_OPTION_DEFAULTS, **scenario(case.path)["load"].get("options", {}), **case.options}
    if capacity_qps is None and status is not None and status.dns_cpu is not None:
        capacity_qps = status.dns_cpu.capacity_qps
    delay = buffer_datagrams(_rcvbuf_bytes(lab)) / capacity_qps if capacity_qps else 0.0
    budget = float(options["dns-retry-budget"])
    return firewall_model(float(options.get("dns-rate", 1.0)), float(lab["firewall_sessions"]),
                          float(lab["firewall_udp_timeout_s"]), port_policy=options["dns-port-policy"],
                          retries_n=int(options["dns-retries"]), capacity_qps=capacity_qps,
                          queue_delay_s=delay, stub_timeout_s=float(options["dns-timeout"]),
                          retry_budget=budget if budget > 0 else None)  # 0: no budget, as for the generator


def outcome(run_dir: str | Path, predicted: FirewallResult | None = None) -> dict[str, Any]:
    """What a replay run measured, beside what the model predicted for it: the table's peak and
    size, new flows the firewall dropped, retries, queries failed, the longest stretch of intervals
    with goodput below half after the last burst, and the run's metastability verdict."""
    from loadkit.model.firewall import fit_firewall
    from loadkit.model.retries import retry_amplification, trigger_window
    from loadkit.record import counters
    from loadkit.record.reader import load_run

    run = load_run(run_dir)
    res = fit_firewall(run)
    amp = retry_amplification(run)
    busy = amp[amp["offered_qps"] > 0]
    end = trigger_window(run, amp)[1]
    after = busy[busy.index.to_numpy(dtype=float) - busy["interval_s"].to_numpy(dtype=float) >= end]
    failed = counters.total(run, "dns.timeouts") if counters.has_metric(run, "dns.timeouts") else 0.0
    return {
        "run_id": run.run_id,
        "table_peak_n": res.measured_max_entries_n,
        "table_size_n": res.size_n,
        "firewall_drops_n": res.measured_drops_n,
        "retries_n": float((busy["retry_qps"] * busy["interval_s"]).sum()),
        "queries_failed_n": failed,
        "goodput_below_half_s": _longest_low_goodput_s(after),
        "measured_waste_share": res.measured_waste_share,
        "verdict": res.verdict,
        "predicted_verdict": (predicted or res).predicted_verdict,
        "prediction": (predicted or res).waste.summary(),
    }


def _longest_low_goodput_s(amp: Any) -> float:
    """Longest run of consecutive intervals answering under half of what they offered."""
    best = cur = 0.0
    for ratio, dt in zip(amp["goodput_ratio"].fillna(0.0), amp["interval_s"]):
        cur = cur + float(dt) if ratio < 0.5 else 0.0
        best = max(best, cur)
    return best
