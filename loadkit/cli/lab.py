"""`loadkit lab`: placeholder until its stage lands."""

from __future__ import annotations

import argparse

from loadkit.errors import LoadkitError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="(not built yet)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise LoadkitError("'loadkit lab' is not built yet")
