"""Measure the lab DNS server's capacity: the answered rate it sustains at < 1 % loss.

With a CPU quota (``--dns-cpu``) unbound's capacity is set rather than whatever the machine leaves
over, and this measures what the quota gives, once, at ``lab up``: a short step ramp of constant
open-loop rates with loadkit's own DNS sender (no retries, so every query is counted once), each
step ``STEP_S`` long, the rate multiplied by ``FACTOR`` while the loss stays under ``LOSS_LIMIT``,
then ``BISECT_STEPS`` steps halving the interval between the last rate under the limit and the
first over it (a 1.5x ramp alone would quantise the capacity to 50 %; after 4 halvings, 3 %).
The capacity is the best rate the server served (sent, minus what its socket dropped, minus what
was still queued in it when the step stopped sending) in a step under the limit; the steps are
kept as evidence. The queue counts because a large receive buffer (``--dns-rcvbuf``) takes in a
whole step's excess without a drop: a server at 5,000 q/s behind a 16 MiB buffer took in 10,000
q/s for a second and would have been calibrated at twice what it serves.

Loss is what the **server's** socket dropped (the kernel's per-socket drop counter), not what the
client missed: on a busy machine the sender itself may read answers late and time them out, which
would make the server look slower than its quota; a server short of CPU shows as drops at its own
socket, and that is what a quota sets.

Bounded: at most ``MAX_STEPS`` + ``BISECT_STEPS`` steps up to ``MAX_QPS`` (or down to ``MIN_QPS``
when the first step is already too much): about 10-15 s.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

LOSS_LIMIT = 0.01
START_QPS = 3000.0
FACTOR = 1.5
BISECT_STEPS = 4
STEP_S = 1.0
MAX_STEPS = 12
MAX_QPS = 250_000.0
#: the ramp steps down from START_QPS for a small quota, no lower than this
MIN_QPS = 100.0
#: after a step, let the server empty its queue before the next one
SETTLE_S = 0.3
#: the reply a step waits for after it stops sending (a loaded server answers within this)
TIMEOUT_S = 0.5


def server_drops(address: str, port: int) -> int:
    """Datagrams dropped so far by the UDP sockets serving ``address:port``."""
    from loadkit.observe.procfs import read_udp_sockets

    return sum(s.drops_n for s in read_udp_sockets(ports=[port])
               if s.local_address in (address, "0.0.0.0", "::"))


def server_queued(address: str, port: int) -> int:
    """Datagrams waiting now in the UDP sockets serving ``address:port`` (their receive queue's
    bytes, in the kernel's accounting, over :data:`~loadkit.model.udp.BYTES_PER_DATAGRAM`)."""
    from loadkit.model.udp import BYTES_PER_DATAGRAM
    from loadkit.observe.procfs import read_udp_sockets

    queued = sum(s.rx_queue_bytes for s in read_udp_sockets(ports=[port])
                 if s.local_address in (address, "0.0.0.0", "::"))
    return int(queued // BYTES_PER_DATAGRAM)


def _step(address: str, port: int, pool: Any, rate_qps: float) -> tuple[int, int, int, int]:
    """(sent, answered, dropped by the server, queued in the server when sending stopped) of one
    step at ``rate_qps``."""
    from loadkit.generate.dns.schedule import ConstantRate
    from loadkit.generate.dns.sender import DnsSender
    from loadkit.profile.targets import Target

    sender = DnsSender(
        Target(address, address, port), pool, base=ConstantRate(rate_qps),
        sources=(address,), ports_per_source=8, timeout_s=TIMEOUT_S, retries_n=0,
        max_duration_s=STEP_S, max_queries_n=int(rate_qps * STEP_S) + 1,
    )
    backlog = [0]

    def at_interval(report: Any) -> None:
        # while sending (the last report of the sending part is at the step's end): the backlog
        # grows through a step the server cannot keep up with, and drains in the wait after it
        if report.counters.get("dns.original_sent", 0):
            backlog[0] = server_queued(address, port)

    sender.on_interval = at_interval
    drops0 = server_drops(address, port)
    try:
        sender.run()
    finally:
        sender.close()
    t = sender.totals
    dropped = max(0, server_drops(address, port) - drops0)
    return int(t.get("dns.original_sent", 0)), int(t.get("dns.answered", 0)), dropped, backlog[0]


def capacity(address: str, port: int, names: list[str]) -> dict[str, Any]:
    """``{"capacity_qps": ..., "steps": [[offered_qps, served_qps, loss, client_answered_qps], ...],
    ...}`` (served: sent minus the server socket's drops and what was still queued in it when the
    step stopped sending; loss: those two over sent);
    ``capacity_qps`` is None when even the first step lost more than the limit, and
    ``lower_bound`` is true when no step overloaded the server (the sender was the limit)."""
    from loadkit.generate.dns.wire import QueryPool

    pool = QueryPool(names, [("A", 1.0)], size=5000, seed=15)
    steps: list[list[float]] = []
    best: float | None = None
    t0 = time.perf_counter()

    def under_limit(rate_qps: float) -> bool:
        nonlocal best
        sent, answered, dropped, queued = _step(address, port, pool, rate_qps)
        served = sent - dropped - queued
        # not served in the step: dropped at the socket, or still waiting in it
        loss = (dropped + queued) / sent if sent else 1.0
        steps.append([round(sent / STEP_S), round(served / STEP_S), round(loss, 4), round(answered / STEP_S)])
        log.info("DNS calibration: offered %.0f q/s, served %.0f q/s, server drops + queued %.2f %% (client got %.0f q/s)",
                 sent / STEP_S, served / STEP_S, 100 * loss, answered / STEP_S)
        time.sleep(SETTLE_S)
        if loss >= LOSS_LIMIT:
            return False
        best = max(best or 0.0, served / STEP_S)
        return True

    good, bad = 0.0, START_QPS
    for _ in range(MAX_STEPS):
        if not under_limit(bad):
            break
        good, bad = bad, bad * FACTOR
        if bad > MAX_QPS:
            bad = 0.0  # never overloaded within the cap: nothing to bisect
            break
    if not good and bad:
        # the first step was already too much (a small quota): step down until one is not
        rate = bad / FACTOR
        for _ in range(MAX_STEPS):
            if rate < MIN_QPS or under_limit(rate):
                break
            bad, rate = rate, rate / FACTOR
        good = rate if best is not None else 0.0
    for _ in range(BISECT_STEPS if good and bad else 0):
        mid = (good + bad) / 2
        if under_limit(mid):
            good = mid
        else:
            bad = mid
    return {
        "capacity_qps": round(best) if best is not None else None,
        "lower_bound": not bad,
        "loss_limit": LOSS_LIMIT,
        "step_s": STEP_S,
        "steps": steps,
        "took_s": round(time.perf_counter() - t0, 2),
    }
