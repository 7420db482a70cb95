"""Parse and format the TCP multiaddrs that name data worker addresses.

Data workers listen on TCP, so this project accepts only two forms as worker
addresses: /ip4/A.B.C.D/tcp/PORT and /ip6/ADDR/tcp/PORT. Host names (dns,
dns4, dns6), UDP and QUIC, and trailing protocols such as /p2p/ID are
rejected, so a bad entry fails when the config loads.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import NoReturn

from .errors import MultiaddrError

__all__ = ["TcpMultiaddr", "format_tcp", "parse"]

IP4_HINT = "/ip4/A.B.C.D/tcp/PORT"
IP6_HINT = "/ip6/ADDR/tcp/PORT"
ANY_HINT = f"{IP4_HINT} or {IP6_HINT}"

# ASCII digits only. str.isdigit() would also accept other scripts' digits.
_PORT_PATTERN = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class TcpMultiaddr:
    """An IP address and TCP port written as /ip4|ip6/ADDR/tcp/PORT."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __str__(self) -> str:
        return f"/ip{self.ip.version}/{self.ip.compressed}/tcp/{self.port}"

    def host_port(self) -> str:
        """Format the address as HOST:PORT, with IPv6 hosts in brackets."""
        if self.ip.version == 6:
            return f"[{self.ip.compressed}]:{self.port}"
        return f"{self.ip.compressed}:{self.port}"


def parse(text: str) -> TcpMultiaddr:
    """Parse a worker multiaddr, raising MultiaddrError unless it has one of the two accepted forms."""
    if text == "":
        _fail(text, "the value is empty", ANY_HINT)
    parts = text.split("/")
    if parts[0] != "":
        _fail(text, "it does not start with '/'", ANY_HINT)
    family, hint = _family(text, parts)
    if len(parts) < 4:
        _fail(text, "the /tcp/PORT part is missing", hint)
    ip = _parse_ip(text, family, parts[2], hint)
    if parts[3] != "tcp":
        _fail(text, f"'{parts[3]}' is not supported because workers listen on TCP", hint)
    if len(parts) > 5:
        trailing = "/" + "/".join(parts[5:])
        _fail(text, f"unexpected trailing part '{trailing}'", hint)
    port = _parse_port(text, parts[4] if len(parts) == 5 else "", hint)
    return TcpMultiaddr(ip, port)


def format_tcp(ip: str, port: int) -> str:
    """Format an IP address and TCP port as a canonical worker multiaddr."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError as err:
        message = f"invalid worker address {ip!r}: not an IP address; use an IPv4 or IPv6 address"
        raise MultiaddrError(message) from err
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise MultiaddrError(f"invalid worker port {port!r} for {ip}: use a port from 1 to 65535")
    return str(TcpMultiaddr(address, port))


def _family(text: str, parts: list[str]) -> tuple[int, str]:
    """Return the IP version that parts[1] names and the matching hint."""
    protocol = parts[1] if len(parts) > 1 else ""
    if protocol == "ip4":
        return 4, IP4_HINT
    if protocol == "ip6":
        return 6, IP6_HINT
    if protocol in ("dns", "dns4", "dns6", "dnsaddr"):
        reason = f"host names ('/{protocol}') are not supported because a worker binds this address"
        _fail(text, reason, ANY_HINT)
    if protocol == "":
        _fail(text, "the /ip4 or /ip6 part is missing", ANY_HINT)
    _fail(text, f"'{protocol}' is not ip4 or ip6", ANY_HINT)


def _parse_ip(
    text: str, family: int, value: str, hint: str
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    kind = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    try:
        ip = kind(value)
    except ValueError:
        _fail(text, f"'{value}' is not an IPv{family} address", hint)
    # A multiaddr carries a zone in a separate /ip6zone/ part, which this parser does not accept.
    if family == 6 and ip.scope_id:
        _fail(text, f"'{value}' has a zone, which a worker multiaddr cannot carry", hint)
    return ip


def _parse_port(text: str, value: str, hint: str) -> int:
    if value == "":
        _fail(text, "the TCP port is missing", hint)
    if not _PORT_PATTERN.fullmatch(value) or not 1 <= int(value) <= 65535:
        _fail(text, f"port '{value}' is not a number from 1 to 65535", hint)
    return int(value)


def _fail(text: str, reason: str, hint: str) -> NoReturn:
    raise MultiaddrError(f"invalid worker multiaddr {text!r}: {reason}; use {hint}")
