"""UDP burst model: buffer arithmetic, loss, buffer sizing and a run's measured service rate."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from loadkit.errors import ModelError
from loadkit.model import UdpBurstResult, buffer_datagrams, fit_udp_burst, receive_drops, udp_burst
from loadkit.partfiles import PartWriter
from loadkit.schema import RUN_LAYOUT, GeneratorMetric, NetSample, SocketSample
from loadkit.record.reader import load_run
from model_synth import T0, write_manifest


def test_default_buffer_holds_about_256_queries():
    # 212,992 / 832 = 256 exactly; a tiny buffer still takes one datagram
    assert buffer_datagrams(212_992, 832) == 256
    assert buffer_datagrams(32_768, 832) == 39
    assert buffer_datagrams(100, 832) == 1
    r = udp_burst(212_992, service_rate_qps=0.0)
    assert r.max_burst_no_loss == 256
    assert r.expected_loss(1000) == 1000 - 256


def test_service_during_the_window_and_arrival_rate():
    r = udp_burst(212_992, service_rate_qps=100_000, burst_window_s=0.01)
    assert r.max_burst_no_loss == pytest.approx(256 + 1000)
    assert r.expected_loss(2000, 0.01) == pytest.approx(2000 - 1000 - 256)
    assert r.expected_loss(1000, 0.01) == 0
    # arriving at 150k/s against 100k/s service: the queue grows at 50k/s -> B / (1 - 2/3) = 3 B
    assert r.max_burst_at_rate(150_000) == pytest.approx(3 * 256)
    assert math.isinf(r.max_burst_at_rate(90_000))
    at_rate = udp_burst(212_992, 100_000, arrival_rate_qps=150_000)
    assert at_rate.max_burst_no_loss == pytest.approx(768)
    assert "arriving at 150000/s" in at_rate.summary()


def test_rcvbuf_for_is_the_inverse_of_max_burst():
    r = udp_burst(212_992, service_rate_qps=50_000)
    for burst, window in ((5000, 0.0), (20_000, 0.05), (300, 0.001)):
        need = r.rcvbuf_for(burst, window)
        sized = udp_burst(need, 50_000, burst_window_s=window)
        assert sized.max_burst_no_loss >= burst
        assert udp_burst(need - 832, 50_000, burst_window_s=window).max_burst_no_loss < burst


def test_bad_input_and_json():
    with pytest.raises(ModelError, match="receive buffer"):
        udp_burst(0, 1000)
    with pytest.raises(ModelError, match="arrival rate"):
        udp_burst(1000, 1000, arrival_rate_qps=-1)
    r = udp_burst(16384, 1000, burst_window_s=0.002)
    assert UdpBurstResult.from_json(r.to_json()) == r
    inf = udp_burst(16384, 2000, arrival_rate_qps=1000)
    assert math.isinf(inf.max_burst_no_loss) and "no limit" in inf.summary()
    assert math.isnan(UdpBurstResult.from_json(inf.to_json()).max_burst_no_loss)


def test_fit_without_bursts_claims_no_drain_rate_and_counts_host_drops(tmp_path):
    run_dir = tmp_path / "run"
    write_manifest(run_dir, "dns", "dns_burst", lab={"config": {"dns_rcvbuf_bytes": 8192}})
    gen = PartWriter(run_dir / RUN_LAYOUT["generator"])
    net = PartWriter(run_dir / RUN_LAYOUT["net"])
    sent = answered = errs = 0.0
    for k, offered in enumerate([1000, 2000, 4000, 8000, 16000, 8000, 1000]):
        served = min(offered, 5000)  # capacity 5000/s
        sent += offered
        answered += served
        errs += offered - served
        ts = T0 + k + 1
        gen.extend([GeneratorMetric(ts, "dns.original_sent", "counter", sent),
                    GeneratorMetric(ts, "dns.answered", "counter", answered)])
        net.append(NetSample(ts, "lab", int(answered), int(errs), int(errs), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                             0, 0, 0))
    gen.flush()
    net.flush()
    r = fit_udp_burst(load_run(run_dir))
    # no burst events: the busiest second's answered rate is the load, not the drain rate inside a
    # burst, so no drain rate is claimed
    assert math.isnan(r.service_rate_qps) and r.drain_source == "none"
    assert r.max_burst_no_loss == r.buffer_datagrams == 19
    assert r.rcvbuf_bytes == 16384  # so-rcvbuf 8192, doubled by the kernel
    assert r.observed_drops_n == 3000 + 11000 + 3000
    assert r.observed_onset_qps == pytest.approx(8000)


def test_fit_counts_only_the_target_sockets_drops(tmp_path):
    run_dir = tmp_path / "run"
    write_manifest(run_dir, "dns", "dns_burst")
    manifest = run_dir / RUN_LAYOUT["manifest"]
    data = json.loads(manifest.read_text())
    data["targets"] = ["udp://127.0.0.9:5353"]
    manifest.write_text(json.dumps(data))
    gen = PartWriter(run_dir / RUN_LAYOUT["generator"])
    socks = PartWriter(run_dir / RUN_LAYOUT["sockets"])
    for k in range(4):
        ts = T0 + k
        gen.extend([GeneratorMetric(ts, "dns.original_sent", "counter", 1000.0 * k),
                    GeneratorMetric(ts, "dns.answered", "counter", 900.0 * k)])
        # another server on the same port (another lab) drops far more: not ours
        socks.append(SocketSample(ts, "lab", 5353, 0, 0, 100 * k, "127.0.0.9"))
        socks.append(SocketSample(ts, "lab", 5353, 0, 0, 5000 * k, "127.0.0.8"))
    gen.flush()
    socks.flush()
    r = fit_udp_burst(load_run(run_dir))
    assert r.observed_drops_n == 300
    assert fit_udp_burst(load_run(run_dir), address="127.0.0.8", port=5353).observed_drops_n == 15000
    # the same drops, with where they were counted (the report labels its charts with it)
    label, drops = receive_drops(load_run(run_dir))
    assert label == "drops at 127.0.0.9:5353" and list(drops) == [100, 100, 100]


def test_drops_fall_back_to_the_host_wide_counter_when_no_socket_was_watched(tmp_path):
    run_dir = tmp_path / "run"
    write_manifest(run_dir, "dns", "dns_burst")
    net = PartWriter(run_dir / RUN_LAYOUT["net"])
    for k in range(3):
        net.append({"ts_unix_s": T0 + k, "udp_rcvbuf_errors_n": 40 * k})
    net.flush()
    label, drops = receive_drops(load_run(run_dir))
    assert label == "RcvbufErrors (whole host)" and list(drops) == [40, 40]



# -- the drain rate inside bursts (issue: one-second averages are the load, not the drain) ---------


def _write_burst_run(run_dir, *, drain_qps=50_000.0, rcvbuf_bytes=212_992, bursts=((2000, 0.010),) * 6,
                     sockets=1, period_s=5.0, answers=True, so_rcvbuf=None, host=None, sock_diag=True):
    """A DNS run with bursts every ``period_s``: the server drains ``drain_qps`` while each arrives
    (split evenly over ``sockets`` SO_REUSEPORT sockets of ``rcvbuf_bytes`` each), and drops what its
    buffers cannot hold; the collector samples every second, the events carry the answer timing."""
    lab = {"config": {"dns_rcvbuf_bytes": so_rcvbuf}} if so_rcvbuf else None
    write_manifest(run_dir, "dns", "dns_burst", lab=lab)
    manifest = run_dir / RUN_LAYOUT["manifest"]
    data = json.loads(manifest.read_text())
    data["targets"] = ["udp://127.0.0.1:5353"]
    data["host"] = host or {}
    manifest.write_text(json.dumps(data))
    buf = buffer_datagrams(rcvbuf_bytes)
    socks = PartWriter(run_dir / RUN_LAYOUT["sockets"])
    gen = PartWriter(run_dir / RUN_LAYOUT["generator"])
    events, drops, sent_total, lost = [], [0] * sockets, 0, []
    t = T0 + 1.0
    for i in range(sockets):  # the collector starts before the load
        socks.append(SocketSample(t, "lab", 5353, 0, 0, 0, "127.0.0.1", 100 + i, rcvbuf_bytes if sock_diag else 0))
    for k, (n, w) in enumerate(bursts):
        first = t + 0.3
        per_socket_loss = max(0.0, n / sockets - drain_qps * w / sockets - buf)
        loss = int(round(per_socket_loss)) * sockets
        for i in range(sockets):
            drops[i] += int(round(per_socket_loss))
        lost.append(loss)
        # answers read by the end of the window: what the server drained meanwhile
        detail = {"burst_index": k, "first_sent_unix_s": first, "last_sent_unix_s": first + w, "window_s": w,
                  "sent_n": n}
        if answers:
            served = min(n, drain_qps * (w + 0.0005))
            detail.update(answered_in_window_n=int(served), answers_read_unix_s=first + w + 0.0005)
        events.append({"ts_unix_s": first, "kind": "burst", "source": "dns", "detail": detail})
        sent_total += n
        for second in range(int(period_s)):
            ts = t + second + 1.0
            for i in range(sockets):
                socks.append(SocketSample(ts, "lab", 5353, 0, 0, drops[i], "127.0.0.1", 100 + i,
                                          rcvbuf_bytes if sock_diag else 0))
            gen.extend([GeneratorMetric(ts, "dns.original_sent", "counter", float(sent_total)),
                        GeneratorMetric(ts, "dns.answered", "counter", float(sent_total - sum(lost)))])
        t += period_s
    socks.flush()
    gen.flush()
    (run_dir / RUN_LAYOUT["events"]).write_text("".join(json.dumps(e) + "\n" for e in events))
    return lost


def test_drain_rate_is_measured_inside_the_bursts(tmp_path):
    # 50,000/s drain, 2,000 queries in 10 ms every 5 s: the one-second answered rate is ~400/s, but
    # the server absorbs 256 + 500 = 756 of each burst
    lost = _write_burst_run(tmp_path / "run")
    fit = fit_udp_burst(load_run(tmp_path / "run"))
    assert fit.drain_rate_qps == pytest.approx(50_000, rel=0.06)
    assert fit.drain_source == "answers in the burst window" and not fit.drain_is_lower_bound
    assert fit.max_burst_no_loss == pytest.approx(756, rel=0.03)
    assert fit.burst_n == 2000 and fit.burst_window_s == pytest.approx(0.010)
    assert fit.predicted_loss_n == pytest.approx(lost[0], rel=0.05)
    assert fit.measured_loss_mean_n == pytest.approx(lost[0])
    assert [b.measured_loss_n for b in fit.bursts] == lost
    assert fit.sockets[0].rcvbuf_source == "sock_diag" and fit.buffer_datagrams == 256
    # the buffer for the burst at the slowest drain, in whole queries, rounded up; so-rcvbuf is half
    queued = 2000 - fit.drain_rate_min_qps * 0.010
    assert fit.needed_rcvbuf_bytes == math.ceil(queued) * 832
    assert fit.recommended_so_rcvbuf_bytes == math.ceil(fit.needed_rcvbuf_bytes * 1.25 / 2)
    assert 2 * fit.recommended_so_rcvbuf_bytes >= 1.25 * fit.needed_rcvbuf_bytes  # the headroom
    text = fit.summary()
    assert f"so-rcvbuf {fit.recommended_so_rcvbuf_bytes:,} B" in text and "net.core.rmem_max must be ≥" in text
    assert "predicted" in text and "measured" in text
    back = type(fit).from_json(fit.to_json())
    assert back.bursts == fit.bursts and back.sockets == fit.sockets


def test_rounding_never_goes_down():
    # a 300-query burst needs 300 × 832 B; rounding to 0.1 MiB would give a buffer of 252 queries
    r = udp_burst(212_992, 0.0)
    need = r.rcvbuf_for(300)
    assert need == 300 * 832 and buffer_datagrams(need) >= 300
    from loadkit.model.udp import so_rcvbuf_for

    assert so_rcvbuf_for(249_601, headroom=1.0) == 124_801 and 2 * so_rcvbuf_for(249_601, headroom=1.0) >= 249_601
    assert so_rcvbuf_for(249_601) == 156_001  # with the 25 % headroom: ceil(249,601 × 1.25 / 2)


def test_never_saturated_is_a_lower_bound(tmp_path):
    _write_burst_run(tmp_path / "run", rcvbuf_bytes=4 << 20)
    fit = fit_udp_burst(load_run(tmp_path / "run"))
    assert fit.observed_drops_n == 0 and fit.drain_is_lower_bound
    assert any("lower bound" in c for c in fit.caveats) and "lower bound" in fit.summary()
    assert "≥" in fit.summary()
    # the run's own buffer absorbed every burst: never more than that is asked for
    assert fit.needed_rcvbuf_bytes <= 4 << 20 and "so-rcvbuf at most" in fit.summary()


def test_one_fit_per_socket_when_several_share_the_port(tmp_path):
    # two SO_REUSEPORT sockets of 256 queries each: a 2,000 burst in 10 ms splits 1,000 / 1,000
    lost = _write_burst_run(tmp_path / "run", sockets=2)
    fit = fit_udp_burst(load_run(tmp_path / "run"))
    assert len(fit.sockets) == 2 and {s.inode for s in fit.sockets} == {100, 101}
    assert fit.max_burst_no_loss == pytest.approx(2 * 256 + 500, rel=0.03)
    assert fit.predicted_loss_n == pytest.approx(lost[0], rel=0.05)
    # each socket needs the queue of its share only
    assert fit.needed_rcvbuf_bytes == pytest.approx(math.ceil(1000 - fit.drain_rate_min_qps * 0.005) * 832, rel=0.01)
    assert any("2 sockets" in c for c in fit.caveats)


def test_without_sock_diag_the_request_is_doubled_and_capped_by_rmem_max(tmp_path):
    _write_burst_run(tmp_path / "run", so_rcvbuf=8 << 20, host={"rmem_max_bytes": 4 << 20}, sock_diag=False)
    fit = fit_udp_burst(load_run(tmp_path / "run"))
    assert fit.rcvbuf_bytes == 8 << 20 and fit.sockets[0].rcvbuf_source == "so-rcvbuf doubled"
    _write_burst_run(tmp_path / "run2", so_rcvbuf=8 << 20, sock_diag=False)
    assert fit_udp_burst(load_run(tmp_path / "run2")).rcvbuf_bytes == 16 << 20


def test_without_answer_timing_the_drain_is_inferred_from_the_loss(tmp_path):
    lost = _write_burst_run(tmp_path / "run", bursts=((2000, 0.010), (3000, 0.010)) * 3, answers=False)
    fit = fit_udp_burst(load_run(tmp_path / "run"))
    assert fit.drain_source == "inferred from drops"
    assert fit.drain_rate_qps == pytest.approx(50_000, rel=0.02)
    assert fit.burst_n == 3000 and fit.predicted_loss_n == pytest.approx(lost[1], abs=15)


# -- the socket's real receive buffer (netlink sock_diag) ----------------------------------------


def test_sock_diag_reads_the_kernels_rcvbuf_of_a_real_socket():
    import socket

    from loadkit.observe import sockdiag

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 50_000)
        a.bind(("127.0.0.1", 0))
        port = a.getsockname()[1]
        b.bind(("127.0.0.1", port))  # a second SO_REUSEPORT socket: a row of its own
        found = {m.inode: m for m in sockdiag.udp_meminfo([port])}
        ino_a, ino_b = (os.fstat(s.fileno()).st_ino for s in (a, b))
        # what getsockopt says, i.e. the doubled request (ss -m "rb")
        assert found[ino_a].rcvbuf_bytes == a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 100_000
        assert found[ino_b].rcvbuf_bytes == b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert found[ino_a].local_port == port and found[ino_a].local_address == "127.0.0.1"
        # queued bytes are seen too
        b.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.sendto(b"x" * 40, ("127.0.0.1", port))
            time.sleep(0.05)
        assert sockdiag.udp_rcvbuf([port])[ino_a].rmem_alloc_bytes > 0


def test_collector_records_one_row_per_socket_with_its_rcvbuf(tmp_path):
    import socket

    from loadkit.observe.collector import Collector, CollectorConfig

    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for s, size in zip(socks, (20_000, 40_000)):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        socks[0].bind(("127.0.0.1", 0))
        port = socks[0].getsockname()[1]
        socks[1].bind(("127.0.0.1", port))
        c = Collector(CollectorConfig(udp_ports=[port], out_dir=None, host="t"))
        sample = c.sample()
        mine = {os.fstat(s.fileno()).st_ino for s in socks}  # other processes may hold the port elsewhere
        rows = sorted((r.inode, r.rcvbuf_bytes) for r in sample.sockets if r.inode in mine)
        assert rows == sorted((os.fstat(s.fileno()).st_ino, 2 * size) for s, size in zip(socks, (20_000, 40_000)))
        c.close()
    finally:
        for s in socks:
            s.close()


def test_sk_rcvbuf_of_a_request_is_capped_then_doubled():
    from loadkit.observe.sockdiag import doubled_rcvbuf

    assert doubled_rcvbuf(8 << 20, 4 << 20) == 8 << 20  # capped at rmem_max, then doubled
    assert doubled_rcvbuf(8 << 20, 4 << 20, forced=True) == 16 << 20  # SO_RCVBUFFORCE: no cap
    assert doubled_rcvbuf(1000, 4 << 20) == 2000


def test_cli_prints_the_same_figures_as_the_model_and_the_so_rcvbuf(tmp_path, capsys):
    from loadkit.cli import main

    _write_burst_run(tmp_path / "run")
    out = tmp_path / "fit.json"
    assert main(["fit", "udp-burst", str(tmp_path / "run"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    fit = fit_udp_burst(load_run(tmp_path / "run"))
    assert printed == fit.summary()  # one computation: the report calls fit_udp_burst too
    from loadkit.report.capacity import udp_fit

    assert udp_fit(load_run(tmp_path / "run")).summary() == printed
    assert f"so-rcvbuf {fit.recommended_so_rcvbuf_bytes:,} B" in printed
    assert json.loads(out.read_text())["recommended_so_rcvbuf_bytes"] == fit.recommended_so_rcvbuf_bytes
    # a burst size of one's own, beyond what the run sent, is an extrapolation and says so
    assert main(["fit", "udp-burst", str(tmp_path / "run"), "--burst", "5000", "--burst-window", "0.01"]) == 0
    assert "extrapolation" in capsys.readouterr().out
    assert main(["fit", "udp-burst", str(tmp_path / "run"), "--burst", "-5"]) == 2
    assert capsys.readouterr().err.strip().endswith("burst size -5.0 must be > 0 queries")


def test_collector_drops_come_from_sock_diag_with_the_instant_they_were_read(tmp_path):
    import socket

    from loadkit.observe import procfs
    from loadkit.observe.collector import Collector, CollectorConfig

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a few datagrams, then drops
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        for _ in range(200):
            client.sendto(b"q" * 30, ("127.0.0.1", port))
        proc_drops = next(s.drops_n for s in procfs.read_udp_sockets(ports=[port])
                          if s.inode == os.fstat(server.fileno()).st_ino)
        assert proc_drops > 0
        c = Collector(CollectorConfig(udp_ports=[port], out_dir=None, host="t"))
        (row,) = [r for r in c.sample().sockets if r.inode == os.fstat(server.fileno()).st_ino]
        c.close()
        assert row.drops_n == proc_drops  # sk_drops, the same counter as /proc/net/udp's drops column
        assert row.ts_unix_s <= row.read_unix_s <= time.time()


def test_a_run_without_dns_load_is_refused_not_given_the_platform_buffer(tmp_path) -> None:
    """A mail storm has no DNS queries: fitting the burst model to it must say so, not print
    the default buffer's 256 datagrams as if it had been measured."""
    from loadkit.record.reader import load_run
    from loadkit.record.synthetic import write_mail_run

    run = load_run(write_mail_run(tmp_path))
    with pytest.raises(ModelError, match="sent no DNS queries"):
        fit_udp_burst(run)


