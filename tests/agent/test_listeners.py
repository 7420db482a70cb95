"""Listening TCP sockets read over netlink and from /proc/net, with sockets this test binds on loopback."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys

import pytest

from quil_cluster.agent import listeners
from quil_cluster.agent.listeners import _decode, is_listening, listening, listening_by_inode, sockets_of

# Loopback address of these tests; other test files use other 127.0.0.x addresses.
ADDRESS = "127.0.0.62"


@pytest.fixture
def listener():
    """A TCP socket listening on ADDRESS at a port the kernel picks."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind((ADDRESS, 0))
        server.listen()
        yield server
    finally:
        server.close()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- listening() ----------------------------------------------------------------


def test_listening_finds_ipv4_listener(listener):
    assert (ADDRESS, listener.getsockname()[1]) in listening()


def test_listening_skips_bound_socket():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound:
        bound.bind((ADDRESS, 0))
        port = bound.getsockname()[1]
        assert (ADDRESS, port) not in listening()


def test_listening_skips_connected_client(listener):
    with socket.create_connection(listener.getsockname(), timeout=5) as client:
        client_port = client.getsockname()[1]
        table = listening()
    assert (ADDRESS, client_port) not in table


def test_listening_drops_closed_listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind((ADDRESS, 0))
        server.listen()
        port = server.getsockname()[1]
    finally:
        server.close()
    assert (ADDRESS, port) not in listening()


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback address in this network namespace")
def test_listening_finds_ipv6_loopback_listener():
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as server:
        server.bind(("::1", 0))
        server.listen()
        port = server.getsockname()[1]
        table = listening()
    assert ("::1", port) in table


# -- _decode() --------------------------------------------------------------------

LITTLE_ENDIAN = pytest.mark.skipif(sys.byteorder != "little", reason="the kernel text below is of a little-endian host")


@LITTLE_ENDIAN
def test_decode_ipv4_kernel_text():
    assert _decode("0100007F:1CB6", socket.AF_INET) == ("127.0.0.1", 7350)


@LITTLE_ENDIAN
def test_decode_ipv4_wildcard_kernel_text():
    assert _decode("00000000:0016", socket.AF_INET) == ("0.0.0.0", 22)


@LITTLE_ENDIAN
def test_decode_ipv6_loopback_kernel_text():
    assert _decode("00000000000000000000000001000000:1CB6", socket.AF_INET6) == ("::1", 7350)


@LITTLE_ENDIAN
def test_decode_ipv6_link_local_kernel_text():
    assert _decode("000080FE000000000000000001000000:FFFF", socket.AF_INET6) == ("fe80::1", 65535)


# -- is_listening() ---------------------------------------------------------------


def test_is_listening_exact_address():
    assert is_listening("127.0.0.62", 7350, {("127.0.0.62", 7350)}) is True


def test_is_listening_other_address_same_port():
    assert is_listening("127.0.0.63", 7350, {("127.0.0.62", 7350)}) is False


def test_is_listening_other_port():
    assert is_listening("127.0.0.62", 7351, {("127.0.0.62", 7350)}) is False


def test_is_listening_counts_ipv4_wildcard():
    table = {("0.0.0.0", 7350)}
    assert is_listening("127.0.0.62", 7350, table) is True
    assert is_listening("192.0.2.10", 7350, table) is True


def test_is_listening_ipv4_wildcard_other_port():
    assert is_listening("192.0.2.10", 7351, {("0.0.0.0", 7350)}) is False


def test_is_listening_ipv4_wildcard_not_for_ipv6():
    assert is_listening("::1", 7350, {("0.0.0.0", 7350)}) is False


def test_is_listening_counts_ipv6_wildcard():
    assert is_listening("2001:db8::5", 7350, {("::", 7350)}) is True


def test_is_listening_ipv6_wildcard_not_for_ipv4():
    # NOTE: a dual-stack "::" socket also accepts IPv4, but is_listening counts only its own family.
    assert is_listening("127.0.0.62", 7350, {("::", 7350)}) is False


def test_is_listening_normalises_ipv6_text():
    assert is_listening("0:0:0:0:0:0:0:1", 7350, {("::1", 7350)}) is True


def test_is_listening_finds_real_listener(listener):
    ip, port = listener.getsockname()
    assert is_listening(ip, port, listening()) is True


def test_is_listening_invalid_ip_raises():
    with pytest.raises(ValueError):
        is_listening("node.example", 7350, set())


# -- listening_by_inode() and sockets_of() ------------------------------------------------


def test_sockets_of_lists_own_listener(listener):
    port = listener.getsockname()[1]
    assert f"{ADDRESS}:{port}" in sockets_of(os.getpid(), listening_by_inode())


def test_listening_by_inode_matches_socket_inode(listener):
    inode = os.fstat(listener.fileno()).st_ino
    assert listening_by_inode()[inode] == (ADDRESS, listener.getsockname()[1])


def test_sockets_of_skips_other_process_listener(listener):
    child = subprocess.Popen(["/bin/sleep", "1000"], close_fds=True)
    try:
        assert sockets_of(child.pid, listening_by_inode()) == []
    finally:
        child.kill()
        child.wait(10)


def test_sockets_of_exited_process_raises():
    child = subprocess.Popen(["/bin/true"])
    child.wait(10)
    with pytest.raises(FileNotFoundError):
        sockets_of(child.pid, {})


# -- netlink and the /proc/net fallback ------------------------------------------------


def test_netlink_matches_proc_tables(listener):
    netlink = listeners._diag_listening(socket.AF_INET) | listeners._diag_listening(socket.AF_INET6)
    inode = os.fstat(listener.fileno()).st_ino
    assert netlink[inode] == (ADDRESS, listener.getsockname()[1])
    # Sockets can open or close between the two reads; this test's own listener is in both.
    assert set(netlink.items()) & set(listeners._proc_listening().items()) >= {(inode, netlink[inode])}


def test_listening_falls_back_to_proc(listener, monkeypatch):
    def failing(family):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(listeners, "_diag_listening", failing)
    monkeypatch.setattr(listeners, "_netlink_works", True)
    assert (ADDRESS, listener.getsockname()[1]) in listening()
    assert listeners._netlink_works is False


def test_parse_diag_raises_netlink_error():
    header = struct.pack("=IHHII", 36, 2, 0, 1, 0)
    datagram = header + struct.pack("=i", -errno.EPERM) + bytes(16)
    with pytest.raises(OSError) as caught:
        listeners._parse_diag(datagram, socket.AF_INET, {})
    assert caught.value.errno == errno.EPERM


def test_parse_diag_reads_ipv4_listener():
    message = bytearray(72)
    message[0:2] = bytes([socket.AF_INET, 10])
    message[4:6] = struct.pack("!H", 8340)
    message[8:12] = socket.inet_aton("127.0.0.62")
    message[68:72] = struct.pack("=I", 4711)
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + bytes(4)
    datagram = struct.pack("=IHHII", 16 + len(message), 20, 2, 1, 0) + bytes(message) + done
    found = {}
    assert listeners._parse_diag(datagram, socket.AF_INET, found) is True
    assert found == {4711: ("127.0.0.62", 8340)}
