"""A stateful firewall's session table under retries: when it fills, and whether it stays full.

A UDP session lives ``timeout_s`` after its flow's last packet, so by Little's law the table
holds ``new-flow rate × timeout`` entries. A table of ``size_n`` therefore admits at most
``size_n / timeout_s`` new flows per second once full, and drops the rest. Stub resolvers retry a
lost query from a new source port (per-attempt ports), so every retry is a new flow: drops cause
retries, which are new flows, which keep the table full (incident 2). With per-query ports a
retry reuses its query's flow and the table sees only the original demand.

The loop ``offered = original + r × offered × loss(offered)`` with
``loss(x) = max(0, 1 - (size / timeout) / x)`` is the retry loop of
:mod:`loadkit.model.retries`; a second stable state at the original demand (found by the same
:func:`~loadkit.model.retries.retry_loop_states`) means the table stays full after the trigger
is gone: metastable.
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
    capacity_loss,
    metastability,
    retries_per_loss,
    retry_amplification,
    retry_loop_states,
)
from loadkit.record.reader import RunData

PORT_POLICIES = ("per-attempt", "per-query")


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
    """New flows per second: every attempt with per-attempt source ports, every query otherwise."""
    if port_policy not in PORT_POLICIES:
        raise ModelError(f"port policy {port_policy!r}: expected one of {', '.join(PORT_POLICIES)}")
    return float(offered_qps if port_policy == "per-attempt" else original_qps)


def firewall_loss(size_n: float, timeout_s: float, port_policy: str = "per-attempt",
                  original_qps: float | None = None) -> Callable[[float], float]:
    """``loss(offered)`` the table causes: a capacity of ``size / timeout`` new flows per second;
    with per-query ports only the original demand makes flows, so the loss does not grow with
    retries."""
    cap = admitted_flow_qps(size_n, timeout_s)
    if port_policy == "per-query":
        if original_qps is None:
            raise ModelError("per-query ports: the loss depends on the original demand; give original_qps")
        fixed = capacity_loss(cap)(original_qps)
        return lambda x: fixed
    new_flow_qps(0.0, 0.0, port_policy)  # validates the policy
    return capacity_loss(cap)


@dataclass
class FirewallResult(Result):
    """The session table against a load: occupancy, when it fills, whether the loop holds it full."""

    kind = "firewall"

    size_n: float
    timeout_s: float
    port_policy: str
    original_qps: float  #: the demand the verdict is for (the run's baseline)
    retries_per_loss: float
    admitted_flow_qps: float  #: size / timeout
    predicted_occupancy_n: float  #: at the original demand alone
    fill_amplification: float  #: offered / original at which per-attempt flows fill the table
    loop: LoopStates
    # what a recorded run showed (fit_firewall), else None / nan
    measured_max_entries_n: float | None = None
    measured_drops_n: float | None = None
    occupancy_error_pct: float | None = None  #: worst |predicted - measured| / measured before saturation
    occupancy_points_n: int = 0
    first_full_unix_s: float | None = None
    verdict: str | None = None  #: the run's metastability verdict with this table's capacity
    caveats: list[str] = field(default_factory=list)

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
        text += "; " + ("the loop sustains itself after the trigger (second stable state at "
                        f"{self.loop.high_amplification:.2f}×)" if self.loop.second_stable_state
                        else "no second stable state: the table drains once the trigger stops")
        if self.measured_drops_n is not None:
            text += f"; firewall dropped {self.measured_drops_n:,.0f} new flows"
        if self.verdict:
            text += f"; run verdict: {self.verdict}"
        if self.caveats:
            text += " [" + "; ".join(self.caveats) + "]"
        return text


def firewall_model(original_qps: float, size_n: float, timeout_s: float, *, retries_per_loss: float = 1.0,
                   port_policy: str = "per-attempt", peak_offered_qps: float | None = None,
                   cap_qps: float | None = None) -> FirewallResult:
    """The table's occupancy at ``original_qps`` and the retry loop's stable states through it.

    ``retries_per_loss``: new attempts per dropped one (1 for a stub resolver that retries each
    lost attempt once more, up to its limit; 2 when it sends two copies); ``peak_offered_qps``:
    the trigger's offered load (default: twice what fills the table); ``cap_qps``: the most the
    clients can offer (every query at its last attempt).
    """
    if original_qps <= 0:
        raise ModelError(f"original demand {original_qps} must be > 0 queries/s")
    admitted = admitted_flow_qps(size_n, timeout_s)
    loss = firewall_loss(size_n, timeout_s, port_policy, original_qps)
    peak = float(peak_offered_qps) if peak_offered_qps is not None else 2.0 * max(admitted, original_qps)
    loop = retry_loop_states(original_qps, retries_per_loss, loss, peak_offered_qps=peak, cap_qps=cap_qps)
    flows = new_flow_qps(original_qps, original_qps, port_policy)
    fill_amp = admitted / original_qps if port_policy == "per-attempt" else (1.0 if flows >= admitted else math.inf)
    return FirewallResult(size_n=float(size_n), timeout_s=float(timeout_s), port_policy=port_policy,
                          original_qps=float(original_qps), retries_per_loss=float(retries_per_loss),
                          admitted_flow_qps=admitted, predicted_occupancy_n=occupancy(flows, timeout_s, size_n),
                          fill_amplification=fill_amp, loop=loop)


def _table(run: RunData, *, strict: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The samples of the firewall in front of the run's target (a host may run several: the
    lab names each table after the address it guards), one row per timestamp. ``strict``: only a
    table named after the target (the collector records every firewall on its host)."""
    fw = getattr(run, "firewall", None)
    if fw is None or not len(fw):
        raise ModelError(f"run {run.run_id} has no 'firewall' samples (samples/firewall: ts_unix_s, entries_n, "
                         "size_n, drops_n): record the run with a collector that watches the firewall")
    caveats: list[str] = []
    tokens = [str(t)[len("udp://"):].rpartition(":")[0].strip("[]").replace(".", "_").replace(":", "_")
              for t in run.manifest.get("targets") or [] if str(t).startswith("udp://")]
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


