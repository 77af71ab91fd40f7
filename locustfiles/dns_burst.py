"""DNS bursts against a resolver: a steady base rate plus bursts, open loop, with retries.

QA's daily burst test: ``locust -f locustfiles/dns_burst.py --headless -t 15s`` sends 2,000
queries per second to the lab's unbound (127.0.0.1:5353) plus a burst of 2,000 queries in
10 ms every 5 s, retrying like a stub resolver. Every ``--dns-*`` option shows in the web UI;
``--host`` points it at a staging server (which must be in the allowlist).
"""

from locust import events, run_single_user

import loadkit.plugin.recorder  # noqa: F401
from loadkit.generate.dns.users import DnsSettings, DnsUser, install

install(
    events,
    DnsSettings(
        rate_qps=2000,
        burst_size_n=2000,
        burst_ms=10,
        burst_period_s=5,
        first_burst_s=2,
        qtypes="A:80,AAAA:20",
        nxdomain_share=0.05,
        timeout_s=1.0,
        retries=2,
    ),
)


class DnsBurstUser(DnsUser):
    pass


if __name__ == "__main__":
    run_single_user(DnsBurstUser)
