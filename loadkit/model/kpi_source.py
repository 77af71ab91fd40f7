"""Production KPI series loadkit did not record: a CSV file or a Prometheus range query.

Both give a ``pandas.Series`` of floats indexed by unix seconds (UTC), sorted, which
:func:`loadkit.model.kpi.review_kpi` reads. A CSV has one ``timestamp,value`` pair per line (an
optional header line, ``#`` comments, blank lines skipped); a timestamp is ISO 8601 (naive = UTC)
or unix seconds (milliseconds when above 1e11, as many exporters write them); an empty, ``nan``
or ``NaN`` value is a gap. A malformed line is refused with the file and line named.

Prometheus is read through its plain HTTP API (``/api/v1/query_range``, stdlib urllib). Its
address passes the same allowlist as every load target (default loopback). A range longer than
Prometheus' 11,000 points per series is fetched in chunks. The query must return one series:
aggregate with ``sum(...)`` when it would return several.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from loadkit.errors import InputFileError, TargetError
from loadkit.profile.profile import parse_duration
from loadkit.profile.targets import check_target

#: Prometheus refuses a range query of more points than this per series (its query_range limit)
PROMETHEUS_MAX_POINTS = 11_000
#: a timestamp above this is in milliseconds (1e11 s is the year 5138)
_MS_THRESHOLD = 1e11


class KpiSourceError(InputFileError):
    """A KPI source (a CSV file, a Prometheus query) is missing, malformed or unreachable."""


#: durations ("15m", "1h30m", "7d") have one grammar, the profiles': ``parse_duration_s(text, what)``
parse_duration_s = parse_duration


_OFFSET = re.compile(r"^\s*(?:UTC)?\s*([+-])?(\d{1,2})(?::?(\d{2}))?\s*$", re.IGNORECASE)


def parse_utc_offset_s(text: str) -> float:
    """``+09:00``, ``-0530``, ``9``, ``UTC+9`` -> seconds east of UTC."""
    m = _OFFSET.match(str(text))
    if not m or int(m.group(2)) > 14 or int(m.group(3) or 0) >= 60:
        raise KpiSourceError(f"UTC offset {text!r} is not +HH:MM (e.g. +09:00, -05:30)")
    s = int(m.group(2)) * 3600 + int(m.group(3) or 0) * 60
    return float(-s if m.group(1) == "-" else s)


def parse_time_unix_s(text: str, what: str = "time", now_unix_s: float | None = None) -> float:
    """ISO 8601 (naive = UTC), unix seconds, ``now`` or ``now-7d`` -> unix seconds."""
    s = str(text).strip()
    if s.startswith("now"):
        now = time.time() if now_unix_s is None else now_unix_s
        rest = s[3:].strip()
        if not rest:
            return now
        if rest[0] in "+-":
            sign = -1.0 if rest[0] == "-" else 1.0
            return now + sign * parse_duration_s(rest[1:], what)
    ts = _timestamp(s)
    if ts is None:
        raise KpiSourceError(f"{what} {text!r} is not a time (ISO 8601, unix seconds, now or now-7d)")
    return ts


def _timestamp(s: str) -> float | None:
    """One timestamp field -> unix seconds, or None when it is not one."""
    try:
        x = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(x):
            return None
        return x / 1000.0 if abs(x) > _MS_THRESHOLD else x
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return None
    if dt.tzinfo is None:  # a naive timestamp is UTC, as Prometheus and most exporters write
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def read_kpi_csv(path: str | Path, name: str | None = None) -> pd.Series:
    """A ``timestamp,value`` CSV as a Series by unix seconds, named after the value column
    (or ``name``, or the file's stem). Refuses a bad line with ``file line N: ...``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # utf-8-sig: spreadsheets write a BOM
    except OSError as err:
        raise KpiSourceError(f"KPI file {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise KpiSourceError(f"KPI file {path} is not UTF-8 text: {err.reason}") from err
    ts: list[float] = []
    values: list[float] = []
    column = None
    seen_data = False
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        where = f"KPI file {path} line {lineno}"
        if len(row) != 2:
            raise KpiSourceError(f"{where}: expected 2 fields (timestamp,value), got {len(row)}")
        t_s, v_s = row[0].strip(), row[1].strip()
        t = _timestamp(t_s)
        if t is None:
            if not seen_data and column is None:  # the header line
                column = v_s or None
                continue
            raise KpiSourceError(f"{where}: {t_s!r} is not a timestamp (ISO 8601 or unix seconds)")
        seen_data = True
        if v_s.lower() in ("", "nan"):
            continue  # a gap: the poller had no value
        try:
            v = float(v_s)
        except ValueError:
            raise KpiSourceError(f"{where}: value {v_s!r} is not a number") from None
        if not math.isfinite(v):
            raise KpiSourceError(f"{where}: value {v_s!r} is not finite")
        ts.append(t)
        values.append(v)
    if not values:
        raise KpiSourceError(f"KPI file {path} has no timestamp,value lines")
    s = pd.Series(values, index=pd.Index(ts, dtype=float, name="ts_unix_s"), dtype=float,
                  name=name or column or path.stem)
    return s[~s.index.duplicated(keep="last")].sort_index()


def query_prometheus(url: str, query: str, start_unix_s: float, end_unix_s: float, step_s: float, *,
                     allowlist=None, timeout_s: float = 10.0, name: str | None = None) -> pd.Series:
    """A PromQL range query as a Series by unix seconds; one series only.

    ``url`` is the server's base URL (``http://127.0.0.1:9090``); its host must be in the
    allowlist (``allowlist`` or ``LOADKIT_ALLOWLIST``, default loopback) before anything is sent.
    """
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise KpiSourceError(f"Prometheus URL {url!r} is not http(s)://HOST[:PORT]")
    check_target(parsed.netloc, 443 if parsed.scheme == "https" else 80, allowlist)
    if not end_unix_s > start_unix_s:
        raise KpiSourceError(f"Prometheus range: end {end_unix_s} is not after start {start_unix_s}")
    if step_s <= 0:
        raise KpiSourceError(f"Prometheus step {step_s} must be > 0")
    base = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rstrip("/"), "", ""))
    opener = urllib.request.build_opener(_AllowlistRedirects(allowlist))
    chunk_s = (PROMETHEUS_MAX_POINTS - 1) * step_s
    points: dict[float, float] = {}
    labels = None
    t0 = start_unix_s
    while t0 <= end_unix_s:
        t1 = min(end_unix_s, t0 + chunk_s)
        series = _query_range(opener, base, query, t0, t1, step_s, timeout_s)
        if len(series) > 1:
            shown = ", ".join(_labels_text(s.get("metric", {})) for s in series[:3])
            raise KpiSourceError(f"Prometheus query {query!r} returned {len(series)} series ({shown}, ...); "
                                 "aggregate it to one, e.g. sum(...)")
        for s in series:
            labels = s.get("metric", {})
            for t, v in s.get("values", []):
                points[float(t)] = float(v)  # Prometheus writes values as strings ("NaN", "+Inf" too)
        t0 = t1 + step_s
    if not points:
        raise KpiSourceError(f"Prometheus query {query!r} returned no samples between "
                             f"{_iso(start_unix_s)} and {_iso(end_unix_s)}")
    s = pd.Series(points, dtype=float).sort_index()
    s = s[s.map(math.isfinite)]
    s.index = pd.Index(s.index.to_numpy(dtype=float), name="ts_unix_s")
    s.name = name or (labels or {}).get("__name__") or query
    return s


