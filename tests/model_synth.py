"""Synthetic inputs with known parameters, for the model tests and notebook tests.

The run writers are :mod:`loadkit.record.synthetic` (through ``RunWriter``, so the models read a
run exactly like a recorded one); this module keeps the names the model tests import, and adds
:func:`kpi_trace`, a KPI series that is not a run.
"""

from __future__ import annotations

import numpy as np

from loadkit.record.synthetic import (
    T0,
    group_row,
    write_headroom_run,
    write_manifest,
    write_retry_run,
    write_usl_run,
)
from loadkit.record.synthetic import MIB as MiB

__all__ = ["MiB", "T0", "group_row", "kpi_trace", "write_headroom_run", "write_manifest", "write_retry_run",
           "write_usl_run"]


def kpi_trace(days: int = 7, step_s: float = 60.0, spike_at_s: float = 12.5 * 3600, spike_len_s: float = 300.0,
              spike_height: float = 50.0, shift_day: int | None = 4, shift: float = 30.0, seed: int = 4,
              wander: float = 0.0, wander_s: float = 3600.0, daily_amplitude: float = 0.0,
              plateau_s: float = 0.0, plateau_height: float = 0.0, plateau_day: int = 1):
    """A week of a per-minute KPI (e.g. RcvbufErrors per minute): noise, a daily 12:30 spike of
    ``spike_len_s``, and a level shift at the start of ``shift_day``. Returns (series, truth).

    ``wander``: a slow AR(1) drift of that standard deviation and correlation time ``wander_s``
    (real KPIs drift; white noise alone makes every hourly mean look sharp).
    ``daily_amplitude``: a day/night cycle (sine, peak at 15:00). ``plateau_s``: one long spike
    of ``plateau_height`` at 03:00 on ``plateau_day``."""
    import math

    import pandas as pd

    rng = np.random.default_rng(seed)
    t = T0 - (T0 % 86400) + np.arange(0, days * 86400, step_s)
    v = 10.0 + rng.normal(0, 1.0, len(t))
    if wander > 0:
        phi = math.exp(-step_s / wander_s)
        w = np.empty(len(t))
        w[0] = rng.normal(0, wander)
        kicks = rng.normal(0, wander * math.sqrt(1 - phi**2), len(t))
        for k in range(1, len(t)):
            w[k] = phi * w[k - 1] + kicks[k]
        v += w
    if daily_amplitude:
        v += daily_amplitude * np.sin(2 * np.pi * ((t % 86400) / 86400.0 - 0.375))
    if plateau_s > 0:
        p0 = t[0] + plateau_day * 86400 + 3 * 3600
        v[(t >= p0) & (t < p0 + plateau_s)] += plateau_height
    sod = t % 86400
    v[(sod >= spike_at_s) & (sod < spike_at_s + spike_len_s)] += spike_height
    shift_ts = None
    if shift_day is not None:
        shift_ts = t[0] + shift_day * 86400 + 6 * 3600
        v[t >= shift_ts] += shift
    s = pd.Series(v, index=pd.to_datetime(t, unit="s"), name="rcvbuf_errors_per_min")
    return s, {"spike_at_s": spike_at_s, "spike_len_s": spike_len_s, "shift_ts": shift_ts, "t0": t[0],
               "plateau_ts": (t[0] + plateau_day * 86400 + 3 * 3600) if plateau_s > 0 else None}
