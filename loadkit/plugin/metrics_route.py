"""``/metrics`` on the Locust web UI: the load side's counters for Prometheus.

The collector's exposition (:mod:`loadkit.observe.exporter`) shows the target; this shows what
the load did, on the port Locust's web UI already serves (8089 by default), so one Prometheus
scrapes both and a dashboard puts load and saturation on one screen:

- every generator counter and gauge (:func:`loadkit.generate.metrics.metrics_for`, the same
  values the recorder writes to the run's ``generator`` table, merged over workers on a master: summed, a
  largest-value gauge such as ``login_replay.max_lateness_s`` maximised):
  counter ``dns.original_sent`` -> ``loadkit_dns_original_sent_total``, gauge
  ``imap.held_sessions`` -> ``loadkit_imap_held_sessions``, a ``_s`` suffix -> ``_seconds``;
- ``loadkit_dns_offered_total``: original queries plus retries, what the target was offered;
- ``loadkit_dns_sources``: source addresses of the DNS load (per-source rate = offered rate / it;
  a replay's come from its recording, which a master does not read: not on a replay's master);
- ``loadkit_requests_total{request_type,name}`` and
  ``loadkit_request_failures_total{request_type,name,class}`` from Locust's statistics (a
  loadkit failure's class token is its ``repr``, as in the run record's failures table);
- ``loadkit_users`` and, on a master, ``loadkit_workers``.

In distributed mode the master has the merged figures, and only the master has a web UI, so
scrape the master. A headless Locust (``loadkit run``) has no web server: ``--metrics-listen
HOST:PORT`` serves the same ``/metrics`` there (loopback only: it has no login; beyond loopback,
use the web UI with ``--web-login``). With ``--web-login`` the route asks for the same login as
the UI.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Any, Iterator

from locust.runners import MasterRunner
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from loadkit.generate.metrics import metrics_for
from loadkit.record import counters

log = logging.getLogger(__name__)

ROUTE = "/metrics"
_ENDPOINT = "loadkit_metrics"

#: protocols whose load side exports an offered counter (:func:`loadkit.record.counters.offered_parts`)
OFFERED_PROTOCOLS = ("dns",)


def prometheus_name(metric: str) -> str:
    """``dns.burst_window_s`` -> ``loadkit_dns_burst_window_seconds`` (a counter's ``_total`` is
    added by the exposition)."""
    name = "loadkit_" + re.sub(r"[^a-zA-Z0-9_]", "_", metric)
    return name[:-2] + "_seconds" if name.endswith("_s") else name


class LoadMetrics:
    """A ``prometheus_client`` custom collector over one Locust environment."""

    def __init__(self, environment: Any) -> None:
        self.environment = environment

    def collect(self) -> Iterator[Metric]:
        yield from self._generator_families()
        yield from self._request_families()
        runner = self.environment.runner
        if runner is not None:
            yield GaugeMetricFamily("loadkit_users", "Locust users running now.", value=float(runner.user_count))
            if isinstance(runner, MasterRunner):
                yield GaugeMetricFamily("loadkit_workers", "Locust workers connected.", value=float(runner.worker_count))

    def _generator_families(self) -> Iterator[Metric]:
        # the rows the recorder writes, with the kinds the run record's one reader knows
        rows = metrics_for(self.environment).snapshot(time.time())
        values = {row.metric: row.value for row in rows if row.kind == counters.COUNTER}
        for row in rows:
            if row.kind == counters.COUNTER:
                yield CounterMetricFamily(prometheus_name(row.metric), f"Generator counter {row.metric}.", value=row.value)
            elif row.kind == counters.GAUGE:
                yield GaugeMetricFamily(prometheus_name(row.metric), f"Generator gauge {row.metric}.", value=row.value)
        for protocol in OFFERED_PROTOCOLS:
            parts = counters.offered_parts(protocol)
            if parts[0] in values:
                yield CounterMetricFamily(f"loadkit_{protocol}_offered", "Queries offered to the target: originals plus retries.",
                                          value=sum(values.get(p, 0.0) for p in parts))
        sources = self._dns_sources()
        if sources:
            yield GaugeMetricFamily("loadkit_dns_sources", "Source addresses the DNS load is sent from.", value=float(sources))

    def _dns_sources(self) -> int | None:
        run = getattr(self.environment, "loadkit_dns", None)
        if run is None:
            return None
        try:
            # never a plan built here: a scrape must not read a capture or a names file
            return run.sources_n()
        except Exception as err:  # a scrape never fails over one figure
            log.debug("no DNS source count for /metrics: %s", err)
            return None

    def _request_families(self) -> Iterator[Metric]:
        stats = self.environment.stats
        if stats is None:
            return
        requests = CounterMetricFamily("loadkit_requests", "Requests Locust counted (answered or failed).",
                                       labels=["request_type", "name"])
        for (name, method), entry in sorted(stats.entries.items()):
            requests.add_metric([str(method), str(name)], float(entry.num_requests))
        failures = CounterMetricFamily("loadkit_request_failures", "Failed requests by failure class.",
                                       labels=["request_type", "name", "class"])
        for err in list(stats.errors.values()):
            failures.add_metric([str(err.method), str(err.name), failure_label(str(err.error))],
                                float(err.occurrences))
        yield requests
        yield failures


#: longest failure class label; a longer one keeps its start and a digest of the whole, so two
#: messages that share their first characters stay two series
LABEL_MAX_CHARS = 120


def failure_label(text: str) -> str:
    """A failure's ``class`` label: the text itself up to :data:`LABEL_MAX_CHARS` characters, else its
    start and ``~`` and 8 hex digits of its SHA-1 (one series per distinct message)."""
    if len(text) <= LABEL_MAX_CHARS:
        return text
    digest = hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()[:8]
    return f"{text[:LABEL_MAX_CHARS - 9]}~{digest}"


def _registry(environment: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LoadMetrics(environment))
    return registry


def serve_metrics(environment: Any, listen: str) -> Any:
    """Serve ``/metrics`` at ``listen`` (``HOST:PORT``, loopback) with ``prometheus_client``'s own
    HTTP server, for a run without a web UI; stopped at ``quitting``. Returns the server."""
    from prometheus_client.exposition import start_http_server

    from loadkit.errors import LoadkitError, ProfileError
    from loadkit.observe.exporter import parse_listen
    from loadkit.observe.webconfig import is_loopback

    try:
        host, port = parse_listen(listen)
    except LoadkitError as err:
        raise ProfileError(f"--metrics-listen {listen!r} is not HOST:PORT (e.g. 127.0.0.1:9646)") from err
    if not is_loopback(host):
        raise ProfileError(f"--metrics-listen {listen}: only a loopback address (the load side's /metrics "
                           "has no login); beyond loopback, run with the web UI and --web-login")
    try:
        server, _thread = start_http_server(port, addr=host.strip("[]"), registry=_registry(environment))
    except OSError as err:
        raise ProfileError(f"--metrics-listen {listen}: cannot listen there ({err.strerror})") from err

    def _stop(**_kw: Any) -> None:
        server.shutdown()
        server.server_close()

    environment.events.quitting.add_listener(_stop)
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    log.info("serving the load side's metrics at http://%s:%d/metrics", shown, server.server_port)
    return server


def add_metrics_route(environment: Any) -> None:
    """Serve ``/metrics`` from the environment's web UI (nothing when it has none: a worker, a
    headless run)."""
    web_ui = getattr(environment, "web_ui", None)
    if web_ui is None:
        return
    from flask import Response, request
    from werkzeug.routing import Rule

    registry = _registry(environment)

    def _metrics() -> Any:
        encoder, ctype = choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(registry), status=200, headers={"Content-Type": ctype})

    app = web_ui.app
    # Flask refuses @app.route once the app has served a request: register the rule directly
    if _ENDPOINT not in app.view_functions:
        app.url_map.add(Rule(ROUTE, endpoint=_ENDPOINT, methods=["GET"]))
    app.view_functions[_ENDPOINT] = web_ui.auth_required_if_enabled(_metrics)