class _AllowlistRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to http(s) inside the allowlist: urlopen's own handler follows a
    30x anywhere, past the check of the URL the user gave (nothing is sent to a refused one)."""

    def __init__(self, allowlist) -> None:
        self.allowlist = allowlist

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urlsplit(newurl)
        if target.scheme not in ("http", "https") or not target.hostname:
            raise KpiSourceError(f"Prometheus {req.full_url} redirected to {newurl!r}, not http(s); not followed")
        try:
            check_target(target.netloc, 443 if target.scheme == "https" else 80, self.allowlist)
        except TargetError as err:
            raise type(err)(f"Prometheus redirected to {newurl}: {err}") from err
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _query_range(opener: urllib.request.OpenerDirector, base: str, query: str, start: float, end: float,
                 step: float, timeout_s: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                     "step": f"{step:g}"})
    req = f"{base}/api/v1/query_range?{params}"
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:  # Prometheus explains a bad query in the JSON body
        body = err.read()
        if not body:
            raise KpiSourceError(f"Prometheus {base}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise KpiSourceError(f"Prometheus {base} is unreachable: {reason}") from err
    try:
        doc = json.loads(body)
    except ValueError as err:
        raise KpiSourceError(f"Prometheus {base}: the answer is not JSON (is this a Prometheus server?)") from err
    if doc.get("status") != "success":
        raise KpiSourceError(f"Prometheus query {query!r}: {doc.get('errorType', 'error')}: "
                             f"{doc.get('error', 'no reason given')}")
    data = doc.get("data", {})
    if data.get("resultType") != "matrix":
        raise KpiSourceError(f"Prometheus query {query!r} gave a {data.get('resultType')}, not a range of samples")
    return data.get("result", [])


def _labels_text(metric: dict) -> str:
    name = metric.get("__name__", "")
    rest = ",".join(f'{k}="{v}"' for k, v in metric.items() if k != "__name__")
    return f"{name}{{{rest}}}" if rest else name or "{}"


def _iso(ts_unix_s: float) -> str:
    return datetime.fromtimestamp(ts_unix_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ = ["KpiSourceError", "parse_duration_s", "parse_time_unix_s", "parse_utc_offset_s", "query_prometheus",
           "read_kpi_csv"]
