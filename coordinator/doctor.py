"""quil-coord doctor: ask every agent for its facts and run the checks in checks.py on them.

Exit status: 0 when no check finds a problem, 4 (HOST_FAILED) when one does,
5 (UNREACHABLE) when an agent could not be asked, and the higher of the two
when both happen.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import grpc

from ..common.errors import ConfigError, QuilClusterError
from ..common.exitcodes import ExitCode
from ..proto import agent_pb2 as pb
from . import checks
from .checks import Finding
from .client import CALL_TIMEOUT, CallError, Credentials, call_error, for_each_host
from .cluster import DEFAULT_WORKER_MEMORY, worker_memory
from .home import Home, Settings
from .inventory import Host
from .render import read_control_config, render

# GetHostFacts calls per host; the fastest one measures the clock, because the
# first call can include hashing the node binary, which skews the midpoint.
CLOCK_SAMPLES = 2
# Host column of a control-config finding when the inventory names no control host.
CONTROL_LABEL = "control"


@dataclass
class Sample:
    """Facts and config hashes from one host's agent, with the coordinator's clock before and after the facts call."""

    facts: pb.HostFacts
    sent: float
    received: float
    # SHA-256 of the config the last apply pushed, and of the host's config.yml now.
    applied_sha256: str
    on_disk_sha256: str
    processes: list[checks.ProcessFacts] = field(default_factory=list)


@dataclass
class DoctorReport:
    hosts: list[str]
    findings: list[Finding] = field(default_factory=list)
    # Host name -> why its agent could not be asked.
    unreachable: dict[str, str] = field(default_factory=dict)
    exit_code: ExitCode = ExitCode.OK


def doctor(home: Home) -> DoctorReport:
    """Run every check on every host of the inventory.

    1. read the settings, inventory and assignment under the state lock
    2. ask every agent for its facts and status, in parallel
    3. run the per-host checks, then the version check across hosts
    """
    # 1. state
    with home.locked():
        settings, hosts, assignment = home.load_settings(), home.load_hosts(), home.load_assignment()
    slots = assignment.slots if assignment else []

    # 2. facts
    credentials = Credentials(home)
    answers = for_each_host(hosts, lambda host: _sample(credentials, host))
    report = DoctorReport(hosts=[h.name for h in hosts])
    control = next((h.name for h in hosts if h.control), None)
    control_error = _control_config_error(settings, slots)
    finding = checks.check_control_config(control or CONTROL_LABEL, settings.control_config, control_error)
    if finding is not None:
        report.findings.append(finding)
    samples = {}
    for host in hosts:
        answer = answers[host.name]
        if isinstance(answer, CallError):
            report.unreachable[host.name] = answer.reason
            report.findings.append(_unreachable(host, answer))
        else:
            samples[host.name] = answer

    # 3. checks
    per_worker = _worker_memory(settings)
    for host in hosts:
        if host.name in samples:
            cores = [s for s in slots if s.host == host.name]
            report.findings += _host_findings(home, settings, host, samples[host.name], cores, per_worker)
    report.findings += checks.check_versions(
        {name: sample.facts.node_version for name, sample in samples.items()}, control)
    report.findings.sort(key=lambda f: (f.host, checks.CHECKS.index(f.check)))
    report.exit_code = _exit_code(report)
    return report


def _sample(credentials: Credentials, host: Host) -> Sample | CallError:
    channel, stub = credentials.stub(host)
    try:
        timed = []
        for _ in range(CLOCK_SAMPLES):
            sent = time.time()
            facts = stub.GetHostFacts(pb.GetHostFactsRequest(), timeout=CALL_TIMEOUT)
            timed.append((time.time() - sent, sent, facts))
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        return call_error(err)
    finally:
        channel.close()
    _, sent, facts = min(timed, key=lambda entry: entry[0])
    round_trip = min(entry[0] for entry in timed)
    processes = [checks.ProcessFacts(p.core, pb.ProcessState.Name(p.state).removeprefix("PROCESS_STATE_").lower(),
                                     p.restarts, p.detail) for p in status.processes]
    return Sample(facts, sent, sent + round_trip, status.config_sha256, status.config_file_sha256, processes)


def _host_findings(home: Home, settings: Settings, host: Host, sample: Sample, cores: list,
                   per_worker: int) -> list[Finding]:
    facts = sample.facts
    found: list[Finding | None] = [checks.check_clock(host.name, facts.unix_time, sample.sent, sample.received)]
    found += checks.check_processes(host.name, sample.processes)
    if not host.probe_only:
        found += [
            checks.check_address(host.name, host.address, facts.worker_address, list(facts.interface_addresses)),
            checks.check_ephemeral(host.name, _worker_ports(settings, cores), facts.ephemeral_port_low,
                                   facts.ephemeral_port_high, facts.ephemeral_reserved_ports),
            checks.check_drift(host.name, _rendered_sha256(home, host), sample.applied_sha256,
                               sample.on_disk_sha256),
            checks.check_signatures(host.name, facts.node_binary_path, list(facts.signature_files),
                                    facts.signature_check_disabled),
            checks.check_memory(host.name, len(cores), facts.memory_bytes, per_worker),
            checks.check_gomaxprocs(host.name, facts.worker_gomaxprocs, facts.logical_cpus),
        ]
    return [finding for finding in found if finding is not None]


def _worker_ports(settings: Settings, cores: list) -> list[int]:
    """Return the ports this host's workers bind: one per core, and for 2.1 a stream port as well."""
    ports = [settings.base_port + slot.offset for slot in cores]
    if settings.node_generation == "2.1":
        ports += [settings.stream_base_port + slot.offset for slot in cores]
    return sorted(ports)


