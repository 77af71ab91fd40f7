"""The Locust versions loadkit supports, checked when the code that writes Locust's internals loads.

:mod:`loadkit.generate.locust_stats` updates ``StatsEntry`` and ``StatsError`` fields directly (one
call per interval instead of one request event per DNS query), so a Locust release that renames
or reshapes them would break Locust's table, CSV and reports silently. The range below is the
one the test suite runs against (``tests/test_packaging.py`` checks it is the range
``pyproject.toml`` declares, and that every internal field written still exists); outside it,
installing the DNS users in a locustfile stops with one line saying so (exit status 2) instead of
producing wrong statistics.
"""

from __future__ import annotations

import re

from loadkit.errors import LoadkitError

#: lowest supported Locust (inclusive) and first unsupported one, as (major, minor)
LOCUST_MIN = (2, 30)
LOCUST_BELOW = (3, 0)
#: the same range as a requirement specifier (pyproject.toml's ``locust`` dependency)
SUPPORTED_LOCUST = f">={LOCUST_MIN[0]}.{LOCUST_MIN[1]},<{LOCUST_BELOW[0]}"
#: the fields of a StatsEntry that :func:`loadkit.generate.locust_stats.inject` writes or reads
STATS_ENTRY_FIELDS = ("num_requests", "num_failures", "num_reqs_per_sec", "num_fail_per_sec", "response_times",
                      "total_response_time", "min_response_time", "max_response_time", "last_request_timestamp",
                      "use_response_times_cache", "_cache_response_times")
#: the fields of a StatsError it writes
STATS_ERROR_FIELDS = ("occurrences", "first_seen", "last_seen")


class UnsupportedLocust(LoadkitError):
    """The installed Locust is outside the range loadkit writes Locust's statistics for."""


def _major_minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise UnsupportedLocust(f"Locust version {version!r} cannot be read; loadkit supports locust{SUPPORTED_LOCUST}")
    return int(m.group(1)), int(m.group(2))


def check_locust_version(version: str | None = None) -> str:
    """The installed Locust version (or ``version``) if supported, else :class:`UnsupportedLocust`."""
    if version is None:
        from importlib.metadata import version as installed

        version = installed("locust")
    if not LOCUST_MIN <= _major_minor(version) < LOCUST_BELOW:
        raise UnsupportedLocust(
            f"Locust {version} is not supported: loadkit writes Locust's statistics directly and is tested "
            f"with locust{SUPPORTED_LOCUST}; install one of those (pip install 'locust{SUPPORTED_LOCUST}')")
    return version
