"""Headroom fidelity: does a fit on about half the capacity predict the real fall-over?

Drives the ramp with loadkit's own path, as a user would: ``loadkit run`` of a profile whose
Locust IMAP user (``locustfiles/imap_storm.py``) logs in through haproxy and holds its sessions,
new logins arriving open loop at ``--step`` per second, while the collector samples every proxy's
memory cgroup and its sessions (``[collect] groups``). On a lab of its own (``--proxies``
dovecot proxies, ``--proxy-memory`` each, round robin) on ``--address``:

1. the **fit run** stops itself (``[abort] cgroup_memory_fraction``) when a proxy's memory is
   half way from its idle charge to its limit, so the fit sees about half the capacity;
   :func:`loadkit.model.fit_headroom` on that run record gives the prediction and its 95 %
   interval;
2. the **fall-over run** ramps the same way with no memory abort until a proxy's OOM killer
   acts; the measured fall-over is the total of sessions the collector saw held just before the
   first OOM kill (``measured_first_failure_sessions`` of the same model on that record);
3. prints predicted beside measured, whether the interval covers it, and last
   ``error_pct=<(predicted-measured)/measured*100>``.

Bounded: at most ``--max-sessions`` users and ``--max-seconds`` per run. The lab is brought down
at the end; ``loadkit run`` ends its own Locust process. On a shared 2-core machine logins can
be slow; the figure is the ratio, not a speed.

    python benchmarks/headroom_fidelity.py [--proxies 3] [--proxy-memory 256MiB] [--address 127.0.7.1]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loadkit.errors import LoadkitError
from loadkit.lab import Lab, LabConfig, parse_bytes
from loadkit.model import fit_headroom
from loadkit.record.reader import load_run

REPO = Path(__file__).resolve().parent.parent

PROFILE = """
[run]
scenario = "{scenario}"
release = "fidelity"
duration = "{duration_s}s"
stop_timeout = "5s"

[targets]
imap = "{host}:{port}"
allowlist = ["127.0.0.0/8"]

[load]
locustfile = "{repo}/locustfiles/imap_storm.py"
host = "imap"
users = {users}
spawn_rate = {users}
options = {{ mail-arrival = "rate:{rate}", mail-dwell = "idle", mail-reconnect = "backoff", mail-reconnect-delay = 1.0 }}

[collect]
groups = {{ {groups} }}
interval_s = 0.5

[caps]
max_users = {users}
max_duration_s = "1h"
max_rate_qps = 100000
{abort}"""


def _profile(path: Path, lab: Lab, args: argparse.Namespace, scenario: str, abort_fraction: float,
             duration_s: float) -> None:
    status = lab.status()
    groups = ", ".join(
        f'{p.name} = "cgroup:{p.cgroup}@{p.imap.port},{p.pop3.port}"' for p in status.proxies)
    path.write_text(PROFILE.format(
        scenario=scenario, duration_s=int(duration_s), host=status.imap.host, port=status.imap.port,
        repo=REPO, users=args.max_sessions, rate=args.step, groups=groups,
        abort=f"\n[abort]\ncgroup_memory_fraction = {abort_fraction}\n" if abort_fraction else ""))


def _loadkit_run(profile: Path, out: Path, work: Path, timeout_s: float) -> Path:
    """``loadkit run PROFILE`` in its own process; the run directory it wrote."""
    before = set(out.iterdir()) if out.exists() else set()
    proc = subprocess.run([sys.executable, "-m", "loadkit", "run", str(profile), "--out", str(out)],
                          cwd=work, capture_output=True, text=True, timeout=timeout_s)
    new = sorted(set(out.iterdir()) - before) if out.exists() else []
    if proc.returncode not in (0, 1) or not new:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise LoadkitError(f"loadkit run {profile.name} exited {proc.returncode}: {' | '.join(tail)}")
    return new[-1]


def _idle_fraction(lab: Lab) -> float:
    """The proxies' idle memory as a fraction of their limit (the largest)."""
    fractions = [p.memory_bytes / p.limit_bytes for p in lab.status().proxies
                 if p.memory_bytes and p.limit_bytes]
    if not fractions:
        raise LoadkitError("the proxies run without memory cgroups: this benchmark needs limits")
    return max(fractions)


