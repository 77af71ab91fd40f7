"""Headroom: where the proxies behind a load balancer fall over, and whether they go together.

Per proxy (a collector group that held sessions), memory is fitted against concurrent client
sessions with a robust straight line (Huber weights, so a sample taken mid-reclaim or mid-restart
does not drag the slope). Memory is the cgroup charge when the proxy has a limit, else PSS, else
USS: summed RSS counts every shared page once per process and overstates a dovecot proxy about
sixfold. A proxy without a cgroup limit needs the memory it may use from the caller
(``limit_bytes``); it is never left out.

From the fits: sessions at each proxy's limit; with the balancer's shares (round-robin and
least-connections both keep held-session counts equal; weights make them proportional) the total
concurrency at which the first proxy fails; then the cascade: the failed proxy's clients reconnect
to the survivors, whose shares grow, until either the survivors hold or all N fail; and N+1, the
total the others survive with the proxy whose loss hurts most taken down for maintenance.

The 95 % interval samples three things: each line's parameters (a sandwich covariance, which
is what a Huber fit's standard errors need: the plain weighted-least-squares one is about 10 %
low), the samples' scatter about the line (the charge at the moment of failure is one sample),
and an allowance for curvature beyond the fitted range that grows with the extrapolation
distance (a line fitted on half the ramp missed a proxy type's fall-over by 7 %). Proxies with
the same limit and share whose lines agree are pooled into one line: with identical proxies the
all-fail total is N × the capacity, and the smallest of N noisy estimates is biased low. The
interval does not cover a change of workload (another client mix, TLS, a new release).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from loadkit.errors import ModelError
from loadkit.model._result import Result
from loadkit.record.reader import RunData

POLICIES = ("roundrobin", "leastconn", "weighted")

#: samples at or above this fraction of the limit are left out of the fit: near the limit the
#: kernel reclaims page cache and the charge stops being a function of sessions alone
FIT_MAX_FRACTION = 0.95

#: the curvature allowance: memory taken as base + per × s × (1 + c × s / capacity) with c of
#: this standard deviation (a stated prior, not estimated from the data). A straight line fitted on
#: sessions 0..f × capacity of such a curve misses the capacity by about c × (1 - f + f²/6), so
#: the allowance grows with the extrapolation distance and vanishes for no fitted proxy.
#: benchmarks/model_coverage.py checks the interval's coverage on ramps drawn from this prior
EXTRAPOLATION_REL_SD = 0.08


def _curvature_factor(c: float, f: np.ndarray) -> np.ndarray:
    """True capacity / straight-line capacity when memory is u + c u² (u = sessions / capacity)
    and the line was fitted on u in [0, f]: the least-squares line of u + c u² on [0, f] has
    slope 1 + c f and intercept -c f²/6, so it reaches 1 at (1 + c f²/6) / (1 + c f); the curve
    reaches it at (sqrt(1 + 4c) - 1) / 2c (never, for c <= -1/4)."""
    if abs(c) < 1e-12:
        return np.ones_like(f)
    true_u = (math.sqrt(1.0 + 4.0 * c) - 1.0) / (2.0 * c) if 1.0 + 4.0 * c > 0 else math.inf
    return true_u * (1.0 + c * f) / (1.0 + c * f * f / 6.0)

#: lines of proxies with one limit and one share are pooled unless a Wald test of their equality
#: rejects it at this level
POOL_TEST_ALPHA = 0.01


@dataclass
class ProxyFit(Result):
    """Memory against sessions for one proxy (one collector group)."""

    kind = "proxy_fit"

    name: str
    bytes_per_session: float
    bytes_per_session_stderr: float
    base_bytes: float
    base_bytes_stderr: float
    limit_bytes: float
    sessions_at_limit: float
    admission_limit_sessions: float  #: sessions that keep memory under admission_fraction * limit
    share: float  #: fraction of all sessions the balancer gives this proxy
    memory_source: str  #: "cgroup", "pss" or "uss"
    points_n: int
    max_sessions_observed: float
    limit_source: str = "cgroup"  #: "cgroup" (recorded) or "given" (limit_bytes from the caller)
    pooled: bool = False  #: capacity from one line pooled over identical proxies

    def summary(self) -> str:
        pooled = " (pooled line)" if self.pooled else ""
        return (
            f"{self.name}: {self.bytes_per_session / 2**20:.2f} MiB/session "
            f"(± {self.bytes_per_session_stderr / 2**20:.2f}), base {self.base_bytes / 2**20:.0f} MiB, "
            f"limit {self.limit_bytes / 2**20:.0f} MiB ({self.limit_source}) at ≈ "
            f"{self.sessions_at_limit:.0f} sessions{pooled}"
        )


@dataclass
class HeadroomResult(Result):
    """Where the first and the last proxy fall over, with the cascade between them."""

    kind = "headroom"

    policy: str
    proxies: list[ProxyFit]
    first_failure_sessions: float
    first_failure_proxy: str
    all_fail_sessions: float
    all_fail_ci95: tuple[float, float]
    cascade_all_fail: bool  #: True when the first failure alone takes all N down
    cascade_order: list[str]  #: proxies in the order they fail at all_fail_sessions
    admission_fraction: float
    #: the entrance (frontend) limit: total sessions at which the first proxy reaches its
    #: admission limit under the balancer's shares, min over proxies of admission limit / share
    admission_limit_total_sessions: float
    forecast_peak_sessions: float | None = None
    headroom_pct: float | None = None  #: (first failure / forecast - 1) * 100
    #: proxies, added in the same pattern of weights, that keep every proxy under its admission
    #: limit at the forecast: ceil(N × forecast / admission_limit_total); the proxy with the
    #: largest share per unit of capacity decides
    proxies_needed_for_forecast: int | None = None
    max_fraction_observed: float = math.nan  #: largest observed total / first failure (extrapolation)
    reconnect_overhead: float = 0.0
    run_ids: list[str] = field(default_factory=list)
    #: sum of the per-proxy admission limits (what per-server maxconn admits when the balancer
    #: skips full servers)
    admission_limit_sum_sessions: float = math.nan
    #: N+1: total sessions the others survive (no further failure) with one proxy down
    n_minus_1_sessions: float = math.nan
    n_minus_1_ci95: tuple[float, float] = (math.nan, math.nan)
    n_minus_1_proxy_down: str = ""  #: the proxy whose loss leaves the least
    first_failure_ci95: tuple[float, float] = (math.nan, math.nan)
    #: total sessions held when a run saw its first OOM kill (None: no run fell over)
    measured_first_failure_sessions: float | None = None
    caveats: list[str] = field(default_factory=list)

    def summary(self) -> str:
        n = len(self.proxies)
        lo, hi = self.all_fail_ci95
        ci = f"(95 % CI {lo:.0f}–{hi:.0f})"
        if self.cascade_all_fail:
            text = f"all {n} proxies fall over at ≈ {self.all_fail_sessions:.0f} concurrent sessions {ci}"
        else:
            text = (
                f"first proxy ({self.first_failure_proxy}) falls over at ≈ "
                f"{self.first_failure_sessions:.0f} concurrent sessions, all {n} at ≈ "
                f"{self.all_fail_sessions:.0f} {ci}"
            )
        if math.isfinite(self.max_fraction_observed):
            text += f", fitted on up to {self.max_fraction_observed:.0%} of the predicted fall-over"
        if self.measured_first_failure_sessions is not None:
            text += f"; measured: first OOM kill at {self.measured_first_failure_sessions:.0f} sessions"
        if n > 1 and math.isfinite(self.n_minus_1_sessions):
            text += (f"; with {self.n_minus_1_proxy_down} down (N+1) the others survive up to ≈ "
                     f"{self.n_minus_1_sessions:.0f}")
        if self.forecast_peak_sessions is not None:
            text += (
                f"; forecast peak {self.forecast_peak_sessions:.0f} → headroom "
                f"{self.headroom_pct:+.0f} %, {self.proxies_needed_for_forecast} proxies needed"
            )
        return text


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def _as_runs(runs: RunData | list[RunData]) -> list[RunData]:
    runs = [runs] if isinstance(runs, RunData) else list(runs)
    if not runs:
        raise ModelError("no runs given: pass at least one run directory")
    return runs


def _lab_of(g: pd.DataFrame) -> dict[str, float]:
    """proxy -> recorded cgroup limit: what identifies the lab a run measured."""
    return {str(k): float(v) for k, v in g.groupby("proxy")["cgroup_limit_bytes"].max().items()}


def _describe_lab(lab: dict[str, float]) -> str:
    limits = sorted({v for v in lab.values()})
    mem = "/".join(f"{v / 2**20:.0f} MiB" if v > 0 else "no limit" for v in limits)
    return f"{len(lab)} proxies × {mem}"


def _check_same_lab(frames: list[tuple[str, pd.DataFrame]]) -> None:
    """Runs of different labs (proxy count or limits) are never merged by proxy name."""
    first_id, first = frames[0][0], _lab_of(frames[0][1])
    for run_id, g in frames[1:]:
        lab = _lab_of(g)
        if lab != first:
            raise ModelError(
                f"runs {first_id} ({_describe_lab(first)}) and {run_id} ({_describe_lab(lab)}) come "
                "from different labs (proxies or memory limits differ): fit them separately")


def headroom_points(runs: RunData | list[RunData], limit_bytes: float | None = None) -> pd.DataFrame:
    """The samples the headroom fit uses: one row per (proxy, instant).

    Proxies are the groups that held sessions. Columns ``run_id``, ``proxy``, ``ts_unix_s``,
    ``sessions_n``, ``memory_bytes``, ``limit_bytes``, ``limit_source``, ``memory_source``,
    ``oom_kill`` (an OOM kill since the run's first sample of that proxy) and ``in_fit`` (False
    for samples near the limit or after an OOM kill in the same run).
    """
    frames = []
    for r in _as_runs(runs):
        if not len(r.groups):
            continue
        g = r.groups.copy()
        several_hosts = g["host"].nunique() > 1
        g["proxy"] = (g["host"] + "/" + g["group"]) if several_hosts else g["group"].astype(str)
        held = g.groupby("proxy")["sessions_n"].max()
        g = g[g["proxy"].isin(held[held > 0].index)]
        if len(g):
            g["run_id"] = r.run_id
            frames.append((r.run_id, g))
    if not frames:
        raise ModelError("the runs have no collector group samples with sessions (samples/groups): "
                         "record them with the collector watching each proxy and its ports")
    _check_same_lab(frames)
    g = pd.concat([f for _, f in frames], ignore_index=True)
    out = []
    for name, sub in g.groupby("proxy", sort=True):
        sub = sub.copy()
        if float(sub["cgroup_limit_bytes"].max()) > 0:
            sub["memory_bytes"] = sub["cgroup_memory_bytes"].astype(float)
            sub["memory_source"] = "cgroup"
            sub["limit_bytes"] = sub["cgroup_limit_bytes"].astype(float)
            sub["limit_source"] = "cgroup"
        else:
            if not limit_bytes or limit_bytes <= 0:
                raise ModelError(f"proxy {name} has no cgroup limit in the samples; pass limit_bytes "
                                 "(--limit-bytes) for the memory it may use")
            # summed RSS overstates shared pages; PSS splits them fairly, USS leaves them out
            use_pss = sub["pss_bytes"] > 0
            sub["memory_bytes"] = np.where(use_pss, sub["pss_bytes"], sub["uss_bytes"]).astype(float)
            sub["memory_source"] = np.where(use_pss, "pss", "uss")
            sub["limit_bytes"] = float(limit_bytes)
            sub["limit_source"] = "given"
            sub = sub[sub["memory_bytes"] > 0]
            if not len(sub):
                raise ModelError(f"proxy {name} has neither a cgroup charge nor USS/PSS (run the "
                                 "collector with permission to read smaps); summed RSS is not used")
        out.append(sub)
    g = pd.concat(out, ignore_index=True).sort_values(["run_id", "proxy", "ts_unix_s"]).reset_index(drop=True)
    oom = np.zeros(len(g), dtype=bool)
    for _, idx in g.groupby(["run_id", "proxy"]).groups.items():
        # the OOM counter is cumulative over the cgroup's life: compare with this run's own first
        # sample, so a kill in an earlier run does not exclude a later clean one
        kills = g.loc[idx, "cgroup_oom_kills_n"].to_numpy()
        oom[np.asarray(idx)] = np.maximum.accumulate(kills > kills[0])
    near_limit = g["memory_bytes"] >= FIT_MAX_FRACTION * g["limit_bytes"]
    g["oom_kill"] = oom
    g["in_fit"] = ~(oom | near_limit.to_numpy())
    return g[["run_id", "proxy", "ts_unix_s", "sessions_n", "memory_bytes", "limit_bytes",
              "limit_source", "memory_source", "oom_kill", "in_fit"]]


def _measured_first_failure(pts: pd.DataFrame) -> float | None:
    """Total sessions held just before a run's first OOM kill (the smallest over runs)."""
    found = []
    for _, run in pts.groupby("run_id"):
        kills = run[run["oom_kill"]]
        if not len(kills):
            continue
        t_fail = float(kills["ts_unix_s"].min())
        totals = run[run["ts_unix_s"] < t_fail].groupby("ts_unix_s")["sessions_n"].sum()
        if len(totals):
            found.append(float(totals.max()))
    return min(found) if found else None


