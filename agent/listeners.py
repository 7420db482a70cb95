"""Listening TCP sockets of this network namespace, read from /proc/net.

Reading the two tables directly is much cheaper than psutil.net_connections,
which also walks every process's file descriptors to find owners.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import struct
from pathlib import Path

_LISTEN = "0A"
_TABLES = (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6))


def listening() -> set[tuple[str, int]]:
    """Return (ip, port) of every listening TCP socket; ip in its compressed form."""
    return set(listening_by_inode().values())


def listening_by_inode() -> dict[int, tuple[str, int]]:
    """Return (ip, port) of every listening TCP socket, keyed by the socket's inode number."""
    found: dict[int, tuple[str, int]] = {}
    for table, family in _TABLES:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == _LISTEN:
                found[int(parts[9])] = _decode(parts[1], family)
    return found


def sockets_of(pid: int, by_inode: dict[int, tuple[str, int]]) -> list[str]:
    """Return 'ip:port' ('[ip]:port' for IPv6) of pid's own listening sockets, sorted.

    by_inode is listening_by_inode(), read once for many processes: psutil's
    per-process lookup reads both /proc/net tables again for every process,
    which costs tens of milliseconds each on a busy host. Raises OSError
    when the process has exited or its descriptors cannot be read.
    """
    found = set()
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            target = os.readlink(f"{directory}/{name}")
        except OSError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            address = by_inode.get(int(target[8:-1]))
            if address is not None:
                ip, port = address
                found.add(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return sorted(found)


# The same addresses come back on every status call; decode each once.
@functools.lru_cache(maxsize=65536)
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
