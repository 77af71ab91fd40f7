"""`loadkit run PROFILE`: validate, check targets, run Locust, record, evaluate gates."""

from __future__ import annotations

import argparse
import json
import logging

from loadkit.cli._common import add_command


_EPILOG = """\
exit status:
  0  the run completed and every gate passed (or was not evaluated)
  1  a gate failed, or the run was aborted by a threshold in [abort]
  2  error: bad profile or option, a target outside the allowlist (nothing was sent),
     Locust failed to start, or the run was interrupted (SIGTERM/Ctrl-C; the record is
     completed with status "interrupted")

distributed runs:
  --workers N starts a master and N local workers. The master listens on --master-bind
  (default 127.0.0.1, this host only). To let workers on other hosts join, bind an address
  they can reach (or 0.0.0.0 / :: for every interface) and a fixed --master-port; on each
  remote host run
      locust -f <same locustfile(s)> --worker --master-host <this host> --master-port PORT
  with the profile's [load] options (the command is printed when the run starts). The bind
  address must be inside the allowlist (the profile's, else LOADKIT_ALLOWLIST, else
  loopback) unless it is a loopback address, 0.0.0.0 or ::, which are accepted as they are
  (without --workers there is no master to bind and nothing is checked). Remote workers check
  their own targets against their own LOADKIT_ALLOWLIST. With a [load] shape the master sets
  the users; for the DNS rate to follow the shape on a remote worker too, give it the
  LOADKIT_PROFILE_SHAPE value and -f line from the master's command (printed at start).

The run record is written to OUT/<run id>/ as the run goes (manifest.json, requests/,
failures/, generator/, samples/, events.jsonl, locust/). List records with 'loadkit runs list'.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "run", _run, "run a load-test profile with Locust and record it",
                    "Run a profile (TOML): resolve and allow every target before anything is sent, start "
                    "collectors, run Locust headless, write the run record, evaluate the gates.",
                    epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", help="profile TOML file, e.g. scenarios/smoke.toml, or the name of a shipped "
                   "scenario (loadkit scenario lists them)")
    p.add_argument("--release", help="release label (overrides [run] release)")
    p.add_argument("--out", default="runs", help="directory for run records (default: ./runs)")
    p.add_argument("--duration", help="run length, e.g. 30s or 5m (overrides [run] duration)")
    p.add_argument("--workers", type=int, default=0,
                   help="run Locust distributed: a master and N worker processes (default: one process)")
    p.add_argument("--master-bind", default=None, metavar="ADDR",
                   help="with --workers: address the master listens on for workers (default "
                   "127.0.0.1); must be in the allowlist unless it is loopback, 0.0.0.0 or ::")
    p.add_argument("--master-port", type=int, default=0, metavar="PORT",
                   help="with --workers: port the master listens on (default: a free port)")
    p.add_argument("--lab-dir", default=None,
                   help="lab directory whose status is recorded in the manifest when the profile "
                   "targets that lab (default: the running lab that serves a target)")
    p.add_argument("--json", action="store_true",
                   help="print the final summary (run id and directory, status, exit status, gates) as one "
                   "JSON object on stdout; progress stays on stderr")


def _run(args: argparse.Namespace) -> int:
    from loadkit.profile.profile import load_profile
    from loadkit.run.runner import plan_run, run_profile

    profile = load_profile(_profile_path(args.profile)).with_overrides(release=args.release,
                                                                       duration=args.duration)
    # workers, master bind and every target checked once; a refusal comes first, before the
    # lab is even looked at, and the resolved targets are what the run uses
    plan = plan_run(profile, args.workers, args.master_bind, args.master_port)
    lab = _lab_status(plan.targets, args.lab_dir)
    result = run_profile(plan, out_dir=args.out, lab=lab)
    if args.json:
        print(json.dumps({"run_id": result.run_dir.name, "run_dir": str(result.run_dir), "status": result.status,
                          "exit_code": result.exit_code, "gates": result.gates}, default=str))
    return result.exit_code


def _lab_status(targets: dict, lab_dir: str | None) -> dict:
    """The lab's status when one of the profile's targets is a running lab's endpoint, else {}.

    Only the command line looks at the lab: the runner records what it is given. The lab is
    found from the targets (:func:`loadkit.defaults.find_lab`), not the working directory,
    unless ``--lab-dir`` names it.
    """
    from pathlib import Path

    from loadkit import defaults

    if lab_dir:
        directory = Path(lab_dir)
    else:
        found = [lab for t in targets.values() if (lab := defaults.find_lab(t.address, t.port))]
        directory = found[0].dir if found else defaults.lab_dir()
    if not directory.is_dir():
        return {}
    try:
        from loadkit.lab import Lab

        status = Lab.from_dir(directory).status()
    except Exception as err:  # a broken lab directory must not stop a run against staging
        logging.getLogger(__name__).debug("no lab status from %s: %s", directory, err)
        return {}
    if not status.running:
        return {}
    endpoints = {(e.host, e.port) for e in (status.dns, status.imap, status.pop3)}
    if status.firewall is not None:  # the DNS endpoint behind the lab's firewall
        endpoints.add((status.firewall.dns.host, status.firewall.dns.port))
    if any((t.address, t.port) in endpoints for t in targets.values()):
        return status.to_dict()
    return {}


def _profile_path(given: str) -> str:
    """A profile file as given; a name that is no file (``burst_retry_storm``, ``smoke.toml``) is
    the shipped scenario of that name, so an installed loadkit runs its scenarios without a checkout."""
    from pathlib import Path

    from loadkit import resources
    from loadkit.errors import ProfileError

    name = given.removesuffix(".toml")
    if Path(given).is_file() or "/" in given:
        return given
    if name in resources.shipped_names("scenarios"):
        return str(resources.scenario(name))
    raise ProfileError(f"profile {given} not found (no such file, and loadkit ships no scenario of that name: "
                       f"{', '.join(resources.shipped_names('scenarios'))})")
