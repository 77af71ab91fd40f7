"""Per-source rate limit (incident 3): what a per-IP queries-per-second limit refuses.

Many small sources (hijacked home routers) each send a few queries a second; together they
overload the caches, and blocking the top talkers does not help because none stands out. A
per-IP limit does, if it is set above what legitimate sources send in their busy seconds. This
model answers: for a candidate limit L, what share of sources is refused in a second, what share
of queries is dropped, and how many retries the drops cause; and which limit refuses fewer than
0.1 % of sources.

The limit is counted the way unbound's ``ip-ratelimit`` counts (``infra_ip_ratelimit_inc``):
queries from one address within one calendar second, the ones past L dropped (with
``ip-ratelimit-factor: 0``, as the lab sets it). A source is "refused" in a second when at least
one of its queries is dropped.

Where the per-source counts come from: loadkit's DNS sender does not record them per source, so
the distribution is derived from the generator's configuration in the run's manifest (sources,
per-source rate, arrival process, retries) and an arrival process per source:

- ``poisson``: every source an independent Poisson process (real clients; the default for the
  recommendation, and burstier than loadkit's own generator);
- ``generator``: what loadkit's sender actually does: one aggregate stream (Poisson or evenly
  spaced) dealt round-robin over the sources' sockets, so each source's gaps are nearly regular.
  Used to check the model against a lab run with a rate limit (predicted beside measured).

Dropped queries are retried by the clients (``retries`` more attempts each); retries add to the
next seconds' counts, taken as a Poisson stream of the same rate (a fixed point).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from loadkit.errors import ModelError
from loadkit.model._result import Result
from loadkit.record import counters
from loadkit.record.reader import RunData

ARRIVALS = ("poisson", "generator")

#: the share of sources a recommended limit may refuse in a second
TARGET_REFUSED_SHARE = 0.001

#: per-second counts are tabulated up to this many times the mean (and at least this far)
_COUNT_SPAN = 12.0


@dataclass
class LimitRow(Result):
    """What one candidate per-IP limit does to the sources."""

    kind = "source_limit_row"

    limit_qps: int
    refused_sources_share: float  #: share of sources with a query dropped in a given second
    refused_sources_share_run: float  #: share of sources with a query dropped at least once in the run
    refused_queries_share: float  #: share of all queries sent (retries included) that are dropped
    retries_qps: float  #: extra queries per second, all sources, from retried drops

    def summary(self) -> str:
        return (f"limit {self.limit_qps} q/s per source: {self.refused_sources_share:.3%} of sources refused "
                f"in a second ({self.refused_sources_share_run:.1%} at least once in the run), "
                f"{self.refused_queries_share:.3%} of queries dropped, +{self.retries_qps:.1f} q/s of retries")


@dataclass
class SourceLimitResult(Result):
    """Per-source rates and the per-IP limit to set."""

    kind = "source_limit"

    sources_n: int
    source_qps: float  #: mean queries per second per source (original queries)
    arrival: str  #: "poisson" or "generator"
    basis: str  #: where the per-source rates come from, in words
    count_quantiles: dict[str, float]  #: per-second query count of one source: p50, p99, p99.9
    candidates: list[LimitRow]
    recommended_limit_qps: int  #: the smallest limit refusing < target_share of sources in a second
    target_share: float = TARGET_REFUSED_SHARE
    retries_n: int = 1
    duration_s: float = 60.0
    #: the limit the run was made with (the lab's --dns-ratelimit), and the dropped share of
    #: queries predicted for it (generator arrivals) beside the measured one
    applied_limit_qps: int | None = None
    predicted_refused_queries_share: float | None = None
    measured_refused_queries_share: float | None = None
    caveats: list[str] = field(default_factory=list)

    def row(self, limit_qps: int) -> LimitRow | None:
        return next((r for r in self.candidates if r.limit_qps == limit_qps), None)

    def summary(self) -> str:
        rec = self.row(self.recommended_limit_qps)
        text = (f"{self.sources_n} sources × {self.source_qps:.3g} q/s ({self.arrival} arrivals; busiest "
                f"second p99.9 {self.count_quantiles.get('p99.9', math.nan):.0f} queries): per-IP limit "
                f"{self.recommended_limit_qps} q/s refuses {rec.refused_sources_share if rec else math.nan:.3%} "
                f"of sources in a second (target < {self.target_share:.1%})")
        if self.applied_limit_qps is not None:
            measured = self.measured_refused_queries_share
            text += (f"; at the run's limit {self.applied_limit_qps} q/s: dropped queries predicted "
                     f"{self.predicted_refused_queries_share:.2%}, measured "
                     + (f"{measured:.2%}" if measured is not None else "n/a"))
        return text


# ------------------------------------------------------------------------------------------------
# per-second counts of one source
# ------------------------------------------------------------------------------------------------


def _poisson_pmf(mean: float, top: int) -> np.ndarray:
    return stats.poisson.pmf(np.arange(top + 1), mean)


def _generator_times(source_qps: float, sources_n: int, ports_per_source: int, aggregate: str,
                     seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Send times of one source's original queries under the sender's round-robin over sockets.

    The sender deals one aggregate stream (rate sources × source_qps) to its sockets in turn, a
    source's ``ports_per_source`` sockets one after the other: a source gets a block of that
    many consecutive arrivals in every ``sources × ports`` of the stream.
    """
    total_qps = source_qps * sources_n
    block = max(1, ports_per_source)
    cycle = sources_n * block
    n_blocks = int(seconds * source_qps / block) + 2
    if aggregate == "poisson":
        between = rng.gamma(cycle - block + 1, 1.0 / total_qps, n_blocks)
        within = rng.exponential(1.0 / total_qps, (n_blocks, block - 1)) if block > 1 else np.zeros((n_blocks, 0))
    else:
        between = np.full(n_blocks, (cycle - block + 1) / total_qps)
        within = np.full((n_blocks, block - 1), 1.0 / total_qps)
    gaps = np.concatenate([between[:, None], within], axis=1).ravel()
    t = np.cumsum(gaps) - rng.uniform(0, gaps[0])  # a random phase
    return t[(t >= 0) & (t < seconds)]


