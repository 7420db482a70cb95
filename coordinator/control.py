"""Start, stop and restart single node processes on one host (quil-coord start, stop, restart).

The agent does the work and the waiting (see agent/control.py). This module
picks the host, sends one Control call and turns the per-core results into
outcomes and an exit status. Like systemctl, starting a running process and
stopping a stopped one succeed with a note.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from ..common.errors import HostError, InventoryError, TLSError, UnreachableError
from ..common.exitcodes import ExitCode
from ..common.states import State
from ..proto import agent_pb2 as pb
from .client import CALL_TIMEOUT, Credentials, call_error
from .home import Home
from .inventory import Host

VERBS = {"start": pb.CONTROL_VERB_START, "stop": pb.CONTROL_VERB_STOP, "restart": pb.CONTROL_VERB_RESTART}
# Seconds quil-coord start, stop and restart wait by default for each process to reach its target state.
DEFAULT_WAIT_SECONDS = 30.0

# ControlError -> (result shown, exit status). Notes keep status 0.
RESULTS: dict[int, tuple[str, ExitCode]] = {
    pb.CONTROL_ERROR_NONE: ("ok", ExitCode.OK),
    pb.CONTROL_ERROR_ALREADY_RUNNING: ("already running", ExitCode.OK),
    pb.CONTROL_ERROR_NOT_RUNNING: ("not running", ExitCode.OK),
    pb.CONTROL_ERROR_NOT_ASSIGNED: ("not assigned", ExitCode.HOST_FAILED),
    pb.CONTROL_ERROR_SPAWN_FAILED: ("spawn failed", ExitCode.HOST_FAILED),
    pb.CONTROL_ERROR_TIMEOUT: ("timeout", ExitCode.HOST_FAILED),
}
_STATE_NAMES = {pb.ProcessState.Value(f"PROCESS_STATE_{s.name}"): s.value for s in State}


@dataclass
class CoreOutcome:
    host: str
    core: int
    # ok, already running, not running, not assigned, spawn failed or timeout.
    result: str
    state: str
    pid: int
    detail: str
    exit_code: ExitCode


def find_host(home: Home, name: str) -> Host:
    """Return the inventory host called name; raise InventoryError naming the known hosts."""
    with home.locked():
        hosts = home.load_hosts()
    for host in hosts:
        if host.name == name:
            return host
    known = ", ".join(h.name for h in hosts) or "none (add one with quil-coord host add)"
    raise InventoryError(f"unknown host '{name}'; known hosts: {known}")


def control(home: Home, host_name: str, verb: str, cores: list[int], wait_seconds: float) -> list[CoreOutcome]:
    """Send one Control call to the host's agent and return one outcome per core.

    Raises InventoryError for an unknown host, and a HostError (UnreachableError,
    or TLSError for an authorization failure) when the call fails as a whole.
    """
    host = find_host(home, host_name)
    if host.probe_only:
        raise InventoryError(f"host {host.name} is probe-only: it runs no node processes")
    request = pb.ControlRequest(verb=VERBS[verb], cores=cores, wait_seconds=wait_seconds)
    channel, stub = Credentials(home).stub(host)
    try:
        # The agent responds within wait_seconds (clamped to 120 s), and the margin covers the call itself.
        reply = stub.Control(request, timeout=min(wait_seconds, 120.0) + CALL_TIMEOUT)
    except grpc.RpcError as err:
        raise call_failure(host.name, err) from err
    finally:
        channel.close()
    return [_outcome(host.name, result) for result in reply.results]


def call_failure(host: str, err: grpc.RpcError) -> HostError | TLSError:
    """Return the exception for a failed call, with the exit status the client's outcome table gives it."""
    failure = call_error(err)
    if failure.exit_code == ExitCode.UNREACHABLE:
        return UnreachableError(host, failure.reason)
    if failure.exit_code == ExitCode.TLS:
        return TLSError(f"{host}: {failure.reason}")
    return HostError(host, failure.reason)


def _outcome(host: str, result: pb.ControlResult) -> CoreOutcome:
    shown, exit_code = RESULTS.get(result.error, ("unknown result", ExitCode.HOST_FAILED))
    return CoreOutcome(host, result.core, shown, _STATE_NAMES.get(result.state, "unknown"), result.pid,
                       result.detail, exit_code)


def exit_code(outcomes: list[CoreOutcome]) -> ExitCode:
    return max((o.exit_code for o in outcomes), default=ExitCode.OK)
