"""`loadkit demo [incidents [N ...]]`: the whole story with one command (``make demo``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from loadkit.cli._common import add_command
from loadkit.errors import ProfileError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", _demo, "bring up a lab, run a DNS burst and an IMAP storm to fall-over, build "
                    "the report, bring the lab down",
                    "The demo: a lab of its own, the shipped DNS burst scenario, an IMAP storm that ramps until the "
                    "proxies fall over, the capacity report in DIR/reports/demo/, the lab down (also after an "
                    "error, Ctrl-C or SIGTERM). 'incidents' replays the three incidents of docs/incidents.md "
                    "instead, each as it happened and with its mitigation.")
    p.add_argument("what", nargs="?", choices=["incidents"], metavar="incidents",
                   help="replay the incidents instead of the demo")
    p.add_argument("numbers", nargs="*", metavar="N",
                   help="with incidents: which ones (1, 2, 2b, 2c, 3; default 1 2 3; 2b is incident 2's "
                   "firewall loop, about 4 minutes, 2c the loop holding itself, about 3 minutes; both need "
                   "nftables)")
    p.add_argument("--repeat", type=int, default=1, metavar="R",
                   help="with incidents: replay each R times and print the incident x {as shipped, "
                   "mitigated} x replay table with its spread (default 1)")
    p.add_argument("--address", default=os.environ.get("LOADKIT_DEMO_ADDRESS", "127.0.0.1"),
                   help="loopback address of the demo's lab (default $LOADKIT_DEMO_ADDRESS or 127.0.0.1)")
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("LOADKIT_DEMO_DIR", ".")),
                   help="working directory for the lab, runs and report (default $LOADKIT_DEMO_DIR or .)")


#: the incidents loadkit.demo replays (its INCIDENTS keys; not imported here: pandas is slow to load)
_INCIDENTS = ("1", "2", "2b", "2c", "3")


def _incident_numbers(words: list[str]) -> list[str]:
    for word in words:
        if word not in _INCIDENTS:
            raise ProfileError(f"incident {word!r} does not exist: choose from {', '.join(_INCIDENTS)}")
    return list(dict.fromkeys(words))


def _demo(args: argparse.Namespace) -> int:
    from loadkit import demo

    work = args.dir.resolve()
    if args.what == "incidents":
        if args.repeat < 1:
            raise ProfileError(f"--repeat {args.repeat}: replay at least once (e.g. --repeat 3)")
        return demo.incidents(work, args.address, _incident_numbers(args.numbers), args.repeat)
    if args.repeat != 1:
        raise ProfileError("--repeat is for 'loadkit demo incidents'")
    if args.numbers:
        raise ProfileError(f"'{' '.join(args.numbers)}' given without 'incidents': "
                           "loadkit demo takes incident numbers only after 'incidents'")
    return demo.run_demo(work, args.address)
