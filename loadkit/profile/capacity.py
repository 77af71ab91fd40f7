"""Load stated relative to the target's measured DNS capacity: ``dns-rate = "1.5 capacity"``.

A lab brought up with a CPU quota (``loadkit lab up --dns-cpu 0.1``) measures the answered rate
its unbound sustains at < 1 % loss and reports it as ``dns.capacity_qps`` in its status. A
profile that says ``"1.5 capacity"`` offers 1.5 times that figure, so a scenario overloads (or
does not) by the same margin on a quiet machine and a busy one, whatever the absolute figure is.

Grammar: ``"<number> capacity"`` (also ``"1.5x capacity"``, ``"1.5 × capacity"``), the number
finite and > 0, for rate options only (the options ``[caps] max_rate_qps`` is checked against:
``dns-rate``, ``dns-source-qps``, ``dns-ramp-to``...). A burst size stays a count of queries: what
overflows a receive buffer is the burst's size against the buffer, not against the rate.

Two steps, as for targets: :func:`parse_expression` checks the text when the profile is loaded
(a bad number is one line before anything runs); :func:`resolve_capacity` replaces each expression
by its figure once the lab the run is pointed at is known (``loadkit run`` finds it from the
targets or ``--lab-dir``), records both in the profile (``Profile.capacity_relative``, written to
the run's manifest) and checks the caps again against the figures.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

from loadkit.errors import ProfileError

if TYPE_CHECKING:  # profile.py imports this module: no cycle at run time
    from loadkit.profile.profile import Profile

#: the word that makes a value relative, and the lab option that gives a lab its capacity
WORD = "capacity"
_EXPR_RE = re.compile(r"^\s*([^\s×xX*]+)\s*(?:[×xX*]\s*)?capacity\s*$", re.IGNORECASE)
_ENDS_RE = re.compile(r"(?:^|[\s×*\d.xX])capacit\w*\s*$", re.IGNORECASE)
#: what a user runs to get a lab with a measured capacity
LAB_HINT = "loadkit lab up --dns-cpu 0.25"


class CapacityLoad(NamedTuple):
    """One option stated relative to capacity, resolved (what the manifest records)."""

    option: str
    expression: str  #: as written in the profile, e.g. "1.5 capacity"
    factor: float  #: 1.5
    capacity_qps: float  #: the lab's measured capacity it was resolved against
    value_qps: float  #: factor × capacity, the figure the run offered
    source: str  #: where the capacity came from, in words

    def describe(self) -> str:
        return (f"{self.option} '{self.expression}' = {self.value_qps:,.0f} q/s "
                f"({self.factor:g} × {self.capacity_qps:,.0f} q/s, {self.source})")


def is_expression(value: Any) -> bool:
    """True for a string that ends in the word capacity (or a misspelling such as capacities,
    which :func:`parse_expression` then refuses); a file path that merely contains it is not."""
    return isinstance(value, str) and _ENDS_RE.search(value) is not None


def parse_expression(value: str, where: str) -> float:
    """``"1.5 capacity"`` -> 1.5; one-line :class:`ProfileError` naming ``where`` otherwise."""
    m = _EXPR_RE.match(value)
    example = "e.g. \"1.5 capacity\""
    if not m:
        raise ProfileError(f"{where}: {value!r} is not a capacity-relative rate ({example}: a number, "
                           "then the word capacity)")
    try:
        factor = float(m.group(1))
    except ValueError:
        raise ProfileError(f"{where}: {value!r}: {m.group(1)!r} is not a number ({example})") from None
    if not math.isfinite(factor) or factor <= 0:
        raise ProfileError(f"{where}: {value!r}: the factor must be a number more than 0 ({example})")
    return factor


def capacity_from_lab(lab: dict | None) -> tuple[float | None, str]:
    """The DNS capacity a lab status (``Lab.status().to_dict()``, as ``loadkit run`` records it)
    reports, and where it came from in words; (None, why) when there is none."""
    if not lab:
        return None, "no running loadkit lab serves the profile's targets"
    dns = lab.get("dns") or {}
    capacity = dns.get("capacity_qps")
    if not isinstance(capacity, (int, float)) or isinstance(capacity, bool) or not capacity > 0:
        if dns.get("cpu_cores"):
            return None, f"the lab in {lab.get('dir')} has a CPU quota but its calibration found no capacity"
        return None, f"the lab in {lab.get('dir')} has no CPU quota, so no measured capacity"
    cores = dns.get("cpu_cores")
    quota = f" at {cores:g} core" if isinstance(cores, (int, float)) else ""
    return float(capacity), f"measured by the lab in {lab.get('dir')}{quota}"


def relative_options(profile: "Profile") -> dict[str, str]:
    """option -> expression, for every ``[load] options`` value stated relative to capacity."""
    return {k: v for k, v in profile.load.options.items() if is_expression(v)}


def resolve_capacity(profile: "Profile", lab: dict | None = None, *, capacity_qps: float | None = None,
                     source: str = "") -> "Profile":
    """The profile with every capacity-relative option replaced by its figure, the caps checked
    against the figures, and both recorded in ``capacity_relative``.

    The capacity is ``capacity_qps`` when given (``source`` says whose), else the one ``lab`` (a
    lab status dict) reports. A profile with no such option is returned as it is, lab or none.
    """
    from loadkit.profile.profile import check_caps

    relative = relative_options(profile)
    if not relative:
        return profile
    if capacity_qps is None:
        capacity_qps, source = capacity_from_lab(lab)
    name = profile.path.name
    if capacity_qps is None:
        option, expression = next(iter(relative.items()))
        raise ProfileError(f"{name}: {option} '{expression}' needs a lab with --dns-cpu, whose measured "
                           f"capacity it is relative to ({source}); run `{LAB_HINT}` or give "
                           "loadkit run --lab-dir DIR")
    options = dict(profile.load.options)
    resolved: dict[str, dict] = {}
    for option, expression in relative.items():
        factor = parse_expression(expression, f"{name}: [load] options.{option}")
        value = float(round(factor * capacity_qps))
        options[option] = value
        resolved[option] = CapacityLoad(option, expression, factor, float(capacity_qps), value,
                                        source or "given")._asdict()
    out = replace(profile, load=replace(profile.load, options=options), capacity_relative=resolved)
    check_caps(out, f"{name} (at {capacity_qps:,.0f} q/s capacity)")
    return out


def describe(profile: "Profile") -> list[str]:
    """One line per resolved option, for the run's log."""
    return [CapacityLoad(**row).describe() for row in profile.capacity_relative.values()]
