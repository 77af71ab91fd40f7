"""DNS floods: many small sources (the hijacked home routers of incident 3), or a ramp to the knee.

Default: 2,000 source addresses (127.1.0.1 upwards, loopback needs no setup) each sending 2
queries/s at Poisson arrivals, 30 % for random subdomains that miss the cache, no bursts:
``locust -f locustfiles/dns_flood.py --headless -t 30s``. An explicit ``--dns-rate`` is the total
rate instead (spread over the same sources); the log line says which one applies. In distributed
mode the sources and the rate are dealt out to the workers.

Ramp-to-knee (like resperf): ``--dns-ramp-to 150000 --dns-ramp-duration 60`` raises the offered
rate linearly from ``--dns-rate`` (when given; else sources x ``--dns-source-qps``) and stops when the loss
passes ``--dns-knee-loss`` or the answers' 99th percentile passes ``--dns-knee-p99-ms`` for two
intervals in a row; the maximum throughput and the loss at that point are logged.
"""

from locust import events, run_single_user

import loadkit.plugin.recorder  # noqa: F401
from loadkit.generate.dns.users import DnsSettings, DnsUser, install

install(
    events,
    DnsSettings(
        rate_qps=0,
        sources=2000,
        source_qps=2,
        arrival="poisson",
        burst_size_n=0,
        random_subdomain_share=0.3,
        qtypes="A:80,AAAA:20",
        timeout_s=2.0,
        retries=1,
        stats_interval_s=1.0,
    ),
)


class DnsFloodUser(DnsUser):
    pass


if __name__ == "__main__":
    run_single_user(DnsFloodUser)