# ------------------------------------------------------------------------------------------------
# fit
# ------------------------------------------------------------------------------------------------


def huber_line(x: np.ndarray, y: np.ndarray, c: float = 1.345, max_iter: int = 100
               ) -> tuple[np.ndarray, np.ndarray]:
    """Robust line ``y = b0 + b1 x`` by iteratively reweighted least squares with Huber weights.

    Returns ``(beta, cov)``. The scale is the MAD of the residuals (1.4826 × MAD estimates sigma
    for normal noise). The covariance is the M-estimator's sandwich ``s² n/(n-2) A⁻¹ B A⁻¹`` with
    ``A = Σ ψ'(u) x xᵀ`` and ``B = Σ ψ(u)² x xᵀ`` (Huber 1981, §7.6): the weighted-least-squares
    covariance treats the weights as known and comes out too small.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    X = np.column_stack([np.ones_like(x), x])
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    scale = 0.0
    for _ in range(max_iter):
        r = y - X @ beta
        scale = 1.4826 * np.median(np.abs(r - np.median(r)))
        if scale <= 1e-12 * max(1.0, np.abs(y).max()):
            break
        u = np.abs(r) / (c * scale)
        w = np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-300))
        sw = np.sqrt(w)
        new = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)[0]
        if np.allclose(new, beta, rtol=1e-10, atol=1e-9):
            beta = new
            break
        beta = new
    r = y - X @ beta
    n = len(y)
    if scale <= 1e-12 * max(1.0, np.abs(y).max()):
        # (nearly) exact line: the ordinary least-squares covariance
        sigma2 = float(np.sum(r**2) / max(n - 2, 1))
        return beta, sigma2 * np.linalg.pinv(X.T @ X)
    u = r / scale
    psi = np.clip(u, -c, c)
    dpsi = (np.abs(u) <= c).astype(float)
    A = (X * dpsi[:, None]).T @ X
    B = (X * (psi**2)[:, None]).T @ X
    a_inv = np.linalg.pinv(A)
    cov = scale**2 * n / max(n - 2, 1) * a_inv @ B @ a_inv
    return beta, cov


def _shares(names: list[str], policy: str, weights: dict[str, float] | None) -> np.ndarray:
    if policy not in POLICIES:
        raise ModelError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    if policy == "weighted" and not weights:
        raise ModelError("policy 'weighted' needs weights, e.g. --weight p1=2 --weight p2=1")
    if not weights:
        return np.full(len(names), 1.0 / len(names))
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ModelError(f"weights name unknown proxies {', '.join(unknown)}; proxies are {', '.join(names)}")
    w = np.array([float(weights.get(n, 1.0)) for n in names])
    if (w < 0).any() or w.sum() <= 0:
        raise ModelError("weights must be >= 0 and not all 0")
    return w / w.sum()


def cascade(total: float, capacities: np.ndarray, shares: np.ndarray,
            reconnect_overhead: float = 0.0) -> list[int]:
    """Indices of proxies that fail, in order, when ``total`` sessions arrive.

    A proxy fails when its share of the sessions reaches its capacity. Its clients reconnect to
    the survivors (shares renormalised among them); ``reconnect_overhead`` adds that fraction of
    the lost sessions again, for clients that hold a half-open login while retrying.
    """
    alive = [i for i in range(len(capacities)) if shares[i] > 0]
    failed: list[int] = []
    lost = 0.0
    while alive:
        s = shares[alive] / shares[alive].sum()
        load = s * (total + reconnect_overhead * lost)
        newly = [i for i, l in zip(alive, load) if l >= capacities[i] * (1 - 1e-12)]
        if not newly:
            break
        lost += float(sum(l for i, l in zip(alive, load) if i in newly))
        failed.extend(sorted(newly, key=lambda i: capacities[i] / shares[i]))
        alive = [i for i in alive if i not in newly]
    return failed


def _all_fail_total(capacities: np.ndarray, shares: np.ndarray, reconnect_overhead: float) -> float:
    n_live = int((shares > 0).sum())
    lo = float(np.min(capacities[shares > 0] / shares[shares > 0]))
    if len(cascade(lo, capacities, shares, reconnect_overhead)) == n_live:
        return lo
    hi = lo
    for _ in range(200):
        hi *= 2.0
        if len(cascade(hi, capacities, shares, reconnect_overhead)) == n_live:
            break
    for _ in range(100):  # bisection to well below one session
        mid = 0.5 * (lo + hi)
        if len(cascade(mid, capacities, shares, reconnect_overhead)) == n_live:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-3:
            break
    return hi


def _first_total(capacities: np.ndarray, shares: np.ndarray) -> float:
    live = shares > 0
    return float(np.min(capacities[live] / shares[live]))


def _n_minus_1(capacities: np.ndarray, shares: np.ndarray) -> tuple[float, int]:
    """(total the others survive, index of the proxy down) for the worst single proxy down."""
    best = (math.inf, -1)
    for j in range(len(capacities)):
        rest = shares.copy()
        rest[j] = 0.0
        if rest.sum() <= 0:
            continue
        best = min(best, (_first_total(capacities, rest / rest.sum()), j))
    return best


@dataclass
class _Line:
    """One fitted line and the proxies whose capacity it gives (one, or several pooled)."""

    members: list[int]
    beta: np.ndarray
    cov: np.ndarray
    scatter_bytes: float
    max_x: float


def _line_for(name: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    if len(x) < 5 or len(np.unique(x)) < 3:
        raise ModelError(
            f"proxy {name}: {len(x)} usable samples at {len(np.unique(x))} session counts; "
            "need >= 5 samples at >= 3 session counts (ramp sessions while the collector runs)"
        )
    beta, cov = huber_line(x, y)
    if beta[1] <= 0:
        raise ModelError(f"proxy {name}: memory does not grow with sessions (slope "
                         f"{beta[1]:.0f} B/session); is sessions_n recorded for its ports?")
    resid = y - (beta[0] + beta[1] * x)
    return beta, cov, 1.4826 * float(np.median(np.abs(resid - np.median(resid))))


def _lines_agree(betas: list[np.ndarray], covs: list[np.ndarray]) -> bool:
    """Wald test that several lines are one line (chi² with 2(k-1) degrees of freedom)."""
    precisions = [np.linalg.pinv(c) for c in covs]
    mean = np.linalg.pinv(sum(precisions)) @ sum(p @ b for p, b in zip(precisions, betas))
    wald = float(sum((b - mean) @ p @ (b - mean) for p, b in zip(precisions, betas)))
    return bool(stats.chi2.sf(wald, 2 * (len(betas) - 1)) > POOL_TEST_ALPHA)


def _fit_lines(data: list[tuple[np.ndarray, np.ndarray]], names: list[str], limits: np.ndarray,
               shares: np.ndarray, sources: list[str]) -> tuple[list[_Line], list]:
    """Per-proxy lines, and pooled lines for proxies that share limit, share and memory source
    and whose lines agree. Returns (capacity lines, per-proxy (beta, cov))."""
    own = [_line_for(n, x, y) for n, (x, y) in zip(names, data)]
    keys: dict[tuple, list[int]] = {}
    for i in range(len(names)):
        keys.setdefault((limits[i], round(float(shares[i]), 12), sources[i]), []).append(i)
    lines = []
    for members in keys.values():
        if len(members) > 1 and _lines_agree([own[i][0] for i in members], [own[i][1] for i in members]):
            x = np.concatenate([data[i][0] for i in members])
            y = np.concatenate([data[i][1] for i in members])
            beta, cov, scatter = _line_for("+".join(names[i] for i in members), x, y)
            lines.append(_Line(members, beta, cov, scatter, float(x.max())))
        else:
            lines.extend(_Line([i], own[i][0], own[i][1], own[i][2], float(data[i][0].max()))
                         for i in members)
    return lines, [(b, c) for b, c, _ in own]


def _capacities(lines: list[_Line], limits: np.ndarray, n: int) -> np.ndarray:
    caps = np.empty(n)
    for line in lines:
        for i in line.members:
            caps[i] = (limits[i] - line.beta[0]) / line.beta[1]
    return caps


def _draws(lines: list[_Line], limits: np.ndarray, caps: np.ndarray, shares: np.ndarray,
           reconnect_overhead: float, draws_n: int, seed: int) -> np.ndarray:
    """(first failure, all fail, N+1) totals for ``draws_n`` samples of the fits' uncertainty."""
    rng = np.random.default_rng(seed)
    n = len(limits)
    # the fraction of each proxy's capacity its line saw (see EXTRAPOLATION_REL_SD)
    seen = np.empty(n)
    for line in lines:
        for i in line.members:
            seen[i] = min(1.0, line.max_x / caps[i])
    sampled = [rng.multivariate_normal(line.beta, line.cov, size=draws_n, check_valid="ignore")
               for line in lines]
    curvature = rng.normal(0.0, 1.0, size=draws_n)  # one workload: one curvature for all proxies
    out = []
    for d in range(draws_n):
        caps_d = np.empty(n)
        for line, beta in zip(lines, sampled):
            base, slope = beta[d]
            if slope <= 0:
                break
            for i in line.members:
                eps = rng.normal(0.0, line.scatter_bytes)
                caps_d[i] = (limits[i] - base - eps) / slope
        else:
            caps_d *= _curvature_factor(EXTRAPOLATION_REL_SD * curvature[d], seen)
            if (caps_d > 0).all() and np.isfinite(caps_d).all():
                nm1 = _n_minus_1(caps_d, shares)[0] if n > 1 else math.nan
                out.append((_first_total(caps_d, shares), _all_fail_total(caps_d, shares, reconnect_overhead), nm1))
    return np.array(out).reshape(-1, 3)


