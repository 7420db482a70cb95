"""Host facts from the agents, used where the inventory leaves a value open."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from ..common.errors import HostError, UnreachableError
from ..common.exitcodes import ExitCode
from ..proto import agent_pb2 as pb
from .client import CALL_TIMEOUT, CallError, Credentials, call_error, for_each_host
from .home import Home
from .inventory import Host


@dataclass(frozen=True)
class Facts:
    logical_cpus: int
    physical_cpus: int
    memory_bytes: int


def host_facts(home: Home, hosts: list[Host], required: set[str]) -> dict[str, Facts]:
    """Ask each host's agent for its CPUs and memory.

    A host in required must respond (its worker count depends on it): the first
    that does not raises HostError, or UnreachableError when it cannot be
    reached. Others that do not respond are left out.
    """
    credentials = Credentials(home)

    def ask(host: Host) -> Facts | CallError:
        channel, stub = credentials.stub(host)
        try:
            reply = stub.GetHostFacts(pb.GetHostFactsRequest(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            return call_error(err)
        finally:
            channel.close()
        return Facts(reply.logical_cpus, reply.physical_cpus or reply.logical_cpus, reply.memory_bytes)

    answers = for_each_host(hosts, ask)
    for name, answer in answers.items():
        if isinstance(answer, CallError) and name in required:
            kind = UnreachableError if answer.exit_code == ExitCode.UNREACHABLE else HostError
            raise kind(name, f"cannot read the CPU count from its agent ({answer.reason}); pass --cpus or --workers")
    return {name: answer for name, answer in answers.items() if isinstance(answer, Facts)}
