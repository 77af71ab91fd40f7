"""Profiles: one TOML file describes one load test, validated before anything runs.

A profile says what load to offer, against which targets, inside which safety limits, and what
counts as a pass. Every problem is reported as one :class:`~loadkit.errors.ProfileError` line
naming the file, the key and the problem (``smoke.toml: [load] users: must be more than 0,
got -5``). Loading checks the shape of the profile and that referenced files exist; it
sends nothing: resolving targets against the allowlist is :func:`resolve_targets`.

Schema (every table but ``[run]``, ``[targets]`` and ``[load]`` is optional)::

    [run]
    scenario = "smoke"              # required; letters, digits, "._-"
    release = "dev"                 # release label (``loadkit run --release`` overrides)
    duration = "30s"                # required; 90, "90s", "5m", "1h30m", "500ms"
    description = "..."             # free text
    stop_timeout = "5s"             # how long users get to finish when the run stops

    [targets]                       # the endpoints the load goes to, named
    dns = "127.0.0.1:5353"          # "host:port", "[v6]:port", "udp://host:port". A target named
    imap = "127.0.0.1:1143"         #   dns, imap, pop3 (or pop) is where that protocol's users
    pop3 = "127.0.0.1:1110"         #   send (each class its own, with or without [load] host);
                                    #   its port may be left out: the protocol's standard port,
                                    #   53, 143, 110 (993, 995 with options mail-tls = "tls")
    allowlist = ["127.0.0.0/8"]     # networks every target must resolve into (default:
                                    #   LOADKIT_ALLOWLIST, else loopback only)

    [load]                          # one Locust run (``[[load]]`` with one entry is accepted)
    locustfile = "locustfiles/dns_burst.py"   # or a list of files (Locust merges them)
    host = "dns"                    # optional: a target name, given to Locust as --host
                                    #   ADDRESS:PORT (for locustfiles whose users have no
                                    #   protocol target, and the web UI's Host field);
                                    #   "NAME.address" gives the address alone
    users = 50                      # Locust -u (concurrent users); leave out with a shape
    spawn_rate = 10                 # Locust -r (users started per second)
    shape = { kind = "steps", steps = [["30s", 10], ["30s", 50]] }
        # optional load shape (loadkit.generate.shapes), applied to Locust by the runner;
        # it sets the users over time (and the DNS base rate, scaled so its peak is
        # --dns-rate) and ends at [run] duration at the latest. Kinds and keys:
        #   steps         steps = [[DURATION, USERS], ...] (or [{duration, users}, ...])
        #   spike_train   base_users, spike_users; spike_s, period_s, first_spike_s, duration_s
        #   daily         night_users, peak_users, spike_users; spike_hour, spike_minutes,
        #                 day_s, days
        #   ramp_to_knee  max_users; start_users, users_per_s, max_s, max_loss_ratio,
        #                 max_p99_s, intervals_n, check_every_s
        # every kind also takes spawn_rate (default: [load] spawn_rate); keys ending in _s
        # are durations ("30s", "5m" or seconds)
    options = { dns-rate = 2000, dns-names-file = "names.txt" }
        # extra Locust/locustfile options: --KEY VALUE; true is a bare flag, false leaves
        # it out, a list repeats the option. A string "{target:NAME}" is replaced by the
        # resolved address of target NAME ("127.0.0.1:5353"). A rate option may be relative to
        # the DNS capacity the target lab measured (``loadkit lab up --dns-cpu``): dns-rate =
        # "1.5 capacity" (loadkit.profile.capacity; resolved by loadkit run). Credentials never go here:
        # point to a file (mail-accounts = "accounts.csv") or read them from the environment.

    [collect]                       # collectors started with the run
    groups = { p1 = "cgroup:/loadkit/lab/proxy1@11243,11210", unbound = "cmdline:unbound.*lab" }
                                    # NAME = "PATTERN" | "cmdline:REGEX" | "cgroup:PATH",
                                    #   "@PORT,PORT": listening ports whose sessions are counted
                                    #   (loadkit.profile.groupspec, the collector's grammar;
                                    #   a regex is compiled here)
    udp_ports = [5353]              # UDP sockets whose queue and drops are sampled
    urls = ["http://127.0.0.1:9109"]  # remote collectors (also checked against the allowlist)
    interval_s = 0.5                # sampling interval
    allow_missing = false           # true: a group that matches nothing yet records 0 until it
                                    #   appears (--collect-allow-missing), instead of a refusal

    [caps]                          # hard ceilings; a profile or flag above them is refused
    max_users = 2000
    max_duration_s = 600
    max_rate_qps = 20000            # checked against every rate option: names ending in
                                    #   "qps", "-rate" or "ramp-to" (not spawn-rate), and
                                    #   "rate:N" values (--mail-arrival rate:100)

    [abort]                         # the run stops within about 2 s of a breach (an event)
    cgroup_memory_fraction = 0.9    # any group's cgroup memory >= 90 % of its limit (needs
                                    #   [collect] groups with a cgroup, or urls)
    failure_ratio = 0.5             # failures / requests over one record interval ...
    min_requests = 50               # ... once the interval has at least this many requests

    [gates]                         # evaluated after the run: exit 1 when one fails
    p50_latency_s = 0.05            # whole-run percentiles of every request (as `loadkit runs show`)
    p95_latency_s = 0.2
    p99_latency_s = 0.5
    failure_ratio = 0.01            # failures / requests over the whole run
    min_headroom_pct = 20           # from loadkit.model.headroom: first proxy failure vs ...
    forecast_peak_sessions = 5000   # ... this forecast peak; "not evaluated" when it cannot fit

    [record]
    interval_s = 1.0                # one request/failure/generator row set per interval

    [lab]                           # hints only: the lab settings this scenario expects,
    proxy_memory_bytes = 268435456  #   e.g. for ``loadkit lab up``; not read by the runner
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from loadkit.errors import CollectorError, ProfileError, TargetError
from loadkit.profile import capacity
from loadkit.profile.groupspec import parse_group_spec
from loadkit.profile.targets import PROTOCOL_NAMES, check_target, split_host_port, standard_port

#: the tables a profile may have and the keys each may hold
_TABLES: dict[str, tuple[str, ...]] = {
    "run": ("scenario", "release", "duration", "description", "stop_timeout"),
    "targets": (),  # free target names plus "allowlist"
    "load": ("locustfile", "host", "users", "spawn_rate", "options", "shape"),
    "collect": ("groups", "udp_ports", "urls", "interval_s", "allow_missing"),
    "caps": ("max_users", "max_duration_s", "max_rate_qps"),
    "abort": ("cgroup_memory_fraction", "failure_ratio", "min_requests"),
    "gates": (
        "p50_latency_s", "p95_latency_s", "p99_latency_s", "failure_ratio", "min_headroom_pct",
        "forecast_peak_sessions", "forecast_peak_qps", "forecast_peak_burst_queries",
    ),
    "record": ("interval_s",),
    "lab": (),  # hints, free form
}

#: ceilings that apply when a profile sets no [caps]: a test beyond these is deliberate
DEFAULT_CAPS = {"max_users": 20_000, "max_duration_s": 3600.0, "max_rate_qps": 250_000.0}

#: option names that would carry a secret; their values must come from a file or environment
_SECRET_WORDS = ("password", "passwd", "secret", "token", "apikey", "api-key", "api_key")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_OPTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_NUMBER = r"(\d+(?:\.\d+)?)"
#: weeks, days, hours, minutes, seconds, milliseconds, largest first, each at most once
_DURATION_RE = re.compile(rf"^(?:{_NUMBER}w)?(?:{_NUMBER}d)?(?:{_NUMBER}h)?(?:{_NUMBER}m(?!s))?(?:{_NUMBER}s)?"
                          rf"(?:{_NUMBER}ms)?$")
_DURATION_UNITS_S = (604800.0, 86400.0, 3600.0, 60.0, 1.0, 0.001)
_TARGET_REF_RE = re.compile(r"\{target:([^}]*)\}")
#: options that set a request rate, checked against [caps] max_rate_qps (``--dns-rate``,
#: ``--dns-ramp-to``, ``--rate-qps``...; ``spawn-rate`` is users per second, not requests)
_RATE_OPTION_RE = re.compile(r"(?<!spawn)(?:qps|-rate|^rate|ramp-to)$")

# Locust options the runner sets itself from the profile: an options entry may not override them
_RESERVED_OPTIONS = {
    "f", "locustfile", "u", "users", "r", "spawn-rate", "t", "run-time", "headless", "H", "host",
    "csv", "html", "master", "worker", "expect-workers", "master-host", "master-port",
    "master-bind-host", "master-bind-port", "record-dir", "run-id", "scenario", "release",
    "processes", "autostart", "autoquit",
}


def parse_duration(value: Any, where: str = "duration") -> float:
    """``90``, ``"90"``, ``"90s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"7d"``, ``"1w"`` -> seconds
    (> 0, finite). The one grammar of durations: profiles, shapes and the command line's options."""
    hint = "use e.g. 30s, 5m, 1h30m, 500ms, 7d"
    if isinstance(value, bool):
        raise ProfileError(f"{where}: must be a duration ({hint}), got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)  # a bare number is seconds ("inf" and "nan" are refused below)
        except ValueError:
            m = _DURATION_RE.match(text)
            if not text or not m or not any(m.groups()):
                raise ProfileError(f"{where}: {value!r} is not a duration ({hint})") from None
            seconds = sum(float(g) * unit for g, unit in zip(m.groups(), _DURATION_UNITS_S) if g)
    else:
        raise ProfileError(f"{where}: must be a duration ({hint}), got {value!r}")
    if not math.isfinite(seconds) or not seconds > 0:
        raise ProfileError(f"{where}: duration must be more than 0 (and finite), got {value!r}")
    return seconds


@dataclass(frozen=True)
class LoadSpec:
    """The ``[load]`` table: one Locust run."""

    locustfiles: tuple[Path, ...]
    users: int
    spawn_rate: float
    host: str | None = None  #: a target name, or "NAME.address" for the address alone
    options: dict[str, Any] = field(default_factory=dict)
    shape: dict[str, Any] | None = None
    """``{"kind": ..., param: value}`` with durations in seconds (:func:`check_shape`), or None"""


@dataclass(frozen=True)
class CollectSpec:
    groups: dict[str, str] = field(default_factory=dict)
    udp_ports: tuple[int, ...] = ()
    urls: tuple[str, ...] = ()
    interval_s: float = 0.5
    allow_missing: bool = False  #: a group matching nothing at start is not refused (records 0)

    @property
    def enabled(self) -> bool:
        return bool(self.groups or self.udp_ports or self.urls)


@dataclass(frozen=True)
class Caps:
    max_users: int = DEFAULT_CAPS["max_users"]
    max_duration_s: float = DEFAULT_CAPS["max_duration_s"]
    max_rate_qps: float = DEFAULT_CAPS["max_rate_qps"]


@dataclass(frozen=True)
class AbortSpec:
    cgroup_memory_fraction: float | None = None
    failure_ratio: float | None = None
    min_requests: int = 50


@dataclass(frozen=True)
class GateSpec:
    p50_latency_s: float | None = None
    p95_latency_s: float | None = None
    p99_latency_s: float | None = None
    failure_ratio: float | None = None
    min_headroom_pct: float | None = None
    forecast_peak_sessions: float | None = None  #: the load the headroom is measured against
    forecast_peak_qps: float | None = None  #: a DNS rate forecast, for the report's DNS headroom
    forecast_peak_burst_queries: float | None = None  #: a DNS burst forecast, for burst runs

    def items(self) -> list[tuple[str, float]]:
        return [(k, v) for k, v in vars(self).items() if v is not None]


@dataclass(frozen=True)
class Profile:
    """A validated profile. ``raw`` is the TOML as read (credentials are never in it)."""

    path: Path
    scenario: str
    release: str
    duration_s: float
    targets: dict[str, str]
    allowlist: tuple[str, ...] | None
    load: LoadSpec
    collect: CollectSpec = field(default_factory=CollectSpec)
    caps: Caps = field(default_factory=Caps)
    abort: AbortSpec = field(default_factory=AbortSpec)
    gates: GateSpec = field(default_factory=GateSpec)
    record_interval_s: float = 1.0
    stop_timeout_s: float = 5.0
    description: str = ""
    lab_hints: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    #: options stated relative to the lab's DNS capacity, once resolved (loadkit.profile.capacity):
    #: option -> {expression, factor, capacity_qps, value_qps, source}; empty until then
    capacity_relative: dict[str, dict] = field(default_factory=dict)

    def with_overrides(
        self, release: str | None = None, duration: Any = None, where: str = "command line"
    ) -> "Profile":
        """A copy with ``--release``/``--duration`` applied and the caps checked again."""
        p = self
        if release is not None:
            _check_name(release, f"{where} --release")
            p = replace(p, release=release)
        if duration is not None:
            p = replace(p, duration_s=parse_duration(duration, f"{where} --duration"))
        check_caps(p, where)
        return p

    def to_dict(self) -> dict[str, Any]:
        """The profile as recorded in a run's manifest (plain JSON types)."""
        return {
            "path": str(self.path),
            "scenario": self.scenario,
            "release": self.release,
            "duration_s": self.duration_s,
            "description": self.description,
            "targets": dict(self.targets),
            "allowlist": list(self.allowlist) if self.allowlist is not None else None,
            "load": {
                "locustfiles": [str(p) for p in self.load.locustfiles],
                "users": self.load.users,
                "spawn_rate": self.load.spawn_rate,
                "host": self.load.host,
                "options": dict(self.load.options),
                "shape": dict(self.load.shape) if self.load.shape else None,
            },
            "collect": {
                "groups": dict(self.collect.groups),
                "udp_ports": list(self.collect.udp_ports),
                "urls": list(self.collect.urls),
                "interval_s": self.collect.interval_s,
                "allow_missing": self.collect.allow_missing,
            },
            "caps": vars(self.caps).copy(),
            "abort": vars(self.abort).copy(),
            "gates": vars(self.gates).copy(),
            "record_interval_s": self.record_interval_s,
            "stop_timeout_s": self.stop_timeout_s,
            "lab": dict(self.lab_hints),
            "capacity_relative": {k: dict(v) for k, v in self.capacity_relative.items()},
        }


# ------------------------------------------------------------------------------------------------
# field checks: each takes the value and "file: [table] key" for the message
# ------------------------------------------------------------------------------------------------


def _check_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ProfileError(f"{where}: must be a name of letters, digits and '._-', got {value!r}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ProfileError(f"{where}: must be a string, got {type(value).__name__} {value!r}")
    return value


def _pos_int(value: Any, where: str, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(f"{where}: must be an integer, got {type(value).__name__} {value!r}")
    if value < 0 or (value == 0 and not zero_ok):
        raise ProfileError(f"{where}: must be {'0 or more' if zero_ok else 'more than 0'}, got {value}")
    return value


def _pos_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"{where}: must be a number, got {type(value).__name__} {value!r}")
    if not value > 0:
        raise ProfileError(f"{where}: must be more than 0, got {value}")
    return float(value)


def _fraction(value: Any, where: str) -> float:
    v = _pos_number(value, where)
    if v > 1:
        raise ProfileError(f"{where}: is a fraction between 0 and 1 (0.9 = 90 %), got {value}")
    return v


def _port(value: Any, where: str) -> int:
    p = _pos_int(value, where)
    if p > 65535:
        raise ProfileError(f"{where}: port {p} is out of range 1-65535")
    return p


def _table(data: dict, name: str, where: str, required: bool = False) -> dict:
    value = data.get(name)
    if value is None:
        if required:
            raise ProfileError(f"{where}: missing table [{name}]")
        return {}
    if isinstance(value, list) and name == "load":
        if len(value) != 1 or not isinstance(value[0], dict):
            raise ProfileError(
                f"{where}: [[load]] must appear once (list several files in one locustfile = [...])"
            )
        value = value[0]
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: [{name}] must be a table, got {type(value).__name__}")
    allowed = _TABLES[name]
    if allowed:
        for key in value:
            if key not in allowed:
                raise ProfileError(
                    f"{where}: [{name}] unknown key {key!r} (allowed: {', '.join(allowed)})"
                )
    return value


def _resolve_file(value: str, profile_path: Path, where: str) -> Path:
    p = Path(value).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        # relative to the profile's folder, its parent (a repo's scenarios/ folder), then cwd
        candidates = [profile_path.parent / p, profile_path.parent.parent / p, Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    if where.endswith("locustfile") and p.suffix == ".py" and len(p.parts) <= 2:
        # "dns_burst.py" or "locustfiles/dns_burst.py" in a profile outside a checkout: the
        # locustfile loadkit ships (an installed wheel carries them)
        from loadkit import resources

        if p.stem in resources.locustfile_names():
            return resources.locustfile(p.stem)
    raise ProfileError(f"{where}: file {value!r} not found (relative to the profile or the working directory, "
                       "nor a locustfile loadkit ships: loadkit locustfile lists them)")


def _check_options(options: Any, targets: dict[str, str], where: str) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise ProfileError(f"{where}: must be a table of option = value, got {type(options).__name__}")
    out: dict[str, Any] = {}
    for key, value in options.items():
        kw = f"{where}.{key}"
        name = key.lstrip("-")
        if not _OPTION_RE.match(name):
            raise ProfileError(f"{kw}: {key!r} is not an option name (letters, digits, '-', '_')")
        if name in _RESERVED_OPTIONS:
            raise ProfileError(f"{kw}: set by the profile itself ([run] duration, [load] users...), not in options")
        lowered = name.lower()
        if any(w in lowered for w in _SECRET_WORDS) and not lowered.endswith(("file", "env")):
            raise ProfileError(
                f"{kw}: credentials are not written into profiles; give a file (e.g. accounts-file) "
                "or the name of an environment variable"
            )
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, (dict, list)) or v is None:
                raise ProfileError(f"{kw}: must be a string, number, boolean or a list of them, got {v!r}")
            if capacity.is_expression(v):
                if isinstance(value, list) or not _RATE_OPTION_RE.search(lowered.replace("_", "-")):
                    raise ProfileError(f"{kw}: {v!r}: only a single rate option (queries/s, e.g. dns-rate) "
                                       "can be relative to the lab's capacity")
                capacity.parse_expression(v, kw)
            if isinstance(v, str):
                for ref in _TARGET_REF_RE.findall(v):
                    if ref not in targets:
                        raise ProfileError(f"{kw}: refers to unknown target {ref!r} (targets: {', '.join(targets)})")
        out[name] = value
    return out


#: ``[load] shape`` kinds: parameter -> (kind of value, required); "users" may be 0, "count"
#: may not; "duration" takes 30s/5m or seconds. The names are the attributes of the shape
#: classes in loadkit.generate.shapes (loadkit.generate.profile_shape maps kind -> class).
SHAPE_KINDS: dict[str, dict[str, tuple[str, bool]]] = {
    "steps": {"steps": ("steps", True)},
    "spike_train": {
        "base_users": ("users", True), "spike_users": ("count", True), "spike_s": ("duration", False),
        "period_s": ("duration", False), "first_spike_s": ("duration", False),
        "duration_s": ("duration", False),
    },
    "daily": {
        "night_users": ("users", True), "peak_users": ("count", True), "spike_users": ("count", True),
        "spike_hour": ("hour", False), "spike_minutes": ("number", False), "day_s": ("duration", False),
        "days": ("count", False),
    },
    "ramp_to_knee": {
        "max_users": ("count", True), "start_users": ("users", False), "users_per_s": ("number", False),
        "max_s": ("duration", False), "max_loss_ratio": ("fraction", False),
        "max_p99_s": ("duration", False), "intervals_n": ("count", False),
        "check_every_s": ("duration", False),
    },
}

#: the parameters of each kind that are user counts: the shape's peak is the largest of them
_SHAPE_USER_KEYS = ("base_users", "spike_users", "night_users", "peak_users", "start_users", "max_users")


def check_shape(value: Any, default_spawn_rate: float | None, where: str) -> dict[str, Any]:
    """``[load] shape`` -> ``{"kind": ..., param: value}`` (durations in seconds)."""
    if not isinstance(value, dict):
        raise ProfileError(
            f"{where}: must be a table such as {{ kind = \"steps\", steps = [[\"30s\", 10]] }}, "
            f"got {type(value).__name__} {value!r}"
        )
    kinds = ", ".join(SHAPE_KINDS)
    kind = value.get("kind")
    if kind is None:
        raise ProfileError(f"{where}.kind: missing (one of {kinds})")
    if kind not in SHAPE_KINDS:
        raise ProfileError(f"{where}.kind: {kind!r} is not a shape (one of {kinds})")
    params = SHAPE_KINDS[kind]
    out: dict[str, Any] = {"kind": kind}
    for key, v in value.items():
        if key in ("kind", "spawn_rate"):
            continue
        if key not in params:
            raise ProfileError(
                f"{where}.{key}: not a parameter of a {kind} shape (allowed: {', '.join(params)}, spawn_rate)"
            )
    for key, (what, required) in params.items():
        wk = f"{where}.{key}"
        if key not in value:
            if required:
                raise ProfileError(f"{wk}: missing (a {kind} shape needs {', '.join(k for k, (_, r) in params.items() if r)})")
            continue
        v = value[key]
        if what == "users":
            out[key] = _pos_int(v, wk, zero_ok=True)
        elif what == "count":
            out[key] = _pos_int(v, wk)
        elif what == "duration":
            out[key] = parse_duration(v, wk)
        elif what == "number":
            out[key] = _pos_number(v, wk)
        elif what == "fraction":
            out[key] = _fraction(v, wk)
        elif what == "hour":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 24:
                raise ProfileError(f"{wk}: must be an hour of the day 0-24 (12.5 = 12:30), got {v!r}")
            out[key] = float(v)
        else:  # steps
            out[key] = _check_steps(v, wk)
    rate = value.get("spawn_rate", default_spawn_rate)
    if rate is not None:
        out["spawn_rate"] = _pos_number(rate, f"{where}.spawn_rate")
    if shape_peak_users(out) <= 0:
        raise ProfileError(f"{where}: the shape never has any users")
    return out


def _check_steps(value: Any, where: str) -> list[list[float]]:
    example = 'e.g. steps = [["30s", 10], ["30s", 50]]'
    if not isinstance(value, list) or not value:
        raise ProfileError(f"{where}: must be a list of [duration, users] steps, {example}")
    steps: list[list[float]] = []
    for i, step in enumerate(value, 1):
        ws = f"{where}[{i}]"
        if isinstance(step, dict):
            unknown = set(step) - {"duration", "users"}
            if unknown or len(step) != 2:
                raise ProfileError(f"{ws}: a step is {{ duration = \"30s\", users = 10 }}, got {step!r}")
            step = [step["duration"], step["users"]]
        if not isinstance(step, list) or len(step) != 2:
            raise ProfileError(f"{ws}: a step is [duration, users], {example}; got {step!r}")
        steps.append([parse_duration(step[0], f"{ws} duration"), _pos_int(step[1], f"{ws} users", zero_ok=True)])
    return steps


def shape_peak_users(shape: dict[str, Any]) -> int:
    """The most users a checked shape asks for (what [caps] max_users is checked against)."""
    if shape["kind"] == "steps":
        return max(int(users) for _, users in shape["steps"])
    return max(int(v) for k, v in shape.items() if k in _SHAPE_USER_KEYS)


def check_caps(profile: Profile, where: str) -> None:
    """Refuse a profile whose users, duration or any rate option exceeds ``[caps]``."""
    caps = profile.caps
    if profile.load.shape and profile.load.users > caps.max_users:
        raise ProfileError(
            f"{where}: [load] shape peaks at {profile.load.users} users, above [caps] max_users = {caps.max_users}"
        )
    if profile.load.users > caps.max_users:
        raise ProfileError(
            f"{where}: {profile.load.users} users exceeds [caps] max_users = {caps.max_users}"
        )
    if profile.duration_s > caps.max_duration_s:
        raise ProfileError(
            f"{where}: duration {profile.duration_s:g} s exceeds [caps] max_duration_s = {caps.max_duration_s:g}"
        )
    for key, value in profile.load.options.items():
        for v in value if isinstance(value, list) else [value]:
            if capacity.is_expression(v):  # "1.5 capacity": checked once resolved against a lab
                continue
            if isinstance(v, str) and v.startswith("rate:"):  # e.g. --mail-arrival rate:100
                v = v[5:]
            elif not _RATE_OPTION_RE.search(key.replace("_", "-").lower()):
                continue
            try:
                if isinstance(v, bool):
                    raise ValueError
                v = float(v)
            except (TypeError, ValueError):
                raise ProfileError(
                    f"{where}: [load] options.{key}: must be a number of requests/s, got {v!r}"
                ) from None
            if v < 0:
                raise ProfileError(f"{where}: [load] options.{key}: must not be negative, got {v:g}")
            if v > caps.max_rate_qps:
                raise ProfileError(
                    f"{where}: [load] options.{key} = {v:g} exceeds [caps] max_rate_qps = {caps.max_rate_qps:g}"
                )


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile; :class:`ProfileError` naming file, key and problem."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ProfileError(f"profile {path} not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"{name}: not valid TOML: {err}") from err
    except UnicodeDecodeError as err:
        raise ProfileError(f"{name}: not UTF-8 text ({err.reason})") from err
    return profile_from_dict(data, path)


def profile_from_dict(data: dict[str, Any], path: Path) -> Profile:
    """Validate a parsed profile table by table; the first problem is one :class:`ProfileError`."""
    name = path.name
    for table in data:
        if table not in _TABLES:
            raise ProfileError(f"{name}: unknown table [{table}] (allowed: {', '.join(_TABLES)})")
    run = _run_table(_table(data, "run", name, required=True), name)
    targets, allowlist = _targets_table(_table(data, "targets", name, required=True), name)
    load = _load_table(_table(data, "load", name, required=True), targets, path)
    profile = Profile(
        path=path,
        targets=targets,
        allowlist=allowlist,
        load=load,
        collect=_collect_table(_table(data, "collect", name), name),
        caps=_caps_table(_table(data, "caps", name), name),
        abort=_abort_table(_table(data, "abort", name), name),
        gates=_gates_table(_table(data, "gates", name), name),
        record_interval_s=_pos_number(_table(data, "record", name).get("interval_s", 1.0),
                                      f"{name}: [record] interval_s"),
        lab_hints=dict(_table(data, "lab", name)),
        raw=data,
        **run,
    )
    if profile.abort.cgroup_memory_fraction and not (profile.collect.groups or profile.collect.urls):
        raise ProfileError(f"{name}: [abort] cgroup_memory_fraction: needs [collect] groups (a cgroup) or "
                           "urls to read the memory from")
    check_caps(profile, name)
    return profile


def _run_table(run: dict[str, Any], name: str) -> dict[str, Any]:
    """``[run]`` -> the :class:`Profile` fields it sets."""
    w = f"{name}: [run]"
    if "scenario" not in run:
        raise ProfileError(f"{w} scenario: missing (a name such as smoke)")
    if "duration" not in run:
        raise ProfileError(f"{w} duration: missing (e.g. duration = \"30s\")")
    return {
        "scenario": _check_name(run["scenario"], f"{w} scenario"),
        "release": _check_name(run.get("release", "unlabelled"), f"{w} release"),
        "duration_s": parse_duration(run["duration"], f"{w} duration"),
        "stop_timeout_s": parse_duration(run.get("stop_timeout", 5), f"{w} stop_timeout"),
        "description": _str(run.get("description", ""), f"{w} description"),
    }


def _targets_table(tdata: dict[str, Any], name: str) -> tuple[dict[str, str], tuple[str, ...] | None]:
    """``[targets]`` -> ``({name: spec}, allowlist)``; a port may be left out only for a target
    named after a protocol (its standard port, :func:`loadkit.profile.targets.standard_port`)."""
    targets: dict[str, str] = {}
    allowlist: tuple[str, ...] | None = None
    for key, value in tdata.items():
        wk = f"{name}: [targets] {key}"
        if key == "allowlist":
            allowlist = _check_allowlist(value, wk)
            continue
        _check_name(key, f"{name}: [targets] name")
        spec = _str(value, wk)
        try:
            _, port = split_host_port(spec, standard_port(key))
        except TargetError as err:
            raise ProfileError(f"{wk}: {err}") from None
        if port == 0:
            raise ProfileError(f"{wk}: {spec!r} needs a port (host:port)")
        targets[key] = spec
    if not targets:
        raise ProfileError(f"{name}: [targets]: name at least one target, e.g. dns = \"127.0.0.1:5353\"")
    return targets, allowlist


def _check_allowlist(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise ProfileError(f"{where}: must be a list of networks such as [\"127.0.0.0/8\"]")
    for v in value:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ProfileError(f"{where}: {v!r} is not a network (e.g. 198.51.100.0/24)") from None
    return tuple(value)


def _load_table(ldata: dict[str, Any], targets: dict[str, str], path: Path) -> LoadSpec:
    w = f"{path.name}: [load]"
    if "locustfile" not in ldata:
        raise ProfileError(f"{w} locustfile: missing")
    files = ldata["locustfile"]
    files = files if isinstance(files, list) else [files]
    if not files:
        raise ProfileError(f"{w} locustfile: the list is empty")
    locustfiles = tuple(
        _resolve_file(_str(f, f"{w} locustfile"), path, f"{w} locustfile") for f in files
    )
    for f in locustfiles:
        if f.suffix != ".py":
            raise ProfileError(f"{w} locustfile: {f.name} is not a Python file")
    shape = None
    if "shape" in ldata:
        if "users" in ldata:
            raise ProfileError(f"{w} users: leave it out when [load] shape is set (the shape sets the users)")
        spawn = _pos_number(ldata["spawn_rate"], f"{w} spawn_rate") if "spawn_rate" in ldata else None
        shape = check_shape(ldata["shape"], spawn, f"{w} shape")
        users = shape_peak_users(shape)
    elif "users" not in ldata:
        raise ProfileError(f"{w} users: missing (number of concurrent Locust users, or a [load] shape)")
    else:
        users = _pos_int(ldata["users"], f"{w} users")
    spawn_rate = _pos_number(ldata.get("spawn_rate", users), f"{w} spawn_rate")
    host = ldata.get("host")
    if host is not None:
        _str(host, f"{w} host")
        if host.removesuffix(".address") not in targets:
            raise ProfileError(f"{w} host: {host!r} is not one of [targets] ({', '.join(targets)})")
    options = _check_options(ldata.get("options", {}), targets, f"{w} options")
    return LoadSpec(locustfiles, users, spawn_rate, host, options, shape)


def _collect_table(cdata: dict[str, Any], name: str) -> CollectSpec:
    w = f"{name}: [collect]"
    groups = cdata.get("groups", {})
    if not isinstance(groups, dict):
        raise ProfileError(f"{w} groups: must be a table of name = \"spec\", e.g. p1 = \"cgroup:/sys/fs/cgroup/p1\"")
    for g, spec in groups.items():
        # the collector's own grammar, regex compiled: a bad group is refused here, not mid-run
        try:
            parse_group_spec(f"{g}={_str(spec, f'{w} groups.{g}')}")
        except CollectorError as err:
            raise ProfileError(f"{w} groups.{g}: {err}") from None
    udp_ports = cdata.get("udp_ports", [])
    if not isinstance(udp_ports, list):
        raise ProfileError(f"{w} udp_ports: must be a list of ports, got {udp_ports!r}")
    ports = tuple(_port(p, f"{w} udp_ports") for p in udp_ports)
    urls = cdata.get("urls", [])
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list):
        raise ProfileError(f"{w} urls: must be a list of collector URLs, got {urls!r}")
    for u in urls:
        if not isinstance(u, str) or not u.startswith(("http://", "https://")):
            raise ProfileError(f"{w} urls: {u!r} is not an http:// URL")
    interval = _pos_number(cdata.get("interval_s", 0.5), f"{w} interval_s")
    allow_missing = cdata.get("allow_missing", False)
    if not isinstance(allow_missing, bool):
        raise ProfileError(f"{w} allow_missing: must be true or false, got {allow_missing!r}")
    return CollectSpec(dict(groups), ports, tuple(urls), interval, allow_missing)


def _caps_table(kdata: dict[str, Any], name: str) -> Caps:
    w = f"{name}: [caps]"
    return Caps(
        max_users=_pos_int(kdata.get("max_users", DEFAULT_CAPS["max_users"]), f"{w} max_users"),
        max_duration_s=parse_duration(kdata.get("max_duration_s", DEFAULT_CAPS["max_duration_s"]), f"{w} max_duration_s"),
        max_rate_qps=_pos_number(kdata.get("max_rate_qps", DEFAULT_CAPS["max_rate_qps"]), f"{w} max_rate_qps"),
    )


def _abort_table(adata: dict[str, Any], name: str) -> AbortSpec:
    w = f"{name}: [abort]"
    return AbortSpec(
        cgroup_memory_fraction=_fraction(adata["cgroup_memory_fraction"], f"{w} cgroup_memory_fraction")
        if "cgroup_memory_fraction" in adata
        else None,
        failure_ratio=_fraction(adata["failure_ratio"], f"{w} failure_ratio") if "failure_ratio" in adata else None,
        min_requests=_pos_int(adata.get("min_requests", 50), f"{w} min_requests"),
    )


def _gates_table(gdata: dict[str, Any], name: str) -> GateSpec:
    w = f"{name}: [gates]"
    gate_values = {}
    for k, v in gdata.items():
        if k == "failure_ratio":
            gate_values[k] = _fraction(v, f"{w} {k}")
        elif k == "min_headroom_pct":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
                raise ProfileError(f"{w} {k}: must be a percentage 0-100, got {v!r}")
            gate_values[k] = float(v)
        else:
            gate_values[k] = _pos_number(v, f"{w} {k}")
    return GateSpec(**gate_values)


def target_default_port(profile: Profile, key: str) -> int:
    """The port a ``[targets]`` entry without one gets: its protocol's standard port, the
    implicit-TLS one (993, 995) when ``[load] options`` set ``mail-tls = "tls"``."""
    tls = str(profile.load.options.get("mail-tls", "off")).lower() == "tls"
    return standard_port(key, tls=tls and PROTOCOL_NAMES.get(key) in ("imap", "pop3"))


def resolve_targets(profile: Profile) -> dict[str, Any]:
    """Resolve every target and collector URL; :class:`TargetNotAllowed` before anything is sent.

    Returns ``{target name: Target}``; collector URLs are checked too (they are contacted).
    """
    resolved = {}
    allow: Sequence[str] | None = profile.allowlist
    for key, spec in profile.targets.items():
        resolved[key] = check_target(spec, target_default_port(profile, key), allow)
    for url in profile.collect.urls:
        check_target(url, 443 if url.startswith("https") else 80, allow)
    return resolved


def expand_target_refs(value: Any, resolved: dict[str, Any]) -> Any:
    """Replace ``{target:NAME}`` in option strings by the resolved ``address:port``."""
    if isinstance(value, list):
        return [expand_target_refs(v, resolved) for v in value]
    if isinstance(value, str):
        return _TARGET_REF_RE.sub(lambda m: str(resolved[m.group(1)]), value)
    return value
