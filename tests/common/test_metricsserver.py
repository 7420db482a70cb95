"""The plain-HTTP metrics server: address parsing, the /metrics path, the connection bound, stopping."""

from __future__ import annotations

import logging
import socket
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


def test_connections_beyond_limit_are_closed(server, caplog):
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            for _ in range(metricsserver.MAX_CONNECTIONS)]
    try:
        # Each idle connection takes a slot until REQUEST_TIMEOUT, so wait until the server accepted all of them.
        deadline = time.monotonic() + TIMEOUT
        while server._server._slots._value > 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as extra:
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert extra.recv(1024) == b""
        assert server._server.dropped == 1
        assert caplog.messages[-1].startswith("metrics: closed a connection from 127.0.0.1 because 4 requests are "
                                              "already running (1 dropped so far)")
    finally:
        for connection in idle:
            connection.close()
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            assert b"quil_test_value 42.0" in _get(server.url)
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_silent_client_is_closed_after_timeout(server, monkeypatch, caplog):
    monkeypatch.setattr(metricsserver._QuietHandler, "timeout", 0.2)
    caplog.set_level(logging.DEBUG, logger="quil_cluster.common.metricsserver")
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as silent:
        assert silent.recv(1024) == b""
    deadline = time.monotonic() + TIMEOUT
    while "metrics request from 127.0.0.1 timed out after 0.2 s" not in caplog.messages:
        assert time.monotonic() < deadline, caplog.messages
        time.sleep(0.01)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


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