def _generator_pmf(source_qps: float, sources_n: int, ports_per_source: int, aggregate: str,
                   top: int, seed: int, seconds: int = 20000) -> np.ndarray:
    """Per-second counts of one source's original queries under the sender, by simulation."""
    t = _generator_times(source_qps, sources_n, ports_per_source, aggregate, seconds,
                         np.random.default_rng(seed)) + np.random.default_rng(seed + 1).uniform()
    counts = np.bincount(np.floor(t).astype(int), minlength=seconds + 1)[1:seconds]
    pmf = np.bincount(np.minimum(counts, top), minlength=top + 1).astype(float)
    return pmf / pmf.sum()


def _simulate_limit(times: list[np.ndarray], limit: int, retries_n: int, timeout_s: float,
                    backoff: float, sources_n: int, duration_s: float, rng: np.random.Generator) -> LimitRow:
    """Event by event, as the server counts: each source's queries in time order, retries sent
    ``timeout × backoff^k`` after a dropped attempt k, a calendar second's queries past
    ``limit`` dropped whatever they are. Used for loadkit's own sender, whose near-regular
    arrivals make a dropped query's retry displace a later original (a chain that a Poisson
    approximation of the retries gets wrong)."""
    sent = dropped = retried = 0
    refused_seconds = seconds_total = refused_sources = 0
    for orig in times:
        phase = rng.uniform()  # where the server's second boundaries fall
        heap = [(float(x), 0) for x in orig]
        heapq.heapify(heap)
        count: dict[int, int] = {}
        refused: set[int] = set()
        while heap:
            t, attempt = heapq.heappop(heap)
            if t >= duration_s:
                continue
            sec = int(math.floor(t + phase))
            count[sec] = count.get(sec, 0) + 1
            sent += 1
            retried += attempt > 0
            if count[sec] > limit:
                dropped += 1
                refused.add(sec)
                if attempt < retries_n:
                    heapq.heappush(heap, (t + timeout_s * backoff**attempt, attempt + 1))
        refused_seconds += len(refused)
        refused_sources += bool(refused)
        seconds_total += max(1, int(math.ceil(duration_s)))
    refused_share = refused_seconds / seconds_total
    sources_sim = max(len(times), 1)
    return LimitRow(limit_qps=int(limit), refused_sources_share=refused_share,
                    refused_sources_share_run=refused_sources / sources_sim,
                    refused_queries_share=dropped / sent if sent else 0.0,
                    retries_qps=retried / duration_s * sources_n / sources_sim)