def _ci(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return (math.nan, math.nan)
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))


def fit_headroom(
    runs: RunData | list[RunData],
    *,
    policy: str = "roundrobin",
    weights: dict[str, float] | None = None,
    admission_fraction: float = 0.9,
    forecast_peak_sessions: float | None = None,
    limit_bytes: float | None = None,
    reconnect_overhead: float = 0.0,
    ci_draws: int = 2000,
    seed: int = 0,
) -> HeadroomResult:
    """Fit memory per session for every proxy and find where the first and the last fall over.

    ``limit_bytes`` is the memory a proxy may use when the run recorded no cgroup limit for it
    (for example a host's RAM share); proxies with a cgroup limit use the recorded one. Runs must
    come from one lab (same proxies and limits).
    """
    runs = _as_runs(runs)
    if not 0 < admission_fraction <= 1:
        raise ModelError(f"admission fraction {admission_fraction} must be in (0, 1]")
    if forecast_peak_sessions is not None and forecast_peak_sessions <= 0:
        raise ModelError(f"forecast peak {forecast_peak_sessions} must be > 0 sessions")
    if reconnect_overhead < 0:
        raise ModelError(f"reconnect overhead {reconnect_overhead} must be >= 0")
    pts = headroom_points(runs, limit_bytes=limit_bytes)
    names = sorted(pts["proxy"].unique())
    shares = _shares(names, policy, weights)
    subs = [pts[(pts["proxy"] == name) & pts["in_fit"]] for name in names]
    data = [(s["sessions_n"].to_numpy(dtype=float), s["memory_bytes"].to_numpy(dtype=float)) for s in subs]
    limits = np.array([float(pts.loc[pts["proxy"] == name, "limit_bytes"].max()) for name in names])
    sources = [str(s["memory_source"].iloc[0]) if len(s) else "" for s in subs]
    lines, own = _fit_lines(data, names, limits, shares, sources)
    caps = _capacities(lines, limits, len(names))
    if (caps <= 0).any():
        bad = ", ".join(n for n, c in zip(names, caps) if c <= 0)
        raise ModelError(f"proxies {bad} are at their memory limit with no sessions (base memory above limit)")
    line_of = {i: line for line in lines for i in line.members}
    fits = []
    for i, name in enumerate(names):
        line = line_of[i]
        fits.append(ProxyFit(
            name=name, bytes_per_session=float(line.beta[1]),
            bytes_per_session_stderr=math.sqrt(max(line.cov[1, 1], 0.0)), base_bytes=float(line.beta[0]),
            base_bytes_stderr=math.sqrt(max(line.cov[0, 0], 0.0)), limit_bytes=float(limits[i]),
            sessions_at_limit=float(caps[i]),
            admission_limit_sessions=float((admission_fraction * limits[i] - line.beta[0]) / line.beta[1]),
            share=float(shares[i]), memory_source=sources[i], points_n=len(data[i][0]),
            max_sessions_observed=float(data[i][0].max()), limit_source=str(subs[i]["limit_source"].iloc[0]),
            pooled=len(line.members) > 1,
        ))
    return _result(runs, pts, fits, lines, caps, limits, shares, policy=policy,
                   admission_fraction=admission_fraction, forecast=forecast_peak_sessions,
                   reconnect_overhead=reconnect_overhead, ci_draws=ci_draws, seed=seed)


