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
from loadkit.record import counters

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


def _recorded_so_rcvbuf(manifest: dict) -> float:
    """The lab's ``dns_rcvbuf_bytes`` (unbound ``so-rcvbuf``) as the run recorded it, 0 if none."""
    lab = manifest.get("lab") or {}
    profile_lab = (manifest.get("profile") or {}).get("lab") or {}
    for where in (lab, lab.get("config") or {}, profile_lab):
        value = where.get("dns_rcvbuf_bytes")
        if value:
            return float(value)
    return 0.0


def udp_target(run: RunData, address: str | None = None) -> tuple[str | None, int | None]:
    """``(address, port)`` of the run's first ``udp://`` target (``address`` kept when given);
    ``(address, None)`` when the run names none."""
    for target in run.manifest.get("targets") or []:
        if str(target).startswith("udp://"):
            host, _, port_s = str(target)[len("udp://"):].rpartition(":")
            return address or host.strip("[]"), int(port_s) if port_s.isdigit() else None
    return address, None


def target_socket(run: RunData, address: str | None = None, port: int | None = None) -> pd.DataFrame:
    """Samples of the DNS server's own socket: by the given address/port, else the run's
    ``udp://`` target; empty when the collector did not watch it."""
    sockets = run.sockets
    if not len(sockets):
        return sockets
    if port is None:
        address, port = udp_target(run, address)
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



# --------------------------------------------------------------------------------------------
# a recorded run: the drain rate inside each burst, one fit per server socket
# --------------------------------------------------------------------------------------------


#: What a recommended receive buffer holds beyond the need measured: the need is sized at the
#: slowest drain one run saw, and a busier server drains slower (a second run on a loaded machine
#: dropped about 1 % of its bursts through a buffer sized without headroom).
RCVBUF_HEADROOM = 1.25


def so_rcvbuf_for(sk_rcvbuf_bytes: float, headroom: float = RCVBUF_HEADROOM) -> int:
    """The ``SO_RCVBUF``/``so-rcvbuf`` request that gives at least ``headroom × sk_rcvbuf_bytes``:
    the kernel doubles a request (``sock_setsockopt``), so half of it, rounded up (never down)."""
    return int(math.ceil(max(float(sk_rcvbuf_bytes), 0.0) * headroom / 2.0))


@dataclass
class SocketFit(Result):
    """One server socket: its buffer and the drops counted on it."""

    kind = "udp_socket"

    address: str
    port: int
    inode: int  #: 0 when the run recorded sockets without one (or none at all)
    rcvbuf_bytes: float  #: sk_rcvbuf
    rcvbuf_source: str  #: "sock_diag", "so-rcvbuf doubled", "given", "platform default"
    buffer_datagrams: int
    drops_n: int  #: drops counted on this socket during the run (0 when not watched)

    def summary(self) -> str:
        return (f"{self.address}:{self.port} rb {self.rcvbuf_bytes:.0f} B ({self.rcvbuf_source}) = "
                f"{self.buffer_datagrams} queries; dropped {self.drops_n}")


@dataclass
class BurstObservation(Result):
    """One burst of the run: what was sent, the drain rate inside it, loss predicted and measured."""

    kind = "udp_burst_observation"

    burst_index: int
    first_sent_unix_s: float
    window_s: float
    sent_n: int
    drain_qps: float  #: answers read during the burst / time from its first query to that read; nan if unknown
    predicted_loss_n: float  #: with the run's median drain rate
    measured_loss_n: float  #: drops on the server sockets between this burst and the next; nan if unknown


