"""Headroom: where the proxies behind a load balancer fall over, and whether they go together.

Per proxy (a group of the collector), memory is fitted against concurrent client sessions with a
robust straight line (Huber weights, so a sample taken mid-reclaim or mid-restart does not drag
the slope). Memory is the cgroup charge when the group has a limit, else PSS, else USS: summed RSS
counts every shared page once per process and overstates a dovecot proxy about sixfold.

From the fits: sessions at each proxy's limit; with the balancer's shares (round-robin and
least-connections both keep held-session counts equal; weights make them proportional) the total
concurrency at which the first proxy fails; then the cascade: the failed proxy's clients reconnect
to the survivors, whose shares grow, until either the survivors hold or all N fail. The 95 %
interval comes from sampling the fitted lines' parameters (their covariance) and the samples'
scatter about the lines, so it covers fit and measurement noise, not a change of workload (a
different client mix, TLS, a new release) and not the extrapolation from a partial ramp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loadkit.errors import ModelError
from loadkit.model._result import Result
from loadkit.record.reader import RunData

POLICIES = ("roundrobin", "leastconn", "weighted")

#: samples at or above this fraction of the limit are left out of the fit: near the limit the
#: kernel reclaims page cache and the charge stops being a function of sessions alone
FIT_MAX_FRACTION = 0.95


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

    def summary(self) -> str:
        return (
            f"{self.name}: {self.bytes_per_session / 2**20:.2f} MiB/session "
            f"(± {self.bytes_per_session_stderr / 2**20:.2f}), base {self.base_bytes / 2**20:.0f} MiB, "
            f"limit {self.limit_bytes / 2**20:.0f} MiB at ≈ {self.sessions_at_limit:.0f} sessions"
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
    admission_limit_total_sessions: float  #: total sessions with every proxy at its admission limit
    forecast_peak_sessions: float | None = None
    headroom_pct: float | None = None  #: (first failure / forecast - 1) * 100
    proxies_needed_for_forecast: int | None = None
    max_fraction_observed: float = math.nan  #: largest observed total / first failure (extrapolation)
    reconnect_overhead: float = 0.0
    run_ids: list[str] = field(default_factory=list)

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


def headroom_points(runs: RunData | list[RunData]) -> pd.DataFrame:
    """The samples the headroom fit uses: one row per (proxy, instant).

    Columns ``proxy``, ``ts_unix_s``, ``sessions_n``, ``memory_bytes``, ``limit_bytes``,
    ``memory_source`` and ``in_fit`` (False for samples near the limit or after an OOM kill).
    """
    frames = [r.groups for r in _as_runs(runs) if len(r.groups)]
    if not frames:
        raise ModelError("the runs have no collector group samples (samples/groups): record them "
                         "with the collector watching each proxy's cgroup")
    g = pd.concat(frames, ignore_index=True)
    limited = g[g["cgroup_limit_bytes"] > 0]
    if len(limited):
        g = limited.copy()
        g["memory_bytes"] = g["cgroup_memory_bytes"].astype(float)
        g["memory_source"] = "cgroup"
    else:
        g = g.copy()
        # summed RSS overstates shared pages; PSS splits them fairly, USS leaves them out
        use_pss = g["pss_bytes"] > 0
        g["memory_bytes"] = np.where(use_pss, g["pss_bytes"], g["uss_bytes"]).astype(float)
        g["memory_source"] = np.where(use_pss, "pss", "uss")
        g = g[g["memory_bytes"] > 0]
        if not len(g):
            raise ModelError("the groups have neither a cgroup charge nor USS/PSS (run the "
                             "collector with permission to read smaps); summed RSS is not used")
    several_hosts = g["host"].nunique() > 1
    g["proxy"] = (g["host"] + "/" + g["group"]) if several_hosts else g["group"]
    g["limit_bytes"] = g["cgroup_limit_bytes"].astype(float)
    g = g.sort_values(["proxy", "ts_unix_s"]).reset_index(drop=True)
    in_fit = np.ones(len(g), dtype=bool)
    for _, idx in g.groupby("proxy").groups.items():
        sub = g.loc[idx]
        # after the first OOM kill the proxy is restarting, not holding sessions
        kills = sub["cgroup_oom_kills_n"].to_numpy()
        after_kill = kills > kills[0]
        near_limit = (sub["limit_bytes"] > 0) & (sub["memory_bytes"] >= FIT_MAX_FRACTION * sub["limit_bytes"])
        in_fit[np.asarray(idx)] = ~(after_kill | near_limit.to_numpy())
    g["in_fit"] = in_fit
    return g[["proxy", "ts_unix_s", "sessions_n", "memory_bytes", "limit_bytes",
              "memory_source", "in_fit"]]


# ------------------------------------------------------------------------------------------------
# fit
# ------------------------------------------------------------------------------------------------


def huber_line(x: np.ndarray, y: np.ndarray, c: float = 1.345, max_iter: int = 100
               ) -> tuple[np.ndarray, np.ndarray]:
    """Robust line ``y = b0 + b1 x`` by iteratively reweighted least squares with Huber weights.

    Returns ``(beta, cov)``; the scale is the MAD of the residuals (1.4826 * MAD estimates sigma
    for normal noise), the covariance the weighted least-squares one with that scale.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    X = np.column_stack([np.ones_like(x), x])
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    w = np.ones_like(y)
    for _ in range(max_iter):
        r = y - X @ beta
        scale = 1.4826 * np.median(np.abs(r - np.median(r)))
        if scale <= 1e-12 * max(1.0, np.abs(y).max()):
            w = np.ones_like(y)
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
    dof = max(len(y) - 2, 1)
    sigma2 = float(np.sum(w * r**2) / dof)
    xtwx = (X * w[:, None]).T @ X
    cov = sigma2 * np.linalg.pinv(xtwx)
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

    ``limit_bytes`` is the memory each proxy may use when the run recorded no cgroup limit (for
    example a host's RAM share); with a cgroup it is read from the samples.
    """
    runs = _as_runs(runs)
    if not 0 < admission_fraction <= 1:
        raise ModelError(f"admission fraction {admission_fraction} must be in (0, 1]")
    if forecast_peak_sessions is not None and forecast_peak_sessions <= 0:
        raise ModelError(f"forecast peak {forecast_peak_sessions} must be > 0 sessions")
    if reconnect_overhead < 0:
        raise ModelError(f"reconnect overhead {reconnect_overhead} must be >= 0")
    pts = headroom_points(runs)
    names = sorted(pts["proxy"].unique())
    shares = _shares(names, policy, weights)

    fits: list[ProxyFit] = []
    betas, covs, scatters = [], [], []
    for name, share in zip(names, shares):
        sub = pts[(pts["proxy"] == name) & pts["in_fit"]]
        x = sub["sessions_n"].to_numpy(dtype=float)
        y = sub["memory_bytes"].to_numpy(dtype=float)
        if len(x) < 5 or len(np.unique(x)) < 3:
            raise ModelError(
                f"proxy {name}: {len(x)} usable samples at {len(np.unique(x))} session counts; "
                "need >= 5 samples at >= 3 session counts (ramp sessions while the collector runs)"
            )
        beta, cov = huber_line(x, y)
        base, slope = float(beta[0]), float(beta[1])
        resid = y - (base + slope * x)
        scatters.append(1.4826 * float(np.median(np.abs(resid - np.median(resid)))))
        if slope <= 0:
            raise ModelError(f"proxy {name}: memory does not grow with sessions (slope "
                             f"{slope:.0f} B/session); is sessions_n recorded for its ports?")
        lim = float(sub["limit_bytes"].max()) if sub["limit_bytes"].max() > 0 else float(limit_bytes or 0)
        if lim <= 0:
            raise ModelError(f"proxy {name} has no cgroup limit in the samples; pass limit_bytes "
                             "(--limit-bytes) for the memory it may use")
        at_limit = (lim - base) / slope
        admit = (admission_fraction * lim - base) / slope
        fits.append(ProxyFit(
            name=name, bytes_per_session=slope, bytes_per_session_stderr=math.sqrt(max(cov[1, 1], 0.0)),
            base_bytes=base, base_bytes_stderr=math.sqrt(max(cov[0, 0], 0.0)), limit_bytes=lim,
            sessions_at_limit=at_limit, admission_limit_sessions=admit, share=float(share),
            memory_source=str(sub["memory_source"].iloc[0]), points_n=len(x),
            max_sessions_observed=float(x.max()),
        ))
        betas.append(beta)
        covs.append(cov)

    caps = np.array([f.sessions_at_limit for f in fits])
    if (caps <= 0).any():
        bad = ", ".join(f.name for f in fits if f.sessions_at_limit <= 0)
        raise ModelError(f"proxies {bad} are at their memory limit with no sessions (base memory above limit)")
    live = shares > 0
    first_idx = int(np.argmin(np.where(live, caps / np.where(live, shares, 1), np.inf)))
    first_total = float(caps[first_idx] / shares[first_idx])
    all_total = _all_fail_total(caps, shares, reconnect_overhead)
    order = cascade(all_total, caps, shares, reconnect_overhead)
    cascade_all = len(cascade(first_total, caps, shares, reconnect_overhead)) == int(live.sum())

    # 95 % interval: propagate each line's parameter covariance through the cascade, plus the
    # samples' own scatter about the line (the charge at the moment of failure is one sample)
    rng = np.random.default_rng(seed)
    limits = np.array([f.limit_bytes for f in fits])
    draws = np.stack([rng.multivariate_normal(b, c, size=ci_draws, check_valid="ignore")
                      for b, c in zip(betas, covs)], axis=1)  # (draws, proxies, 2)
    noise = rng.normal(0.0, 1.0, size=(ci_draws, len(fits))) * np.array(scatters)
    totals = []
    for d, eps in zip(draws, noise):
        slope_d = d[:, 1]
        if (slope_d <= 0).any():
            continue
        caps_d = (limits - d[:, 0] - eps) / slope_d
        if (caps_d <= 0).any():
            continue
        totals.append(_all_fail_total(caps_d, shares, reconnect_overhead))
    ci = (float(np.percentile(totals, 2.5)), float(np.percentile(totals, 97.5))) if totals else (math.nan, math.nan)

    admit_total = float(np.min(np.where(live, np.array([f.admission_limit_sessions for f in fits])
                                        / np.where(live, shares, 1), np.inf)))
    headroom_pct = needed = None
    if forecast_peak_sessions is not None:
        headroom_pct = (first_total / forecast_peak_sessions - 1.0) * 100.0
        per_proxy = min(f.admission_limit_sessions for f in fits)
        needed = int(math.ceil(forecast_peak_sessions / per_proxy)) if per_proxy > 0 else None
    # how far the fit extrapolates: the largest total observed at one instant vs first failure
    totals_obs = pts[pts["in_fit"]].groupby("ts_unix_s")["sessions_n"].sum()
    max_frac = float(totals_obs.max() / first_total) if len(totals_obs) else math.nan

    return HeadroomResult(
        policy=policy, proxies=fits, first_failure_sessions=first_total,
        first_failure_proxy=names[first_idx], all_fail_sessions=all_total, all_fail_ci95=ci,
        cascade_all_fail=cascade_all, cascade_order=[names[i] for i in order],
        admission_fraction=admission_fraction, admission_limit_total_sessions=admit_total,
        forecast_peak_sessions=forecast_peak_sessions, headroom_pct=headroom_pct,
        proxies_needed_for_forecast=needed, max_fraction_observed=max_frac,
        reconnect_overhead=reconnect_overhead, run_ids=[r.run_id for r in runs],
    )
