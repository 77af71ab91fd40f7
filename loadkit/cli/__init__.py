"""The ``loadkit`` command. Only this package knows the command line.

Each subcommand lives in its own module with ``register(subparsers)``; the handler returns an
exit status. A :class:`~loadkit.errors.LoadkitError` becomes one line on stderr and its
``exit_code``; anything else is a bug and keeps its traceback. A reader that stops early
(``loadkit runs list --json | head``) ends the command quietly, as with any Unix filter.

An installation with only some extras (``pip install 'loadkit[collect]'`` on a target host) lacks
the packages of other subcommands: such a subcommand is still listed, and running it prints one
line naming the missing package and the extra that brings it, instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from loadkit import __version__
from loadkit.errors import LoadkitError
from loadkit.stop_signals import own_stop_signals

from ._common import add_command

#: subcommand modules, in the order of ``loadkit --help``
_SUBCOMMANDS = ("lab", "collect", "run", "runs", "fit", "report", "demo", "kpi", "locustfile", "scenario")
#: the extra of pyproject.toml that brings what each subcommand needs beyond the collector's packages
EXTRA_OF = {"lab": "load", "collect": "collect", "run": "load", "runs": "models", "fit": "models",
            "report": "report", "demo": "all", "kpi": "models", "locustfile": "load", "scenario": "load"}
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
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] == "loadkit":
                raise  # a bug, not a missing extra
            _register_missing(sub, name, err)
            continue
        module.register(sub)
    return parser


class MissingExtra(LoadkitError):
    """A subcommand needs a package that this installation of loadkit lacks."""


def _missing_extra(command: str, err: ModuleNotFoundError) -> MissingExtra:
    package = (err.name or str(err)).split(".")[0]
    extra = EXTRA_OF.get(command, "all")
    return MissingExtra(f"loadkit {command} needs the Python package {package!r}, which is not installed: "
                        f"pip install 'loadkit[{extra}]'")


def _register_missing(sub: argparse._SubParsersAction, name: str, err: ModuleNotFoundError) -> None:
    problem = _missing_extra(name, err)

    def refuse(_args: argparse.Namespace) -> int:
        raise problem

    p = add_command(sub, name, refuse, f"(needs loadkit[{EXTRA_OF.get(name, 'all')}])", str(problem))
    p.set_defaults(takes_any_arguments=True)  # its options are unknown here: the one line says why


def main(argv: list[str] | None = None) -> int:
    own_stop_signals()  # Ctrl-C works even when the launcher ignored SIGINT (a background job)
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown and not getattr(args, "takes_any_arguments", False):
            # as parse_args would, but from the command's own parser: "loadkit runs list: error: ..."
            getattr(args, "command_parser", parser).error("unrecognized arguments: " + " ".join(unknown))
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
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] == "loadkit":
            raise
        # a package imported only when the command runs (e.g. papermill for the report)
        problem = _missing_extra(args.command, err)
        print(f"loadkit: error: {problem}", file=sys.stderr)
        return problem.exit_code
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
