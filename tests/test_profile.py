"""Profiles: the schema, the malformed profiles in tests/profiles_bad/, overrides and caps."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadkit.cli import main
from loadkit.errors import ProfileError, TargetNotAllowed
from loadkit.profile.profile import load_profile, parse_duration, resolve_targets

HERE = Path(__file__).parent
BAD = sorted((HERE / "profiles_bad").glob("*.toml"))
TINY = HERE / "locustfiles" / "tiny.py"


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect:"), f"{path.name} must start with '# expect: <message part>'"
    return first.split("expect:", 1)[1].strip()


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_malformed_profile_gives_one_line_naming_file_and_problem(path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    assert _expected(path) in message


@pytest.mark.parametrize("path", BAD[:3], ids=[p.stem for p in BAD[:3]])
def test_cli_prints_the_line_and_exits_2(path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loadkit: error: ") and "\n" not in err and _expected(path) in err


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "p.toml"
    p.write_text(body.replace("TINY", str(TINY)))
    return p


GOOD = """
[run]
scenario = "s1"
release = "r9"
duration = "1m30s"
[targets]
dns = "127.0.0.1"
echo = "127.0.0.1:7007"
allowlist = ["127.0.0.0/8"]
[load]
locustfile = "TINY"
host = "echo"
users = 20
spawn_rate = 5
options = { rate-qps = 500, server = "{target:dns}", tcp = true, source = ["127.0.5.1", "127.0.5.2"] }
[collect]
groups = { p1 = "cgroup:/sys/fs/cgroup/x@1143" }
udp_ports = [5353]
interval_s = 0.25
[caps]
max_users = 100
max_rate_qps = 1000
[abort]
cgroup_memory_fraction = 0.9
failure_ratio = 0.5
[gates]
p99_latency_s = 0.5
failure_ratio = 0.01
"""


def test_good_profile_is_read_with_units_and_defaults(tmp_path: Path) -> None:
    p = load_profile(_write(tmp_path, GOOD))
    assert (p.scenario, p.release, p.duration_s) == ("s1", "r9", 90.0)
    assert p.load.users == 20 and p.load.spawn_rate == 5.0 and p.load.locustfiles == (TINY.resolve(),)
    assert p.collect.groups == {"p1": "cgroup:/sys/fs/cgroup/x@1143"} and p.collect.udp_ports == (5353,)
    assert p.abort.cgroup_memory_fraction == 0.9 and p.abort.min_requests == 50
    assert dict(p.gates.items()) == {"p99_latency_s": 0.5, "failure_ratio": 0.01}
    resolved = resolve_targets(p)
    assert str(resolved["dns"]) == "127.0.0.1:53"  # dns may leave out its port
    assert str(resolved["echo"]) == "127.0.0.1:7007"
    d = p.to_dict()
    assert d["load"]["options"]["rate-qps"] == 500 and d["targets"]["echo"] == "127.0.0.1:7007"


def test_overrides_are_checked_against_caps(tmp_path: Path) -> None:
    p = load_profile(_write(tmp_path, GOOD))
    q = p.with_overrides(release="r10", duration="2m")
    assert (q.release, q.duration_s) == ("r10", 120.0)
    with pytest.raises(ProfileError, match="--duration: 'soon' is not a duration"):
        p.with_overrides(duration="soon")
    with pytest.raises(ProfileError, match="exceeds \\[caps\\] max_duration_s"):
        p.with_overrides(duration="3h")
    with pytest.raises(ProfileError, match="--release: must be a name"):
        p.with_overrides(release="a b")


def test_target_outside_allowlist_is_refused_naming_the_allowlist(tmp_path: Path) -> None:
    p = load_profile(_write(tmp_path, GOOD.replace('echo = "127.0.0.1:7007"', 'echo = "192.0.2.10:7007"')))
    with pytest.raises(TargetNotAllowed, match="outside the allowlist \\(127.0.0.0/8\\)"):
        resolve_targets(p)


def test_collector_urls_are_checked_against_the_allowlist_too(tmp_path: Path) -> None:
    body = GOOD.replace("interval_s = 0.25", 'interval_s = 0.25\nurls = ["http://198.51.100.7:9109"]')
    with pytest.raises(TargetNotAllowed, match="198.51.100.7"):
        resolve_targets(load_profile(_write(tmp_path, body)))


@pytest.mark.parametrize(
    "text, seconds",
    [("90", 90), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5), (2.5, 2.5), ("1m30s", 90),
     ("7d", 604800), ("1w", 604800), ("1.5h", 5400), ("2d12h", 216000), ("1 h 30 m", 5400), ("1s250ms", 1.25)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize("text", ["inf", "nan", float("inf"), "1x", "30m1h", "ms", "-5s", "1d-2h"])
def test_durations_refused(text: object) -> None:
    with pytest.raises(ProfileError, match="^x: "):
        parse_duration(text, "x")


SCENARIOS = sorted((HERE.parent / "scenarios").glob("*.toml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenarios_are_valid_and_name_loopback_targets(path: Path) -> None:
    p = load_profile(path)
    assert p.targets, "a scenario names its targets explicitly"
    resolved = resolve_targets(p)  # all inside the default (loopback) allowlist
    assert all(t.address.startswith("127.") for t in resolved.values())


GROUP_SPECS = [
    ("p", "foo@bar", True),  # '@' not followed by ports: part of the pattern
    ("u", "cgroup:/user.slice/user@1000.service", True),
    ("p1", "cgroup:/loadkit/p1@11243,11210", True),
    ("d", "cmdline:unbound -c .*@5353", True),
    ("bad", "cmdline:unbound(lab", False),  # compiled at validation
    ("bad", "cgroup:/x@1143,imap", False),
    ("bad", "cgroup:", False),
    ("bad", "x@70000", False),
]


@pytest.mark.parametrize(("name", "spec", "ok"), GROUP_SPECS, ids=[s for _, s, _ in GROUP_SPECS])
def test_profile_and_collector_read_group_specs_with_one_grammar(tmp_path: Path, name, spec, ok) -> None:
    from loadkit.errors import CollectorError
    from loadkit.observe.groups import parse_group_spec

    body = f"""
