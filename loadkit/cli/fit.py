"""`loadkit fit KIND RUN...`: fit a model to recorded runs, print its summary, write its JSON.

Each KIND is a subcommand with only its own options (`loadkit fit udp-burst --help`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loadkit.cli._common import add_command, finite, finite_non_negative, finite_positive
from loadkit.errors import LoadkitError, ModelError

KINDS = ("headroom", "usl", "udp-burst", "retries", "anomalies", "firewall", "source-limit")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "fit", None, f"fit a model ({', '.join(KINDS)}) to recorded runs",
                    "Fit a model to one or more run directories, print its one-line summary and optionally write "
                    "the result as JSON. headroom combines all runs given; the other kinds fit each run on its own. "
                    "'loadkit fit KIND --help' lists the options of one kind.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, (help_line, add_options) in _KIND_OPTIONS.items():
        k = add_command(kinds, kind, _run, help_line, help_line[0].upper() + help_line[1:] + ".")
        k.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directory")
        k.add_argument("--out", type=Path, metavar="FILE.json", help="write the result(s) as JSON here")
        k.add_argument("--json", action="store_true",
                       help="print the result(s) as JSON on stdout instead of the summary")
        add_options(k)


def _headroom_options(h: argparse.ArgumentParser) -> None:
    h.add_argument("--policy", default="roundrobin", choices=("roundrobin", "leastconn", "weighted"),
                   help="load-balancer policy (default %(default)s)")
    h.add_argument("--weight", action="append", default=[], metavar="PROXY=W",
                   help="balancer weight of one proxy (repeat per proxy)")
    h.add_argument("--admission-fraction", type=finite, default=0.9, metavar="F",
                   help="admission limit keeps each proxy under F × its memory limit (default %(default)s)")
    h.add_argument("--forecast-peak", type=finite, default=None, metavar="SESSIONS",
                   help="forecast peak of concurrent sessions, for headroom and proxies needed")
    h.add_argument("--limit-bytes", type=finite_positive, default=None, metavar="BYTES",
                   help="memory each proxy may use when the run recorded no cgroup limit")
    h.add_argument("--reconnect-overhead", type=finite, default=0.0, metavar="F",
                   help="extra sessions per lost session while clients reconnect (default 0)")


def _usl_options(u: argparse.ArgumentParser) -> None:
    u.add_argument("--concurrency-metric", default="users", metavar="GAUGE",
                   help="generator gauge giving each interval's concurrency (default %(default)s)")


def _udp_burst_options(b: argparse.ArgumentParser) -> None:
    b.add_argument("--rcvbuf", type=finite, default=None, metavar="BYTES",
                   help="each server socket's sk_rcvbuf in bytes (ss -m 'rb'; twice so-rcvbuf); default: as "
                   "the collector read it, else the recorded so-rcvbuf doubled")
    b.add_argument("--bytes-per-datagram", type=finite, default=832.0, metavar="BYTES",
                   help="buffer charge per datagram (default %(default)s, a small query on loopback)")
    b.add_argument("--burst", type=finite, default=None, metavar="QUERIES",
                   help="burst size the headline and so-rcvbuf are for (default: the run's largest burst)")
    b.add_argument("--burst-window", type=finite, default=None, metavar="SECONDS",
                   help="duration of that burst (default: the run's, as the bursts really left)")
    b.add_argument("--port", type=int, default=None,
                   help="the server's UDP port among watched sockets (default: the run's udp:// target)")


def _trigger_end_option(r: argparse.ArgumentParser) -> None:
    r.add_argument("--trigger-end", type=finite, default=None, metavar="UNIX_S",
                   help="when the trigger ended (default: the run's phase events, else the end of its last "
                   "burst, else where the original rate fell back)")


def _retries_options(r: argparse.ArgumentParser) -> None:
    _trigger_end_option(r)
    r.add_argument("--min-post", type=finite_non_negative, default=2.0, metavar="SECONDS",
                   help="run time needed after the trigger to judge it (default %(default)s); a window "
                   "shorter than the clients' retry horizon is judged, with a caveat")


def _firewall_options(f: argparse.ArgumentParser) -> None:
    _trigger_end_option(f)
    f.add_argument("--size", type=finite_positive, default=None, metavar="ENTRIES",
                   help="session-table size (default: from the run's firewall samples)")
    f.add_argument("--udp-timeout", type=finite_positive, default=None, metavar="SECONDS",
                   help="a UDP session's timeout (default: from the run's firewall samples)")
    f.add_argument("--port-policy", default=None, choices=("per-attempt", "per-query", "fixed"),
                   help="the clients' source ports: a new flow per attempt, per query, or fixed sockets "
                        "(default: the run's --dns-port-policy)")


def _anomalies_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--table", default="net", choices=("net", "groups", "sockets", "system", "requests"),
                   help="sample table holding the KPI (default %(default)s)")
    a.add_argument("--column", default="udp_rcvbuf_errors_n", help="KPI column (default %(default)s)")
    a.add_argument("--group", default=None, help="only this group (groups table)")
    a.add_argument("--delta", action="store_true",
                   help="use the per-interval increase (for cumulative counters)")
    a.add_argument("--z", type=finite_positive, default=6.0, help="spike threshold in robust σ (default %(default)s)")
    a.add_argument("--longest-spike", type=finite_positive, default=3600.0, metavar="SECONDS",
                   help="longest spike to find; the baseline window is three times it (default %(default)s)")


def _source_limit_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--sources", type=int, default=None, metavar="N",
                   help="number of sources (default: the run's dns-sources, with --source-qps)")
    s.add_argument("--source-qps", type=finite, default=None, metavar="QPS",
                   help="queries per second per source (default: the run's dns-source-qps)")
    s.add_argument("--arrival", default="poisson", choices=("poisson", "generator"),
                   help="arrivals per source for the recommendation: independent Poisson (real clients) or "
                   "loadkit's own sender (default %(default)s)")
    s.add_argument("--applied-limit", type=int, default=None, metavar="QPS",
                   help="per-IP limit the run was made with (default: the profile's [lab] dns_ratelimit_qps)")
    s.add_argument("--target-share", type=finite, default=0.001, metavar="F",
                   help="largest share of sources the recommended limit may refuse in a second "
                   "(default %(default)s)")


#: each KIND's help line and the options only it takes (KINDS is their order)
_KIND_OPTIONS = {
    "headroom": ("proxies' memory per session, the fall-over concurrency, N+1 and the admission limit "
                 "(all runs combined)", _headroom_options),
    "usl": ("Universal Scalability Law and the latency knee", _usl_options),
    "udp-burst": ("drain rate inside bursts, loss per burst and the so-rcvbuf needed", _udp_burst_options),
    "retries": ("retry amplification after a trigger: stable, recovers, not recovered or metastable",
                _retries_options),
    "anomalies": ("spikes, a daily pattern and level shifts in a KPI, and polling delays", _anomalies_options),
    "firewall": ("a stateful firewall's session-table occupancy, predicted beside measured", _firewall_options),
    "source-limit": ("per-source rates and the per-IP limit that refuses few sources", _source_limit_options),
}
assert tuple(_KIND_OPTIONS) == KINDS


def _weights(specs: list[str]) -> dict[str, float] | None:
    if not specs:
        return None
    weights = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ModelError(f"--weight {spec!r}: expected PROXY=NUMBER, e.g. proxy1=2") from None
        if not sep or not name:
            raise ModelError(f"--weight {spec!r}: expected PROXY=NUMBER, e.g. proxy1=2")
    return weights


def _fit_one(kind: str, run, args: argparse.Namespace):
    from loadkit import model

    if kind == "usl":
        return model.fit_usl_run(run, args.concurrency_metric)
    if kind == "udp-burst":
        return model.fit_udp_burst(run, rcvbuf_bytes=args.rcvbuf, bytes_per_datagram=args.bytes_per_datagram,
                                   burst_n=args.burst, burst_window_s=args.burst_window, port=args.port)
    if kind == "retries":
        return model.metastability(run, args.trigger_end, min_post_s=args.min_post)
    if kind == "firewall":
        return model.fit_firewall(run, timeout_s=args.udp_timeout, size_n=args.size, port_policy=args.port_policy,
                                  trigger_end_unix_s=args.trigger_end)
    if kind == "anomalies":
        series = model.kpi_series(run, args.table, args.column, group=args.group, delta=args.delta)
        return model.find_anomalies(series, z_threshold=args.z, longest_spike_s=args.longest_spike,
                                    name=args.column)
    if kind == "source-limit":
        if (args.sources is None) != (args.source_qps is None):
            raise ModelError("--sources and --source-qps go together")
        return model.fit_source_limit(run, sources_n=args.sources, source_qps=args.source_qps,
                                      arrival=args.arrival, applied_limit_qps=args.applied_limit,
                                      target_share=args.target_share)
    raise AssertionError(kind)  # pragma: no cover


def _print_summaries(runs: list, results: list) -> None:
    for run, result in zip(runs, results):
        prefix = f"{run.run_id}: " if run is not None else ""
        summary = result.summary()
        print(prefix + summary)
        # caveats (extrapolation, lower bound, not significant) in words, under their summary
        for caveat in getattr(result, "caveats", None) or []:
            if caveat not in summary:
                print(f"  caveat: {caveat}")


def _run(args: argparse.Namespace) -> int:
    from loadkit import model
    from loadkit.record.reader import load_run

    runs = [load_run(path) for path in args.runs]
    if args.kind == "headroom":
        results = [model.fit_headroom(
            runs, policy=args.policy, weights=_weights(args.weight),
            admission_fraction=args.admission_fraction, forecast_peak_sessions=args.forecast_peak,
            limit_bytes=args.limit_bytes, reconnect_overhead=args.reconnect_overhead)]
    else:
        results = [_fit_one(args.kind, run, args) for run in runs]
    data = results[0].to_dict() if len(results) == 1 else [r.to_dict() for r in results]
    if args.json:  # the same JSON as --out, for a pipe (jq); the summaries would break it
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        _print_summaries(runs if len(results) > 1 else [None], results)
    if args.out:
        try:
            args.out.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        except OSError as err:
            raise LoadkitError(f"cannot write {args.out}: {err.strerror}") from err
    return 0
