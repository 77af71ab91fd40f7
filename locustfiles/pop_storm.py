"""POP3 login storm: clients that log in, STAT, UIDL, RETR one message and hold the session.

    locust -f locustfiles/pop_storm.py --headless -u 150 -r 50 -t 20s --csv out/pop
    locust -f locustfiles/pop_storm.py --host 127.0.0.1:1110 --mail-dwell 30 --mail-reconnect backoff

The target is ``--target pop3=HOST[:PORT]`` (what ``loadkit run`` passes for a profile's
``pop3`` target), else ``--host``; a host without a port means port 110. Without either it is
the lab's haproxy (the lab in ``LOADKIT_LAB_DIR``, else 127.0.0.1:1110). The accounts default to
the file of the lab that serves the target, found from the target, whatever the directory. The ``--mail-*``
options (dwell, arrival model, reconnect policy, TLS, per-phase timeouts) show in the web UI's
custom parameters and in the README; Locust prints ``--help`` before it imports a locustfile,
so they are not listed there.
"""

import loadkit.plugin.recorder  # noqa: F401  (records the run)
from locust import run_single_user

from loadkit.generate.mail.users import Pop3User


class PopStormUser(Pop3User):
    """One POP3 client of the storm."""


if __name__ == "__main__":
    run_single_user(PopStormUser)