def measure(args: argparse.Namespace, lab: Lab, work: Path) -> tuple[object, float]:
    out = work / "runs"
    idle = _idle_fraction(lab)
    half = idle + 0.5 * (1.0 - idle)
    print(f"idle memory {idle:.0%} of the limit: the fit run stops at {half:.0%}", flush=True)
    fit_profile = work / "fit.toml"
    _profile(fit_profile, lab, args, "headroom_fidelity_fit", round(half, 3), args.max_seconds)
    fit_dir = _loadkit_run(fit_profile, out, work, args.max_seconds + 120)
    result = fit_headroom(load_run(fit_dir))
    for p in result.proxies:
        print(f"  {p.summary()}")
    print(f"predicted: {result.summary()}", flush=True)
    if args.keep_run is not None:
        shutil.copytree(fit_dir, args.keep_run, dirs_exist_ok=True)

    # long enough to pass the predicted fall-over by a quarter, not longer: after the first OOM
    # kill the run has nothing more to measure
    fall_s = min(args.max_seconds, 1.25 * result.all_fail_sessions / args.step + 20.0)
    fall_profile = work / "fall.toml"
    _profile(fall_profile, lab, args, "headroom_fidelity_fall_over", 0, fall_s)
    fall_dir = _loadkit_run(fall_profile, out, work, args.max_seconds + 120)
    measured = fit_headroom(load_run(fall_dir)).measured_first_failure_sessions
    if measured is None:
        raise LoadkitError(f"no OOM kill within {args.max_sessions} sessions / {args.max_seconds:.0f} s")
    return result, float(measured)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default="127.0.7.1", help="loopback address for the lab")
    ap.add_argument("--proxies", type=int, default=3)
    ap.add_argument("--proxy-memory", default="256MiB")
    ap.add_argument("--step", type=float, default=8.0, help="new logins per second (open loop)")
    ap.add_argument("--max-sessions", type=int, default=2000, help="Locust users, at most one session each")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="length of each run at most")
    ap.add_argument("--keep-run", type=Path, default=None, metavar="DIR",
                    help="keep the run directory the fit used (collector group samples) here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="headroom-fidelity-") as tmp:
        lab = Lab(LabConfig(dir=Path(tmp) / "lab", address=args.address, proxies=args.proxies,
                            proxy_memory_bytes=parse_bytes(args.proxy_memory),
                            accounts=min(99999, args.max_sessions + 100)))
        try:
            status = lab.up()
            print(f"lab: {args.proxies} proxies × {args.proxy_memory} on {status.imap}", flush=True)
            result, measured = measure(args, lab, Path(tmp))
        except LoadkitError as err:
            print(f"headroom_fidelity: {err}", file=sys.stderr)
            return 2
        finally:
            lab.down()
    predicted = result.first_failure_sessions
    lo, hi = result.first_failure_ci95
    covered = "covers" if lo <= measured <= hi else "does NOT cover"
    print(f"predicted={predicted:.0f} sessions at the first failure (95 % CI {lo:.0f}–{hi:.0f}; all "
          f"{args.proxies} proxies fall over at {result.all_fail_sessions:.0f}), fitted on up to "
          f"{result.max_fraction_observed:.0%} of it")
    print(f"measured={measured:.0f} sessions held when the first OOM kill came; the interval {covered} it")
    print(f"error_pct={round((predicted - measured) / measured * 100, 1) + 0.0:.1f}")  # no "-0.0"
    return 0


if __name__ == "__main__":
    sys.exit(main())
