"""How a stub resolver's retries leave: from which source port, and whether a budget allows them.

Source ports (``--dns-port-policy``). A stateful firewall keys its sessions by the client's address
*and port*, so the port a retry uses decides whether it costs a new session (incident 2: retries
from fresh ports filled a firewall's 500,000-entry session table):

* ``per-attempt``: every retry from a fresh ephemeral socket, as stub resolvers that randomise
  the source port per query do (RFC 5452 section 9.2); each retry is a new session.
* ``per-query``: a retry reuses the socket its query was first sent from.
* ``fixed``: a retry goes out on the next of the sender's fixed sockets (the sockets the original
  queries use, round robin), so retries open no new sessions beyond those sockets.

Retry budget (``--dns-retry-budget F``): retries at most ``F`` times the original queries sent
over a sliding window, the client-side mitigation of gRPC's retry throttling and Finagle's
``RetryBudget``: when the server drops queries because it is overloaded, retrying all of them
multiplies the overload; a budget caps that multiplication at ``1 + F``.
"""

from __future__ import annotations

PORT_POLICIES = ("per-attempt", "per-query", "fixed")


class RetryBudget:
    """Allows a retry while retries over the last ``window_s`` stay within ``ratio`` times the
    original queries sent over the same window. Counts are kept in ``slots_n`` slots of
    ``window_s / slots_n`` seconds, so the window slides in steps of one slot."""

    def __init__(self, ratio: float, window_s: float = 10.0, slots_n: int = 20) -> None:
        self.ratio = float(ratio)
        self.window_s = float(window_s)
        self.slot_s = self.window_s / slots_n
        self._originals = [0] * slots_n
        self._retries = [0] * slots_n
        self._originals_sum = 0
        self._retries_sum = 0
        self._slot = 0  # absolute slot number of the newest slot

    def _advance(self, now_s: float) -> int:
        slot = int(now_s / self.slot_s)
        n = len(self._originals)
        if slot > self._slot:
            # zero the slots that fell out of the window (all of them after a long pause)
            for k in range(self._slot + 1, min(slot, self._slot + n) + 1):
                i = k % n
                self._originals_sum -= self._originals[i]
                self._retries_sum -= self._retries[i]
                self._originals[i] = 0
                self._retries[i] = 0
            self._slot = slot
        return self._slot % n

    def add_originals(self, now_s: float, n: int) -> None:
        """``n`` original queries were sent at ``now_s`` (a ``perf_counter`` time)."""
        i = self._advance(now_s)
        self._originals[i] += n
        self._originals_sum += n

    def allow_retry(self, now_s: float) -> bool:
        """True (and the retry is counted) when one more retry stays within the budget."""
        i = self._advance(now_s)
        if self._retries_sum + 1 > self.ratio * self._originals_sum:
            return False
        self._retries[i] += 1
        self._retries_sum += 1
        return True
