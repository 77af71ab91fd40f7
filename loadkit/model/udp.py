"""UDP burst loss: will a burst of queries overflow the server's socket receive buffer?

A UDP socket queues datagrams until its charged memory exceeds ``sk_rcvbuf``; each datagram is
charged its buffer's true size, not its payload (about 832 bytes for a small DNS query on
loopback), so the platform default of 212,992 bytes holds 256 queries. Linux drops a datagram
when the charge with it would exceed ``sk_rcvbuf`` but always admits one into an empty queue
(``__udp_enqueue_schedule_skb``; older kernels admitted one more past the limit), which makes the
capacity ``max(1, floor(rcvbuf / bytes_per_datagram))``: 256 and 39 measured on the lab's
unbound at 212,992 and 32,768 bytes.

A burst of ``n`` datagrams arriving over ``w`` seconds at rate ``n/w`` faster than the service
rate ``mu`` leaves ``n - mu w`` queued at its end: it is lost-free while that fits, so the largest
loss-free burst is ``B + mu w`` (``B / (1 - mu / rate)`` at a given arrival rate), and the fluid
loss of a bigger one is ``n - mu w - B``.

``rcvbuf_bytes`` here is the kernel's ``sk_rcvbuf`` (``ss -m`` ``rb``, ``getsockopt``): Linux
doubles a ``setsockopt(SO_RCVBUF)`` value (unbound's ``so-rcvbuf``) to leave room for overhead,
and caps the request at ``net.core.rmem_max`` unless it is forced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from loadkit.errors import ModelError
from loadkit.model._result import Result
from loadkit.record.reader import RunData

#: buffer charge of one small DNS query datagram on loopback, measured (skb truesize)
BYTES_PER_DATAGRAM = 832
#: Linux's net.core.rmem_default on most distributions
DEFAULT_RCVBUF_BYTES = 212_992


def buffer_datagrams(rcvbuf_bytes: float, bytes_per_datagram: float = BYTES_PER_DATAGRAM) -> int:
    """Datagrams a socket queues before it drops (at least one: an empty queue takes one)."""
    return max(1, int(math.floor(rcvbuf_bytes / bytes_per_datagram)))


@dataclass
class UdpBurstResult(Result):
    """The receive buffer against a burst: the largest burst without loss and what bigger ones lose."""

    kind = "udp_burst"

    rcvbuf_bytes: float
    bytes_per_datagram: float
    service_rate_qps: float
    buffer_datagrams: int
    burst_window_s: float  #: the burst the headline figure is for (0 = all at once)
    arrival_rate_qps: float | None  #: when set, the headline is for a burst at this rate
    max_burst_no_loss: float  #: inf (null in JSON) when arrivals never outpace service
    # what a recorded run showed (fit_udp_burst), else None
    observed_drops_n: int | None = None
    observed_onset_qps: float | None = None  #: lowest offered rate of an interval with drops

    def max_burst_in_window(self, burst_window_s: float) -> float:
        """Largest burst arriving within ``burst_window_s`` seconds that loses nothing."""
        return self.buffer_datagrams + self.service_rate_qps * burst_window_s

    def max_burst_at_rate(self, arrival_rate_qps: float) -> float:
        """Largest burst arriving at ``arrival_rate_qps`` that loses nothing (inf if rate <= mu)."""
        if arrival_rate_qps <= self.service_rate_qps:
            return math.inf
        return self.buffer_datagrams / (1.0 - self.service_rate_qps / arrival_rate_qps)

    def expected_loss(self, burst_n: float, burst_window_s: float = 0.0) -> float:
        """Datagrams lost from a burst of ``burst_n`` within ``burst_window_s`` (fluid model)."""
        return max(0.0, burst_n - self.service_rate_qps * burst_window_s - self.buffer_datagrams)

    def rcvbuf_for(self, burst_n: float, burst_window_s: float = 0.0) -> int:
        """``sk_rcvbuf`` bytes that queue such a burst without loss (set half of it with
        ``SO_RCVBUF``/``so-rcvbuf``; raise ``net.core.rmem_max`` above it)."""
        queued = max(burst_n - self.service_rate_qps * burst_window_s, 1.0)
        return int(math.ceil(math.ceil(queued) * self.bytes_per_datagram))

    def summary(self) -> str:
        if self.arrival_rate_qps is not None:
            when = f"arriving at {self.arrival_rate_qps:.0f}/s"
        elif self.burst_window_s > 0:
            when = f"within {self.burst_window_s * 1e3:.0f} ms"
        else:
            when = "arriving at once"
        big = "no limit (arrivals never outpace service)" if not math.isfinite(self.max_burst_no_loss) \
            else f"≈ {self.max_burst_no_loss:.0f} queries"
        text = (f"rcvbuf {self.rcvbuf_bytes:.0f} B holds {self.buffer_datagrams} datagrams of "
                f"{self.bytes_per_datagram:.0f} B; service {self.service_rate_qps:.0f}/s; largest "
                f"burst without loss {when}: {big}")
        if self.observed_drops_n is not None:
            text += f"; run dropped {self.observed_drops_n}"
        return text


def udp_burst(rcvbuf_bytes: float = DEFAULT_RCVBUF_BYTES, service_rate_qps: float = 0.0, *,
              bytes_per_datagram: float = BYTES_PER_DATAGRAM, burst_window_s: float = 0.0,
              arrival_rate_qps: float | None = None) -> UdpBurstResult:
    """The burst model for one socket: buffer bytes, charge per datagram, service rate."""
    if rcvbuf_bytes <= 0:
        raise ModelError(f"receive buffer {rcvbuf_bytes} must be > 0 bytes")
    if bytes_per_datagram <= 0:
        raise ModelError(f"bytes per datagram {bytes_per_datagram} must be > 0")
    if service_rate_qps < 0 or burst_window_s < 0:
        raise ModelError("service rate and burst window must be >= 0")
    if arrival_rate_qps is not None and arrival_rate_qps <= 0:
        raise ModelError(f"arrival rate {arrival_rate_qps} must be > 0 queries/s")
    r = UdpBurstResult(rcvbuf_bytes=float(rcvbuf_bytes), bytes_per_datagram=float(bytes_per_datagram),
                       service_rate_qps=float(service_rate_qps),
                       buffer_datagrams=buffer_datagrams(rcvbuf_bytes, bytes_per_datagram),
                       burst_window_s=float(burst_window_s), arrival_rate_qps=arrival_rate_qps,
                       max_burst_no_loss=math.nan)
    r.max_burst_no_loss = (r.max_burst_at_rate(arrival_rate_qps) if arrival_rate_qps is not None
                           else r.max_burst_in_window(burst_window_s))
    return r


def _counter_rates(run: RunData, metric: str) -> pd.Series:
    g = run.generator
    g = g[(g["metric"] == metric) & (g["kind"] == "counter")]
    s = g.groupby("ts_unix_s")["value"].sum().sort_index()
    if len(s) < 2:
        return pd.Series(dtype=float)
    dt = np.diff(s.index.to_numpy(dtype=float))
    return pd.Series(np.diff(s.to_numpy(dtype=float)) / dt, index=s.index[1:])


def _recorded_so_rcvbuf(manifest: dict) -> float:
    """The lab's ``dns_rcvbuf_bytes`` (unbound ``so-rcvbuf``) as the run recorded it, 0 if none."""
    lab = manifest.get("lab") or {}
    profile_lab = (manifest.get("profile") or {}).get("lab") or {}
    for where in (lab, lab.get("config") or {}, profile_lab):
        value = where.get("dns_rcvbuf_bytes")
        if value:
            return float(value)
    return 0.0


