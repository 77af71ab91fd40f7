"""Scalability: Universal Scalability Law, latency knee and Little's law.

USL (Gunther): ``X(N) = lambda N / (1 + sigma (N - 1) + kappa N (N - 1))`` with contention
``sigma``, coherency ``kappa`` and single-user throughput ``lambda``; throughput peaks at
``N* = sqrt((1 - sigma) / kappa)``. Pitfalls handled here: ``lambda`` is fitted, not taken from a
measured X(1) (often not measured, and one noisy point would scale every other); fewer than six
distinct concurrency levels cannot pin three parameters and their errors, so they are refused.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import curve_fit

from loadkit.errors import ModelError
from loadkit.model._result import Result
from loadkit.record import counters
from loadkit.record.reader import RunData

MIN_USL_POINTS = 6


def usl_throughput(n: np.ndarray | float, sigma: float, kappa: float, lambda_: float) -> np.ndarray:
    """X(N) of the Universal Scalability Law."""
    n = np.asarray(n, dtype=float)
    return lambda_ * n / (1.0 + sigma * (n - 1.0) + kappa * n * (n - 1.0))


@dataclass
class UslResult(Result):
    """A USL fit with one-sigma parameter errors and t-quantile 95 % intervals."""

    kind = "usl"

    sigma: float
    kappa: float
    lambda_: float
    sigma_stderr: float
    kappa_stderr: float
    lambda_stderr: float
    n_star: float  #: concurrency of peak throughput, >= 1; inf (null in JSON) unless kappa is significant
    x_max: float  #: throughput at N* (or lambda/sigma as N grows when no peak was measured)
    r_squared: float
    points_n: int
    max_concurrency_observed: float
    sigma_ci95: tuple[float, float] = (math.nan, math.nan)
    kappa_ci95: tuple[float, float] = (math.nan, math.nan)
    lambda_ci95: tuple[float, float] = (math.nan, math.nan)
    n_star_ci95: tuple[float, float] = (math.nan, math.nan)  #: nan unless kappa is significant
    kappa_significant: bool = False  #: the 95 % interval of kappa lies above 0
    n_star_clamped: bool = False  #: the fitted N* was below 1 (throughput falls from the start)
    dof: int = 0  #: degrees of freedom of the t quantile (points - 3)
    weighting: str = "relative"  #: noise taken proportional to throughput
    max_throughput_observed: float = math.nan  #: the largest measured throughput
    concurrency_at_max_observed: float = math.nan  #: where it was measured

    @property
    def stderrs(self) -> dict[str, float]:
        return {"sigma": self.sigma_stderr, "kappa": self.kappa_stderr, "lambda_": self.lambda_stderr}

    def predict(self, concurrency: np.ndarray | float) -> np.ndarray:
        return usl_throughput(concurrency, self.sigma, self.kappa, self.lambda_)

    def summary(self) -> str:
        if not self.kappa_significant:
            ceiling = self.lambda_ / self.sigma if self.sigma > 0 else math.inf
            peak = (f"no retrograde region measured (kappa not significantly above 0 up to "
                    f"N = {self.max_concurrency_observed:.0f}); ceiling ≈ {ceiling:.4g}/s")
        elif self.n_star_clamped:
            peak = ("throughput falls from the lowest concurrency measured: peak at N* = 1 "
                    f"(clamped), ≈ {self.x_max:.4g}/s")
        else:
            lo, hi = self.n_star_ci95
            peak = f"peak ≈ {self.x_max:.4g}/s at N* ≈ {self.n_star:.0f} (95 % CI {lo:.0f}–{hi:.0f})"
            if self.n_star > self.max_concurrency_observed:
                peak += f", beyond the largest N measured ({self.max_concurrency_observed:.0f})"
        measured = ""
        if math.isfinite(self.max_throughput_observed):
            measured = (f"; measured max {self.max_throughput_observed:.4g}/s at N = "
                        f"{self.concurrency_at_max_observed:.0f} (model there "
                        f"{float(self.predict(self.concurrency_at_max_observed)):.4g}/s)")
        return (f"USL sigma={self.sigma:.4f}±{self.sigma_stderr:.4f} kappa={self.kappa:.2e}±"
                f"{self.kappa_stderr:.1e} lambda={self.lambda_:.4g}/s; {peak}{measured} "
                f"(R²={self.r_squared:.3f}, {self.points_n} points)")


def _curve_fit(n: np.ndarray, x: np.ndarray, scale: np.ndarray, p0: list[float]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return curve_fit(
            lambda nn, s, k, l: usl_throughput(nn, s, k, l), n, x, p0=p0, sigma=scale,
            absolute_sigma=False, bounds=([0.0, 0.0, 0.0], [1.0, np.inf, np.inf]), maxfev=20000,
        )


def fit_usl(concurrency, throughput) -> UslResult:
    """Fit the USL to measured (concurrency, throughput) pairs; >= 6 distinct concurrencies.

    Throughput noise grows with throughput (a 5 % jitter is 5 % at every level), so the fit is
    weighted by the fitted throughput (two passes: observed, then fitted values as the scale);
    unweighted, the few high-throughput points decide kappa and its interval covers the truth
    far less often than it says. Intervals are t quantiles with points - 3 degrees of freedom.
    """
    n = np.asarray(concurrency, dtype=float)
    x = np.asarray(throughput, dtype=float)
    if n.shape != x.shape:
        raise ModelError(f"concurrency ({n.size} values) and throughput ({x.size}) differ in length")
    ok = np.isfinite(n) & np.isfinite(x) & (n > 0) & (x >= 0)
    n, x = n[ok], x[ok]
    if len(np.unique(n)) < MIN_USL_POINTS:
        raise ModelError(f"USL needs throughput at >= {MIN_USL_POINTS} distinct concurrency levels, "
                         f"got {len(np.unique(n))}: add load steps")
    # start lambda from the best per-user throughput at low load, not from X(1) alone
    low = n <= np.quantile(n, 0.34)
    lam0 = float(np.max(x[low] / n[low])) if low.any() else float(np.max(x / n))
    floor = max(float(np.max(x)) * 1e-3, 1e-12)
    try:
        popt, _ = _curve_fit(n, x, np.maximum(x, floor), [0.05, 1e-4, max(lam0, 1e-9)])
        popt, pcov = _curve_fit(n, x, np.maximum(usl_throughput(n, *popt), floor), list(popt))
    except (RuntimeError, ValueError) as err:
        raise ModelError(f"USL fit did not converge on {len(n)} points: {err}") from err
    sigma, kappa, lam = (float(v) for v in popt)
    errs = np.sqrt(np.clip(np.diag(pcov), 0, np.inf)) if np.all(np.isfinite(pcov)) else np.full(3, math.nan)
    dof = max(len(n) - 3, 1)
    q = float(stats.t.ppf(0.975, dof))
    cis = [(float(v - q * e), float(v + q * e)) for v, e in zip((sigma, kappa, lam), errs)]
    significant = bool(kappa > 0 and math.isfinite(errs[1]) and cis[1][0] > 0)
    n_star, n_star_ci, x_max, clamped = _peak(sigma, kappa, lam, pcov, q, significant)
    pred = usl_throughput(n, sigma, kappa, lam)
    ss_tot = float(np.sum((x - x.mean()) ** 2))
    r2 = 1.0 - float(np.sum((x - pred) ** 2)) / ss_tot if ss_tot > 0 else math.nan
    return UslResult(sigma=sigma, kappa=kappa, lambda_=lam, sigma_stderr=float(errs[0]),
                     kappa_stderr=float(errs[1]), lambda_stderr=float(errs[2]), n_star=n_star,
                     x_max=x_max, r_squared=r2, points_n=int(len(n)),
                     max_concurrency_observed=float(n.max()), sigma_ci95=cis[0], kappa_ci95=cis[1],
                     lambda_ci95=cis[2], n_star_ci95=n_star_ci, kappa_significant=significant,
                     n_star_clamped=clamped, dof=dof, max_throughput_observed=float(x.max()),
                     concurrency_at_max_observed=float(n[int(np.argmax(x))]))


def _peak(sigma: float, kappa: float, lam: float, pcov: np.ndarray, q: float, significant: bool):
    """(N*, its 95 % interval, X at N*, clamped) — N* only when kappa is significantly above 0.

    The interval is the delta method on log N* = (log(1 - sigma) - log kappa) / 2, which keeps
    it positive and follows the skew of 1/sqrt(kappa); N* and the interval are clamped to >= 1.
    """
    if not significant:
        return math.inf, (math.nan, math.nan), (lam / sigma if sigma > 0 else math.inf), False
    raw = math.sqrt(max(1.0 - sigma, 0.0) / kappa)
    n_star = max(1.0, raw)
    x_max = float(usl_throughput(n_star, sigma, kappa, lam))
    if raw < 1.0:  # sigma at its bound of 1 or kappa huge: throughput falls from the start
        return n_star, (1.0, 1.0), x_max, True
    grad = np.array([-0.5 / (1.0 - sigma), -0.5 / kappa])
    se_log = math.sqrt(max(float(grad @ pcov[:2, :2] @ grad), 0.0))
    half = min(q * se_log, 700.0)  # exp() overflows past ~709
    return n_star, (max(1.0, raw * math.exp(-half)), max(1.0, raw * math.exp(half))), x_max, False


# ------------------------------------------------------------------------------------------------
# latency knee
# ------------------------------------------------------------------------------------------------


@dataclass
class KneeResult(Result):
    """Where latency stops being flat: the break of a two-segment line fit."""

    kind = "latency_knee"

    knee_concurrency: float
    latency_at_knee_s: float
    slope_before_s: float  #: latency added per unit of concurrency before the knee
    slope_after_s: float
    points_n: int

    def summary(self) -> str:
        return (f"latency knee at ≈ {self.knee_concurrency:.4g} (latency {self.latency_at_knee_s * 1e3:.1f} ms; "
                f"slope {self.slope_before_s * 1e3:.3g} → {self.slope_after_s * 1e3:.3g} ms per unit)")


def latency_knee(concurrency, latency_s) -> KneeResult:
    """Fit a continuous two-segment line to latency vs load; the break is the knee.

    The breakpoint is searched on a fine grid between the 2nd and the 2nd-to-last distinct load
    and the segments are joined (continuous), least squares.
    """
    c = np.asarray(concurrency, dtype=float)
    y = np.asarray(latency_s, dtype=float)
    ok = np.isfinite(c) & np.isfinite(y)
    c, y = c[ok], y[ok]
    levels = np.unique(c)
    if len(levels) < 4:
        raise ModelError(f"latency knee needs >= 4 distinct load levels, got {len(levels)}")
    best = None
    for b in np.linspace(levels[1], levels[-2], 400):
        X = np.column_stack([np.ones_like(c), c, np.maximum(c - b, 0.0)])
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        sse = float(np.sum((y - X @ beta) ** 2))
        if best is None or sse < best[0]:
            best = (sse, b, beta)
    _, b, beta = best
    return KneeResult(knee_concurrency=float(b), latency_at_knee_s=float(beta[0] + beta[1] * b),
                      slope_before_s=float(beta[1]), slope_after_s=float(beta[1] + beta[2]),
                      points_n=int(len(c)))


# ------------------------------------------------------------------------------------------------
# run -> points, Little's law
# ------------------------------------------------------------------------------------------------


def _concurrency_per_interval(run: RunData, metric: str) -> pd.DataFrame:
    req = run.requests
    if not len(req):
        raise ModelError(f"run {run.run_id} has no request intervals (requests/)")
    per = req.groupby("ts_unix_s").agg(
        interval_s=("interval_s", "max"), requests_n=("requests_n", "sum"),
        failures_n=("failures_n", "sum"),
        latency_sum=("latency_mean_s", lambda s: float((s * req.loc[s.index, "requests_n"]).sum())),
    ).reset_index()
    per["throughput_rps"] = (per["requests_n"] - per["failures_n"]) / per["interval_s"]
    per["latency_mean_s"] = per["latency_sum"] / per["requests_n"].where(per["requests_n"] > 0)
    gauge = counters.gauge(run, metric)
    if not len(gauge):
        raise ModelError(f"run {run.run_id} has no '{metric}' gauge in generator/: cannot tell the "
                         "concurrency of each interval")
    per = pd.merge_asof(per.sort_values("ts_unix_s"), gauge.rename("concurrency").reset_index(),
                        on="ts_unix_s", direction="nearest")
    return per


def usl_points(run: RunData, concurrency_metric: str = "users") -> pd.DataFrame:
    """Mean throughput (successful requests/s) per concurrency level of a stepped run."""
    per = _concurrency_per_interval(run, concurrency_metric)
    per = per[per["concurrency"] > 0]
    return (per.groupby("concurrency")
            .agg(throughput_rps=("throughput_rps", "mean"), latency_mean_s=("latency_mean_s", "mean"),
                 intervals_n=("throughput_rps", "size"))
            .reset_index())


def fit_usl_run(run: RunData, concurrency_metric: str = "users") -> UslResult:
    pts = usl_points(run, concurrency_metric)
    return fit_usl(pts["concurrency"], pts["throughput_rps"])


@dataclass
class LittleResult(Result):
    """Does concurrency ≈ throughput × (latency + think time) hold for the run?"""

    kind = "littles_law"

    ratio_median: float  #: measured concurrency / (throughput × (latency + think))
    ratio_p10: float
    ratio_p90: float
    consistent: bool
    tolerance: float
    intervals_n: int

    def summary(self) -> str:
        verdict = "consistent" if self.consistent else "INCONSISTENT"
        return (f"Little's law {verdict}: concurrency / (throughput × time in system) = "
                f"{self.ratio_median:.2f} (p10 {self.ratio_p10:.2f}, p90 {self.ratio_p90:.2f}, "
                f"{self.intervals_n} intervals)")


def littles_law_check(run: RunData, *, think_time_s: float = 0.0, tolerance: float = 0.2,
                      concurrency_metric: str = "users") -> LittleResult:
    """Compare the users gauge with throughput × (latency + think time), interval by interval.

    A ratio far above 1 means users were waiting somewhere the stats do not time (a generator
    short of CPU, coordinated omission); far below 1, requests counted that no user waited for.
    """
    per = _concurrency_per_interval(run, concurrency_metric)
    per["total_rps"] = per["requests_n"] / per["interval_s"]
    per = per[(per["concurrency"] > 0) & (per["requests_n"] > 0)]
    if not len(per):
        raise ModelError(f"run {run.run_id} has no interval with both users and requests")
    ratio = per["concurrency"] / (per["total_rps"] * (per["latency_mean_s"] + think_time_s))
    med = float(ratio.median())
    return LittleResult(ratio_median=med, ratio_p10=float(ratio.quantile(0.1)),
                        ratio_p90=float(ratio.quantile(0.9)), consistent=abs(med - 1.0) <= tolerance,
                        tolerance=tolerance, intervals_n=int(len(ratio)))
