"""bench e2e over a real Mosquitto, and the throttled link it can put in front of the device."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from plasma.protocol.catalog import resolve_bundle
from plasma.server.bench.fleet import ThrottledLink, bench_e2e, bench_fleet

PENDULUM = resolve_bundle("pendulum-nominal")  # shipped (plasma/models)


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_throttled_link_carries_every_byte_at_no_more_than_its_rate() -> None:
    server, port = _echo_server()
    link = ThrottledLink(f"mqtt://127.0.0.1:{port}", kbps=2000)
    try:
        host, link_port = link.url.split("//")[1].split(":")
        payload = bytes(range(256)) * 320  # 80 KiB
        with socket.create_connection((host, int(link_port))) as sock:
            t0 = time.monotonic()
            sock.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = sock.recv(65536)
                assert chunk, "the link closed early"
                got += chunk
            elapsed = time.monotonic() - t0
        assert bytes(got) == payload
        # Each way: (80 - 16 KiB burst) at 250 KB/s >= 0.26 s; both ways are paced, in sequence
        # per 4 KiB chunk, so a lower bound is all a shared machine lets us assert.
        assert elapsed >= 0.9 * (len(payload) - ThrottledLink.BURST) / (2000 * 1000 / 8)
    finally:
        link.close()
        server.close()


def test_throttled_link_refuses_what_it_cannot_relay() -> None:
    with pytest.raises(ValueError, match="mqtt://"):
        ThrottledLink("mqtts://127.0.0.1:8883", kbps=100)
    with pytest.raises(ValueError, match="positive"):
        ThrottledLink("mqtt://127.0.0.1:1883", kbps=0)


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("link_kbps", [None, 4000.0])
def test_bench_e2e_runs_over_a_real_broker(mosquitto, link_kbps) -> None:
    result = bench_e2e(f"mqtt://{mosquitto.host}:{mosquitto.port}", packets=4,
                       full_model_pushes=2, link_kbps=link_kbps)
    assert result["rejected"] == 0 and result["packets"] == 4
    assert result["full_model_rejected"] == 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["full_model_bytes"] > 10 * result["packet_bytes"]
    assert result["link_kbps"] == link_kbps
    if link_kbps:  # 157 KB cannot cross 4 Mbit/s in less than ~0.28 s (16 KB burst)
        assert result["full_model_p50_ms"] > 250


@pytest.mark.slow
def test_bench_fleet_on_its_own_broker_reports_every_device_and_its_memory() -> None:
    """No --broker: the bench starts a Mosquitto sized for the fleet; every device answers once
    and the device processes' resident memory is reported."""
    result = bench_fleet(None, devices=12, processes=2, model=str(PENDULUM),
                         swap="inplace", timeout=20.0)
    assert (result["accepted"], result["rejected"], result["missed"]) == (12, 0, 0)
    assert 0 < result["p50_active_s"] <= result["all_active_s"] < 20.0
    assert len(result["worker_rss_mb"]) == 2 and all(r > 20 for r in result["worker_rss_mb"])
    assert result["device_rss_mb_per_device"] == pytest.approx(result["device_rss_mb"] / 12, abs=0.01)