[run]
scenario = "g"
duration = "5s"
[targets]
echo = "127.0.0.1:7"
[load]
locustfile = "TINY"
users = 1
[collect]
groups = {{ {name} = {spec!r} }}
""".replace("'", '"')
    try:
        parse_group_spec(f"{name}={spec}")
        collector_ok = True
    except CollectorError:
        collector_ok = False
    try:
        load_profile(_write(tmp_path, body))
        profile_ok = True
    except ProfileError as err:
        profile_ok = False
        assert f"[collect] groups.{name}: " in str(err)
    assert profile_ok == collector_ok == ok


def test_the_schema_docstrings_example_options_are_real_options() -> None:
    import re
    from dataclasses import fields

    import loadkit.profile.profile as profile_module
    from loadkit.generate.dns.users import DnsSettings, _flag

    line = next(t for t in profile_module.__doc__.splitlines() if t.strip().startswith("options = {"))
    keys = re.findall(r"([a-z][a-z0-9-]*) =", line.split("{", 1)[1])
    flags = {_flag(f.name) for f in fields(DnsSettings)}
    assert keys and all(f"--{k}" in flags for k in keys), (keys, sorted(flags))


def test_dns_forecasts_are_gate_parameters_not_gates(tmp_path: Path) -> None:
    """The report reads [gates] forecast_peak_qps / forecast_peak_burst_queries: a profile may set
    them, and they are not evaluated as gates."""
    from loadkit.run.gates import evaluate

    (tmp_path / "x.py").write_text("")
    path = tmp_path / "p.toml"
    path.write_text('[run]\nscenario = "s"\nduration = "5s"\n[targets]\ndns = "127.0.0.1:5353"\n[load]\nlocustfile = "x.py"\nusers = 1\n'
                    "[gates]\nforecast_peak_qps = 800\nforecast_peak_burst_queries = 4000\n")
    profile = load_profile(path)
    assert dict(profile.gates.items()) == {"forecast_peak_qps": 800, "forecast_peak_burst_queries": 4000}
    assert evaluate(tmp_path, dict(profile.gates.items())) == []


def test_a_profile_away_from_the_checkout_finds_the_shipped_locustfile_by_name(tmp_path: Path) -> None:
    from loadkit import resources

    body = '[run]\nscenario = "s"\nduration = "5s"\n[targets]\ndns = "127.0.0.1:5353"\n[load]\nusers = 1\nlocustfile = "{}"\n'
    (tmp_path / "a.toml").write_text(body.format("dns_burst.py"))
    assert load_profile(tmp_path / "a.toml").load.locustfiles == (resources.locustfile("dns_burst"),)
    # a name loadkit does not ship is still one line naming the file and where it was looked for
    (tmp_path / "b.toml").write_text(body.format("no_such.py"))
    with pytest.raises(ProfileError, match="file 'no_such.py' not found .*loadkit locustfile lists them"):
        load_profile(tmp_path / "b.toml")
