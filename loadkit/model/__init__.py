"""model stage: pure functions of recorded runs.

Each function takes :class:`~loadkit.record.reader.RunData` (or plain arrays) and returns a result
dataclass with its uncertainty, ``summary()`` (one line), ``to_dict()``, ``to_json()`` and
``from_json()``. Nothing here imports Locust or the lab: a model sees only what a run recorded.

- headroom: :func:`fit_headroom` (memory per session, first failure, cascade to all N)
- scalability: :func:`fit_usl`, :func:`latency_knee`, :func:`littles_law_check`
- UDP burst: :func:`udp_burst`, :func:`fit_udp_burst`
- retries: :func:`retry_amplification`, :func:`metastability`, :func:`retry_loop_states`
- firewall session table: :func:`firewall_model`, :func:`fit_firewall`
- anomalies: :func:`find_anomalies`
- per-source rate limit: :func:`source_limit`, :func:`fit_source_limit`
"""

from loadkit.model.anomalies import AnomalyResult, ChangePoint, DailyPeriod, Spike, find_anomalies, kpi_series
from loadkit.model.headroom import HeadroomResult, ProxyFit, cascade, fit_headroom, headroom_points, huber_line
from loadkit.model.source_limit import LimitRow, SourceLimitResult, fit_source_limit, source_limit
from loadkit.model.retries import (
    LoopStates,
    MetastabilityResult,
    fit_retry_loop,
    metastability,
    retry_amplification,
    retry_loop_states,
    trigger_window,
)
from loadkit.model.firewall import FirewallResult, firewall_model, fit_firewall
from loadkit.model.udp import (
    BYTES_PER_DATAGRAM,
    BurstObservation,
    SocketFit,
    UdpBurstFit,
    RCVBUF_HEADROOM,
    so_rcvbuf_for,
    DEFAULT_RCVBUF_BYTES,
    UdpBurstResult,
    buffer_datagrams,
    fit_udp_burst,
    receive_drops,
    target_socket,
    udp_burst,
)
from loadkit.model.usl import (
    KneeResult,
    LittleResult,
    UslResult,
    fit_usl,
    fit_usl_run,
    latency_knee,
    littles_law_check,
    usl_points,
    usl_throughput,
)

__all__ = [
    "AnomalyResult", "BYTES_PER_DATAGRAM", "ChangePoint", "DEFAULT_RCVBUF_BYTES", "DailyPeriod",
    "HeadroomResult", "KneeResult", "LittleResult", "MetastabilityResult", "ProxyFit", "Spike",
    "UdpBurstResult", "UslResult", "buffer_datagrams", "cascade", "find_anomalies", "fit_headroom",
    "fit_udp_burst", "fit_usl", "fit_usl_run", "headroom_points", "huber_line", "kpi_series",
    "latency_knee", "littles_law_check", "metastability", "receive_drops", "retry_amplification", "target_socket", "udp_burst",
    "usl_points", "usl_throughput",
    "BurstObservation", "SocketFit", "UdpBurstFit", "so_rcvbuf_for", "RCVBUF_HEADROOM",
    "LoopStates", "fit_retry_loop", "retry_loop_states", "trigger_window",
    "LimitRow", "SourceLimitResult", "fit_source_limit", "source_limit",
]