@dataclass
class UdpBurstFit(Result):
    """The burst model fitted to a recorded DNS run (``loadkit fit udp-burst`` and the report).

    The drain rate is measured *inside* bursts: how many answers came back between a burst's
    first query and the sender's first read after its last one, over that time (the burst events
    carry both). A burst that drops while the server drains at ``mu`` leaves its buffers full, so
    it loses ``n - B - mu w`` (``B`` the sockets' buffers in queries, ``w`` the emission window).
    When no burst dropped, the server kept up and the drain rate is only a lower bound.
    """

    kind = "udp_burst_fit"

    bytes_per_datagram: float
    sockets: list[SocketFit]
    drain_rate_qps: float  #: median over bursts; nan when no burst measured it
    drain_rate_min_qps: float  #: the slowest burst: what the recommendation is sized for
    drain_source: str  #: "answers in the burst window", "inferred from drops", "none"
    drain_is_lower_bound: bool  #: no burst dropped: the server may drain faster
    bursts: list[BurstObservation]
    burst_n: float  #: the burst the headline is for (the largest the run sent, unless given)
    burst_window_s: float
    max_burst_no_loss: float  #: in ``burst_window_s``, at the median drain rate
    predicted_loss_n: float  #: of ``burst_n`` in ``burst_window_s`` at the median drain rate
    measured_loss_mean_n: float  #: mean measured loss of the bursts of that size; nan if none measured
    needed_rcvbuf_bytes: int  #: sk_rcvbuf per socket for ``burst_n`` at the slowest drain, whole queries
    #: half of it with :data:`RCVBUF_HEADROOM`, rounded up; net.core.rmem_max must be >= this
    recommended_so_rcvbuf_bytes: int
    observed_drops_n: int
    observed_onset_qps: float | None
    caveats: list[str]

    # -- what the report also reads (the figures of UdpBurstResult) ------------------------------
    @property
    def service_rate_qps(self) -> float:
        return self.drain_rate_qps

    @property
    def rcvbuf_bytes(self) -> float:
        return min(s.rcvbuf_bytes for s in self.sockets)

    @property
    def buffer_datagrams(self) -> int:
        return sum(s.buffer_datagrams for s in self.sockets)

    def _mu(self, conservative: bool = False) -> float:
        mu = self.drain_rate_min_qps if conservative else self.drain_rate_qps
        return mu if math.isfinite(mu) else 0.0

    def expected_loss(self, burst_n: float, burst_window_s: float = 0.0, drain_qps: float | None = None) -> float:
        """Queries lost from a burst spread evenly over the sockets (fluid model; the median drain
        rate unless ``drain_qps`` is given)."""
        k = len(self.sockets)
        served = (self._mu() if drain_qps is None else drain_qps) * burst_window_s / k
        return float(sum(max(0.0, burst_n / k - served - s.buffer_datagrams) for s in self.sockets))

    def max_burst_in_window(self, burst_window_s: float) -> float:
        k = len(self.sockets)
        return k * min(s.buffer_datagrams for s in self.sockets) + self._mu() * burst_window_s

    def rcvbuf_for(self, burst_n: float, burst_window_s: float = 0.0) -> int:
        """sk_rcvbuf bytes each socket needs so such a burst loses nothing at the slowest drain rate
        the run measured, in whole queries, rounded up."""
        k = len(self.sockets)
        queued = max(burst_n / k - self._mu(conservative=True) * burst_window_s / k, 1.0)
        return int(math.ceil(math.ceil(queued) * self.bytes_per_datagram))

    def summary(self) -> str:
        first = self.sockets[0]
        where = f"{first.address}:{first.port}" if first.port else "the server socket"
        k = len(self.sockets)
        socks = (f"{where}: {k} sockets, rcvbuf {self.rcvbuf_bytes:.0f} B each" if k > 1 else
                 f"{where}: rcvbuf {self.rcvbuf_bytes:.0f} B holds {self.buffer_datagrams} datagrams of "
                 f"{self.bytes_per_datagram:.0f} B")
        if math.isfinite(self.drain_rate_qps):
            drain = (f"drain in bursts {'≥ ' if self.drain_is_lower_bound else ''}{self.drain_rate_qps:,.0f}/s "
                     f"(median of {sum(math.isfinite(b.drain_qps) for b in self.bursts)} bursts, {self.drain_source})")
        else:
            drain = "drain in bursts not measured"
        ms = self.burst_window_s * 1e3
        text = [socks, drain,
                f"largest burst without loss in {ms:.0f} ms {'≥' if self.drain_is_lower_bound else '≈'} "
                f"{self.max_burst_no_loss:,.0f}"]
        if self.burst_n:
            measured = (f", measured {self.measured_loss_mean_n:,.0f}" if math.isfinite(self.measured_loss_mean_n)
                        else "")
            text.append(f"a burst of {self.burst_n:,.0f} in {ms:.0f} ms loses {self.predicted_loss_n:,.0f} "
                        f"predicted{measured}")
            at_most = "at most " if self.drain_is_lower_bound else ""
            text.append(f"so-rcvbuf {at_most}{self.recommended_so_rcvbuf_bytes:,} B (sk_rcvbuf "
                        f"{self.needed_rcvbuf_bytes:,} B needed per socket, "
                        f"+{100 * (RCVBUF_HEADROOM - 1):.0f} % headroom for a slower drain; net.core.rmem_max "
                        f"must be ≥ {self.recommended_so_rcvbuf_bytes:,} unless set with SO_RCVBUFFORCE)")
        out = "; ".join(text)
        if self.caveats:
            out += " [" + "; ".join(self.caveats) + "]"
        return out


