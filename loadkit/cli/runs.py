"""`loadkit runs list | show RUN`: the catalog of run records."""

from __future__ import annotations

import argparse
import json
import time

from loadkit.cli._common import add_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "runs", None, "list and show run records (DuckDB over the Parquet files)")
    actions = p.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    lst = add_command(actions, "list", _list, "one line per run, oldest first")
    lst.add_argument("--release", help="only runs of this release")
    lst.add_argument("--scenario", help="only runs of this scenario")
    lst.add_argument("--dir", default="runs", help="runs directory (default: ./runs)")
    lst.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    show = add_command(actions, "show", _show, "one run: manifest, requests, failures, events, gates")
    show.add_argument("run", help="run id, unique prefix of one, or a run directory")
    show.add_argument("--dir", default="runs", help="runs directory (default: ./runs)")
    show.add_argument("--json", action="store_true", help="print JSON")
    export = add_command(actions, "export", _export, "write a run's tables as CSV files (one per table)",
                         "Write every table of a run record as DIR/TABLE.csv (requests, failures, latency, "
                         "generator, groups, net, sockets, system, firewall; those the run has), its events as "
                         "events.csv (detail as JSON) and its manifest.json, for a spreadsheet or another tool.")
    export.add_argument("run", help="run id, unique prefix of one, or a run directory")
    export.add_argument("--csv", required=True, metavar="DIR", help="directory to write the CSV files to (made if missing)")
    export.add_argument("--dir", default="runs", help="runs directory (default: ./runs)")
    export.add_argument("--json", action="store_true", help="print the files written as JSON")


def _list(args: argparse.Namespace) -> int:
    from loadkit.record.catalog import list_runs

    runs = list_runs(args.dir, release=args.release, scenario=args.scenario)
    if args.json:
        for row in runs.to_dict(orient="records"):
            print(json.dumps(row, default=str))
        return 0
    if runs.empty:
        print("no runs")
        return 0
    print(f"{'run':40} {'scenario':20} {'release':12} {'status':11} {'started (UTC)':19} "
          f"{'dur s':>6} {'requests':>9} {'fail':>7}  gates")
    for r in runs.itertuples():
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.started_unix_s))
        print(f"{r.run_id:40} {r.scenario:20} {r.release:12} {r.status:11} {started:19} "
              f"{r.duration_s:6.0f} {r.requests_n:9d} {r.failures_n:7d}  {r.gates}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from loadkit.record.catalog import show_run

    info = show_run(args.run, args.dir)
    m = info["manifest"]
    if args.json:
        out = dict(info, requests=info["requests"].to_dict(orient="records"),
                   failures=info["failures"].to_dict(orient="records"))
        print(json.dumps(out, default=str, indent=2))
        return 0
    started, ended = m.get("started_unix_s") or 0, m.get("ended_unix_s") or 0
    print(f"run       {m.get('run_id')}  ({info['path']})")
    print(f"scenario  {m.get('scenario')}   release {m.get('release')}   status {m.get('status')}")
    print(f"started   {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))}"
          + (f"   duration {ended - started:.1f} s" if ended else "   (not ended)"))
    print(f"targets   {', '.join(m.get('targets') or [])}")
    if info.get("incomplete"):
        print(f"record    {info['incomplete']}")
    if not info["requests"].empty:
        print("\nrequests")
        print(info["requests"].to_string(index=False))
    latency = info.get("latency") or {}
    labels = [v for k, v in latency.items() if k.endswith("_label")]
    if labels:
        # the same figures the latency gates compare: every request, the whole run
        print("\nlatency, every request over the whole run")
        for label in labels:
            print("  " + label)
    if not info["failures"].empty:
        print("\nfailures by class")
        print(info["failures"].to_string(index=False))
    print("\nevents    " + ", ".join(f"{k} {v}" for k, v in sorted(info["event_counts"].items())))
    for e in info["notable_events"]:
        print(f"  {e.get('kind')} {e.get('source')}: {json.dumps(e.get('detail'))}")
    gates = m.get("gates") or []
    if gates:
        from loadkit.run.gates import describe

        print("\ngates")
        for g in gates:
            print("  " + describe(g))
    return 0


def _export(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import pandas as pd

    from loadkit.errors import RecordError
    from loadkit.record.catalog import find_run
    from loadkit.record.reader import load_run
    from loadkit.schema import RUN_LAYOUT, TABLE_RECORDS

    run_dir = find_run(args.run, args.dir)
    run = load_run(run_dir)
    out = Path(args.csv)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in TABLE_RECORDS:
            table = getattr(run, name)
            if table.empty:
                continue
            table.to_csv(out / f"{name}.csv", index=False)
            written.append(f"{name}.csv")
        if run.events:
            # nested details stay readable in one cell as JSON
            events = pd.DataFrame([dict(e, detail=json.dumps(e.get("detail"), default=str)) for e in run.events])
            events.to_csv(out / "events.csv", index=False)
            written.append("events.csv")
        shutil.copyfile(run_dir / RUN_LAYOUT["manifest"], out / "manifest.json")
        written.append("manifest.json")
    except OSError as err:
        raise RecordError(f"cannot write the CSV files to {out}: {err.strerror or err}") from err
    if args.json:
        print(json.dumps({"run_id": run.run_id, "dir": str(out), "files": written}))
    else:
        print(f"{run.run_id}: wrote {', '.join(written)} to {out}")
    return 0
