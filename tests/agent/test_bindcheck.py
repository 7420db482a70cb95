"""Checks before a spawn: bind endpoints, addresses on no interface, ports another process listens on."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time

import pytest
from helpers import free_port_range

from quil_cluster.agent import bindcheck, listeners

# Loopback address for the listener tests; other test files use other 127.0.0.x addresses.
ADDRESS = "127.0.0.63"
ip = ipaddress.ip_address


def _listener(address: str, port: int, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a process that listens on address:port, and wait until it does."""
    code = (
        "import socket, sys, time\n"
        "server = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
        "server.bind((sys.argv[1], int(sys.argv[2])))\n"
        "server.listen()\n"
        "time.sleep(1000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, address, str(port), *extra], env=env)
    deadline = time.monotonic() + 10
    while not listeners.is_listening(address, port, listeners.listening()):
        assert time.monotonic() < deadline, f"listener on {address}:{port} never listened"
        assert proc.poll() is None, f"listener exited with {proc.returncode}"
        time.sleep(0.02)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(10)


def test_bind_endpoints_reads_every_multiaddr():
    binds = ("/ip4/198.19.0.5/tcp/25001", "/ip6/fd00::5/tcp/32501")
    assert bindcheck.bind_endpoints(binds, ("198.19.0.5", 25001)) == [
        (ip("198.19.0.5"), 25001), (ip("fd00::5"), 32501),
    ]


def test_bind_endpoints_falls_back_to_listen():
    assert bindcheck.bind_endpoints((), ("127.0.0.5", 41000)) == [(ip("127.0.0.5"), 41000)]


def test_bind_endpoints_empty_for_control_process():
    assert bindcheck.bind_endpoints((), None) == []


@pytest.mark.parametrize(("address", "expected"), [
    ("0.0.0.0", False), ("::", False), ("127.0.0.1", False), ("127.77.0.1", False), ("::1", False),
    ("198.19.255.77", True), ("10.8.0.2", True), ("fd00::5", True),
])
def test_needs_interface(address, expected):
    assert bindcheck.needs_interface(ip(address)) is expected


def test_missing_addresses_lists_each_once():
    endpoints = [(ip("198.19.255.77"), 1), (ip("198.19.255.77"), 2), (ip("127.0.0.5"), 3), (ip("10.8.0.2"), 4)]
    local = {ip("10.8.0.2"), ip("127.0.0.1")}
    assert bindcheck.missing_addresses(endpoints, local) == [ip("198.19.255.77")]


def test_local_addresses_include_loopback():
    assert ip("127.0.0.1") in bindcheck.local_addresses()


def test_local_addresses_exclude_test_net():
    # 192.0.2.0/24 is reserved for documentation and never assigned here.
    assert ip("192.0.2.1") not in bindcheck.local_addresses()


@pytest.mark.parametrize(("bind", "listening", "conflict"), [
    ("127.0.0.5", ("127.0.0.5", 80), True),
    ("127.0.0.5", ("0.0.0.0", 80), True),
    ("0.0.0.0", ("127.0.0.9", 80), True),
    ("127.0.0.5", ("127.0.0.6", 80), False),
    ("127.0.0.5", ("127.0.0.5", 81), False),
    ("127.0.0.5", ("::", 80), False),
    ("::1", ("::", 80), True),
    ("::", ("0.0.0.0", 80), False),
])
def test_held_port_conflicts(bind, listening, conflict, monkeypatch):
    monkeypatch.setattr(bindcheck, "_owner_text", lambda holder: f"owner of {holder[0]}")
    report = bindcheck.held_port([(ip(bind), 80)], {listening})
    assert (report is not None) is conflict


def test_held_port_names_owner_pid_and_command(monkeypatch):
    port = free_port_range([ADDRESS], 1, start=43000)
    env = dict(os.environ, QUIL_TEST_SECRET="hunter2")
    proc = _listener(ADDRESS, port, env=env)
    try:
        report = bindcheck.held_port([(ip(ADDRESS), port)], listeners.listening())
    finally:
        _stop(proc)
    # The listener's -c argument spans several lines; the report keeps them on one.
    command = " ".join(" ".join(proc.args).split())
    assert len(command) > bindcheck.MAX_COMMAND_CHARS
    assert report == (
        f"port {ADDRESS}:{port} is already in use by pid {proc.pid}"
        f" ({command[:bindcheck.MAX_COMMAND_CHARS - 3]}...); stop that process or free the port"
    )
    assert "\n" not in report
    assert "hunter2" not in report


def test_command_line_kept_on_one_line():
    code = "import time\ntime.sleep(1000)"
    sleeper = subprocess.Popen([sys.executable, "-c", code, "a\n\n b\tc", "\x1b[31mred\x07"])
    expected = f"{sys.executable} -c import time time.sleep(1000) a b c ?[31mred?"
    assert len(expected) <= bindcheck.MAX_COMMAND_CHARS
    try:
        # Until the child has exec'd Python, it still has this test's command line.
        deadline = time.monotonic() + 10
        while bindcheck._command_line(sleeper.pid) != expected:
            assert time.monotonic() < deadline, bindcheck._command_line(sleeper.pid)
            time.sleep(0.02)
    finally:
        _stop(sleeper)


@pytest.mark.parametrize(("text", "expected"), [
    ("python3 -c 'import x\nrun()'", "python3 -c 'import x run()'"),
    ("a\t\tb\r\n  c\x0bd\x0ce", "a b c d e"),
    ("node\x1b[0m\x00end", "node?[0m?end"),
    ("  \n ", ""),
    ("plain", "plain"),
])
def test_one_line(text, expected):
    assert bindcheck.one_line(text) == expected


def test_command_line_short_command_kept_whole():
    sleeper = subprocess.Popen(["/bin/sleep", "1000"])
    try:
        # Until the child has exec'd sleep, it still has this test's command line.
        deadline = time.monotonic() + 10
        while bindcheck._command_line(sleeper.pid) != "/bin/sleep 1000":
            assert time.monotonic() < deadline, bindcheck._command_line(sleeper.pid)
            time.sleep(0.02)
    finally:
        _stop(sleeper)


def test_held_port_free_port_is_none():
    port = free_port_range([ADDRESS], 1, start=43200)
    assert bindcheck.held_port([(ip(ADDRESS), port)], listeners.listening()) is None
