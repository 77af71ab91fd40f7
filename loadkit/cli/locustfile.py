"""`loadkit locustfile [NAME]`: where a shipped locustfile is, for ``locust -f``.

    locust -f "$(loadkit locustfile dns_burst)" --headless -t 30s

Works the same in a checkout (the repository's ``locustfiles/``) and from an installed wheel
(the package data it carries).
"""

from __future__ import annotations

import argparse

from loadkit.cli._common import add_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "locustfile", _run, "print the path of a shipped locustfile (for locust -f)",
                    "Print the path of one of loadkit's locustfiles, e.g. locust -f \"$(loadkit locustfile "
                    "dns_burst)\". Without NAME, list every locustfile with its path.")
    p.add_argument("name", nargs="?", metavar="NAME", help="dns_burst, dns_flood, imap_storm, pop_storm, ...")


def _run(args: argparse.Namespace) -> int:
    from loadkit import resources

    if args.name:
        print(resources.locustfile(args.name))
        return 0
    for name in resources.locustfile_names():
        print(f"{name:14} {resources.locustfile(name)}")
    return 0
