"""What every ``loadkit`` subcommand module shares: registering a (sub)command with its handler."""

from __future__ import annotations

import argparse
import math
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
    # the innermost command's parser reports an unknown argument, with its own usage line
    p.set_defaults(command_parser=p)
    return p


def _number(text: str, least: float | None, strict: bool, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    # float() takes "nan" and "inf": neither is a size, a rate or a time, and nan slips past
    # every later range check (nan > 0 and nan <= 0 are both False)
    if not math.isfinite(value) or (least is not None and (value <= least if strict else value < least)):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def finite(text: str) -> float:
    """An argparse type: a float that is not nan or ±inf (a timestamp, an offset)."""
    return _number(text, None, False, "a finite number")


def finite_positive(text: str) -> float:
    """An argparse type: a finite float > 0 (a size, a rate, a duration, a threshold)."""
    return _number(text, 0.0, True, "a finite number > 0")


def finite_non_negative(text: str) -> float:
    """An argparse type: a finite float >= 0 (an overhead or a wait where 0 means none)."""
    return _number(text, 0.0, False, "a finite number >= 0")
