"""Replay recorded DNS traffic with its timing: a capture, a dnstap file or a query log.

``locust -f locustfiles/dns_replay.py --headless --replay-file spike.pcap`` sends every query of
``spike.pcap`` (UDP and TCP, pcap or pcapng) to the lab's unbound at its recorded offset, each
recorded client from its own loopback address, and stops when the recording ends (give ``-t`` a
little longer than the recording). ``--replay-speed 10`` plays it ten times as fast,
``--replay-scale 3`` three times as big, ``--replay-from 120 --replay-to 180`` one minute of it.
dnstap files (frame streams) and BIND querylog / unbound log-queries logs replay the same way.
Retries, failure classes and the run record (``--record-dir``) are those of every DNS locustfile;
each query's lateness against its schedule is counted (``dns.replay_lateness_le_*``).
"""

from locust import events, run_single_user

import loadkit.plugin.recorder  # noqa: F401
from loadkit.generate.dns.replay import ReplaySettings
from loadkit.generate.dns.replay_users import ReplayUser, install

install(events, ReplaySettings(timeout_s=1.0, retries=2))


class DnsReplayUser(ReplayUser):
    pass


if __name__ == "__main__":
    run_single_user(DnsReplayUser)
