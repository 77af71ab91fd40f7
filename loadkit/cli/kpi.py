"""`loadkit kpi review`: a production KPI's daily pattern, spikes and what each polling
interval would have seen of them, from a CSV file or a Prometheus range query."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from loadkit.cli._common import add_command, finite_positive
from loadkit.errors import LoadkitError
from loadkit.model.anomalies import interval_label
from loadkit.model.kpi import POLL_MODES, KpiReview, delay_text, review_kpi, zone_label
from loadkit.model.kpi_source import (
    KpiSourceError,
    parse_duration_s,
    parse_time_unix_s,
    parse_utc_offset_s,
    query_prometheus,
    read_kpi_csv,
)

#: spikes listed in the table (all of them are in --json)
MAX_SPIKE_ROWS = 20


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "kpi", None, "production KPIs: daily pattern, spikes, polling detection delay",
                    "Review KPI series loadkit did not record (a CSV file or a Prometheus range query).")
    kpi_sub = p.add_subparsers(dest="kpi_command", metavar="ACTION", required=True)
    r = add_command(kpi_sub, "review", _review,
                    "daily pattern, spikes, and what 1 h / 15 min / 1 min polling would have seen",
                    "Learn the series' daily pattern (median by time of day over the days, smoothed), flag "
                    "the spikes above it, group spikes that recur at one time of day, and say which of them "
                    "a KPI polled every 1 h, 15 min or 1 min would have shown, and how late. Times are UTC unless "
                    "--utc-offset puts them on a local clock.")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path, metavar="FILE",
                     help="timestamp,value per line (ISO 8601 or unix seconds; optional header; # comments)")
    src.add_argument("--prometheus", metavar="URL",
                     help="Prometheus base URL (http://127.0.0.1:9090); its host must be in the allowlist")
    q = r.add_argument_group("Prometheus range query")
    q.add_argument("--query", metavar="PROMQL", help="a PromQL expression returning one series")
    q.add_argument("--start", default="now-7d", metavar="TIME",
                   help="ISO 8601, unix seconds or now-DURATION (default %(default)s)")
    q.add_argument("--end", default="now", metavar="TIME", help="(default %(default)s)")
    q.add_argument("--step", default="1m", metavar="DURATION", help="resolution, e.g. 15s, 1m (default %(default)s)")
    m = r.add_argument_group("model")
    m.add_argument("--polling", default="1h,15m,1m", metavar="LIST",
                   help="polling intervals to judge, comma-separated (default %(default)s)")
    m.add_argument("--mode", default="mean", choices=POLL_MODES,
                   help="what a poll reads: the mean over its interval (a counter's rate) or the value at "
                   "the poll (a gauge) (default %(default)s)")
    m.add_argument("--z", type=finite_positive, default=6.0, help="spike threshold in robust σ (default %(default)s)")
    m.add_argument("--longest-spike", default="40m", metavar="DURATION",
                   help="longest excursion still called a spike; the baseline is smoothed over 3× it "
                   "(default %(default)s)")
    m.add_argument("--utc-offset", default="+00:00", metavar="+HH:MM",
                   help="the local clock of days, times of day and poll boundaries (default %(default)s; "
                   "a negative one as --utc-offset=-05:00)")
    m.add_argument("--name", default=None, help="the KPI's name in the output (default: from the source)")
    r.add_argument("--json", action="store_true", help="print the review as one JSON object instead of a table")
    r.add_argument("--out", type=Path, metavar="FILE.json", help="also write the review as JSON here")


def _load(args: argparse.Namespace) -> tuple[pd.Series, str]:
    if args.csv is not None:
        if args.query:
            raise KpiSourceError("--query goes with --prometheus, not --csv")
        return read_kpi_csv(args.csv, name=args.name), str(args.csv)
    if not args.query:
        raise KpiSourceError("--prometheus needs --query PROMQL")
    now = time.time()
    start = parse_time_unix_s(args.start, "--start", now)
    end = parse_time_unix_s(args.end, "--end", now)
    step = parse_duration_s(args.step, "--step")
    series = query_prometheus(args.prometheus, args.query, start, end, step, name=args.name)
    return series, f"{args.prometheus} {args.query}"


def _review(args: argparse.Namespace) -> int:
    polling = tuple(parse_duration_s(p, "--polling interval") for p in args.polling.split(",") if p.strip())
    if not polling:
        raise LoadkitError("--polling needs at least one interval, e.g. 1h,15m,1m")
    longest = parse_duration_s(args.longest_spike, "--longest-spike")
    parse_utc_offset_s(args.utc_offset)  # refused before a Prometheus query is sent
    series, source = _load(args)
    review = review_kpi(series, z_threshold=args.z, longest_spike_s=longest, polling_s=polling,
                        mode=args.mode, utc_offset_s=parse_utc_offset_s(args.utc_offset),
                        name=args.name or "", source=source)
    if args.out is not None:
        try:
            args.out.write_text(review.to_json() + "\n")
        except OSError as err:
            raise LoadkitError(f"cannot write {args.out}: {err.strerror or err}") from err
    if args.json:
        print(json.dumps(review.to_dict(), allow_nan=False))
    else:
        print(render_table(review))
    return 0


def _clock(ts_unix_s: float, offset_s: float, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return pd.Timestamp(ts_unix_s + offset_s, unit="s").strftime(fmt)


def render_table(r: KpiReview) -> str:
    """The review as text: header, pattern, spikes, one row per polling interval, notes."""
    off, zone = r.utc_offset_s, zone_label(r.utc_offset_s)
    lines = [f"KPI {r.name or '(unnamed)'}" + (f"  ({r.source})" if r.source else ""),
             f"  {r.points_n} points every {r.sample_interval_s:g} s from {_clock(r.start_unix_s, off)} to "
             f"{_clock(r.end_unix_s, off)} {zone} on {r.days_n} day{'s' if r.days_n != 1 else ''}, {r.coverage:.0%} present",
             (f"  daily pattern: {r.pattern_low:.4g} to {r.pattern_high:.4g}, peak at {r.pattern_peak_time} {zone}; "
              f"spread {r.spread:.4g}") if r.has_pattern else
             (f"  daily pattern: none beyond the noise (baseline {r.pattern_low:.4g} to {r.pattern_high:.4g}, "
              f"spread {r.spread:.4g})")]
    head = f"  spikes: {len(r.spikes)} above {r.z_threshold:g} σ"
    if r.daily_period is not None:
        d = r.daily_period
        start = f", starting {r.daily_start_time}" if r.daily_start_time else ""
        head += f"; daily at {d.time_of_day} {zone}{start} on {d.days_n} of {d.days_observed_n} days"
    lines.append(head)
    if r.spikes:
        lines.append(f"    {f'start ({zone})':<17} {'end':>5} {'peak':>10} {'score':>7}")
        for s in r.spikes[:MAX_SPIKE_ROWS]:
            lines.append(f"    {_clock(s.start_unix_s, off):<17} {_clock(s.end_unix_s, off, '%H:%M'):>5} "
                         f"{s.peak_value:>10.4g} {s.score:>6.1f}σ")
        if len(r.spikes) > MAX_SPIKE_ROWS:
            lines.append(f"    ... {len(r.spikes) - MAX_SPIKE_ROWS} more (--json lists all)")
    lines.append(f"  {'polling':<8} {'mode':<6} {'polls':>6} {'seen':>7} {'median delay':>13} "
                 f"{'strongest':>10} {'false alarms':>13}")
    for v in r.polling:
        label = interval_label(v.interval_s)
        if v.note:
            lines.append(f"  {label:<8} {v.mode:<6} {v.polls_n:>6}  {v.note}")
            continue
        delay = delay_text(v.median_delay_s) if v.median_delay_s is not None else "-"
        peak = f"{v.peak_score:.1f} σ" if v.peak_score == v.peak_score else "-"
        lines.append(f"  {label:<8} {v.mode:<6} {v.polls_n:>6} {f'{v.detected_n}/{len(v.delays_s)}':>7} "
                     f"{delay:>13} {peak:>10} {v.false_alarms_n:>13}")
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)
