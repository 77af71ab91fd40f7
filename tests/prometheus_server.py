"""A real Prometheus server for tests: started on loopback, config and TSDB in a temporary folder.

Any test that needs Prometheus (scraping loadkit's endpoints, or holding a series to query)
uses this helper rather than starting its own::

    from prometheus_server import PrometheusServer, ScrapeJob

    with PrometheusServer(tmp_path, [ScrapeJob("collector", "127.0.0.1:9108")]) as prom:
        prom.wait_for_targets_up(timeout_s=20)
        prom.query_value('sum(up)')                     # -> 1.0
        prom.query('node_load1')                        # -> the API's result list
        prom.query_range('node_load1', start, end, 1)   # -> matrix result list

Historical data (a daily pattern over weeks, say) goes in *before* ``start()`` with
:meth:`PrometheusServer.backfill`, which runs ``promtool tsdb create-blocks-from openmetrics``
into the server's TSDB folder; retention is long by default so backfilled blocks are kept.

- The binary is Debian's ``prometheus`` package (the Makefile installs it); without it the test
  fails with one line saying so, never silently passes.
- The server listens on ``address`` (default: ``LOADKIT_TEST_LAB_ADDRESS`` or 127.0.0.1) on a
  free port chosen here; if another process takes the port first, start retries on a new one.
- ``stop()`` ends exactly the process ``start()`` made (SIGTERM by PID, then SIGKILL after 10 s)
  and is safe to call twice; the context manager always calls it.
- Scrape interval and timeout default to 1 s so a few-second run has several samples.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import yaml

PROMETHEUS = "prometheus"
PROMTOOL = "promtool"


class ScrapeJob(NamedTuple):
    """One scrape job: Prometheus' ``job`` label, one ``host:port`` target, its path."""

    job: str
    target: str
    metrics_path: str = "/metrics"
    scheme: str = "http"


class PrometheusError(RuntimeError):
    """Prometheus did not start, or an API call failed (the message carries its log tail)."""


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def require_binary(name: str = PROMETHEUS) -> str:
    path = shutil.which(name)
    if path is None:
        raise PrometheusError(f"'{name}' is not installed: install the Debian package prometheus (make setup does)")
    return path


class PrometheusServer:
    """One Prometheus process. ``workdir`` holds ``prometheus.yml``, ``data/`` and ``prometheus.log``."""

    def __init__(
        self,
        workdir: Path,
        jobs: Sequence[ScrapeJob] = (),
        *,
        address: str | None = None,
        scrape_interval_s: float = 1.0,
        retention: str = "3650d",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.jobs = list(jobs)
        self.address = address or os.environ.get("LOADKIT_TEST_LAB_ADDRESS", "127.0.0.1")
        self.scrape_interval_s = scrape_interval_s
        self.retention = retention
        self.extra_args = list(extra_args)
        self.data_dir = self.workdir / "data"
        self.config_file = self.workdir / "prometheus.yml"
        self.log_file = self.workdir / "prometheus.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    # -- configuration --------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The ``prometheus.yml`` this server runs with (one static target per job)."""
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        return {
            # the timeout may not exceed the interval; evaluation matches it for recording rules
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": j.job,
                    "metrics_path": j.metrics_path,
                    "scheme": j.scheme,
                    "static_configs": [{"targets": [j.target]}],
                }
                for j in self.jobs
            ],
        }

    def backfill(self, openmetrics_text: str) -> None:
        """Write historical samples into the TSDB before :meth:`start` (OpenMetrics text, timestamps
        in seconds, ending with ``# EOF``; the helper adds the ``# EOF`` when it is missing)."""
        if self.proc is not None:
            raise PrometheusError("backfill before start(): promtool writes blocks the server loads at start")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        text = openmetrics_text if openmetrics_text.rstrip().endswith("# EOF") else openmetrics_text.rstrip() + "\n# EOF\n"
        src = self.workdir / f"backfill-{time.time_ns()}.om"
        src.write_text(text)
        res = subprocess.run([require_binary(PROMTOOL), "tsdb", "create-blocks-from", "openmetrics", "-q",
                              str(src), str(self.data_dir)], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise PrometheusError(f"promtool backfill failed: {(res.stderr or res.stdout)[-2000:]}")

    # -- life cycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def start(self, timeout_s: float = 30.0, attempts: int = 3) -> "PrometheusServer":
        binary = require_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        last = ""
        for _ in range(attempts):
            self.port = _free_port(self.address)
            args = [binary, f"--config.file={self.config_file}", f"--storage.tsdb.path={self.data_dir}",
                    f"--storage.tsdb.retention.time={self.retention}",
                    f"--web.listen-address={self.address}:{self.port}", "--log.level=warn", *self.extra_args]
            with open(self.log_file, "ab") as log:
                self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                             start_new_session=True)
            if self._wait_ready(timeout_s):
                return self
            last = self.log_tail()
            self.stop()
            if "address already in use" not in last:
                break
        raise PrometheusError(f"prometheus did not become ready on {self.address}:{self.port}: {last}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> "PrometheusServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *_exc: Any) -> None:
        self.stop()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- HTTP API -------------------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>`` with ``params``; returns the response's ``data``."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise PrometheusError(f"{path} {params}: HTTP {err.code}: {err.read()[:500]!r}") from err
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, promql: str, at_unix_s: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result list (``[{"metric": {...}, "value": [ts, "v"]}, ...]``)."""
        return self.api("query", query=promql, time=at_unix_s)["result"]

    def query_value(self, promql: str, at_unix_s: float | None = None) -> float | None:
        """The value of a query that returns one series or a scalar; None when it returns nothing."""
        data = self.api("query", query=promql, time=at_unix_s)
        result = data["result"]
        if data["resultType"] == "scalar":
            return float(result[1])
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{promql!r} returned {len(result)} series; wrap it in sum() or select one")
        return float(result[0]["value"][1])

    def query_range(self, promql: str, start_unix_s: float, end_unix_s: float, step_s: float) -> list[dict[str, Any]]:
        """A range query's matrix (``[{"metric": {...}, "values": [[ts, "v"], ...]}, ...]``)."""
        return self.api("query_range", query=promql, start=start_unix_s, end=end_unix_s, step=step_s)["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets", state="active")["activeTargets"]

    def wait_for_targets_up(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every configured job has a target whose last scrape succeeded."""
        want = {j.job for j in self.jobs}
        targets: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            targets = self.targets()
            if want <= {t["labels"].get("job") for t in targets if t.get("health") == "up"}:
                return targets
            time.sleep(0.25)
        raise PrometheusError(f"targets not up after {timeout_s:.0f} s: "
                              f"{[(t['labels'].get('job'), t.get('health'), t.get('lastError')) for t in targets]}")

    def wait_until(self, promql: str, accept: Callable[[float | None], bool], timeout_s: float = 30.0) -> float | None:
        """Poll ``query_value(promql)`` until ``accept(value)``; returns the accepted value."""
        value: float | None = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.query_value(promql)
            if accept(value):
                return value
            time.sleep(0.25)
        raise PrometheusError(f"{promql!r} still {value!r} after {timeout_s:.0f} s")