def test_an_unwatched_server_socket_is_named_by_the_runs_target(tmp_path):
    # no collector on the server: the fit falls back to host-wide counters, and still says which
    # server it is about (a plain locust -f run records its target; it once printed "the server socket")
    import shutil

    _write_burst_run(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / RUN_LAYOUT["sockets"])
    fit = fit_udp_burst(load_run(tmp_path / "run"))
    assert (fit.sockets[0].address, fit.sockets[0].port) == ("127.0.0.1", 5353)
    assert fit.summary().startswith("127.0.0.1:5353: rcvbuf")
    # nothing counted drops: the fit and the report say so, and neither calls the bursts overflowed
    assert any("drops not counted" in c for c in fit.caveats)
    from loadkit.report.capacity import dns_capacity, dns_run

    notes: list[str] = []
    run = load_run(tmp_path / "run")
    row = dns_run(run, notes)
    # the bursts lost most of their queries (the answers say so): not "absorbed", not a lower bound
    assert row.drops_n is None and not row.largest_burst_is_lower_bound
    assert row.largest_burst_without_loss_queries == pytest.approx(fit.max_burst_in_window(row.burst_window_s))
    assert any("no drops were counted" in n and "the model's" in n for n in notes)
    cap = dns_capacity([run], [row], "s", "lab", None)
    assert not cap.is_lower_bound and not cap.drops_counted
    from loadkit.report.analysis import verdict
    from loadkit.report.summary import ReportSummary

    s = ReportSummary(release="r1", baseline_release=None, generated_unix_s=0.0, dns_capacity=[cap])
    verdict(s)
    assert s.verdict == "WARN"
    assert any("whether bursts of 2,000 queries overflowed is not known" in r for r in s.verdict_reasons)
