"""A tiny locustfile for run tests: a TCP echo exchange against a loopback server.

Each task connects to ``--host`` (host:port), sends one line, reads the reply and fires one
Locust request event; a refused or reset connection is a classed failure. ``--fail-every N``
makes every Nth request fail as ``auth_rejected`` (to exercise failure ratios), and
``--accounts-file`` reads ``user,password`` rows whose password is sent as the line (to check
credentials never reach the record).
"""

from __future__ import annotations

import csv
import itertools
import socket
import time

from locust import User, between, events, task

import loadkit.plugin.recorder  # noqa: F401  (records the run)
from loadkit.generate.metrics import metrics_for
from loadkit.profile.targets import check_target
from loadkit.schema import Failure


@events.init_command_line_parser.add_listener
def _args(parser):
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--accounts-file", default="")
    parser.add_argument("--wait-s", type=float, default=0.01)


class EchoUser(User):
    wait_time = between(0.0, 0.0)
    _counter = itertools.count(1)

    def on_start(self):
        o = self.environment.parsed_options
        self.target = check_target(self.host, 7)
        self.password = "x"
        if o.accounts_file:
            with open(o.accounts_file) as fh:
                rows = list(csv.DictReader(fh))
            self.password = rows[0]["password"]
        self.fail_every = o.fail_every
        self.wait_s = o.wait_s

    @task
    def echo(self):
        n = next(self._counter)
        start = time.perf_counter()
        exc = None
        try:
            with socket.create_connection((self.target.address, self.target.port), timeout=2) as s:
                s.sendall(self.password.encode() + b"\n")
                if not s.recv(100):
                    raise Failure("eof_after_login")
            if self.fail_every and n % self.fail_every == 0:
                raise Failure("auth_rejected", "every Nth")
        except Failure as err:
            exc = err
        except ConnectionRefusedError:
            exc = Failure("conn_refused")
        except OSError as err:
            exc = Failure("conn_reset", str(err))
        metrics_for(self.environment).add("tiny.sent")
        self.environment.events.request.fire(
            request_type="TCP", name="echo", response_time=(time.perf_counter() - start) * 1000,
            response_length=0, exception=exc, context={},
        )
        time.sleep(self.wait_s)
