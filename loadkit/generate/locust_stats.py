"""Put many requests into Locust's statistics at once.

Firing one Locust request event costs about 6 µs, more than a whole DNS query on loopback, so
high-rate generators aggregate per short interval and call :func:`inject` once per interval and
request name. It updates the same :class:`locust.stats.StatsEntry` and ``StatsError`` fields that
``RequestStats.log_request``/``log_error`` would (counts, per-second counts, the rounded
response-time dict, total/min/max, the response-times cache used for current percentiles), on
the entry *and* on the aggregated total. So Locust's table, charts, ``--csv``, ``--html`` and the
worker-to-master reports stay right, and the run recorder, which reads stats deltas, sees the
requests too. Listeners of the ``request`` event do not (no event is fired).

Generic: a mail user holding thousands of sessions can use it the same way as the DNS sender.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping

from locust.stats import StatsError, bucket_response_time

from loadkit.schema import Failure

# The fields written below are Locust internals: an untested Locust is refused where a locustfile
# installs the users that call inject() (loadkit.generate.dns.users.install, one line and exit 2),
# not here, where raising at import would end the locustfile's import with Locust's traceback.


def inject(
    environment: Any,
    request_type: str,
    name: str,
    latencies_s: Iterable[tuple[float, int]],
    failures: Mapping[str, int] | None = None,
    *,
    min_s: float | None = None,
    max_s: float | None = None,
    total_s: float | None = None,
    ts_unix_s: float | None = None,
) -> int:
    """Add completed requests of one ``(request_type, name)`` to Locust's stats.

    ``latencies_s`` is ``(latency in seconds, count)`` pairs for *every* completed request,
    failed or not (Locust counts a failure as a request with a response time). ``failures``
    maps failure class -> count (a subset of those requests); each class becomes one row of
    Locust's failure table, keyed by the :class:`~loadkit.schema.Failure` token. ``min_s``,
    ``max_s`` and ``total_s`` are exact values when the caller has them (the pairs may be
    bucketed). Returns the number of requests added.
    """
    stats = environment.stats
    entry = stats.get(name, request_type)
    now = time.time() if ts_unix_s is None else ts_unix_s
    second = int(now)

    buckets: dict[int, int] = {}
    n = 0
    total_ms = 0.0
    lo_ms = None
    hi_ms = 0.0
    for latency_s, count in latencies_s:
        if count <= 0:
            continue
        ms = latency_s * 1000.0
        key = bucket_response_time(round(ms))
        buckets[key] = buckets.get(key, 0) + count
        n += count
        total_ms += ms * count
        lo_ms = ms if lo_ms is None or ms < lo_ms else lo_ms
        hi_ms = ms if ms > hi_ms else hi_ms
    if total_s is not None:
        total_ms = total_s * 1000.0
    if min_s is not None and n:
        lo_ms = min_s * 1000.0
    if max_s is not None and n:
        hi_ms = max_s * 1000.0

    failures = {k: v for k, v in (failures or {}).items() if v > 0}
    n_fail = sum(failures.values())
    if n == 0 and n_fail == 0:
        return 0

    for target in (entry, stats.total):
        _add_requests(target, second, now, n, buckets, total_ms, lo_ms, hi_ms)
        if n_fail:
            target.num_failures += n_fail
            target.num_fail_per_sec[second] += n_fail

    for failure_class, count in failures.items():
        error = Failure(failure_class)
        key = StatsError.create_key(request_type, name, error)
        row = stats.errors.get(key)
        if row is None:
            row = StatsError(request_type, name, error)
            stats.errors[key] = row
        row.occurrences += count
        if row.first_seen is None:
            row.first_seen = now
        row.last_seen = now
    return n


def _add_requests(
    entry: Any,
    second: int,
    now: float,
    n: int,
    buckets: Mapping[int, int],
    total_ms: float,
    lo_ms: float | None,
    hi_ms: float,
) -> None:
    if n == 0:
        return
    # same cache step as StatsEntry.log: snapshot the previous second's distribution so
    # "current" percentiles in the UI stay right
    if (
        entry.use_response_times_cache
        and entry.last_request_timestamp
        and second > int(entry.last_request_timestamp)
    ):
        entry._cache_response_times(second - 1)
    entry.num_requests += n
    entry.num_reqs_per_sec[second] += n
    entry.last_request_timestamp = now
    entry.total_response_time += total_ms
    for key, count in buckets.items():
        entry.response_times[key] += count
    if lo_ms is not None:
        lo_int = lo_ms
        if entry.min_response_time is None or lo_int < entry.min_response_time:
            entry.min_response_time = lo_int
    if hi_ms > entry.max_response_time:
        entry.max_response_time = hi_ms
