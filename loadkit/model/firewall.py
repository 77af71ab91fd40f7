"""A stateful firewall's session table under retries: when it fills, and whether it stays full.

A UDP session lives ``timeout_s`` after its flow's last packet, so by Little's law the table
holds ``new-flow rate × timeout`` entries. A table of ``size_n`` therefore admits at most
``size_n / timeout_s`` new flows per second once full, and drops the rest. Stub resolvers retry a
lost query from a new source port (per-attempt ports), so every retry is a new flow: drops cause
retries, which are new flows, which keep the table full (incident 2). With per-query ports a
retry reuses its query's flow and the table sees only the original demand.

The retry loop through the table is :mod:`loadkit.model.retries`' loop, kept per query (a stub
resolver sends at most ``1 + retries`` attempts and stops at the first timely answer), with the
loss a full table and the server behind it cause (:func:`per_query_loss`); a second stable state
at the original demand (found by :func:`~loadkit.model.retries.retry_loop_states`) means the
table stays full after the trigger is gone: metastable.

In a steady state every timely answer ends a distinct query, so the goodput ``g`` is
``original × (1 - p^(retries+1)) <= original`` (``p``: the share of attempts not answered in
time). If every attempt the table admits is answered in time, ``g = min(offered, A, C)`` (``A =
size / timeout`` the table's admissions, ``C`` the server's capacity), which is at least
``min(A, C)`` once the table is full; so with ``original < min(A, C)`` there is no second state:
the table drains one timeout after the trigger, whatever the retries. A second stable state needs
*waste*, admitted attempts that yield no timely answer and whose share grows with load: here the
server's queue, when the table admits more than the server serves (``A > C``) and the queue's
delay (receive buffer / ``C``) exceeds the stub's timeout, so every answer comes too late and each
late attempt still held a session. The incident's firewall then stays full at the original demand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from loadkit.errors import ModelError
from loadkit.model._result import Result
from loadkit.model.retries import (
    LoopStates,
    attempts_per_query,
    capacity_loss,
    dns_options,
    metastability,
    offered_cap_qps,
    retries_per_loss,
    retry_amplification,
    retry_loop_states,
)
from loadkit.record.reader import RunData

PORT_POLICIES = ("per-attempt", "per-query", "fixed")


def occupancy(new_flow_qps: float, timeout_s: float, size_n: float = math.inf) -> float:
    """Entries in the table in steady state (Little's law), at most its size."""
    return min(float(size_n), max(new_flow_qps, 0.0) * timeout_s)


def admitted_flow_qps(size_n: float, timeout_s: float) -> float:
    """New flows per second a full table admits: one per entry that expires."""
    if timeout_s <= 0 or size_n <= 0:
        raise ModelError(f"a session table needs size > 0 and timeout > 0 s (got {size_n}, {timeout_s})")
    return float(size_n) / float(timeout_s)


def fill_time_s(new_flow_qps: float, timeout_s: float, size_n: float) -> float:
    """Seconds from an empty table to a full one at a steady new-flow rate; inf when entries
    expire before the table fills (``rate × timeout < size``)."""
    if new_flow_qps <= 0 or new_flow_qps * timeout_s < size_n:
        return math.inf
    return float(size_n) / float(new_flow_qps)


def new_flow_qps(original_qps: float, offered_qps: float, port_policy: str = "per-attempt") -> float:
    """New flows per second: every attempt with per-attempt source ports, every query with
    per-query ports, none with fixed sockets (their few flows, refreshed by every query, stay)."""
    if port_policy not in PORT_POLICIES:
        raise ModelError(f"port policy {port_policy!r}: expected one of {', '.join(PORT_POLICIES)}")
    if port_policy == "fixed":
        return 0.0
    return float(offered_qps if port_policy == "per-attempt" else original_qps)


def firewall_loss(size_n: float, timeout_s: float, port_policy: str = "per-attempt",
                  original_qps: float | None = None) -> Callable[[float], float]:
    """``loss(offered)`` the table causes: a capacity of ``size / timeout`` new flows per second;
    with per-query ports only the original demand makes flows, so the loss does not grow with
    retries; fixed sockets make no new flows, so the table loses nothing."""
    cap = admitted_flow_qps(size_n, timeout_s)
    if port_policy == "fixed":
        return lambda x: 0.0
    if port_policy == "per-query":
        if original_qps is None:
            raise ModelError("per-query ports: the loss depends on the original demand; give original_qps")
        fixed = capacity_loss(cap)(original_qps)
        return lambda x: fixed
    new_flow_qps(0.0, 0.0, port_policy)  # validates the policy
    return capacity_loss(cap)


# --------------------------------------------------------------------------------------------
# the loop kept per query, with the waste term
# --------------------------------------------------------------------------------------------


def timely_goodput_qps(offered_qps: float, admitted_cap_qps: float, capacity_qps: float = math.inf,
                       queue_delay_s: float = 0.0, stub_timeout_s: float = math.inf) -> tuple[float, float]:
    """``(admitted, answered in time)`` per second for ``offered_qps`` new flows.

    The table admits ``min(offered, A)``; the server answers ``min(admitted, C)``. Admitted
    beyond ``C`` keeps its queue full, so every answer waits about ``queue_delay_s`` (buffer / C):
    when that exceeds the stub's timeout none arrives in time (the waste that grows with load).
    """
    admitted = min(max(offered_qps, 0.0), admitted_cap_qps)
    served = min(admitted, capacity_qps)
    if admitted > capacity_qps and queue_delay_s > stub_timeout_s:
        return admitted, 0.0
    return admitted, served


@dataclass
class WasteLoop(Result):
    """Where the per-query retry loop through the table and the server settles (:func:`waste_loop`)."""

    kind = "firewall_waste_loop"

    original_qps: float
    retries_n: int
    admitted_flow_qps: float  #: A = size / timeout
    capacity_qps: float  #: C, the server's answered rate at its limit (nan: not known, taken as unlimited)
    queue_delay_s: float  #: the server's receive buffer / C: an answer's wait when the queue is full
    stub_timeout_s: float
    retry_budget: float | None  #: retries at most this share of the originals (None: no budget)
    low_goodput_qps: float
    high_goodput_qps: float
    high_waste_share: float  #: admitted attempts without a timely answer, in the high state
    high_table_full: bool  #: the high state offers at least what the table admits
    sustains: bool  #: a second stable state: the table stays full after the trigger
    reason: str
    loop: LoopStates  #: the loop's two end points, as :mod:`loadkit.model.retries` reports them

    @property
    def low_offered_qps(self) -> float:
        """Where the loop settles from the original demand alone (:attr:`loop`'s low end)."""
        return self.loop.low_offered_qps

    @property
    def high_offered_qps(self) -> float:
        """Where it settles from every query at its last attempt, the trigger's worst (:attr:`loop`'s high end)."""
        return self.loop.high_offered_qps

    def summary(self) -> str:
        state = ("sustains itself: a second stable state at "
                 f"{self.high_offered_qps:,.0f}/s offered, {self.high_goodput_qps:,.0f}/s answered in time "
                 f"({100 * self.high_waste_share:.0f} % of admitted attempts wasted)" if self.sustains
                 else "drains: one stable state")
        return f"per-query loop at {self.original_qps:,.0f}/s original: {state}; {self.reason}"


def per_query_loss(size_n: float, timeout_s: float, *, port_policy: str = "per-attempt",
                   original_qps: float | None = None, capacity_qps: float = math.inf, queue_delay_s: float = 0.0,
                   stub_timeout_s: float = math.inf) -> Callable[[float], float]:
    """``loss(offered)`` for the per-query loop: the share of attempts without a timely answer
    through the table (:func:`firewall_loss`) and the server behind it (:func:`timely_goodput_qps`)."""
    table = firewall_loss(size_n, timeout_s, port_policy, original_qps)

    def loss(x: float) -> float:
        if x <= 0:
            return 0.0
        admitted = x * (1.0 - table(x))
        _, good = timely_goodput_qps(admitted, math.inf, capacity_qps, queue_delay_s, stub_timeout_s)
        return min(1.0, max(0.0, 1.0 - good / x))

    return loss


def waste_loop(original_qps: float, size_n: float, timeout_s: float, *, retries_n: int = 2,
               capacity_qps: float | None = None, queue_delay_s: float = 0.0, stub_timeout_s: float = math.inf,
               retry_budget: float | None = None, port_policy: str = "per-attempt",
               separation: float = 0.1) -> WasteLoop:
    """The stable states of the per-query loop (:func:`~loadkit.model.retries.retry_loop_states`)
    with the loss of :func:`per_query_loss`, settled from the original demand and from
    the most the clients can offer (:func:`~loadkit.model.retries.offered_cap_qps`: every query at
    its last attempt, within a retry budget).
    With per-query ports a retry reuses its query's flow: the table sees the queries alone."""
    if original_qps <= 0:
        raise ModelError(f"original demand {original_qps} must be > 0 queries/s")
    admitted_cap = admitted_flow_qps(size_n, timeout_s)
    cap_c = float(capacity_qps) if capacity_qps and capacity_qps > 0 else math.inf
    top = offered_cap_qps(original_qps, retries_n, retry_budget)
    loss = per_query_loss(size_n, timeout_s, port_policy=port_policy, original_qps=original_qps,
                          capacity_qps=cap_c, queue_delay_s=queue_delay_s, stub_timeout_s=stub_timeout_s)
    loop = retry_loop_states(original_qps, retries_n, loss, peak_offered_qps=top, cap_qps=top,
                             separation=separation)
    low, high = loop.low_offered_qps, loop.high_offered_qps
    flows_high = new_flow_qps(original_qps, high, port_policy)
    good_low = low * (1.0 - loss(low))
    adm_high = min(flows_high, admitted_cap)
    good_high = high * (1.0 - loss(high))
    sustains = loop.second_stable_state and good_high < original_qps * (1 - separation)
    late = math.isfinite(cap_c) and queue_delay_s > stub_timeout_s
    if sustains and flows_high < admitted_cap:
        table = ("no table in the way" if not math.isfinite(admitted_cap) else
                 f"the table (admitting {admitted_cap:,.0f}/s) never fills")
        reason = (f"the server's own retry storm: its full queue delays answers {queue_delay_s:.2f} s, past the "
                  f"stub's {stub_timeout_s:g} s timeout, and {table}")
    elif sustains:
        reason = (f"the table admits {admitted_cap:,.0f}/s, more than the server's {cap_c:,.0f}/s, and its full "
                  f"queue delays answers {queue_delay_s:.2f} s, past the stub's {stub_timeout_s:g} s timeout")
    elif min(admitted_cap, cap_c) <= original_qps:
        reason = (f"the original demand alone reaches min(table {admitted_cap:,.0f}/s, server "
                  f"{cap_c:,.0f}/s): degraded in both states, not metastable")
    elif not math.isfinite(cap_c):
        reason = (f"the server's capacity is not known (taken as unlimited: no queue, no late answers), so a "
                  f"full table answers the {admitted_cap:,.0f}/s it admits, more than the {original_qps:,.0f}/s demand")
    elif not late:
        still = (f"a full table still answers min({admitted_cap:,.0f}, {cap_c:,.0f})/s"
                 if math.isfinite(admitted_cap) else f"the server still answers its {cap_c:,.0f}/s")
        reason = (f"every admitted attempt is answered in time (answers wait at most {queue_delay_s:.3f} s "
                  f"against a {stub_timeout_s:g} s timeout), so {still}, more than the {original_qps:,.0f}/s demand")
    elif admitted_cap <= cap_c:
        reason = (f"the table admits {admitted_cap:,.0f}/s, no more than the server's {cap_c:,.0f}/s: the "
                  "firewall keeps the server's queue from filling, so admitted attempts are answered in time")
    else:
        reason = (f"offered load cannot keep the server over its {cap_c:,.0f}/s (at most {top:,.0f}/s with "
                  f"{retries_n} retries" + (f" and a {retry_budget:g} retry budget" if retry_budget else "")
                  + "): its queue drains and answers come in time again")
    return WasteLoop(float(original_qps), int(retries_n), admitted_cap, cap_c if math.isfinite(cap_c) else math.nan,
                     float(queue_delay_s), float(stub_timeout_s), retry_budget, good_low, good_high,
                     (1.0 - good_high / adm_high) if adm_high > 0 else 0.0, bool(flows_high >= admitted_cap * 0.999),
                     bool(sustains), reason, loop)


@dataclass
class FirewallResult(Result):
    """The session table against a load: occupancy, when it fills, whether the loop holds it full."""

    kind = "firewall"

    size_n: float
    timeout_s: float
    port_policy: str
    original_qps: float  #: the demand the verdict is for (the run's baseline)
    retries_n: int  #: the clients' retry limit the loop was kept with
    admitted_flow_qps: float  #: size / timeout
    predicted_occupancy_n: float  #: at the original demand alone
    fill_amplification: float  #: offered / original at which per-attempt flows fill the table
    #: the per-query loop through the table and the server (:func:`waste_loop`): its end points
    #: in :attr:`WasteLoop.loop`, why it drains or sustains itself in :attr:`WasteLoop.reason`
    waste: WasteLoop
    #: "metastable" when :attr:`waste` sustains itself, else "recovers": the verdict the
    #: parameters predict, before any run
    predicted_verdict: str
    # what a recorded run showed (fit_firewall), else None / nan
    measured_max_entries_n: float | None = None
    measured_drops_n: float | None = None
    #: worst |predicted - measured| / measured before saturation (a sample against the predictions
    #: at the generator's interval ends around it, from one timeout after the first)
    occupancy_error_pct: float | None = None
    occupancy_points_n: int = 0
    first_full_unix_s: float | None = None
    verdict: str | None = None  #: the run's metastability verdict with this table's capacity
    caveats: list[str] = field(default_factory=list)
    retries_per_loss: float | None = None  #: retries the run sent per query lost (measured)
    #: admitted attempts (offered minus firewall drops) not answered, over the run's intervals with
    #: the table full: the waste that :attr:`waste` predicts, measured
    measured_waste_share: float | None = None
    waste_points_n: int = 0

    @property
    def loop(self) -> LoopStates:
        """The retry loop's stable states (those of :attr:`waste`)."""
        return self.waste.loop

    def summary(self) -> str:
        text = (f"table {self.size_n:,.0f} × {self.timeout_s:g} s admits {self.admitted_flow_qps:,.0f} new flows/s; "
                f"at {self.original_qps:,.0f}/s original ({self.port_policy} ports) it holds "
                f"{self.predicted_occupancy_n:,.0f} predicted")
        if self.measured_max_entries_n is not None:
            text += f", measured up to {self.measured_max_entries_n:,.0f}"
        if self.occupancy_error_pct is not None:
            text += f" (before saturation within {self.occupancy_error_pct:.1f} % over {self.occupancy_points_n} samples)"
        if math.isfinite(self.fill_amplification):
            text += f"; fills at {self.fill_amplification:.2f}× amplification"
        if self.measured_drops_n is not None:
            text += f"; firewall dropped {self.measured_drops_n:,.0f} new flows"
        text += f"; {self.waste.summary()} -> predicted {self.predicted_verdict}"
        if self.measured_waste_share is not None:
            text += (f"; measured waste with the table full: {100 * self.measured_waste_share:.1f} % of admitted "
                     f"attempts ({self.waste_points_n} intervals)")
        if self.verdict:
            text += f"; run verdict: {self.verdict}"
        if self.caveats:
            text += " [" + "; ".join(self.caveats) + "]"
        return text


def firewall_model(original_qps: float, size_n: float, timeout_s: float, *, retries_n: int = 2,
                   port_policy: str = "per-attempt", capacity_qps: float | None = None, queue_delay_s: float = 0.0,
                   stub_timeout_s: float = math.inf, retry_budget: float | None = None) -> FirewallResult:
    """The table's occupancy at ``original_qps`` and the per-query retry loop through it
    (:func:`waste_loop`) with the clients' ``retries_n``, the server's ``capacity_qps`` (unknown:
    never saturated), its full queue's ``queue_delay_s``, the stub's ``stub_timeout_s`` and a
    ``retry_budget``, and the verdict that predicts. Per-query ports make no new flows for
    retries, so the table holds the original demand alone."""
    if original_qps <= 0:
        raise ModelError(f"original demand {original_qps} must be > 0 queries/s")
    admitted = admitted_flow_qps(size_n, timeout_s)
    flows = new_flow_qps(original_qps, original_qps, port_policy)
    fill_amp = admitted / original_qps if port_policy == "per-attempt" else (
        1.0 if flows >= admitted > 0 and port_policy == "per-query" else math.inf)
    waste = waste_loop(original_qps, size_n, timeout_s, retries_n=retries_n, capacity_qps=capacity_qps,
                       queue_delay_s=queue_delay_s, stub_timeout_s=stub_timeout_s, retry_budget=retry_budget,
                       port_policy=port_policy)
    return FirewallResult(size_n=float(size_n), timeout_s=float(timeout_s), port_policy=port_policy,
                          original_qps=float(original_qps), retries_n=int(retries_n), admitted_flow_qps=admitted,
                          predicted_occupancy_n=occupancy(flows, timeout_s, size_n), fill_amplification=fill_amp,
                          waste=waste, predicted_verdict="metastable" if waste.sustains else "recovers")


def _table(run: RunData, *, strict: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The samples of the firewall in front of the run's target (a host may run several: the
    lab names each table after the address it guards), one row per timestamp. ``strict``: only a
    table named after the target (the collector records every firewall on its host)."""
    fw = getattr(run, "firewall", None)
    if fw is None or not len(fw):
        raise ModelError(f"run {run.run_id} has no 'firewall' samples (samples/firewall: ts_unix_s, entries_n, "
                         "size_n, drops_n): record the run with a collector that watches the firewall")
    caveats: list[str] = []
    # the lab names each table after the address it guards, dots and colons as underscores
    target = _target_endpoint(run)
    tokens = [target[0].replace(".", "_").replace(":", "_")] if target else []
    if "firewall" in fw and (fw["firewall"].nunique() > 1 or (strict and tokens)):
        mine = fw[fw["firewall"].astype(str).map(lambda name: any(f"_{tok}_" in name for tok in tokens if tok))]
        if mine["firewall"].nunique() == 1:
            fw = mine
        elif strict:
            raise ModelError(f"run {run.run_id}: no firewall table named after its target")
        else:
            busiest = fw.groupby("firewall")["drops_n"].max().idxmax()
            caveats.append(f"{fw['firewall'].nunique()} firewall tables on the host; none named after the target, "
                           f"so the one that dropped most ({busiest})")
            fw = fw[fw["firewall"] == busiest]
    cols = {"entries_n": "sum", "size_n": "sum", "drops_n": "sum"}
    if "timeout_s" in fw:
        cols["timeout_s"] = "median"
    return fw.groupby("ts_unix_s").agg(cols).sort_index(), caveats


def table_capacity(run: RunData) -> tuple[float, float] | None:
    """(new flows per second the target's firewall table admits when full, its UDP timeout), or
    None when the run has no firewall samples with a size and a timeout."""
    try:
        fw, _ = _table(run, strict=True)
    except ModelError:
        return None
    size = float(fw["size_n"].max())
    timeout = float(fw["timeout_s"].median()) if "timeout_s" in fw else 0.0
    return (size / timeout, timeout) if size > 0 and timeout > 0 else None


def _target_endpoint(run: RunData) -> tuple[str, int] | None:
    """(address, port) of the run's DNS target, None when it names none."""
    from loadkit.model.udp import udp_target  # the one reader of a run's udp:// target

    address, port = udp_target(run)
    return (address, port) if address and port is not None else None


def server_queue(run: RunData) -> tuple[float | None, float | None, list[str]]:
    """(the server's capacity in answered q/s, the delay of its full receive queue in s, caveats)
    of a run's DNS target: the capacity the lab measured at ``up`` (``lab.dns.capacity_qps`` in
    the manifest; a staging system has none), the buffer from the target socket's ``rcvbuf_bytes``
    in samples/sockets, in datagrams of :data:`loadkit.model.udp.BYTES_PER_DATAGRAM`."""
    from loadkit.model.udp import buffer_datagrams  # udp is a sibling model; only this needs it

    caveats: list[str] = []
    target = _target_endpoint(run)
    labs = run.manifest.get("lab") or []
    cap = None
    for lab in labs if isinstance(labs, list) else [labs]:
        dns = lab.get("dns") if isinstance(lab, dict) else None
        if isinstance(dns, dict) and dns.get("capacity_qps") and (target is None or dns.get("host") == target[0]):
            cap = float(dns["capacity_qps"])
            break
    if cap is None:
        caveats.append("no measured server capacity (a lab with --dns-cpu records one): the server is taken "
                       "as never saturated, so no waste is predicted")
    rcvbuf = None
    socks = getattr(run, "sockets", None)
    if socks is not None and len(socks) and target is not None and "rcvbuf_bytes" in socks:
        mine = socks[socks["local_port"] == target[1]]
        if "local_address" in mine:
            mine = mine[mine["local_address"].astype(str) == target[0]]
        if len(mine):
            rcvbuf = float(mine["rcvbuf_bytes"].max())
    if rcvbuf is None:
        caveats.append("the target socket's receive buffer was not sampled (collect its UDP port): queue delay unknown")
    delay = buffer_datagrams(rcvbuf) / cap if cap and rcvbuf else None
    return cap, delay, caveats


def waste_share(amp: pd.DataFrame, fw: pd.DataFrame, size_n: float) -> tuple[float | None, int]:
    """Share of the attempts a full table admitted that were not answered, and over how many
    generator intervals: between consecutive firewall samples that both show the table at least
    98 % full, admitted = attempts offered − new flows dropped (the samples' drop counter), and
    answered is what the generator counted. (None, n) when the full table admitted too few
    (under a quarter of what was offered, or under 50 attempts) for a share to mean anything (the
    counter and the generator are read at different moments, a second or two apart): a table
    filled at once by one cohort admits nothing until that cohort times out."""
    ts = fw.index.to_numpy(dtype=float)
    entries = fw["entries_n"].to_numpy(dtype=float)
    drops = fw["drops_n"].to_numpy(dtype=float)
    ends = amp.index.to_numpy(dtype=float)
    starts = ends - amp["interval_s"].to_numpy(dtype=float)
    offered_n = (amp["offered_qps"] * amp["interval_s"]).to_numpy(dtype=float)
    answered_n = (amp["answered_qps"] * amp["interval_s"]).to_numpy(dtype=float)
    offered = admitted = answered = 0.0
    points = 0
    for i in range(1, len(ts)):
        if entries[i - 1] < 0.98 * size_n or entries[i] < 0.98 * size_n:
            continue
        inside = (starts >= ts[i - 1]) & (ends <= ts[i])  # whole intervals only: a burst at the edge counts once
        points += int(inside.sum())
        offered += float(offered_n[inside].sum())
        answered += float(answered_n[inside].sum())
        admitted += max(0.0, float(offered_n[inside].sum()) - max(0.0, drops[i] - drops[i - 1]))
    if admitted < max(50.0, 0.25 * offered):
        return None, points
    return float(min(1.0, max(0.0, 1.0 - answered / admitted))), points


def predicted_occupancy(amp: pd.DataFrame, timeout_s: float, drops: pd.Series | None = None,
                        port_policy: str = "per-attempt") -> pd.Series:
    """Entries predicted at the end of each interval: the new flows admitted during the last
    ``timeout_s`` (Little's law applied to the recent past, so it follows ramps and bursts)."""
    col = "offered_qps" if port_policy == "per-attempt" else "original_qps"
    flows = amp[col] * amp["interval_s"] * (0.0 if port_policy == "fixed" else 1.0)
    if drops is not None:
        flows = (flows - drops.reindex(flows.index, method="nearest").fillna(0.0)).clip(lower=0.0)
    t = flows.index.to_numpy(dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(flows.to_numpy())])
    lo = np.searchsorted(t, t - timeout_s, side="right")
    return pd.Series(csum[1:] - csum[lo], index=flows.index)


def _occupancy_against(pred: pd.Series, fw: pd.DataFrame, timeout_s: float) -> pd.DataFrame:
    """Each firewall sample (``ts``, measured ``m``) against the prediction: ``miss``, how far the
    measured entries lie outside the predictions at the generator's interval ends on either side of
    the sample (the generator counts per interval, so a sample between two ends may be anywhere
    between their predictions: a burst sent just before a sample is in the next interval's count).
    Samples less than a timeout after the generator's first interval end are left out: their
    prediction's window is not yet full of counted flows."""
    ends, values = pred.index.to_numpy(dtype=float), pred.to_numpy(dtype=float)
    ts, m = fw.index.to_numpy(dtype=float), fw["entries_n"].to_numpy(dtype=float)
    keep = ts >= (ends[0] + timeout_s if len(ends) else np.inf)
    ts, m = ts[keep], m[keep]
    i = np.clip(np.searchsorted(ends, ts), 0, max(len(ends) - 1, 0))
    lo, hi = values[np.clip(i - 1, 0, None)], values[i]
    miss = np.maximum(0.0, np.maximum(np.minimum(lo, hi) - m, m - np.maximum(lo, hi)))
    return pd.DataFrame({"ts": ts, "m": m, "miss": miss})


def fit_firewall(run: RunData, *, timeout_s: float | None = None, size_n: float | None = None,
                 port_policy: str | None = None, trigger_end_unix_s: float | None = None) -> FirewallResult:
    """The firewall model on a recorded run: the table's size and timeout from its samples (or
    given), occupancy predicted from the generator's new flows beside the entries measured, the
    per-query retry loop at the run's baseline demand with its clients' retry limit, timeout,
    budget and port policy (``port_policy`` overrides the run's) and the server's capacity and
    queue (:func:`server_queue`), and the run's verdict."""
    fw, table_caveats = _table(run)
    size = float(size_n if size_n is not None else fw["size_n"].max())
    timeout = float(timeout_s if timeout_s is not None else
                    (fw["timeout_s"].median() if "timeout_s" in fw and fw["timeout_s"].max() > 0 else math.nan))
    if not math.isfinite(timeout) or timeout <= 0 or size <= 0:
        raise ModelError(f"run {run.run_id}: the firewall samples give no table size or UDP timeout; pass them "
                         "(--size, --udp-timeout)")
    amp = retry_amplification(run)
    drops = fw["drops_n"].astype(float).diff().clip(lower=0).fillna(0.0)
    busy = amp[amp["offered_qps"] > 0]
    caveats: list[str] = list(table_caveats)
    verdict, end = None, trigger_end_unix_s
    try:
        verdict_res = metastability(run, trigger_end_unix_s, capacity_qps=size / timeout)
        verdict, original = verdict_res.verdict, verdict_res.baseline_original_qps
        verdict_caveats = verdict_res.caveats
        end = verdict_res.trigger_end_unix_s
    except ModelError as err:
        caveats.append(f"no verdict: {err}")
        original = float(busy["original_qps"].median()) if len(busy) else 0.0
    cap, delay, server_caveats = server_queue(run)
    options = dns_options(run)
    if verdict is None and options.caveat():  # else the verdict's caveats say so
        server_caveats.append(options.caveat())
    policy = port_policy or options.port_policy
    res = firewall_model(original, size, timeout, retries_n=options.retries_n, port_policy=policy, capacity_qps=cap,
                         queue_delay_s=delay or 0.0, stub_timeout_s=options.timeout_s,
                         retry_budget=options.retry_budget)
    res.retries_per_loss = retries_per_loss(busy, end)
    caveats.extend(server_caveats)
    res.measured_waste_share, res.waste_points_n = waste_share(busy, fw, size)
    res.verdict, res.caveats = verdict, caveats + [c for c in (verdict_caveats if verdict else [])
                                                    if c not in caveats]
    res.measured_max_entries_n = float(fw["entries_n"].max())
    res.measured_drops_n = float(drops.sum())  # increments, reset-safe (a table made anew counts from 0)
    pred = predicted_occupancy(amp, timeout, port_policy=policy)
    both = _occupancy_against(pred, fw, timeout)
    full = fw.index[fw["entries_n"] >= 0.98 * size]
    res.first_full_unix_s = float(full[0]) if len(full) else None
    before = both[(both["m"] >= 0.05 * size) & (both["m"] < 0.9 * size)]
    if res.first_full_unix_s is not None:
        before = before[before["ts"] < res.first_full_unix_s]
    if len(before):
        res.occupancy_error_pct = float((100 * before["miss"] / before["m"]).max())
        res.occupancy_points_n = int(len(before))
    else:
        caveats.append("no sample between 5 % and 90 % of the table before it filled: occupancy not compared")
    if not drops.sum() and res.first_full_unix_s is None:
        caveats.append("the table never filled: the loop's high state is an extrapolation")
    return res
