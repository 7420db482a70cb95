"""Helpers the test folders import (tests/ is on the pytest path)."""

from __future__ import annotations

from pathlib import Path

from quil_cluster.coordinator.demo import free_base_port

DATA = Path(__file__).parent / "data"


def free_port_range(addresses: list[str], count: int, start: int = 41000) -> int:
    """First port p >= start such that p .. p+count-1 are free on every address."""
    return free_base_port(addresses, count, start)