def predicted_occupancy(amp: pd.DataFrame, timeout_s: float, drops: pd.Series | None = None,
                        port_policy: str = "per-attempt") -> pd.Series:
    """Entries predicted at the end of each interval: the new flows admitted during the last
    ``timeout_s`` (Little's law applied to the recent past, so it follows ramps and bursts)."""
    col = "offered_qps" if port_policy == "per-attempt" else "original_qps"
    flows = amp[col] * amp["interval_s"]
    if drops is not None:
        flows = (flows - drops.reindex(flows.index, method="nearest").fillna(0.0)).clip(lower=0.0)
    t = flows.index.to_numpy(dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(flows.to_numpy())])
    lo = np.searchsorted(t, t - timeout_s, side="right")
    return pd.Series(csum[1:] - csum[lo], index=flows.index)


def fit_firewall(run: RunData, *, timeout_s: float | None = None, size_n: float | None = None,
                 port_policy: str = "per-attempt", trigger_end_unix_s: float | None = None) -> FirewallResult:
    """The firewall model on a recorded run: the table's size and timeout from its samples (or
    given), occupancy predicted from the generator's new flows beside the entries measured, the
    retry loop fitted (retries per lost query over the run) at the run's baseline demand."""
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
    r = retries_per_loss(busy, end)
    if r is None:
        r = 1.0
        caveats.append("nothing was lost: one retry per loss assumed")
    top = float(busy["amplification"].max()) if len(busy) else math.nan
    res = firewall_model(original, size, timeout, retries_per_loss=r, port_policy=port_policy,
                         peak_offered_qps=float(busy["offered_qps"].max()) if len(busy) else None,
                         cap_qps=top * original if math.isfinite(top) else None)
    res.verdict, res.caveats = verdict, caveats + [c for c in (verdict_caveats if verdict else [])
                                                    if c not in caveats]
    res.measured_max_entries_n = float(fw["entries_n"].max())
    res.measured_drops_n = float(fw["drops_n"].iloc[-1] - fw["drops_n"].iloc[0])
    pred = predicted_occupancy(amp, timeout, port_policy=port_policy)
    both = pd.merge_asof(pd.DataFrame({"ts": fw.index.to_numpy(dtype=float), "m": fw["entries_n"].to_numpy(float)}),
                         pd.DataFrame({"ts": pred.index.to_numpy(dtype=float), "p": pred.to_numpy()}),
                         on="ts", direction="nearest")
    full = fw.index[fw["entries_n"] >= 0.98 * size]
    res.first_full_unix_s = float(full[0]) if len(full) else None
    before = both[(both["m"] >= 0.05 * size) & (both["m"] < 0.9 * size)]
    if res.first_full_unix_s is not None:
        before = before[before["ts"] < res.first_full_unix_s]
    if len(before):
        res.occupancy_error_pct = float((100 * (before["p"] - before["m"]).abs() / before["m"]).max())
        res.occupancy_points_n = int(len(before))
    else:
        caveats.append("no sample between 5 % and 90 % of the table before it filled: occupancy not compared")
    if not drops.sum() and res.first_full_unix_s is None:
        caveats.append("the table never filled: the loop's high state is an extrapolation")
    return res
