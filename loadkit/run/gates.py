"""Gates: the pass/fail answer a release pipeline uses, from a finished run record.

Latency gates read the run's latency histograms through :func:`loadkit.record.latency.percentile`
over the whole run and every request, the same computation and window as ``loadkit runs show``
(a bucket's upper edge: never below the true value, at most about 4.4 % above it; a run recorded
before the latency table falls back to Locust's CSV, and the gate says so). The failure-ratio gate
sums the run's request intervals; the headroom gate asks :mod:`loadkit.model` for the minimum
headroom and is *not evaluated* (``passed`` None, which does not fail the run) when no model is
available or it cannot answer for this run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from loadkit.record.latency import LOCUST_CSV_PREFIX  # noqa: F401  (the runner's --csv prefix)
from loadkit.record.latency import load_latency, percentile

log = logging.getLogger(__name__)

#: gate key -> quantile
PERCENTILE_GATES = {"p50_latency_s": 0.5, "p95_latency_s": 0.95, "p99_latency_s": 0.99}


def gate_result(name: str, passed: bool | None, value: float | None, limit: float, detail: str = "") -> dict:
    return {"name": name, "passed": passed, "value": value, "limit": limit, "detail": detail}


def _headroom_pct(run_dir: Path, forecast_peak_sessions: float | None) -> tuple[float | None, str]:
    """Headroom (percent) of the first proxy failure over the forecast peak, or (None, why not)."""
    if forecast_peak_sessions is None:
        return None, "set [gates] forecast_peak_sessions to compare the fitted capacity with"
    try:
        from loadkit.model.headroom import fit_headroom
    except ImportError:
        return None, "loadkit.model.headroom is not available"
    try:
        from loadkit.record.reader import load_run

        result = fit_headroom(load_run(run_dir), forecast_peak_sessions=forecast_peak_sessions)
    except Exception as err:  # a model that cannot answer for this run is "not evaluated"
        return None, f"headroom model could not answer: {err}"
    value = getattr(result, "headroom_pct", None)
    return (None, "headroom model returned nothing") if value is None else (float(value), "")


def evaluate(run_dir: Path, gates: dict[str, float], requests: Any = None) -> list[dict]:
    """Evaluate ``gates`` ({"p99_latency_s": 0.5, ...}) against the run in ``run_dir``.

    ``forecast_peak_*`` in ``gates`` are parameters (of the headroom gate, of the report), not gates.
    """
    results = []
    loaded = None
    forecast = gates.get("forecast_peak_sessions")
    for name, limit in gates.items():
        if limit is None or name.startswith("forecast_peak_"):
            continue
        if name in PERCENTILE_GATES:
            if loaded is None:  # one read of the latency table for every percentile gate
                loaded = load_latency(Path(run_dir))
            results.append(latency_gate(loaded, name, limit))
        elif name == "failure_ratio":
            if requests is None:
                from loadkit.record.reader import read_table

                requests = read_table(Path(run_dir), "requests")
            total = float(requests["requests_n"].sum()) if len(requests) else 0.0
            if total == 0:
                results.append(gate_result(name, False, None, limit, "no requests completed"))
            else:
                ratio = float(requests["failures_n"].sum()) / total
                results.append(gate_result(name, ratio <= limit, ratio, limit))
        elif name == "min_headroom_pct":
            value, why = _headroom_pct(Path(run_dir), forecast)
            if value is None:
                results.append(gate_result(name, None, None, limit, f"not evaluated: {why}"))
            else:
                results.append(gate_result(name, value >= limit, value, limit))
        else:
            results.append(gate_result(name, None, None, limit, "unknown gate: not evaluated"))
    return results


def latency_gate(run: Any, name: str, limit: float) -> dict:
    """A percentile gate over the whole run and every request (``run``: a run directory or what
    :func:`loadkit.record.latency.load_latency` gave): :func:`loadkit.record.latency.percentile`."""
    figure = percentile(run, PERCENTILE_GATES[name])
    if figure.value_s is None:
        return gate_result(name, None, None, limit, figure.label)
    return gate_result(name, figure.value_s <= limit, figure.value_s, limit, figure.label)


def describe(result: dict) -> str:
    """``p99_latency_s 0.012 <= 0.5 pass`` — one line for the terminal."""
    name, value, limit = result["name"], result["value"], result["limit"]
    if result["passed"] is None:
        return f"{name}: {result['detail'] or 'not evaluated'}"
    op = ">=" if name.startswith("min_") else "<="
    verdict = "pass" if result["passed"] else "FAIL"
    shown = "n/a" if value is None else f"{value:.4g}"
    return f"{name}: {shown} (limit {op} {limit:g}) {verdict}" + (f" ({result['detail']})" if result["detail"] else "")