def _rendered_sha256(home: Home, host: Host) -> str | None:
    """Return the SHA-256 of the config apply would push to host now, or None when it cannot be rendered."""
    from .configview import rendered_for

    try:
        return hashlib.sha256(rendered_for(home, host.name)[1].encode("utf-8")).hexdigest()
    except QuilClusterError:
        return None


def _control_config_error(settings: Settings, slots: list) -> str | None:
    """Return why the control host's config.yml cannot be read or rendered, or None when it can.

    Without an assignment only reading is checked, because rendering needs the slots.
    """
    try:
        if slots:
            render(settings, slots)
        else:
            read_control_config(settings)
    except ConfigError as err:
        return str(err)
    return None


def _worker_memory(settings: Settings) -> int:
    try:
        return worker_memory(read_control_config(settings))
    except QuilClusterError:
        return DEFAULT_WORKER_MEMORY


def _unreachable(host: Host, error: CallError) -> Finding:
    return Finding(host.name, checks.AGENT, f"the agent at {host.agent} did not answer ({error.reason})",
                   "check that the agent runs there (systemctl status quil-agent) and that this machine reaches "
                   f"{host.agent}; quil-coord verify and status show the same")


def _exit_code(report: DoctorReport) -> ExitCode:
    if report.unreachable:
        return ExitCode.UNREACHABLE
    return ExitCode.HOST_FAILED if report.findings else ExitCode.OK


def render_text(report: DoctorReport) -> str:
    """Format one line per finding (host, check, problem, fix), then a summary line."""
    lines = [f"{f.host}: {f.check}: {f.problem}; fix: {f.fix}" for f in report.findings]
    problems = len(report.findings) - len(report.unreachable)
    summary = (f"{len(report.hosts)} hosts checked, {problems} problem{'' if problems == 1 else 's'}, "
               f"{len(report.unreachable)} unreachable")
    lines.append(summary + ("; ok" if report.exit_code == ExitCode.OK else ""))
    return "\n".join(lines)


def render_json(report: DoctorReport) -> str:
    return json.dumps({"ok": report.exit_code == ExitCode.OK, "hosts": report.hosts, "checks": list(checks.CHECKS),
                       "findings": [asdict(f) for f in report.findings], "unreachable": report.unreachable},
                      indent=2)
