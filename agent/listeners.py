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
import threading
import time
from pathlib import Path

_LISTEN = "0A"
_TABLES = (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6))


# Seconds one read of the tables serves sockets_of(), because a status call looks up every process at once.
_INODE_TABLE_MAX_AGE = 0.5
_inode_cache: tuple[float, dict[int, tuple[str, int]]] = (float("-inf"), {})
_inode_lock = threading.Lock()


def listening() -> set[tuple[str, int]]:
    """Return (ip, port) of every listening TCP socket; ip in its compressed form."""
    return set(_read_inode_table().values())


def _read_inode_table() -> dict[int, tuple[str, int]]:
    """Read the tables, keep the result for sockets_of(), and return it."""
    global _inode_cache
    table = _listening_by_inode()
    with _inode_lock:
        _inode_cache = (time.monotonic(), table)
    return table


def _listening_by_inode() -> dict[int, tuple[str, int]]:
    found: dict[int, tuple[str, int]] = {}
    for table, family in _TABLES:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # Fields: sl, local, remote, state, queues, timer, retransmits, uid, timeout, inode, ...
            parts = line.split(None, 10)
            if len(parts) > 9 and parts[3] == _LISTEN:
                found[int(parts[9])] = _decode(parts[1], family)
    return found


def sockets_of(pid: int) -> list[str]:
    """Return 'ip:port' (IPv6 as '[ip]:port') of the TCP sockets pid itself listens on, sorted.

    Reading the tables once and matching the inodes of the process's open
    files costs one table read per status call, where psutil's per-process
    net_connections() reads the whole table again for every process.
    NOTE: a socket opened less than _INODE_TABLE_MAX_AGE seconds after the
    last table read is missing from the result until the next read.
    """
    with _inode_lock:
        read_at, table = _inode_cache
    if time.monotonic() - read_at > _INODE_TABLE_MAX_AGE:
        table = _read_inode_table()
    found = set()
    for inode in _socket_inodes(pid):
        if inode in table:
            ip, port = table[inode]
            found.add(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return sorted(found)


def _socket_inodes(pid: int) -> list[int]:
    """Inodes of the sockets among pid's open files; empty when the process is gone."""
    directory = f"/proc/{pid}/fd"
    inodes = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        try:
            target = os.readlink(f"{directory}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.append(int(target[8:-1]))
    return inodes


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
