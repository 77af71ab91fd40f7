"""`loadkit locustfile [NAME]` (and `loadkit scenario [NAME]`, :mod:`.scenario`): where a shipped file is.

    locust -f "$(loadkit locustfile dns_burst)" --headless -t 30s
    loadkit run "$(loadkit scenario burst_retry_storm)"      # or simply: loadkit run burst_retry_storm

Works the same in a checkout (the repository's ``locustfiles/`` and ``scenarios/``) and from an
installed wheel (the package data it carries).
"""

from __future__ import annotations

import argparse

from loadkit.cli._common import add_command

#: per command: the resources kind, its help, and example names
_COMMANDS = {
    "locustfile": ("locustfiles", "print the path of a shipped locustfile (for locust -f)",
                   "Print the path of one of loadkit's locustfiles, e.g. locust -f \"$(loadkit locustfile "
                   "dns_burst)\". Without NAME, list every locustfile with its path.",
                   "dns_burst, dns_flood, imap_storm, pop_storm, ..."),
    "scenario": ("scenarios", "print the path of a shipped scenario (for loadkit run)",
                 "Print the path of one of loadkit's scenario profiles (loadkit run also takes the bare "
                 "name). Without NAME, list every scenario with its path.",
                 "smoke, burst_retry_storm, proxies_fall_over, ..."),
}


def register(sub: argparse._SubParsersAction) -> None:
    register_shipped(sub, "locustfile")


def register_shipped(sub: argparse._SubParsersAction, command: str) -> None:
    """``loadkit COMMAND [NAME]`` for one kind of shipped file (``locustfile`` or ``scenario``)."""
    kind, short, long, names = _COMMANDS[command]
    p = add_command(sub, command, _run, short, long)
    p.add_argument("name", nargs="?", metavar="NAME", help=names)
    p.set_defaults(shipped_kind=kind)


def _run(args: argparse.Namespace) -> int:
    from loadkit import resources

    if args.name:
        print(resources.shipped(args.shipped_kind, args.name))
        return 0
    for name in resources.shipped_names(args.shipped_kind):
        print(f"{name:26} {resources.shipped(args.shipped_kind, name)}")
    return 0
