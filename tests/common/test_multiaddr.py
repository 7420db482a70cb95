import dataclasses
import ipaddress

import pytest

from quil_cluster.common.errors import ConfigError, MultiaddrError
from quil_cluster.common.multiaddr import TcpMultiaddr, format_tcp, parse


def test_parse_ipv4():
    address = parse("/ip4/10.0.0.1/tcp/40000")

    assert address == TcpMultiaddr(ipaddress.IPv4Address("10.0.0.1"), 40000)
    assert str(address) == "/ip4/10.0.0.1/tcp/40000"
    assert address.host_port() == "10.0.0.1:40000"


def test_parse_ipv6():
    address = parse("/ip6/2001:db8::7/tcp/32500")

    assert address == TcpMultiaddr(ipaddress.IPv6Address("2001:db8::7"), 32500)
    assert str(address) == "/ip6/2001:db8::7/tcp/32500"
    assert address.host_port() == "[2001:db8::7]:32500"


def test_str_is_canonical():
    assert str(parse("/ip6/0:0:0:0:0:0:0:1/tcp/40000")) == "/ip6/::1/tcp/40000"
    assert str(parse("/ip6/2001:DB8::A/tcp/1")) == "/ip6/2001:db8::a/tcp/1"
    assert str(parse("/ip4/10.0.0.1/tcp/040000")) == "/ip4/10.0.0.1/tcp/40000"


def test_parse_port_limits():
    assert parse("/ip4/127.0.0.1/tcp/1").port == 1
    assert parse("/ip4/127.0.0.1/tcp/65535").port == 65535


def test_parse_unspecified_addresses():
    assert parse("/ip4/0.0.0.0/tcp/25000").ip.is_unspecified
    assert parse("/ip6/::/tcp/25000").ip.is_unspecified


def test_multiaddr_is_frozen_and_hashable():
    address = parse("/ip4/10.0.0.1/tcp/40000")

    with pytest.raises(dataclasses.FrozenInstanceError):
        address.port = 1  # type: ignore[misc]
    assert {address, parse("/ip4/10.0.0.1/tcp/40000")} == {address}


IP4_FIX = "use /ip4/A.B.C.D/tcp/PORT"
IP6_FIX = "use /ip6/ADDR/tcp/PORT"
ANY_FIX = "use /ip4/A.B.C.D/tcp/PORT or /ip6/ADDR/tcp/PORT"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("/ip4/10.0.0.300/tcp/40000", f"'10.0.0.300' is not an IPv4 address; {IP4_FIX}"),
        ("/ip4/010.0.0.1/tcp/40000", f"'010.0.0.1' is not an IPv4 address; {IP4_FIX}"),
        ("/ip4//tcp/40000", f"'' is not an IPv4 address; {IP4_FIX}"),
        ("/ip4/::1/tcp/40000", f"'::1' is not an IPv4 address; {IP4_FIX}"),
        ("/ip6/10.0.0.1/tcp/40000", f"'10.0.0.1' is not an IPv6 address; {IP6_FIX}"),
        (
            "/ip6/fe80::1%eth0/tcp/40000",
            f"'fe80::1%eth0' has a zone, which a worker multiaddr cannot carry; {IP6_FIX}",
        ),
        ("/ip4/10.0.0.1/tcp/0", f"port '0' is not a number from 1 to 65535; {IP4_FIX}"),
        ("/ip4/10.0.0.1/tcp/65536", f"port '65536' is not a number from 1 to 65535; {IP4_FIX}"),
        ("/ip4/10.0.0.1/tcp/70000", f"port '70000' is not a number from 1 to 65535; {IP4_FIX}"),
        ("/ip4/10.0.0.1/tcp/-1", f"port '-1' is not a number from 1 to 65535; {IP4_FIX}"),
        ("/ip4/10.0.0.1/tcp/+1", f"port '+1' is not a number from 1 to 65535; {IP4_FIX}"),
        ("/ip4/10.0.0.1/tcp/4e4", f"port '4e4' is not a number from 1 to 65535; {IP4_FIX}"),
        ("/ip4/10.0.0.1/tcp/\u0663", f"port '\u0663' is not a number from 1 to 65535; {IP4_FIX}"),
        ("/ip4/10.0.0.1/udp/40000", f"'udp' is not supported because workers listen on TCP; {IP4_FIX}"),
        ("/ip4/10.0.0.1/udp/8336/quic-v1", f"'udp' is not supported because workers listen on TCP; {IP4_FIX}"),
        ("/ip6/::1/udp/8336/quic", f"'udp' is not supported because workers listen on TCP; {IP6_FIX}"),
        ("/ip4/10.0.0.1/tcp", f"the TCP port is missing; {IP4_FIX}"),
        ("/ip4/10.0.0.1/tcp/", f"the TCP port is missing; {IP4_FIX}"),
        ("/ip4/10.0.0.1", f"the /tcp/PORT part is missing; {IP4_FIX}"),
        ("/ip4/10.0.0.1/tcp/40000/", f"unexpected trailing part '/'; {IP4_FIX}"),
        ("/ip4/10.0.0.1/tcp/40000/p2p/QmWorker", f"unexpected trailing part '/p2p/QmWorker'; {IP4_FIX}"),
        (
            "/dns4/worker.example/tcp/40000",
            f"host names ('/dns4') are not supported because a worker binds this address; {ANY_FIX}",
        ),
        (
            "/dns/worker.example/tcp/40000",
            f"host names ('/dns') are not supported because a worker binds this address; {ANY_FIX}",
        ),
        ("/unix/tmp/worker.sock", f"'unix' is not ip4 or ip6; {ANY_FIX}"),
        ("ip4/10.0.0.1/tcp/40000", f"it does not start with '/'; {ANY_FIX}"),
        (" /ip4/10.0.0.1/tcp/40000", f"it does not start with '/'; {ANY_FIX}"),
        ("/", f"the /ip4 or /ip6 part is missing; {ANY_FIX}"),
        ("", f"the value is empty; {ANY_FIX}"),
    ],
)
def test_parse_rejects(text, reason):
    with pytest.raises(MultiaddrError) as caught:
        parse(text)

    assert str(caught.value) == f"invalid worker multiaddr {text!r}: {reason}"


def test_parse_error_is_config_error():
    with pytest.raises(ConfigError):
        parse("/ip4/10.0.0.1/tcp/0")


def test_format_tcp():
    assert format_tcp("192.168.0.201", 40003) == "/ip4/192.168.0.201/tcp/40003"
    assert format_tcp("2001:db8:0::1", 25000) == "/ip6/2001:db8::1/tcp/25000"
    assert parse(format_tcp("10.1.2.3", 65535)) == TcpMultiaddr(ipaddress.IPv4Address("10.1.2.3"), 65535)


@pytest.mark.parametrize(
    ("ip", "port", "message"),
    [
        ("10.0.0.256", 40000, "invalid worker address '10.0.0.256': not an IP address; use an IPv4 or IPv6 address"),
        ("worker-1", 40000, "invalid worker address 'worker-1': not an IP address; use an IPv4 or IPv6 address"),
        ("10.0.0.1", 0, "invalid worker port 0 for 10.0.0.1: use a port from 1 to 65535"),
        ("10.0.0.1", 65536, "invalid worker port 65536 for 10.0.0.1: use a port from 1 to 65535"),
        ("10.0.0.1", True, "invalid worker port True for 10.0.0.1: use a port from 1 to 65535"),
    ],
)
def test_format_tcp_rejects(ip, port, message):
    with pytest.raises(MultiaddrError) as caught:
        format_tcp(ip, port)

    assert str(caught.value) == message
