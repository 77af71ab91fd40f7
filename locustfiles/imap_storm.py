"""IMAP login storm: clients that log in, open INBOX, read a few headers and hold the session.

    locust -f locustfiles/imap_storm.py --headless -u 150 -r 50 -t 20s --csv out/imap
    locust -f locustfiles/imap_storm.py --host 127.0.0.1:1143 --mail-dwell idle --mail-arrival rate:100

The target is ``--target imap=HOST[:PORT]`` (what ``loadkit run`` passes for a profile's
``imap`` target), else ``--host``; a host without a port means port 143. Without either it is
the lab's haproxy (the lab in ``LOADKIT_LAB_DIR``, else 127.0.0.1:1143). The accounts default to
the file of the lab that serves the target, found from the target, whatever the directory. The ``--mail-*``
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
