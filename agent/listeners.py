"""Listening TCP sockets of this network namespace, read from /proc/net.

Reading the two tables directly is much cheaper than psutil.net_connections,
which also walks every process's file descriptors to find owners.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

_LISTEN = "0A"
_TABLES = (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6))


def listening() -> set[tuple[str, int]]:
    """Return (ip, port) of every listening TCP socket; ip in its compressed form."""
    found: set[tuple[str, int]] = set()
    for table, family in _TABLES:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == _LISTEN:
                found.add(_decode(parts[1], family))
    return found


def _decode(local: str, family: int) -> tuple[str, int]:
    address_hex, port_hex = local.split(":")
    raw = bytes.fromhex(address_hex)
    # The kernel prints each 32-bit word of the address as a number in host
    # byte order, so the words are read back in native order ("=").
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    packed = struct.pack(f">{len(words)}I", *words)
    return str(ipaddress.ip_address(packed)), int(port_hex, 16)


def is_listening(ip: str, port: int, table: set[tuple[str, int]]) -> bool:
    """Return whether ip:port accepts connections, counting wildcard listeners of the same family."""
    address = ipaddress.ip_address(ip)
    wildcard = "0.0.0.0" if address.version == 4 else "::"
    return (str(address), port) in table or (wildcard, port) in table
