"""HTML pieces of the report: the coloured verdict banner and styled tables.

Plain HTML strings with inline styles (no JavaScript), so they survive nbconvert and any mail
client or wiki the report is pasted into.
"""

from __future__ import annotations

import datetime as _dt
import html
from typing import Any, Callable, Sequence

VERDICT_COLOURS = {"PASS": "#1E8449", "WARN": "#D68910", "FAIL": "#C0392B"}

_TABLE = (
    "border-collapse:collapse;margin:6px 0 14px 0;font-family:system-ui,sans-serif;font-size:13px;"
)
_TH = "background:#2C3E50;color:white;padding:6px 10px;text-align:left;border:1px solid #2C3E50;"
_TD = "padding:5px 10px;border:1px solid #D5D8DC;"
_BAD = "background:#FADBD8;color:#922B21;font-weight:bold;"
_GOOD = "background:#D5F5E3;"
_DESIGNED = "background:#D6EAF8;color:#1B4F72;font-weight:bold;"


def esc(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any, digits: int = 0, unit: str = "") -> str:
    """A number for a table: thousands separators, fixed digits, '–' when missing."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        text = f"{value:,.{digits}f}"
        return f"{text} {unit}".strip()
    return esc(value)


def when(ts_unix_s: float | None) -> str:
    if not ts_unix_s:
        return "–"
    return _dt.datetime.fromtimestamp(float(ts_unix_s), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def banner(summary) -> str:
    """The verdict (a :class:`~loadkit.report.summary.ReportSummary`) as a coloured block with its
    reasons, and below them what a reader must know that is not a failure (a designed abort)."""
    verdict = str(summary.verdict)
    colour = VERDICT_COLOURS.get(verdict, "#566573")
    reasons = summary.verdict_reasons or ["all gates passed, headroom left at the forecast peak, no regression"]
    items = "".join(f"<li>{esc(r)}</li>" for r in reasons)
    items += "".join(f'<li style="opacity:0.9;">{esc(n)}</li>' for n in summary.verdict_notes)
    base = summary.baseline_release
    against = f" · compared with <b>{esc(base)}</b>" if base else ""
    return (
        f'<div style="background:{colour};color:white;padding:16px 22px;border-radius:8px;'
        'font-family:system-ui,sans-serif;margin:8px 0 12px 0;">'
        f'<div style="font-size:13px;opacity:0.9;">Capacity report · release <b>{esc(summary.release)}</b>'
        f"{against} · {esc(when(summary.generated_unix_s))}</div>"
        f'<div style="font-size:34px;font-weight:800;letter-spacing:1px;margin:4px 0;">{esc(verdict)}</div>'
        f'<ul style="margin:4px 0 0 18px;padding:0;font-size:14px;">{items}</ul></div>'
    )


def rows(records: Sequence[Any]) -> list[dict]:
    """Typed summary rows as dicts for :func:`table`."""
    return [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in records]


def table(
    rows: Sequence[dict],
    columns: Sequence[tuple[str, str, Callable[[Any], str]]],
    *,
    row_style: Callable[[dict], str] | None = None,
    empty: str = "nothing to show",
) -> str:
    """``columns``: (key, heading, formatter). ``row_style(row)`` returns extra CSS for a row."""
    if not rows:
        return note(empty)
    head = "".join(f'<th style="{_TH}">{esc(h)}</th>' for _, h, _ in columns)
    body = []
    for i, row in enumerate(rows):
        extra = row_style(row) if row_style else ""
        zebra = "background:#F8F9F9;" if i % 2 else ""
        cells = "".join(f'<td style="{_TD}{_align(row.get(k))}{zebra}{extra}">{f(row.get(k))}</td>'
                        for k, _, f in columns)
        body.append(f"<tr>{cells}</tr>")
    return f'<table style="{_TABLE}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _align(value: Any) -> str:
    """Numbers right-aligned so their digits line up; words left-aligned so they read."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return "text-align:right;" if number else "text-align:left;"


def note(text: str) -> str:
    return (
        '<p style="color:#566573;font-style:italic;font-family:system-ui,sans-serif;margin:6px 0;">'
        f"{esc(text)}</p>"
    )


def bad_if(predicate: Callable[[dict], bool]) -> Callable[[dict], str]:
    return lambda row: _BAD if predicate(row) else ""


def good_or_bad(predicate_bad: Callable[[dict], bool]) -> Callable[[dict], str]:
    return lambda row: _BAD if predicate_bad(row) else _GOOD


def outcome_style(row: dict) -> str:
    """Gates and runs: red for a failure, blue for a designed abort, green for a pass."""
    outcome = row.get("outcome")
    if outcome == "aborted as designed":
        return _DESIGNED
    if outcome in ("fail", "aborted", "interrupted", "failed"):
        return _BAD
    return _GOOD if outcome in ("pass", "completed") else ""


def regression_style(row: dict) -> str:
    """Red for a regression, green for an improvement, plain otherwise."""
    if row.get("regression"):
        return _BAD
    return _GOOD if row.get("improvement") else ""
