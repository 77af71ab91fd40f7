"""Replay a login log: dovecot's own log (imap-login/pop3-login Login lines and their
Disconnected lines) or a CSV ``timestamp,protocol,user[,duration_s]``, with its timing.

    locust -f locustfiles/login_replay.py --headless --login-log /var/log/dovecot.log --replay-speed 3 \\
        --replay-from 12:29:00 --replay-to 12:35:00

Each session logs in at its recorded time (divided by ``--replay-speed``), is held for its
recorded duration and logs out, as the storm users' IMAP and POP3 clients (the ``--mail-*``
options apply). Passwords come from ``--mail-accounts`` (default: the accounts file of the lab that
serves the target). A headless run stops by itself when the last session has ended.
"""

from locust import events, run_single_user

import loadkit.plugin.recorder  # noqa: F401  (records the run)
from loadkit.generate.mail.login_replay import LoginReplayUser, install

install(events)


class LoginReplay(LoginReplayUser):
    """Holds a slot while the log is replayed."""


if __name__ == "__main__":
    run_single_user(LoginReplay)
