"""Facts about this host that the agent reports: node version, ports, addresses, signature files, config on disk."""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

import psutil

from ..common import portlist
from ..common.errors import ConfigError

# Release binaries are named node-VERSION-OS-ARCH, e.g. node-2.1.0.25-linux-amd64.
_VERSION = re.compile(r"node-(\d+\.\d+(?:\.\d+)*)")
_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


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


def ephemeral_warning(ports: list[int], port_range: tuple[int, int] | None,
                      reserved: frozenset[int] | set[int] = frozenset()) -> str | None:
    """Return a warning with the fix when a worker port lies in the ephemeral range unreserved, else None."""
    if port_range is None:
        return None
    low, high = port_range
    inside = sorted(p for p in ports if low <= p <= high and p not in reserved)
    if not inside:
        return None
    span = f"{inside[0]}-{inside[-1]}" if len(inside) > 1 else str(inside[0])
    # The sysctl replaces the whole list, so the value keeps the ports reserved already.
    value = portlist.format_ranges(set(reserved) | set(inside)) if reserved else span
    return (f"worker ports {span} are inside this host's ephemeral port range {low}-{high}, so an outgoing "
            f"connection can take one before its worker starts; reserve them with "
            f"sysctl -w net.ipv4.ip_local_reserved_ports={value}, or choose a base port below {low}")


def reserved_port_set(path: Path = _RESERVED_PORTS) -> frozenset[int]:
    """Return the kernel's reserved ports; empty when the list cannot be read or parsed."""
    try:
        return frozenset(portlist.parse(reserved_ports(path)))
    except ConfigError:
        return frozenset()


def file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


# Values Go's strconv.ParseBool accepts, which the node uses for its flag and environment variable.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
SIGNATURE_ENV = "QUILIBRIUM_SIGNATURE_CHECK"


def reserved_ports(path: Path = _RESERVED_PORTS) -> str:
    """Return the kernel's reserved local ports as written there ("40000-40015,41000"), or '' when unreadable."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def interface_addresses() -> list[str]:
    """Return the IPv4 and IPv6 addresses on this host's interfaces now, without scope or prefix length."""
    addresses = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                # Link-local IPv6 addresses carry the interface as a scope: fe80::1%eth0.
                addresses.add(entry.address.split("%", 1)[0])
    return sorted(addresses)


def signature_files(binary: Path) -> list[str]:
    """Return the names of the node's signature files (NAME.dgst, NAME.dgst.sig.N) next to the binary.

    The node looks next to its resolved executable (Go's os.Executable reads
    /proc/self/exe), so a symlink's target directory and name count, not the link's.
    """
    target = binary.resolve()
    pattern = re.compile(re.escape(target.name) + r"\.dgst(\.sig\.\d+)?")
    try:
        names = [entry.name for entry in target.parent.iterdir()]
    except OSError:
        return []
    return sorted(name for name in names if pattern.fullmatch(name))


def signature_check_disabled(node_args: tuple[str, ...] | list[str], node_env: dict[str, str]) -> bool:
    """Tell whether node processes started with these arguments and environment skip the signature check.

    The flag's default is QUILIBRIUM_SIGNATURE_CHECK when that parses as a Go
    bool (an invalid value keeps the check on), and the last --signature-check
    flag wins over it.
    """
    enabled = node_env.get(SIGNATURE_ENV, "true") not in _GO_FALSE
    for arg in node_args:
        name, _, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or name != "signature-check":
            continue
        if not value or value in _GO_TRUE:
            enabled = True
        elif value in _GO_FALSE:
            enabled = False
    return not enabled
