"""Membership changes that reach a host before it leaves the inventory."""

from __future__ import annotations

import logging

import grpc

from ..proto import agent_pb2 as pb
from .client import APPLY_TIMEOUT, Credentials, call_error
from .home import Home

log = logging.getLogger(__name__)


def stop_host_processes(home: Home, name: str) -> str:
    """Ask the host's agent to stop everything; return a short note of what happened.

    An unreachable agent does not block the removal: its certificate is
    revoked either way, and its workers exit when the agent is gone.
    """
    hosts = {h.name: h for h in home.load_hosts()}
    host = hosts.get(name)
    if host is None:
        return "not in the inventory"
    channel, stub = Credentials(home).stub(host)
    try:
        stopped = stub.StopAll(pb.StopAllRequest(), timeout=APPLY_TIMEOUT).stopped
    except grpc.RpcError as err:
        reason = call_error(err).reason
        log.warning("host %s: could not stop its processes (%s); removing it anyway", name, reason)
        return f"its processes were not stopped: {reason}"
    finally:
        channel.close()
    return f"stopped cores {', '.join(str(c) for c in stopped) or 'none'}"
