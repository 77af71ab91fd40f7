"""What every ``loadkit`` subcommand module shares: registering a (sub)command with its handler."""

from __future__ import annotations

import argparse
from typing import Any, Callable


def add_command(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int] | None,
                help: str, description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """Add ``name`` to ``sub``: ``help`` is its line in the parent's list, ``description`` heads its
    own ``--help``; ``func(args)`` handles it and returns the exit status (None for a command whose
    actions have the handlers, e.g. ``lab up|status|down``). ``kwargs`` go to ``add_parser``."""
    if description is not None:
        kwargs["description"] = description
    p = sub.add_parser(name, help=help, **kwargs)
    # -v after the subcommand too (`loadkit collect ... -v`); SUPPRESS keeps the top-level value
    # when the subcommand's parser does not see it
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")
    if func is not None:
        p.set_defaults(func=func)
    return p
