"""Locust side of the DNS replay: options, the first pass in ``init``, one sender per process.

The same wiring as the other DNS locustfiles (:mod:`.users`): the load is open loop and comes
from one :class:`~.replay.ReplaySender` per process between ``test_start`` and ``test_stop``, its
interval reports go into Locust's stats, the fine latency histograms and the generator counters
by :meth:`.users.DnsRun.on_interval`; a bad option or a bad file prints one line and locust
exits 2 before anything is sent. With workers each sends the copies of its share of the source
addresses (the master tells workers their count at test start).
"""

from __future__ import annotations

import logging
from typing import Any

import gevent
from locust import task
from locust.util.timespan import parse_timespan

from loadkit.generate.wiring import note_target, worker_share
from loadkit.profile.targets import target_spec

from . import replay
from .users import DnsRun, DnsUser, _print_interval, install_run, require_supported_locust

log = logging.getLogger(__name__)


class ReplayRun(DnsRun):
    """One process's replay inside a Locust environment."""

    def __init__(self, environment: Any, settings: replay.ReplaySettings) -> None:
        super().__init__(environment, settings)  # type: ignore[arg-type]
        self.replay_plan: replay.ReplayPlan | None = None

    def make_plan(self) -> replay.ReplayPlan:  # type: ignore[override]
        env = self.environment
        settings = replay.settings_from_options(env.parsed_options, self.defaults, target_spec(env, "dns"))
        if self.replay_plan is None or self.replay_plan.settings != settings:
            self.replay_plan = replay.plan(settings)
        return self.replay_plan

    def sources_n(self) -> int | None:  # type: ignore[override]
        """Source addresses of the replay (``/metrics``): they come from the recording's clients,
        so they are known once this process has read it; None on a master, which reads nothing."""
        return len(self.replay_plan.addresses) if self.replay_plan is not None else None

    def start(self) -> None:
        p = self.make_plan()
        index, count = worker_share(self.environment)
        self.share = (index, count)
        self.sender = replay.build_sender(p, index, count, on_interval=self.on_interval)
        # queries replayed as recorded go mostly over UDP, as the DNS models read the target
        note_target(self.environment, p.settings.protocol if p.settings.protocol in ("tcp", "dot") else "udp",
                    p.target)
        self.request_type = "DNS"
        self.sender.open()
        o = self.sender.options
        log.info("DNS replay to %s: worker %d of %d: %s; retries %d, source port %s", p.target, index + 1, count,
                 replay.describe(p), o.retries_n, o.port_policy)
        self.greenlet = gevent.spawn(self._run)

    def log_stopped(self) -> None:
        super().log_stopped()
        if isinstance(self.sender, replay.ReplaySender):
            log.info("DNS replay lateness (actual - scheduled send): %s", self.sender.lateness.summary())

    def _run(self) -> None:
        super()._run()
        runner = self.environment.runner
        if self.sender is not None and not self.sender._stop and type(runner).__name__ == "LocalRunner":
            # the recording has ended (not the test): a standalone run ends with it, as its record
            # then covers exactly the replay (a worker leaves that to its master's --run-time)
            log.info("DNS replay: the recording has ended; stopping the test")
            gevent.spawn_later(0.1, runner.quit)


def install(events: Any, settings: replay.ReplaySettings | None = None) -> None:
    """Wire the replay into a locustfile: options, checks (the whole file), one sender per process."""
    require_supported_locust()
    base = settings or replay.ReplaySettings()

    @events.init_command_line_parser.add_listener
    def _add_arguments(parser: Any, **_kw: Any) -> None:
        replay.add_arguments(parser, base)

    install_run(events, lambda environment: ReplayRun(environment, base))


class ReplayUser(DnsUser):
    """Holds a user slot while the process's replay runs; under ``run_single_user`` it replays the
    file itself (no longer than ``--run-time`` or ``debug_duration_s``) and prints each interval."""

    abstract = True
    debug_duration_s: float = 60.0

    @task
    def hold(self) -> None:  # type: ignore[override]
        env = self.environment
        if env.runner is not None:
            gevent.sleep(1.0)
            return
        run: ReplayRun = env.loadkit_dns
        sender = replay.build_sender(run.replay_plan or run.make_plan(), on_interval=_print_interval)
        run_time = getattr(env.parsed_options, "run_time", None)
        sender.max_duration_s = parse_timespan(str(run_time)) if run_time else self.debug_duration_s
        sender.open()
        try:
            sender.run()
        finally:
            sender.close()
        print(sender.summary(), flush=True)
        from locust.exception import StopUser

        raise StopUser()

    tasks = [hold]  # only this hold (Locust would also collect the base class's task)