def _burst_events(run: RunData) -> pd.DataFrame:
    """The run's ``burst`` events, one row per burst (workers' shares of one burst summed)."""
    rows = []
    for ev in run.events:
        if ev.get("kind") != "burst":
            continue
        d = ev.get("detail") or {}
        try:
            first = float(d.get("first_sent_unix_s", ev.get("ts_unix_s")))
            last = float(d.get("last_sent_unix_s", first + float(d.get("window_s") or 0.0)))
            rows.append({"burst_index": int(d.get("burst_index", len(rows))), "first": first, "last": last,
                         "sent_n": int(d.get("sent_n") or 0),
                         "answered_n": (float(d["answered_in_window_n"])
                                        if float(d.get("answered_in_window_n", -1)) >= 0 else math.nan),
                         "read": float(d["answers_read_unix_s"]) if "answers_read_unix_s" in d else math.nan})
        except (TypeError, ValueError):
            continue  # a malformed event says nothing about the burst
    if not rows:
        return pd.DataFrame(columns=["first", "last", "sent_n", "answered_n", "read"])
    df = pd.DataFrame(rows)
    return df.groupby("burst_index").agg(first=("first", "min"), last=("last", "max"), sent_n=("sent_n", "sum"),
                                         answered_n=("answered_n", lambda v: v.sum(min_count=1)),
                                         read=("read", "max")).sort_values("first")


def _socket_fits(run: RunData, rcvbuf_bytes: float | None, bytes_per_datagram: float, address: str | None,
                 port: int | None) -> tuple[list[SocketFit], dict[int, pd.DataFrame]]:
    """One :class:`SocketFit` per server socket, and each socket's cumulative ``drops`` by sample
    start, with when each sample's read ended (``end``)."""
    mine = target_socket(run, address, port)
    so = _recorded_so_rcvbuf(run.manifest)
    rmem_max = (run.manifest.get("host") or {}).get("rmem_max_bytes")
    if rcvbuf_bytes is not None:
        fallback, source = float(rcvbuf_bytes), "given"
    elif so:
        # no sock_diag figure: what the kernel makes of the request (doubled, capped unless forced)
        fallback, source = float(2 * min(so, rmem_max) if rmem_max else 2 * so), "so-rcvbuf doubled"
    else:
        fallback, source = float(DEFAULT_RCVBUF_BYTES), "platform default"
    if not len(mine):
        # the server socket was not watched: the host-wide RcvbufErrors (every socket's drops);
        # the socket is named by the run's target
        if port is None:
            address, port = udp_target(run, address)
        net = run.net
        d = (net.groupby("ts_unix_s")["udp_rcvbuf_errors_n"].sum().sort_index().astype(float)
             if len(net) and "udp_rcvbuf_errors_n" in net else pd.Series(dtype=float))
        fit = SocketFit(address or "*", int(port or 0), 0, fallback, source,
                        buffer_datagrams(fallback, bytes_per_datagram), int(d.diff().clip(lower=0).sum()))
        frame = pd.DataFrame({"drops": d, "end": d.index.to_numpy(dtype=float)}, index=d.index)
        return [fit], ({0: frame} if len(d) else {})
    inode = mine["inode"] if "inode" in mine else pd.Series(0, index=mine.index)
    fits, drops = [], {}
    for key, rows in mine.assign(_inode=inode.fillna(0).astype(int)).groupby(["local_address", "local_port", "_inode"]):
        rb = rows["rcvbuf_bytes"] if "rcvbuf_bytes" in rows else pd.Series(dtype=float)
        rb = rb[rb > 0]
        size, src = (float(rb.median()), "sock_diag") if len(rb) and rcvbuf_bytes is None else (fallback, source)
        # when the drops were read, where recorded (the sample's start otherwise)
        when = rows["read_unix_s"].where(rows["read_unix_s"] > 0, rows["ts_unix_s"]) if "read_unix_s" in rows \
            else rows["ts_unix_s"]
        d = rows.assign(_when=when.astype(float)).groupby("_when").agg(drops=("drops_n", "sum"))
        d = d.sort_index().astype(float)
        d["end"] = d.index.to_numpy(dtype=float)
        fits.append(SocketFit(str(key[0]), int(key[1]), int(key[2]), size, src,
                              buffer_datagrams(size, bytes_per_datagram), int(d["drops"].diff().clip(lower=0).sum())))
        drops[len(fits) - 1] = d
    return fits, drops


#: time for a burst's last query to reach the server after it left (loopback: microseconds)
ARRIVAL_SLACK_S = 0.002