def target_socket(run: RunData, address: str | None = None, port: int | None = None) -> pd.DataFrame:
    """Samples of the DNS server's own socket: by the given address/port, else the run's
    ``udp://`` target; empty when the collector did not watch it."""
    sockets = run.sockets
    if not len(sockets):
        return sockets
    if port is None:
        for target in run.manifest.get("targets") or []:
            if str(target).startswith("udp://"):
                host, _, port_s = str(target)[len("udp://"):].rpartition(":")
                address = address or host.strip("[]")
                port = int(port_s) if port_s.isdigit() else None
                break
    if port is None:
        return sockets if sockets["local_port"].nunique() == 1 else sockets.iloc[0:0]
    mine = sockets[sockets["local_port"] == port]
    if address and "local_address" in mine and (mine["local_address"] != "").any():
        mine = mine[mine["local_address"].isin([address, "0.0.0.0", "::"])]
    return mine


def receive_drops(run: RunData, address: str | None = None, port: int | None = None) -> tuple[str, pd.Series]:
    """Receive-buffer drops per interval and where they were counted.

    The ``drops`` column of ``/proc/net/udp`` for the server's own socket when the collector
    watched it; else the host-wide ``Udp: RcvbufErrors``, which counts every UDP socket on the
    host, other servers' too (the label says which).
    """
    mine = target_socket(run, address, port)
    if len(mine):
        d = mine.groupby("ts_unix_s")["drops_n"].sum().sort_index()
        first = mine.iloc[0]
        where = f"{first.get('local_address') or address or '*'}:{int(first['local_port'])}"
        return f"drops at {where}", d.diff().clip(lower=0).dropna()
    net = run.net
    if len(net) and "udp_rcvbuf_errors_n" in net:
        d = net.groupby("ts_unix_s")["udp_rcvbuf_errors_n"].sum().sort_index()
        return "RcvbufErrors (whole host)", d.diff().clip(lower=0).dropna()
    return "drops", pd.Series(dtype=float)