def _row(pmf_orig: np.ndarray, source_qps: float, limit: int, retries_n: int, sources_n: int,
         duration_s: float) -> LimitRow:
    """One limit's figures, retries of dropped queries folded in as a fixed point."""
    top = len(pmf_orig) - 1
    k = np.arange(top + 1)
    retry_qps = 0.0
    for _ in range(200):
        pmf = np.convolve(pmf_orig, _poisson_pmf(retry_qps, top))[: top + 1] if retry_qps > 0 else pmf_orig
        pmf = pmf / pmf.sum()
        sent = source_qps + retry_qps
        dropped = float(np.sum(np.maximum(k - limit, 0) * pmf))
        d = min(dropped / sent, 1.0) if sent > 0 else 0.0
        # each original is retried after a drop while attempts remain: d + d² + ... + d^retries
        new = source_qps * sum(d**j for j in range(1, retries_n + 1))
        if abs(new - retry_qps) < 1e-9 * max(1.0, source_qps):
            retry_qps = new
            break
        retry_qps = new
    refused = float(pmf[k > limit].sum())
    return LimitRow(limit_qps=int(limit), refused_sources_share=refused,
                    refused_sources_share_run=1.0 - (1.0 - refused) ** max(duration_s, 1.0),
                    refused_queries_share=d, retries_qps=retry_qps * sources_n)


def source_limit(sources_n: int, source_qps: float, *, arrival: str = "poisson", retries_n: int = 1,
                 timeout_s: float = 1.0, backoff: float = 2.0, duration_s: float = 60.0,
                 ports_per_source: int = 1, aggregate: str = "poisson", limits: list[int] | None = None,
                 target_share: float = TARGET_REFUSED_SHARE, basis: str = "given",
                 seed: int = 0) -> SourceLimitResult:
    """Refused sources, dropped queries and retries for candidate per-IP limits; the limit that
    refuses fewer than ``target_share`` of sources in a second."""
    if sources_n < 1:
        raise ModelError(f"sources {sources_n} must be >= 1")
    if not source_qps > 0:
        raise ModelError(f"per-source rate {source_qps} q/s must be > 0")
    if arrival not in ARRIVALS:
        raise ModelError(f"arrival {arrival!r} is not one of {', '.join(ARRIVALS)}")
    if not 0 < target_share < 1:
        raise ModelError(f"target share {target_share} must be in (0, 1)")
    top = int(math.ceil(max(_COUNT_SPAN, source_qps * 4 + 10 * math.sqrt(source_qps) + 10)))
    if arrival == "poisson":
        pmf = _poisson_pmf(source_qps, top)
    else:
        pmf = _generator_pmf(source_qps, sources_n, ports_per_source, aggregate, top, seed)
    pmf = pmf / pmf.sum()
    cdf = np.cumsum(pmf)
    quantiles = {f"p{q * 100:g}": float(np.searchsorted(cdf, q)) for q in (0.5, 0.99, 0.999)}
    if arrival == "poisson":
        def evaluate(limit: int) -> LimitRow:
            return _row(pmf, source_qps, limit, retries_n, sources_n, duration_s)
    else:
        rng = np.random.default_rng(seed)
        sim_s = min(max(duration_s, 10.0), 120.0)
        times = [_generator_times(source_qps, sources_n, ports_per_source, aggregate, sim_s, rng)
                 for _ in range(min(sources_n, 200))]

        def evaluate(limit: int) -> LimitRow:
            row = _simulate_limit(times, limit, retries_n, timeout_s, backoff, sources_n, sim_s,
                                  np.random.default_rng(seed + limit))
            # over the run's own duration, seconds taken as independent
            row.refused_sources_share_run = 1.0 - (1.0 - row.refused_sources_share) ** max(duration_s, 1.0)
            return row
    rows_by_limit: dict[int, LimitRow] = {}
    rec = None
    for limit in range(max(1, int(math.floor(source_qps)) - 1), top + 1):
        rows_by_limit[limit] = evaluate(limit)
        if rows_by_limit[limit].refused_sources_share < target_share:
            rec = rows_by_limit[limit]
            break
    if rec is None:
        raise ModelError(f"no limit up to {top} q/s refuses < {target_share:.1%} of sources")
    lo = max(1, int(math.floor(source_qps)))
    wanted = {int(limit) for limit in (limits or [])} | {lo, (lo + rec.limit_qps) // 2, rec.limit_qps,
                                                          rec.limit_qps + 2}
    rows = [rows_by_limit[limit] if limit in rows_by_limit else evaluate(limit) for limit in sorted(wanted)]
    caveats = [f"per-source rates: {basis}"]
    if arrival == "poisson":
        caveats.append("each source taken as an independent Poisson process (real clients); loadkit's "
                       "own sender is more regular, so a lab run sees fewer refusals than predicted here")
    return SourceLimitResult(sources_n=int(sources_n), source_qps=float(source_qps), arrival=arrival,
                             basis=basis, count_quantiles=quantiles, candidates=rows,
                             recommended_limit_qps=rec.limit_qps, target_share=target_share,
                             retries_n=int(retries_n), duration_s=float(duration_s), caveats=caveats)


