"""quil-coord verify: measure who can reach which worker port, against the policy.

  1. build the expected grid: every worker port (coordinator/policy.py) from
     every enrolled host, the control host being the authorized source
  2. ask each source's agent to probe its targets, all sources in parallel
  3. probe mismatches once more; a mismatch that stays is a violation
  4. audit listeners: each worker must listen only on its planned addresses
  5. check each agent port refuses a TLS handshake without a client certificate
In a local cluster (every host on this machine) probes between hosts cannot
show isolation, so steps 2 and 3 are skipped and the report states that.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import Callable

import grpc

from ..common.errors import InventoryError
from ..common.exitcodes import ExitCode
from ..proto import agent_pb2 as pb
from . import policy
from .client import CALL_TIMEOUT, Credentials, agent_tls_context, call_error, for_each_host, open_agent_tls
from .home import Home
from .metrics import record_verify
from .inventory import Host

log = logging.getLogger(__name__)

# Seconds one connection attempt may take; a firewall that drops packets shows as a timeout.
PROBE_TIMEOUT = 1.5
_OUTCOMES = {pb.PROBE_OUTCOME_OPEN: "open", pb.PROBE_OUTCOME_REFUSED: "refused",
             pb.PROBE_OUTCOME_TIMEOUT: "timeout", pb.PROBE_OUTCOME_ERROR: "error"}


@dataclass
class ProbeCell:
    source: str
    target: policy.Target
    expected: str  # open or blocked
    observed: str  # open, refused, timeout, error, unreachable (the source's agent)

    @property
    def ok(self) -> bool:
        if self.expected == "open":
            return self.observed == "open"
        return self.observed in ("refused", "timeout")


@dataclass
class VerifyReport:
    cells: list[ProbeCell] = field(default_factory=list)
    # Text of each violation, with the fix.
    violations: list[str] = field(default_factory=list)
    # Host name -> reason, for hosts whose agent could not be asked.
    errors: dict[str, str] = field(default_factory=dict)
    agent_ports: dict[str, str] = field(default_factory=dict)
    local: bool = False

    @property
    def exit_code(self) -> ExitCode:
        if self.violations:
            return ExitCode.VIOLATION
        return ExitCode.UNREACHABLE if self.errors else ExitCode.OK


@record_verify
def verify(home: Home, progress: Callable[[str, str], None] | None = None) -> VerifyReport:
    """Run the steps of the module docstring; progress(host, step) is called from worker threads."""
    step = progress or (lambda host, text: None)
    with home.locked():
        settings = home.load_settings()
        hosts = home.load_hosts()
        assignment = home.load_assignment()
    slots = assignment.slots if assignment else []
    control = next((h for h in hosts if h.control), None)
    if control is None:
        raise InventoryError("no control host, so there is no authorized source to verify against; "
                             "mark one with quil-coord host set NAME --control")
    credentials = Credentials(home)
    report = VerifyReport(local=settings.local)
    # 1.-3. probes; a source whose agent did not respond is an error, not a violation
    if not settings.local:
        grid = _expected_grid(policy.targets(settings, slots), hosts, control)
        for host in hosts:
            step(host.name, "probing worker ports")
        report.cells = _measure(credentials, hosts, grid, report.errors)
        report.violations += [_probe_violation(cell, control, settings) for cell in report.cells
                              if not cell.ok and cell.observed != "unreachable"]
    # 4. listeners
    for host in hosts:
        step(host.name, "checking listeners")
    report.violations += _audit_listeners(credentials, hosts, settings, slots, report.errors)
    # 5. agent ports
    for host in hosts:
        step(host.name, "checking the agent port")
    report.agent_ports = for_each_host(hosts, lambda h: _handshake_without_cert(h, home.trust_bundle()))
    report.violations += [f"{name}: agent port {next(h.agent for h in hosts if h.name == name)} accepted a TLS "
                          "handshake without a client certificate; run the agent from a bundle of this cluster"
                          for name, observed in report.agent_ports.items() if observed == "accepted"]
    for host in hosts:
        step(host.name, "done")
    return report


def _expected_grid(targets: list[policy.Target], hosts: list[Host], control: Host) -> list[ProbeCell]:
    cells = []
    for source in hosts:
        for target in targets:
            expected = policy.expected(target, source, control)
            if expected is not None:
                cells.append(ProbeCell(source.name, target, expected, ""))
    return cells


def _measure(credentials: Credentials, hosts: list[Host], cells: list[ProbeCell], errors: dict[str, str]
             ) -> list[ProbeCell]:
    by_source = {h.name: h for h in hosts}
    _probe(credentials, by_source, cells, errors)
    retry = [cell for cell in cells if not cell.ok and cell.observed != "unreachable"]
    if retry:
        _probe(credentials, by_source, retry, errors)
    return cells


def _probe(credentials: Credentials, hosts: dict[str, Host], cells: list[ProbeCell], errors: dict[str, str]) -> None:
    """Fill in cell.observed, one Probe call per source host."""
    groups: dict[str, list[ProbeCell]] = {}
    for cell in cells:
        groups.setdefault(cell.source, []).append(cell)

    def run(host: Host) -> None:
        group = groups[host.name]
        request = pb.ProbeRequest(targets=[pb.ProbeTarget(address=c.target.address, port=c.target.port)
                                           for c in group], timeout_seconds=PROBE_TIMEOUT)
        channel, stub = credentials.stub(host)
        try:
            reply = stub.Probe(request, timeout=CALL_TIMEOUT + PROBE_TIMEOUT * 4)
        except grpc.RpcError as err:
            errors[host.name] = call_error(err).reason
            for cell in group:
                cell.observed = "unreachable"
            return
        finally:
            channel.close()
        for cell, result in zip(group, reply.results):
            cell.observed = _OUTCOMES.get(result.outcome, "error")

    for_each_host([hosts[name] for name in groups], run)


def _probe_violation(cell: ProbeCell, control: Host, settings) -> str:
    target = cell.target
    if cell.observed == "unreachable":
        return f"{cell.source}: could not probe {target.label}: its agent did not answer"
    if cell.expected == "open":
        return (f"{cell.source} -> {target.label}: {cell.observed}, expected open; check that the worker runs "
                f"and that no firewall on {target.host} drops {cell.source}")
    return (f"{cell.source} -> {target.label}: {cell.observed}, expected blocked; allow only {control.address} "
            f"to port {target.port} on {target.host}: quil-coord host set {target.host} --firewall nftables, "
            f"or the rules from quil-coord firewall show --host {target.host}")


def _audit_listeners(credentials: Credentials, hosts: list[Host], settings, slots, errors: dict[str, str]
                     ) -> list[str]:
    planned: dict[tuple[str, int], set[str]] = {}
    for target in policy.targets(settings, slots):
        planned.setdefault((target.host, target.core), set()).add(_socket_text(target.address, target.port))

    def audit(host: Host) -> list[str]:
        channel, stub = credentials.stub(host)
        try:
            status = stub.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            errors.setdefault(host.name, call_error(err).reason)
            return []
        finally:
            channel.close()
        found = []
        for process in status.processes:
            expected = planned.get((host.name, process.core))
            if process.core == 0 or expected is None:
                continue
            extra = sorted(set(process.listen_sockets) - expected)
            found += [f"{host.name}: worker core={process.core} listens on {sock}, planned only "
                      f"{', '.join(sorted(expected))}; {_listener_fix(sock)}" for sock in extra]
        return found

    results = for_each_host(hosts, audit)
    return [line for host in hosts for line in results[host.name]]


def _listener_fix(sock: str) -> str:
    if sock.startswith(("0.0.0.0:", "[::]:")):
        return "it listens on every interface; set the worker list entry to the host's own address"
    return "another process or an old config binds it; restart the worker after apply"


def _socket_text(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _handshake_without_cert(host: Host, bundle: bytes) -> str:
    """'rejected' when the agent ends a TLS handshake that offers no client certificate, else 'accepted'."""
    try:
        with open_agent_tls(host, agent_tls_context(bundle)) as wrapped:
            # TLS 1.3 reports the rejected client certificate on the first read.
            wrapped.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            data = wrapped.recv(64)
    except (ssl.SSLError, ConnectionResetError):
        return "rejected"
    except OSError:
        return "unreachable"
    return "accepted" if data else "rejected"
