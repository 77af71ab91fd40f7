"""The ``loadkit`` command. Only this package knows the command line.

Each subcommand lives in its own module with ``register(subparsers)``; the handler returns an
exit status. A :class:`~loadkit.errors.LoadkitError` becomes one line on stderr and its
``exit_code``; anything else is a bug and keeps its traceback. A reader that stops early
(``loadkit runs list --json | head``) ends the command quietly, as with any Unix filter.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from loadkit import __version__
from loadkit.errors import LoadkitError
from loadkit.stop_signals import own_stop_signals

from . import collect, demo, fit, kpi, lab, report, run, runs

_SUBCOMMANDS = (lab, collect, run, runs, fit, report, demo, kpi)
#: the exit status of a process that SIGPIPE ended, which is what a reader that stopped early means
EXIT_BROKEN_PIPE = 128 + 13


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
    own_stop_signals()  # Ctrl-C works even when the launcher ignored SIGINT (a background job)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except LoadkitError as err:  # an option's type check (e.g. `--dns-port abc`): one line, no usage dump
        print(f"loadkit: error: {err}", file=sys.stderr)
        return err.exit_code
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left early shows here, not in the flush at exit
        return code
    except LoadkitError as err:
        print(f"loadkit: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("loadkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    # the reader is gone: point stdout at /dev/null so the interpreter's final flush at exit
    # does not raise a second BrokenPipeError (the recipe of Python's signal module docs)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
