"""Checks run before a node process is spawned: is its bind address up, is its port free.

A worker whose bind address is on no interface yet (a VPN that is not up
at boot) would fail at once and crash-loop into FATAL, so the supervisor
keeps it WAITING until the address appears. A port that another process
already listens on would make the worker fail the same way, so the
supervisor reports that process (pid and command line) instead of spawning.
"""

from __future__ import annotations

import ipaddress
import socket

import psutil

from ..common import multiaddr
from ..common.errors import MultiaddrError

# Characters of the owner's command line kept in a held-port report.
MAX_COMMAND_CHARS = 120

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def bind_endpoints(binds: tuple[str, ...], listen: tuple[str, int] | None) -> list[tuple[IPAddress, int]]:
    """Return (ip, port) of every TCP multiaddr in binds, or of listen when binds is empty."""
    found = []
    for text in binds:
        try:
            address = multiaddr.parse(text)
        except MultiaddrError:
            continue  # the reconciler validated binds; a stand-in spec may carry none
        found.append((address.ip, address.port))
    if not found and listen is not None:
        found.append((ipaddress.ip_address(listen[0]), listen[1]))
    return found


def needs_interface(ip: IPAddress) -> bool:
    """Tell whether binding ip requires it on an interface: wildcard and loopback never do."""
    return not (ip.is_unspecified or ip.is_loopback)


def local_addresses() -> set[IPAddress]:
    """Return every IP address assigned to an interface of this network namespace."""
    found: set[IPAddress] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    # An IPv6 link-local address carries its zone ("fe80::1%eth0").
                    found.add(ipaddress.ip_address(entry.address.split("%", 1)[0]))
                except ValueError:
                    continue
    return found


def missing_addresses(endpoints: list[tuple[IPAddress, int]], local: set[IPAddress]) -> list[IPAddress]:
    """Return the bind addresses of endpoints that must be on an interface and are not."""
    missing = []
    for ip, _ in endpoints:
        if needs_interface(ip) and ip not in local and ip not in missing:
            missing.append(ip)
    return missing


def held_port(endpoints: list[tuple[IPAddress, int]], table: set[tuple[str, int]]) -> str | None:
    """Describe the first endpoint another socket already listens on, or return None.

    table is listeners.listening(). The owner is looked up only on a
    conflict, because that walks every process's descriptors.
    """
    for ip, port in endpoints:
        holder = _conflicting_listener(ip, port, table)
        if holder is not None:
            where = _host_port(ip, port)
            return f"port {where} is already in use by {_owner_text(holder)}; stop that process or free the port"
    return None


def _conflicting_listener(ip: IPAddress, port: int, table: set[tuple[str, int]]) -> tuple[str, int] | None:
    """Return a listening (ip, port) of table that makes a bind of ip:port fail, or None.

    Same address, a wildcard listener of the same family, or, for a wildcard
    bind, any listener of that family on the port. The node sets SO_REUSEADDR,
    which allows neither. IPv4 and IPv6 are treated as separate, as with
    IPV6_V6ONLY, which the node sets.
    """
    wildcard = ipaddress.ip_address("0.0.0.0" if ip.version == 4 else "::")
    for listen_ip_text, listen_port in table:
        if listen_port != port:
            continue
        listen_ip = ipaddress.ip_address(listen_ip_text)
        if listen_ip.version != ip.version:
            continue
        if listen_ip == ip or listen_ip == wildcard or ip == wildcard:
            return listen_ip_text, listen_port
    return None


def _owner_text(holder: tuple[str, int]) -> str:
    """Return 'pid N (COMMAND LINE)' of the process listening on holder, or a note that it is unknown."""
    ip, port = holder
    for conn in psutil.net_connections("tcp"):
        if conn.status != psutil.CONN_LISTEN or conn.laddr.port != port:
            continue
        if ipaddress.ip_address(conn.laddr.ip.split("%", 1)[0]) != ipaddress.ip_address(ip):
            continue
        if conn.pid is None:
            break
        return f"pid {conn.pid} ({_command_line(conn.pid)})"
    return "a process this agent cannot see (another user's, or it just exited)"


def _command_line(pid: int) -> str:
    """Return the command line of pid on one line, cut to MAX_COMMAND_CHARS (never its environment)."""
    try:
        proc = psutil.Process(pid)
        text = one_line(" ".join(proc.cmdline())) or f"[{one_line(proc.name())}]"
    except psutil.Error:
        return "command line unreadable"
    return text if len(text) <= MAX_COMMAND_CHARS else text[: MAX_COMMAND_CHARS - 3] + "..."


def one_line(text: str) -> str:
    """Collapse each run of whitespace to one space and replace other non-printable characters with '?'.

    An argument may contain newlines or control characters, and the report
    ends up in one status row and one log line.
    """
    printable = "".join(char if char.isprintable() or char.isspace() else "?" for char in text)
    return " ".join(printable.split())


def _host_port(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"