def fit_udp_burst(run: RunData, *, rcvbuf_bytes: float | None = None,
                  bytes_per_datagram: float = BYTES_PER_DATAGRAM, burst_window_s: float = 0.0,
                  address: str | None = None, port: int | None = None) -> UdpBurstResult:
    """The burst model with the service rate and drops measured in a recorded DNS run.

    Service rate: the highest answered rate of any interval (``dns.answered`` counter, else
    successful DNS requests), the best estimate of capacity when the run saturated the server.
    Drops: the ``drops`` of the server's own socket (``address``/``port``, default the run's
    ``udp://`` target) when the collector watched it, else the host-wide ``RcvbufErrors``. ``rcvbuf_bytes`` defaults to the lab's recorded ``dns_rcvbuf_bytes`` (unbound's
    ``so-rcvbuf``, from the manifest's lab or profile) doubled as the kernel does, else the
    platform default.
    """
    answered = _counter_rates(run, "dns.answered")
    if not len(answered):
        req = run.requests
        req = req[req["request_type"] == "DNS"] if len(req) else req
        if not len(req):
            raise ModelError(f"run {run.run_id} has neither a dns.answered counter nor DNS requests")
        per = req.groupby("ts_unix_s").agg(n=("requests_n", "sum"), f=("failures_n", "sum"),
                                           dt=("interval_s", "max"))
        answered = (per["n"] - per["f"]) / per["dt"]
    service = float(answered.max())
    if rcvbuf_bytes is None:
        so = _recorded_so_rcvbuf(run.manifest)
        rcvbuf_bytes = 2 * float(so) if so else DEFAULT_RCVBUF_BYTES
    result = udp_burst(rcvbuf_bytes, service, bytes_per_datagram=bytes_per_datagram,
                       burst_window_s=burst_window_s)
    _, drops = receive_drops(run, address, port)
    result.observed_drops_n = int(drops.sum()) if len(drops) else 0
    offered = _counter_rates(run, "dns.original_sent").add(
        _counter_rates(run, "dns.retry_sent"), fill_value=0.0)
    if len(drops) and len(offered) and (drops > 0).any():
        hit = pd.merge_asof(pd.DataFrame({"ts_unix_s": drops.index.to_numpy(dtype=float), "d": drops.to_numpy()}),
                            pd.DataFrame({"ts_unix_s": offered.index.to_numpy(dtype=float), "o": offered.to_numpy()}),
                            on="ts_unix_s", direction="nearest")
        hit = hit[hit["d"] > 0]
        result.observed_onset_qps = float(hit["o"].min()) if len(hit) else None
    return result
