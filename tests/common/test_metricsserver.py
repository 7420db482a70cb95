"""The plain-HTTP metrics server: address parsing, the /metrics path, the connection bound, stopping."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge

from quil_cluster.common import metricsserver
from quil_cluster.common.errors import ConfigError

TIMEOUT = 10


@pytest.fixture
def server():
    registry = CollectorRegistry()
    Gauge("quil_test_value", "A value for the test.", registry=registry).set(42)
    running = metricsserver.start(("127.0.0.1", 0), registry, "test")
    try:
        yield running
    finally:
        running.stop()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
        return reply.read()


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:9741", ("127.0.0.1", 9741)), ("[::1]:9741", ("::1", 9741)), ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("localhost:9741", ("localhost", 9741)), ("off", None), ("OFF", None), ("", None), (False, None), (None, None),
])
def test_parse_address_valid(value, expected):
    assert metricsserver.parse_address(value, "metrics_address") == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("9741", "metrics_address: '9741' is not HOST:PORT; use e.g. 127.0.0.1:9741, or 'off'"),
    (True, "metrics_address: 'True' is not HOST:PORT; use e.g. 127.0.0.1:9741, or 'off'"),
    (":9741", "metrics_address: ':9741' is not HOST:PORT with a port from 0 to 65535; use e.g. 127.0.0.1:9741,"
              " or 'off'"),
    ("127.0.0.1:http", "metrics_address: '127.0.0.1:http' is not HOST:PORT with a port from 0 to 65535; use e.g."
                       " 127.0.0.1:9741, or 'off'"),
    ("127.0.0.1:70000", "metrics_address: '127.0.0.1:70000' is not HOST:PORT with a port from 0 to 65535; use e.g."
                        " 127.0.0.1:9741, or 'off'"),
])
def test_parse_address_invalid(value, expected):
    with pytest.raises(ConfigError) as err:
        metricsserver.parse_address(value, "metrics_address")
    assert str(err.value) == expected


@pytest.mark.parametrize(("host", "expected"), [
    ("127.0.0.1", True), ("127.0.0.5", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
    ("192.0.2.10", False), ("metrics.example", False),
])
def test_is_loopback(host, expected):
    assert metricsserver.is_loopback(host) is expected


def test_serves_registry_at_metrics_path(server):
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    assert b"\nquil_test_value 42.0\n" in _get(server.url)


def test_other_path_is_404(server):
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(server.url.replace("/metrics", "/metricsx"))
    err.value.close()
    assert err.value.code == 404


def test_post_is_rejected(server):
    request = urllib.request.Request(server.url, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=TIMEOUT)
    err.value.close()
    assert err.value.code == 405


class _BlockingCollector:
    """A collector whose collect() waits until release is set, so a scrape holds its request thread."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waiting = threading.Semaphore(0)

    def collect(self):
        self.waiting.release()
        self.release.wait(TIMEOUT)
        return []


def _scrape_in_thread(url: str, results: list) -> threading.Thread:
    def scrape() -> None:
        try:
            results.append(_get(url))
        except (urllib.error.URLError, ConnectionError) as err:
            results.append(err)

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    return thread


def test_requests_beyond_limit_are_closed(caplog):
    collector = _BlockingCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    running = metricsserver.start(("127.0.0.1", 0), registry, "test")
    results: list = []
    try:
        threads = [_scrape_in_thread(running.url, results) for _ in range(metricsserver.MAX_CONNECTIONS)]
        # Wait until every request thread is inside collect(), so every slot is taken.
        for _ in threads:
            assert collector.waiting.acquire(timeout=TIMEOUT)
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as extra:
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert extra.recv(1024) == b""
        assert running._server.dropped == 1
        assert caplog.messages[-1].startswith("metrics: closed a connection from 127.0.0.1 because 4 requests are "
                                              "already running (1 dropped so far)")
    finally:
        collector.release.set()
        running.stop()
    for thread in threads:
        thread.join(TIMEOUT)
    assert results == [b""] * metricsserver.MAX_CONNECTIONS


def test_silent_client_is_closed_after_deadline(monkeypatch, caplog):
    monkeypatch.setattr(metricsserver, "REQUEST_DEADLINE", 0.2)
    caplog.set_level(logging.DEBUG, logger="quil_cluster.common.metricsserver")
    running = metricsserver.start(("127.0.0.1", 0), CollectorRegistry(), "test")
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as silent:
            assert silent.recv(1024) == b""
        message = "metrics request from 127.0.0.1 timed out after 0.2 s before the request was complete"
        deadline = time.monotonic() + TIMEOUT
        while message not in caplog.messages:
            assert time.monotonic() < deadline, caplog.messages
            time.sleep(0.01)
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        running.stop()


