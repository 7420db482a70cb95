"""Read a node process's log from its host's agent (quil-coord logs)."""

from __future__ import annotations

from typing import Iterator

import grpc

from ..common.errors import InventoryError
from ..proto import agent_pb2 as pb
from .client import CALL_TIMEOUT, Credentials
from .control import call_failure, find_host
from .home import Home
from .inventory import Host

# The agent ends a follow stream after an hour; the client deadline leaves it room to do so.
FOLLOW_TIMEOUT = 3600.0 + CALL_TIMEOUT


def default_core(home: Home, host: Host) -> int:
    """Return the core to read when none was given: the host's only process; else raise InventoryError."""
    with home.locked():
        assignment = home.load_assignment()
    slots = assignment.slots if assignment else []
    cores = sorted(s.core for s in slots if s.host == host.name)
    if host.control:
        cores.insert(0, 0)
    if len(cores) == 1:
        return cores[0]
    if not cores:
        raise InventoryError(f"host {host.name} has no assigned processes; pass --core N to read an old log")
    listed = ", ".join(str(c) for c in cores)
    raise InventoryError(f"host {host.name} runs cores {listed}; pass --core N (0 is the control process)")


def read_log(home: Home, host_name: str, core: int | None, lines: int, follow: bool
             ) -> Iterator[tuple[bytes, bool]]:
    """Yield (data, truncated) chunks of a process's log until it ends, or, with follow, until closed.

    Raises InventoryError for an unknown host and a HostError or TLSError when the call fails.
    """
    host = find_host(home, host_name)
    if core is None:
        core = default_core(home, host)
    request = pb.ReadLogRequest(core=core, lines=lines, follow=follow)
    channel, stub = Credentials(home).stub(host)
    try:
        for chunk in stub.ReadLog(request, timeout=FOLLOW_TIMEOUT if follow else CALL_TIMEOUT):
            yield chunk.data, chunk.truncated
    except grpc.RpcError as err:
        raise call_failure(host.name, err) from err
    finally:
        # Also cancels a stream the caller stopped reading, so the agent frees its slot.
        channel.close()
