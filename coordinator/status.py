"""Collect every host's process table; hosts that do not respond are kept as unreachable."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc
import yaml

from ..common.errors import QuilClusterError
from ..common.exitcodes import ExitCode
from ..common.states import State
from ..proto import agent_pb2 as pb
from .client import CALL_TIMEOUT, Credentials, call_error, for_each_host
from .home import Home
from .inventory import Host

_STATE_NAMES = {pb.ProcessState.Value(f"PROCESS_STATE_{s.name}"): s.value for s in State}


@dataclass
class HostStatus:
    name: str
    address: str
    agent: str
    reachable: bool
    expected_cores: list[int]
    processes: list[dict] = field(default_factory=list)
    config_generation: int = 0
    cert_expires_in_days: float | None = None
    node_version: str = ""
    # config.yml on the host differs from what the last apply wrote there.
    drifted: bool = False
    # Dotted keys whose values differ from the rendered config (values are never shown).
    drifted_keys: list[str] = field(default_factory=list)
    error: str = ""
    exit_code: ExitCode = ExitCode.OK


def collect(home: Home) -> list[HostStatus]:
    with home.locked():
        hosts = home.load_hosts()
        assignment = home.load_assignment()
    slots = assignment.slots if assignment else []
    expected = {h.name: sorted(s.core for s in slots if s.host == h.name) for h in hosts}
    credentials = Credentials(home)
    results = for_each_host(hosts, lambda h: _host_status(credentials, h, expected[h.name]))
    drifted = [h for h in hosts if results[h.name].drifted]
    if drifted:
        _explain_drift(home, credentials, drifted, results)
    return [results[h.name] for h in hosts]


def _explain_drift(home: Home, credentials: Credentials, hosts: list[Host], results: dict[str, HostStatus]) -> None:
    """Fill in drifted_keys from each drifted host's file and the config apply would write."""
    from .configview import rendered_for

    for host in hosts:
        try:
            expected = yaml.safe_load(rendered_for(home, host.name)[1])
            channel, stub = credentials.stub(host)
            try:
                current = yaml.safe_load(stub.GetConfig(pb.GetConfigRequest(), timeout=CALL_TIMEOUT).config_yaml)
            finally:
                channel.close()
        except (QuilClusterError, grpc.RpcError, yaml.YAMLError):
            continue  # the mark stays; only the list of keys is missing
        results[host.name].drifted_keys = differing_keys(current, expected)


def differing_keys(current, expected, prefix: str = "") -> list[str]:
    """Dotted paths where two parsed configs differ, without their values."""
    if isinstance(current, dict) and isinstance(expected, dict):
        keys = list(expected) + [k for k in current if k not in expected]
        return [path for key in keys
                for path in differing_keys(current.get(key), expected.get(key), f"{prefix}{key}.")]
    return [] if current == expected else [prefix.rstrip(".") or "(whole file)"]


def _host_status(credentials: Credentials, host: Host, expected: list[int]) -> HostStatus:
    status = HostStatus(host.name, host.address, host.agent, reachable=False, expected_cores=expected)
    channel, stub = credentials.stub(host)
    try:
        reply = stub.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        failure = call_error(err)
        status.error, status.exit_code = failure.reason, failure.exit_code
        return status
    finally:
        channel.close()
    status.reachable = True
    status.config_generation = reply.config_generation
    now = time.time()
    if reply.cert_not_after:
        status.cert_expires_in_days = round((reply.cert_not_after - now) / 86400, 2)
    status.node_version = reply.node_version
    status.drifted = bool(reply.config_sha256) and reply.config_file_sha256 != reply.config_sha256
    status.processes = [_process(p, now) for p in reply.processes]
    return status


def _process(p: pb.ProcessStatus, now: float) -> dict:
    return {
        "core": p.core,
        "pid": p.pid,
        "state": _STATE_NAMES.get(p.state, "unknown"),
        "restarts": p.restarts,
        "uptime_seconds": round(now - p.start_time, 1) if p.start_time else 0.0,
        "listen_address": p.listen_address,
        "listening": p.listening,
        "last_exit_status": p.last_exit_status if p.has_last_exit else None,
        "cpu_percent": round(p.cpu_percent, 1),
        "rss_bytes": p.rss_bytes,
        "detail": p.detail,
        # Stopped by quil-coord stop and kept stopped until quil-coord start or restart.
        "held": p.held,
    }


def unhealthy(host: HostStatus) -> bool:
    """Return whether a reachable host lacks a running process for one of its assigned cores.

    A core held by quil-coord stop was stopped on purpose, so it does not count.
    """
    states = {p["core"]: p["state"] for p in host.processes}
    held = {p["core"] for p in host.processes if p.get("held")}
    return host.reachable and any(states.get(core) not in ("running", "starting")
                                  for core in host.expected_cores if core not in held)
