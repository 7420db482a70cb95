"""TCP reachability probes from this host, for quil-coord verify.

A probe only opens and closes a TCP connection; it sends no data. Targets
and time are bounded so a caller cannot turn the agent into a scanner.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from concurrent import futures

# Bounds on one Probe call.
MAX_TARGETS = 4096
MAX_PARALLEL = 64
MIN_TIMEOUT, MAX_TIMEOUT = 0.1, 5.0

OPEN, REFUSED, TIMEOUT, ERROR = "open", "refused", "timeout", "error"


class ProbeError(ValueError):
    """Raised when a probe request is out of bounds."""


def probe_all(targets: list[tuple[str, int]], timeout: float) -> list[tuple[str, str]]:
    """Connect to every (address, port) in parallel; return (outcome, detail) per target, in order."""
    if len(targets) > MAX_TARGETS:
        raise ProbeError(f"{len(targets)} targets; at most {MAX_TARGETS} per call")
    for address, port in targets:
        _check(address, port)
    timeout = min(MAX_TIMEOUT, max(MIN_TIMEOUT, timeout or 2.0))
    if not targets:
        return []
    with futures.ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(targets))) as pool:
        return list(pool.map(lambda t: probe_one(t[0], t[1], timeout), targets))


def _check(address: str, port: int) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError as err:
        raise ProbeError(f"probe target '{address}' is not an IP address") from err
    if not 1 <= port <= 65535:
        raise ProbeError(f"probe port {port} is outside 1-65535")


def probe_one(address: str, port: int, timeout: float) -> tuple[str, str]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except socket.timeout:
            return TIMEOUT, f"no answer within {timeout:.1f} s"
        except ConnectionRefusedError:
            return REFUSED, "connection refused"
        except OSError as err:
            if err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return TIMEOUT, err.strerror or str(err)
            return ERROR, err.strerror or str(err)
    return OPEN, "connected"
