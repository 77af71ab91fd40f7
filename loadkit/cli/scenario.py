"""`loadkit scenario [NAME]`: where a shipped scenario is (the same lookup as `loadkit locustfile`).

    loadkit scenario                       # every shipped scenario, with its path
    loadkit run burst_retry_storm          # loadkit run takes the bare name too
"""

from __future__ import annotations

import argparse

from loadkit.cli.locustfile import register_shipped


def register(sub: argparse._SubParsersAction) -> None:
    register_shipped(sub, "scenario")
