"""UDP burst model: buffer arithmetic, loss, buffer sizing and a run's measured service rate."""

from __future__ import annotations

import json
import math

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


def test_fit_from_run_measures_service_rate_and_drops(tmp_path):
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
    assert r.service_rate_qps == pytest.approx(5000)
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

