"""The Locust side: options (web UI too), checks before the first packet, worker shares."""

from __future__ import annotations

import types

import pytest
from locust.argument_parser import LocustArgumentParser

from loadkit.errors import InputFileError, ProfileError, TargetError
from loadkit.generate.dns import schedule
from loadkit.generate.dns.users import DnsSettings, add_arguments, build_sender, plan, settings_from_options


@pytest.fixture
def names_file(tmp_path):
    p = tmp_path / "names.txt"
    p.write_text("".join(f"h{i:05d}.lab.test.\n" for i in range(100)))
    return str(p)


def test_options_are_locust_custom_arguments_shown_in_the_web_ui() -> None:
    parser = LocustArgumentParser()
    add_arguments(parser, DnsSettings(first_burst_s=2, rate_qps=500))
    shown = parser.args_included_in_web_ui
    for dest in ("dns_rate_qps", "dns_burst_size_n", "dns_burst_ms", "dns_burst_period_s", "dns_names_file",
                 "dns_qtypes", "dns_nxdomain_share", "dns_random_subdomain_share", "dns_protocol",
                 "dns_edns_bytes", "dns_timeout_s", "dns_retries", "dns_backoff", "dns_sources"):
        assert dest in shown, dest
    opts = parser.parse_args(["--dns-rate", "750", "--dns-first-burst", "0.5", "--dns-protocol", "tcp"])
    assert opts.dns_rate_qps == 750.0 and opts.dns_first_burst_s == 0.5 and opts.dns_protocol == "tcp"
    assert "retry" in shown["dns_backoff"].help


def test_web_ui_strings_are_converted_and_bad_ones_named() -> None:
    opts = types.SimpleNamespace(dns_rate_qps="300", dns_burst_size_n="100", dns_qtypes="A")
    s = settings_from_options(opts, DnsSettings(), "127.0.0.1:5353")
    assert (s.rate_qps, s.burst_size_n, s.host) == (300.0, 100, "127.0.0.1:5353")
    with pytest.raises(ProfileError, match="--dns-burst-size 'lots' is not an integer"):
        settings_from_options(types.SimpleNamespace(dns_burst_size_n="lots"), DnsSettings(), None)


@pytest.mark.parametrize(
    "override, error, text",
    [
        ({"rate_qps": -1}, ProfileError, "--dns-rate -1 must be a number >= 0"),
        ({"qtypes": "A,NOPE"}, ProfileError, "'NOPE' is not a DNS query type"),
        ({"protocol": "sctp"}, ProfileError, "--dns-protocol"),
        ({"timeout_s": 0}, ProfileError, "--dns-timeout 0 must be > 0"),
        ({"sources": 0}, ProfileError, "--dns-sources 0"),
        ({"burst_period_s": 0}, ProfileError, "burst period"),
        ({"host": "203.0.113.9:53"}, TargetError, "outside the allowlist"),
        ({"names_file": "/nonexistent/names.txt"}, InputFileError, "does not exist"),
    ],
)
def test_plan_rejects_bad_settings(names_file, override, error, text) -> None:
    settings = DnsSettings(host="127.0.0.1:5353", names_file=names_file)
    for k, v in override.items():
        setattr(settings, k, v)
    with pytest.raises(error, match=text.replace("(", r"\(")) as err:
        plan(settings)
    assert "\n" not in str(err.value)


def test_workers_get_their_share_of_rate_bursts_and_sources(names_file) -> None:
    p = plan(DnsSettings(host="127.0.0.1:5353", names_file=names_file, rate_qps=0, source_qps=3, sources=10,
                         burst_size_n=1001, arrival="constant"))
    assert p.total_rate_qps == 30
    senders = [build_sender(p, i, 2) for i in range(2)]
    assert [s.base.rate_qps for s in senders] == [15.0, 15.0]
    assert [s.burst_train.size_n for s in senders] == [501, 500]
    assert set(senders[0].sources).isdisjoint(senders[1].sources)
    assert len(senders[0].sources) + len(senders[1].sources) == 10


def test_ramp_and_poisson_plans_and_auto_ports(names_file) -> None:
    ramp = plan(DnsSettings(host="127.0.0.1:5353", names_file=names_file, rate_qps=100, ramp_to_qps=120000,
                            ramp_s=10, retries=0, timeout_s=1.0))
    assert isinstance(ramp.base, schedule.LinearRamp)
    # 120k q/s x 1 s of timeout would wrap one socket's 16-bit IDs: several sockets
    assert build_sender(ramp).ports_per_source >= 4
    poisson = plan(DnsSettings(host="127.0.0.1:5353", names_file=names_file, arrival="poisson", burst_size_n=0))
    assert isinstance(poisson.base, schedule.PoissonRate) and poisson.bursts is None
