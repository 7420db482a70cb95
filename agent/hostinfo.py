"""Facts about this host that the agent reports: node version, ephemeral port range, config on disk."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# Release binaries are named node-VERSION-OS-ARCH, e.g. node-2.1.0.25-linux-amd64.
_VERSION = re.compile(r"node-(\d+\.\d+(?:\.\d+)*)")
_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def node_version(binary: Path) -> str:
    """Return the release version in the binary's file name, or '' when the name carries none."""
    match = _VERSION.search(binary.name)
    return match.group(1) if match else ""


def ephemeral_range(path: Path = _PORT_RANGE) -> tuple[int, int] | None:
    """Return the kernel's range of local ports for outgoing connections, or None when unreadable."""
    try:
        low, high = path.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def ephemeral_warning(ports: list[int], port_range: tuple[int, int] | None) -> str | None:
    """Return a warning with the fix when any worker port lies in the ephemeral range, else None."""
    if port_range is None:
        return None
    low, high = port_range
    inside = sorted(p for p in ports if low <= p <= high)
    if not inside:
        return None
    span = f"{inside[0]}-{inside[-1]}" if len(inside) > 1 else str(inside[0])
    return (f"worker ports {span} are inside this host's ephemeral port range {low}-{high}, so an outgoing "
            f"connection can take one before its worker starts; reserve them with "
            f"sysctl -w net.ipv4.ip_local_reserved_ports={span}, or choose a base port below {low}")


def file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
