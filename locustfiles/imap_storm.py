"""IMAP login storm: clients that log in, open INBOX, read a few headers and hold the session.

    locust -f locustfiles/imap_storm.py --headless -u 150 -r 50 -t 20s --csv out/imap
    locust -f locustfiles/imap_storm.py --host 127.0.0.1:1143 --mail-dwell idle --mail-arrival rate:100

Defaults target the lab's haproxy (127.0.0.1:1143) and its accounts file. The ``--mail-*``
options (dwell, arrival model, reconnect policy, TLS, per-phase timeouts) show in the web UI's
custom parameters and in the README; Locust prints ``--help`` before it imports a locustfile,
so they are not listed there.
"""

import loadkit.plugin.recorder  # noqa: F401  (records the run)
from locust import run_single_user

from loadkit.generate.mail.users import ImapUser


class ImapStormUser(ImapUser):
    """One IMAP client of the storm."""


if __name__ == "__main__":
    run_single_user(ImapStormUser)
