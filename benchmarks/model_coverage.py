"""Model coverage: do the nominal 95 % intervals of the headroom and USL fits cover the truth
95 % of the time?

Simulated noisy ramps with known truth, fitted by the same functions the CLI and the report use:

- ``headroom-full``: 3 identical proxies (30 MiB + 1.2 MiB/session, 256 MiB cgroup) ramped to
  85-93 % of their capacity, memory noise 0.5-2 MiB with heavy tails (Student t, 3 degrees of
  freedom) and the collector's ±1 session jitter: the sandwich covariance and the pooling of
  identical proxies (the all-fail total is 3 × one capacity); memory bends slightly away from a
  straight line, ``base + per × s × (1 + c × s / capacity)``, the curvature ``c`` drawn from
  N(0, CURVATURE_SD) per ramp — the stated prior the interval's extrapolation allowance covers;
- ``headroom-partial``: the same, ramped to 40-80 % of the capacity only;
- ``usl-kappa``, ``usl-sigma``, ``usl-lambda``: 1,000 USL curves (at least 200) with sigma in [0.01, 0.1], kappa in
  [1e-4, 2e-3], lambda in [100, 2000]/s at 10 concurrency levels from 1 to 64, 5 % multiplicative
  noise; coverage of each parameter's t interval.

Prints each coverage with its binomial standard error, and last ``coverage=<lowest>``; the goal is
0.93-0.97. No speed is measured.

    python benchmarks/model_coverage.py [--ramps 200] [--usl-curves 1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from loadkit.model import fit_headroom, fit_usl, usl_throughput
from loadkit.model.headroom import EXTRAPOLATION_REL_SD
from loadkit.record.reader import RunData

MIB = 2**20
BASE, PER, LIMIT = 30 * MIB, 1.2 * MIB, 256 * MIB
CAPACITY = (LIMIT - BASE) / PER
PROXIES = ("proxy1", "proxy2", "proxy3")

#: curvature of memory against sessions beyond the fitted range: one sigma of c (see above)
CURVATURE_SD = 0.08


def _run(groups: pd.DataFrame, run_id: str) -> RunData:
    """An in-memory run with only collector group samples (what the headroom fit reads)."""
    empty = pd.DataFrame()
    return RunData(path=Path(run_id), manifest={"run_id": run_id}, requests=empty, failures=empty,
                   generator=empty, groups=groups, net=empty, sockets=empty, system=empty)


def _true_capacity(c: float) -> float:
    """Sessions at the limit for base + per × s × (1 + c s / CAPACITY) = LIMIT."""
    if abs(c) < 1e-12:
        return CAPACITY
    a, b, k = PER * c / CAPACITY, PER, BASE - LIMIT
    return (-b + math.sqrt(b * b - 4 * a * k)) / (2 * a)


def headroom_ramp(rng: np.random.Generator, fraction: float, curvature: float, noise_bytes: float) -> RunData:
    rows = []
    ts = 1_764_000_000.0
    top = fraction * CAPACITY
    for level in np.linspace(0, top, 12):
        for _ in range(5):
            ts += 0.5
            for name in PROXIES:
                s = max(0.0, round(level) + int(rng.integers(-1, 2)))
                mem = BASE + PER * s * (1 + curvature * s / CAPACITY) + noise_bytes * rng.standard_t(3)
                rows.append(dict(ts_unix_s=ts, host="lab", group=name, procs_n=int(s) + 2, rss_bytes=0,
                                 uss_bytes=0, pss_bytes=0, cpu_percent=0.0, fds_n=0, tcp_established_n=0,
                                 tcp_other_n=0, sessions_n=int(s), cgroup_memory_bytes=int(mem),
                                 cgroup_limit_bytes=int(LIMIT), cgroup_failcnt_n=0, cgroup_oom_kills_n=0))
    return _run(pd.DataFrame(rows), "sim")


def headroom_coverage(n: int, rng: np.random.Generator, partial: bool) -> tuple[float, float]:
    """(coverage, median relative half-width) of the all-fail interval over ``n`` ramps."""
    hits, widths = 0, []
    for k in range(n):
        fraction = rng.uniform(0.4, 0.8) if partial else rng.uniform(0.85, 0.93)
        c = rng.normal(0.0, CURVATURE_SD)
        while 1 + 4 * c <= 0.04:  # memory that stops growing before the limit: never falls over
            c = rng.normal(0.0, CURVATURE_SD)
        noise = rng.uniform(0.5, 2.0) * MIB
        truth = len(PROXIES) * _true_capacity(c)
        res = fit_headroom(headroom_ramp(rng, fraction, c, noise), ci_draws=1000, seed=k)
        lo, hi = res.all_fail_ci95
        hits += lo <= truth <= hi
        widths.append((hi - lo) / 2 / truth)
    return hits / n, float(np.median(widths))


def usl_coverage(n: int, rng: np.random.Generator) -> dict[str, float]:
    levels = np.array([1, 2, 4, 8, 12, 16, 24, 32, 48, 64], dtype=float)
    hits = {"kappa": 0, "sigma": 0, "lambda": 0}
    for _ in range(n):
        sigma, kappa, lam = rng.uniform(0.01, 0.1), 10 ** rng.uniform(-4, math.log10(2e-3)), rng.uniform(100, 2000)
        x = usl_throughput(levels, sigma, kappa, lam) * (1 + rng.normal(0, 0.05, levels.size))
        res = fit_usl(levels, x)
        for name, truth, (lo, hi) in (("kappa", kappa, res.kappa_ci95), ("sigma", sigma, res.sigma_ci95),
                                      ("lambda", lam, res.lambda_ci95)):
            hits[name] += lo <= truth <= hi
    return {k: v / n for k, v in hits.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ramps", type=int, default=200, help="simulated headroom ramps per case (default 200)")
    ap.add_argument("--usl-curves", type=int, default=1000,
                    help="simulated USL curves (default 1000: cheap, and the binomial error of a "
                    "coverage near 0.95 is then ±0.007 instead of ±0.015)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    n = args.ramps
    results = {}
    print(f"headroom: 3 identical proxies, {n} ramps each; curvature prior N(0, {CURVATURE_SD}), "
          f"the model's allowance the same ({EXTRAPOLATION_REL_SD})", flush=True)
    for label, partial in (("headroom-full", False), ("headroom-partial", True)):
        cov, width = headroom_coverage(n, rng, partial)
        results[label] = cov
        print(f"  {label}: coverage {cov:.3f} ± {math.sqrt(cov * (1 - cov) / n):.3f} "
              f"(median half-width {width:.1%} of the truth)", flush=True)
    m = max(args.usl_curves, 200)
    print(f"usl: {m} curves, 10 levels 1-64, 5 % multiplicative noise", flush=True)
    for name, cov in usl_coverage(m, rng).items():
        results[f"usl-{name}"] = cov
        print(f"  usl-{name}: coverage {cov:.3f} ± {math.sqrt(cov * (1 - cov) / m):.3f}", flush=True)
    lowest = min(results, key=results.get)
    print(f"lowest: {lowest}; goal 0.93-0.97")
    print(f"coverage={results[lowest]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
