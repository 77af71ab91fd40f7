"""The lab: a local replica of the incident systems on loopback.

unbound serving the zone ``lab.test.``, a dovecot mail backend, K dovecot proxies (one login
process per connection) each in its own memory cgroup, and haproxy in TCP mode in front of
them. ``Lab(LabConfig(...)).up()`` starts it, ``status()`` inspects it, ``down()`` stops exactly
what ``up()`` started. Load code never imports this package: it reaches the lab through
:mod:`loadkit.defaults` like any other target.
"""

from .config import LabConfig, parse_bytes
from .lab import Lab
from .status import CgroupSupport, ComponentStatus, Endpoint, LabStatus, ProxyStatus

__all__ = [
    "CgroupSupport",
    "ComponentStatus",
    "Endpoint",
    "Lab",
    "LabConfig",
    "LabStatus",
    "ProxyStatus",
    "parse_bytes",
]
