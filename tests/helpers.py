"""Helpers the test folders import (tests/ is on the pytest path)."""

from __future__ import annotations

import socket
from pathlib import Path

DATA = Path(__file__).parent / "data"


def free_port_range(addresses: list[str], count: int, start: int = 41000) -> int:
    """First port p >= start such that p .. p+count-1 are free on every address."""
    for base in range(start, 60000 - count, count):
        if all(_free(a, p) for a in addresses for p in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports on {addresses}")


def _free(address: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True
