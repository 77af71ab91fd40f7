"""The ``loadkit`` command. Only this package knows the command line.

Each subcommand lives in its own module with ``register(subparsers)``; the handler returns an
exit status. A :class:`~loadkit.errors.LoadkitError` becomes one line on stderr and its
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from loadkit import __version__
from loadkit.errors import LoadkitError

from . import collect, fit, lab, report, run, runs

_SUBCOMMANDS = (lab, collect, run, runs, fit, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loadkit",
        description="Burst and storm load tests for DNS and POP3/IMAP, with saturation monitoring "
        "and headroom models.",
    )
    parser.add_argument("--version", action="version", version=f"loadkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except LoadkitError as err:
        print(f"loadkit: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("loadkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