def _measured_loss(drops: dict[int, pd.DataFrame], first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Drops on the server sockets between the last sample read before each burst (and after the
    previous one) and the first read after it (and before the next); nan for a burst no such pair
    brackets: a sample read while a burst arrived would split its drops between two bursts."""
    if not drops:
        return np.full(len(first), math.nan)
    nxt = np.append(first[1:], math.inf)
    prev_end = np.insert(last[:-1], 0, -math.inf)
    out = np.zeros(len(first))
    for d in drops.values():
        start, end, v = d.index.to_numpy(dtype=float), d["end"].to_numpy(dtype=float), d["drops"].to_numpy()
        before = [np.flatnonzero((end <= f) & (start >= p)) for f, p in zip(first, prev_end)]
        # drops happen only as datagrams arrive: the first read after the burst's last query (and
        # its flight) holds all of them, and none of the retry waves that time out later
        after = [np.flatnonzero((start >= la + ARRIVAL_SLACK_S) & (end <= nx)) for la, nx in zip(last, nxt)]
        lo = np.array([b[-1] if len(b) else -1 for b in before], dtype=int)
        hi = np.array([a[0] if len(a) else -1 for a in after], dtype=int)
        ok = (lo >= 0) & (hi >= 0)
        out = np.where(ok, out + np.where(ok, v[np.clip(hi, 0, None)] - v[np.clip(lo, 0, None)], 0.0), math.nan)
    return np.clip(out, 0.0, None)


def _onset_qps(run: RunData, fits: list[SocketFit], drops: dict[int, pd.Series]) -> float | None:
    """Lowest offered rate of a collector interval with drops on the server sockets."""

    if not drops or not sum(f.drops_n for f in fits):
        return None
    original, retry = counters.offered_parts("dns")  # offered = originals + retries
    offered = counters.rates(run, original).add(counters.rates(run, retry), fill_value=0.0)
    total = (pd.concat([d["drops"] for d in drops.values()], axis=1).sort_index().ffill().fillna(0.0)
             .sum(axis=1).diff().clip(lower=0).dropna())
    if not len(offered) or not (total > 0).any():
        return None
    hit = pd.merge_asof(pd.DataFrame({"ts": total.index.to_numpy(dtype=float), "d": total.to_numpy()}),
                        pd.DataFrame({"ts": offered.index.to_numpy(dtype=float), "o": offered.to_numpy()}),
                        on="ts", direction="nearest")
    hit = hit[hit["d"] > 0]
    return float(hit["o"].min()) if len(hit) else None


def fit_udp_burst(run: RunData, *, rcvbuf_bytes: float | None = None,
                  bytes_per_datagram: float = BYTES_PER_DATAGRAM, burst_window_s: float | None = None,
                  burst_n: float | None = None, address: str | None = None,
                  port: int | None = None) -> UdpBurstFit:
    """The burst model fitted to a recorded DNS run: buffers per server socket, the drain rate
    inside the run's bursts, loss per burst predicted beside measured, and the buffer needed.

    Buffers: each watched server socket's ``sk_rcvbuf`` as the collector read it (sock_diag);
    else the recorded ``so-rcvbuf`` doubled (capped by ``rmem_max`` when the manifest has it);
    else the platform default; ``rcvbuf_bytes`` overrides. With several sockets (SO_REUSEPORT,
    unbound ``num-threads``), bursts are assumed spread evenly over them (the kernel hashes
    each client address and port to one socket). The headline is for ``burst_n`` queries in
    ``burst_window_s`` (default: the largest burst the run sent, in its median window).
    """
    if burst_n is not None and not burst_n > 0:
        raise ModelError(f"burst size {burst_n} must be > 0 queries")
    if burst_window_s is not None and not burst_window_s >= 0:
        raise ModelError(f"burst window {burst_window_s} must be >= 0 seconds")
    bursts = _burst_events(run)
    if not len(bursts) and not counters.has_metric(run, "dns.original_sent"):
        # a run with no DNS load (a mail storm) would otherwise get the platform buffer's figure
        raise ModelError(f"run {run.run_id} sent no DNS queries (no 'burst' events, no 'dns.original_sent' "
                         "counter): fit udp-burst to a run of a DNS locustfile")
    fits, drops = _socket_fits(run, rcvbuf_bytes, bytes_per_datagram, address, port)
    k = len(fits)
    first = bursts["first"].to_numpy(dtype=float)
    window = (bursts["last"] - bursts["first"]).clip(lower=0.0).to_numpy(dtype=float)
    sent = bursts["sent_n"].to_numpy(dtype=float)
    measured = _measured_loss(drops, first, bursts["last"].to_numpy(dtype=float))
    span = (bursts["read"] - bursts["first"]).to_numpy(dtype=float)
    drain = np.where(span > 0, bursts["answered_n"].to_numpy(dtype=float) / np.where(span > 0, span, 1.0), math.nan)
    buffered = sum(f.buffer_datagrams for f in fits)
    caveats: list[str] = []
    source = "answers in the burst window"
    if not len(bursts):
        source = "none"
        caveats.append("no 'burst' events in the run: drain rate not measured, the buffer alone absorbs")
    elif not np.isfinite(drain).any():
        # no answer timing in the events (an older generator): the loss itself says what drained
        source = "inferred from drops"
        lost = np.where(np.isfinite(measured), measured, 0.0)
        drain = np.where((window > 0) & np.isfinite(measured), np.clip(sent - lost - buffered, 0, None)
                         / np.where(window > 0, window, 1.0), math.nan)
        if not np.isfinite(drain).any():
            source = "none"
            caveats.append("drain rate not measured: the burst events carry no answer timing and no drops "
                           "were counted on the server socket")
    # saturated: a burst dropped, or (when no burst could be told apart) the sockets dropped at all
    saturated = bool(np.nansum(measured) > 0) or (not np.isfinite(measured).any()
                                                   and sum(f.drops_n for f in fits) > 0)
    if len(bursts) and not saturated:
        caveats.append("lower bound: no burst dropped, the server was never saturated" if drops else
                       "lower bound, drops not counted: no collector sampled the server's socket or the "
                       "host's UDP counters (--collect-udp-port PORT), so no burst is known to have dropped")
    mu = float(np.nanmedian(drain)) if np.isfinite(drain).any() else math.nan
    mu_min = float(np.nanmin(drain)) if np.isfinite(drain).any() else math.nan
    fit = UdpBurstFit(bytes_per_datagram=float(bytes_per_datagram), sockets=fits, drain_rate_qps=mu,
                      drain_rate_min_qps=mu_min, drain_source=source, drain_is_lower_bound=not saturated,
                      bursts=[], burst_n=0.0, burst_window_s=0.0, max_burst_no_loss=math.nan,
                      predicted_loss_n=math.nan, measured_loss_mean_n=math.nan, needed_rcvbuf_bytes=0,
                      recommended_so_rcvbuf_bytes=0, observed_drops_n=int(sum(f.drops_n for f in fits)),
                      observed_onset_qps=_onset_qps(run, fits, drops), caveats=caveats)
    # each burst predicted with its own drain rate where it has one (answers and drops are counted
    # apart: the answers by the sender, the drops by the kernel), else the run's median
    fit.bursts = [BurstObservation(int(i), float(f), float(w), int(n), float(d),
                                   fit.expected_loss(n, w, d if math.isfinite(d) else None), float(m))
                  for i, f, w, n, d, m in zip(bursts.index, first, window, sent, drain, measured)]
    largest = float(sent.max()) if len(sent) else 0.0
    fit.burst_n = float(burst_n if burst_n is not None else largest)
    same = sent == largest
    fit.burst_window_s = float(burst_window_s if burst_window_s is not None else
                               (np.median(window[same]) if same.any() else 0.0))
    fit.max_burst_no_loss = fit.max_burst_in_window(fit.burst_window_s)
    fit.predicted_loss_n = fit.expected_loss(fit.burst_n, fit.burst_window_s)
    if burst_n is None and np.isfinite(measured[same]).any():
        fit.measured_loss_mean_n = float(np.nanmean(measured[same]))
    fit.needed_rcvbuf_bytes = fit.rcvbuf_for(fit.burst_n, fit.burst_window_s)
    if burst_n is None and burst_window_s is None and np.isfinite(drain[same]).any():
        # and at least what the worst of those bursts left queued (a short window with a slow drain)
        worst = float(np.nanmax(sent[same] - drain[same] * window[same])) / k
        fit.needed_rcvbuf_bytes = max(fit.needed_rcvbuf_bytes,
                                      int(math.ceil(math.ceil(max(worst, 1.0)) * bytes_per_datagram)))
    if fit.drain_is_lower_bound and burst_n is None and len(bursts):
        # nothing dropped: the buffer the run had is enough for its bursts, whatever the lower
        # bound on the drain rate says
        fit.needed_rcvbuf_bytes = min(fit.needed_rcvbuf_bytes, int(min(f.rcvbuf_bytes for f in fits)))
    fit.recommended_so_rcvbuf_bytes = so_rcvbuf_for(fit.needed_rcvbuf_bytes)
    if k > 1:
        caveats.append(f"{k} sockets share the port: bursts assumed spread evenly over them")
    if burst_n is not None and burst_n > largest:
        caveats.append(f"extrapolation: the run's largest burst was {largest:.0f}")
    return fit