def _result(runs, pts, fits, lines, caps, limits, shares, *, policy, admission_fraction, forecast,
            reconnect_overhead, ci_draws, seed) -> HeadroomResult:
    names = [f.name for f in fits]
    live = shares > 0
    first_idx = int(np.argmin(np.where(live, caps / np.where(live, shares, 1), np.inf)))
    first_total = _first_total(caps, shares)
    all_total = _all_fail_total(caps, shares, reconnect_overhead)
    order = cascade(all_total, caps, shares, reconnect_overhead)
    cascade_all = len(cascade(first_total, caps, shares, reconnect_overhead)) == int(live.sum())
    nm1, down = _n_minus_1(caps, shares) if len(fits) > 1 else (math.nan, -1)
    draws = _draws(lines, limits, caps, shares, reconnect_overhead, ci_draws, seed)

    admits = np.array([f.admission_limit_sessions for f in fits])
    admit_total = float(np.min(np.where(live, admits / np.where(live, shares, 1), np.inf)))
    headroom_pct = needed = None
    if forecast is not None:
        headroom_pct = (first_total / forecast - 1.0) * 100.0
        # the fleet grown in its own pattern of weights: the proxy with the largest share per
        # admitted session decides (with weights 8:1:1 on equal proxies, the heavy one)
        needed = int(math.ceil(len(fits) * forecast / admit_total)) if admit_total > 0 else None
    # how far the fit extrapolates: the largest total observed at one instant vs first failure
    totals_obs = pts[pts["in_fit"]].groupby(["run_id", "ts_unix_s"])["sessions_n"].sum()
    max_frac = float(totals_obs.max() / first_total) if len(totals_obs) else math.nan
    measured = _measured_first_failure(pts)
    caveats = _caveats(fits, lines, max_frac, measured, first_total)
    idle = sorted({str(g) for r in runs if len(r.groups)
                   for g, lim in r.groups.groupby("group")["cgroup_limit_bytes"].max().items()
                   if lim > 0} - {n.rsplit("/", 1)[-1] for n in names})
    if idle:
        caveats.append(f"{', '.join(idle)} had a memory limit but held no sessions: not counted as proxies")
    return HeadroomResult(
        policy=policy, proxies=fits, first_failure_sessions=first_total,
        first_failure_proxy=names[first_idx], all_fail_sessions=all_total, all_fail_ci95=_ci(draws[:, 1]),
        cascade_all_fail=cascade_all, cascade_order=[names[i] for i in order],
        admission_fraction=admission_fraction, admission_limit_total_sessions=admit_total,
        forecast_peak_sessions=forecast, headroom_pct=headroom_pct, proxies_needed_for_forecast=needed,
        max_fraction_observed=max_frac, reconnect_overhead=reconnect_overhead,
        run_ids=[r.run_id for r in runs], admission_limit_sum_sessions=float(admits[live].sum()),
        n_minus_1_sessions=float(nm1), n_minus_1_ci95=_ci(draws[:, 2]),
        n_minus_1_proxy_down=names[down] if down >= 0 else "", first_failure_ci95=_ci(draws[:, 0]),
        measured_first_failure_sessions=measured, caveats=caveats,
    )


def _caveats(fits: list[ProxyFit], lines: list[_Line], max_frac: float, measured: float | None,
             first_total: float) -> list[str]:
    out = []
    if math.isfinite(max_frac) and max_frac < 0.9:
        out.append(f"extrapolated: fitted on up to {max_frac:.0%} of the predicted fall-over; the "
                   "interval allows for curvature beyond that, not for a change of workload")
    given = [f.name for f in fits if f.limit_source == "given"]
    if given:
        out.append(f"no cgroup limit recorded for {', '.join(given)}: the limit given "
                   f"({fits[[f.name for f in fits].index(given[0])].limit_bytes / 2**20:.0f} MiB) was used")
    for line in lines:
        if len(line.members) > 1:
            out.append(f"{len(line.members)} proxies with one limit and matching lines pooled into one line")
    if measured is not None:
        out.append(f"measured: first OOM kill with {measured:.0f} sessions held; predicted first "
                   f"failure {first_total:.0f} ({(first_total / measured - 1) * 100:+.1f} %)")
    else:
        out.append("no run reached an OOM kill: the fall-over is predicted, not measured")
    return out