def _send_slowly(connection: socket.socket, data: bytes, interval: float, stop: threading.Event) -> None:
    """Send data one byte per interval until it is sent, stop is set or the server closes the connection."""
    for byte in data:
        if stop.wait(interval):
            return
        try:
            connection.send(bytes([byte]))
        except OSError:
            return


def test_slow_client_is_closed_at_deadline_while_sending(monkeypatch):
    monkeypatch.setattr(metricsserver, "REQUEST_DEADLINE", 1.0)
    running = metricsserver.start(("127.0.0.1", 0), CollectorRegistry(), "test")
    stop = threading.Event()
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as slow:
            started = time.monotonic()
            sender = threading.Thread(target=_send_slowly, args=(slow, b"GET /metrics HTTP/1.0\r\n" * 10, 0.2, stop),
                                      daemon=True)
            sender.start()
            # The request never completes, so the only possible end is the server closing the connection.
            assert slow.recv(1024) == b""
            elapsed = time.monotonic() - started
            print(f"slow client closed after {elapsed:.2f} s (deadline 1.0 s)")
            assert elapsed < 1.0 + 5.0
    finally:
        stop.set()
        running.stop()


def test_slow_and_half_open_clients_do_not_block_scrape(server):
    """Four clients sending a byte every 2 s and 200 that send nothing, then a scrape within the deadline."""
    stop = threading.Event()
    connections = []
    connecting = time.monotonic()
    try:
        for _ in range(4):
            slow = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            connections.append(slow)
            threading.Thread(target=_send_slowly, args=(slow, b"GET /metrics HTTP/1.1\r\n" * 4, 2.0, stop),
                             daemon=True).start()
        for _ in range(200):
            connections.append(socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT))
        started = time.monotonic()
        print(f"opened 204 connections in {started - connecting:.2f} s")
        with urllib.request.urlopen(server.url, timeout=metricsserver.REQUEST_DEADLINE + 5) as reply:
            body = reply.read()
        elapsed = time.monotonic() - started
        print(f"scrape behind 4 slow and 200 half-open connections took {elapsed:.2f} s")
        assert b"quil_test_value 42.0" in body
        assert elapsed < metricsserver.REQUEST_DEADLINE + 5
    finally:
        stop.set()
        for connection in connections:
            connection.close()


def test_idle_flood_closes_oldest_connection(monkeypatch, caplog):
    monkeypatch.setattr(metricsserver, "MAX_PENDING", 3)
    running = metricsserver.start(("127.0.0.1", 0), CollectorRegistry(), "test")
    idle = []
    try:
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT))
        assert idle[0].recv(1024) == b""
        assert running._server._reader.evicted == 1
        assert caplog.messages[-1].startswith(
            "metrics: closed the oldest incomplete request from 127.0.0.1 to admit one from 127.0.0.1, because 3 "
            "connections are waiting for their request (1 closed so far)")
        idle[3].sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert idle[3].recv(1024).startswith(b"HTTP/1.0 200 OK")
    finally:
        for connection in idle:
            connection.close()
        running.stop()


def test_oversized_head_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as client:
        client.sendall(b"GET /metrics HTTP/1.0\r\nX-Filler: " + b"a" * (metricsserver.MAX_HEAD_BYTES + 1))
        assert client.recv(1024) == b""


def test_bind_conflict_raises_config_error(server):
    with pytest.raises(ConfigError) as err:
        metricsserver.start(("127.0.0.1", server.port), CollectorRegistry(), "--metrics-address")
    assert str(err.value) == (f"--metrics-address: cannot listen on 127.0.0.1:{server.port} for metrics "
                              "(Address already in use); choose a free address, or 'off'")


def test_stop_releases_port():
    running = metricsserver.start(("127.0.0.1", 0), CollectorRegistry(), "test")
    running.stop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", running.port))


def test_ipv6_loopback():
    try:
        running = metricsserver.start(("::1", 0), CollectorRegistry(), "test")
    except ConfigError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    try:
        assert running.url == f"http://[::1]:{running.port}/metrics"
        assert _get(running.url) == b""
    finally:
        running.stop()