# ------------------------------------------------------------------------------------------------
# a recorded run
# ------------------------------------------------------------------------------------------------


def _option(options: dict, key: str, default, kind=float):
    value = options.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ModelError(f"the run's [load] option {key} = {value!r} is not a number") from None


def run_sources(run: RunData) -> dict:
    """The many-sources configuration a DNS run was made with, from its manifest's profile:
    sources, per-source rate, arrival process, retries, ports per source, and the lab's per-IP
    limit (``[lab] dns_ratelimit_qps``)."""
    profile = run.manifest.get("profile") or {}
    options = dict((profile.get("load") or {}).get("options") or {})
    if "dns-sources" not in options:
        raise ModelError(f"run {run.run_id}: its manifest does not give dns-sources (a plain locust run "
                         "records no profile); pass --sources and --source-qps")
    sources = _option(options, "dns-sources", 1, int)
    per_source = _option(options, "dns-source-qps", 0.0)
    if per_source <= 0:
        per_source = _option(options, "dns-rate", 0.0) / max(sources, 1)
    lab = profile.get("lab") or {}
    limit = lab.get("dns_ratelimit_qps")
    return {
        "sources_n": sources, "source_qps": per_source,
        "aggregate": str(options.get("dns-arrival", "constant")),
        "retries_n": _option(options, "dns-retries", 2, int),
        "timeout_s": _option(options, "dns-timeout", 1.0),
        "backoff": _option(options, "dns-backoff", 2.0),
        "ports_per_source": max(1, _option(options, "dns-ports-per-source", 1, int)),
        "applied_limit_qps": int(limit) if isinstance(limit, (int, float)) and limit > 0 else None,
    }


def measured_drop_share(run: RunData) -> float | None:
    """Share of the queries sent (originals and retries) that were never answered, from the
    generator's counters; None without them. Queries still outstanding at the end count as
    dropped, which biases it up by at most one timeout's worth of queries."""
    sent = sum(counters.total(run, name) for name in counters.offered_parts("dns"))
    if sent <= 0:
        return None
    answered = counters.total(run, "dns.answered")
    return max(0.0, 1.0 - answered / sent)


def fit_source_limit(run: RunData, *, sources_n: int | None = None, source_qps: float | None = None,
                     arrival: str = "poisson", applied_limit_qps: int | None = None,
                     target_share: float = TARGET_REFUSED_SHARE, seed: int = 0) -> SourceLimitResult:
    """:func:`source_limit` for a many-sources DNS run: the configuration from its manifest (or
    the arguments), the recommendation for ``arrival`` sources, and, when the run was made
    against a per-IP limit, the dropped share predicted for loadkit's own sender beside the one
    measured."""
    if sources_n is not None and source_qps is not None:
        cfg = {"sources_n": sources_n, "source_qps": source_qps, "aggregate": "poisson", "retries_n": 2,
               "timeout_s": 1.0, "backoff": 2.0, "ports_per_source": 1, "applied_limit_qps": None}
        basis = "given on the command line"
    else:
        cfg = run_sources(run)
        basis = (f"derived from the run's manifest ({cfg['sources_n']} sources × {cfg['source_qps']:g} q/s, "
                 f"{cfg['aggregate']} arrivals, {cfg['retries_n']} retries); loadkit does not record "
                 "per-source counts")
    applied = applied_limit_qps if applied_limit_qps is not None else cfg["applied_limit_qps"]
    inc = counters.increments(run, "dns.original_sent")
    duration_s = float(inc.index.max() - inc.index.min()) if len(inc) > 1 else 60.0
    common = dict(retries_n=cfg["retries_n"], timeout_s=cfg["timeout_s"], backoff=cfg["backoff"],
                  duration_s=duration_s, ports_per_source=cfg["ports_per_source"],
                  aggregate=cfg["aggregate"], target_share=target_share, basis=basis, seed=seed)
    res = source_limit(cfg["sources_n"], cfg["source_qps"], arrival=arrival,
                       limits=[applied] if applied else None, **common)
    if applied:
        sim = source_limit(cfg["sources_n"], cfg["source_qps"], arrival="generator", limits=[applied], **common)
        res.applied_limit_qps = int(applied)
        res.predicted_refused_queries_share = sim.row(applied).refused_queries_share
        res.measured_refused_queries_share = measured_drop_share(run)
        res.caveats.append("predicted beside measured uses loadkit's sender (round-robin over sources), "
                           "the measured share counts unanswered queries (outstanding ones at the end too)")
    else:
        res.caveats.append("the run had no per-IP limit: nothing measured to compare with")
    return res
