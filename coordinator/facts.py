"""Host facts from the agents, used where the inventory leaves a value open."""

from __future__ import annotations

import grpc

from ..common.errors import HostError, UnreachableError
from ..common.exitcodes import ExitCode
from ..proto import agent_pb2 as pb
from .client import CALL_TIMEOUT, CallError, Credentials, call_error, for_each_host
from .home import Home
from .inventory import Host


def cpu_counts(home: Home, hosts: list[Host]) -> dict[str, int]:
    """Ask each host's agent for its logical CPU count; raise HostError naming the first that fails."""
    credentials = Credentials(home)

    def ask(host: Host) -> int | CallError:
        channel, stub = credentials.stub(host)
        try:
            return stub.GetHostFacts(pb.GetHostFactsRequest(), timeout=CALL_TIMEOUT).logical_cpus
        except grpc.RpcError as err:
            return call_error(err)
        finally:
            channel.close()

    answers = for_each_host(hosts, ask)
    for name, answer in answers.items():
        if isinstance(answer, CallError):
            kind = UnreachableError if answer.exit_code == ExitCode.UNREACHABLE else HostError
            raise kind(name, f"cannot read the CPU count from its agent ({answer.reason}); pass --cpus or --workers")
    return {name: int(answer) for name, answer in answers.items()}  # type: ignore[arg-type]
