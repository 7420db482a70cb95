"""The checks behind quil-coord doctor: each takes facts one host reported and returns a finding or None.

The checks are pure functions of their arguments, so a unit test can make
each one fire. doctor.py collects the facts and calls them.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import NamedTuple

from ..common import portlist
from ..common.errors import ConfigError
from .inventory import MEMORY_HEADROOM

# Clock difference from the coordinator that counts as a problem, in seconds,
# after the half round trip of the call is allowed for. Each machine checks the
# validity period of the TLS certificates the coordinator issues against its own clock.
MAX_CLOCK_SKEW = 1.0

CLOCK = "clock"
EPHEMERAL = "ephemeral-ports"
ADDRESS = "worker-address"
DRIFT = "config-drift"
VERSION = "node-version"
SIGNATURE = "signature-files"
MEMORY = "memory"
GOMAXPROCS = "gomaxprocs"
AGENT = "agent"
CONTROL_CONFIG = "control-config"
PROCESS_STATE = "process-state"
# Every check doctor runs, in the order of its output.
CHECKS = (AGENT, CONTROL_CONFIG, CLOCK, PROCESS_STATE, ADDRESS, EPHEMERAL, DRIFT, VERSION, SIGNATURE, MEMORY,
          GOMAXPROCS)


@dataclass(frozen=True)
class Finding:
    host: str
    check: str
    problem: str
    fix: str


class ProcessFacts(NamedTuple):
    """One node process as the agent's GetStatus reports it; state is the lower-case state name."""

    core: int
    state: str
    restarts: int
    detail: str


def check_processes(host: str, processes: list[ProcessFacts]) -> list[Finding]:
    """Find node processes that crash: each one in fatal, and each one in backoff."""
    found = []
    for process in processes:
        name = "the control process (core 0)" if process.core == 0 else f"worker core {process.core}"
        logs = f"quil-coord logs {host} --core {process.core} shows its output"
        if process.state == "fatal":
            found.append(Finding(
                host, PROCESS_STATE,
                f"{name} is fatal, so the agent no longer restarts it: {process.detail or 'no detail reported'}",
                f"{logs}; fix the cause, then run quil-coord restart {host} --core {process.core}",
            ))
        elif process.state == "backoff":
            found.append(Finding(
                host, PROCESS_STATE,
                f"{name} is in backoff after a failure, with {process.restarts} restarts so far: "
                f"{process.detail or 'no detail reported'}",
                f"{logs}; the agent keeps retrying and marks it fatal when it fails too often in a row",
            ))
    return found


def check_clock(host: str, agent_time: float, sent: float, received: float,
                limit: float = MAX_CLOCK_SKEW) -> Finding | None:
    """Compare the agent's clock with the coordinator's, taking the reply as sent halfway through the call."""
    offset = agent_time - (sent + received) / 2
    uncertainty = (received - sent) / 2
    if abs(offset) - uncertainty <= limit:
        return None
    direction = "ahead of" if offset > 0 else "behind"
    return Finding(
        host, CLOCK,
        f"the host's clock is {abs(offset):.1f} s {direction} this machine's (measured to within "
        f"{uncertainty:.2f} s; the limit is {limit:.0f} s), so the TLS certificates the coordinator issues "
        "can be taken as not yet valid or expired",
        "turn on time synchronization on both machines (timedatectl set-ntp true, or install chrony) and "
        "wait until timedatectl shows 'System clock synchronized: yes'",
    )


def check_ephemeral(host: str, ports: list[int], low: int, high: int, reserved_text: str) -> Finding | None:
    """Find worker ports inside the kernel's ephemeral range that are not reserved; low 0 means unknown."""
    if not low or not ports:
        return None
    try:
        reserved = portlist.parse(reserved_text)
    except ConfigError:
        reserved = set()
    inside = [p for p in ports if low <= p <= high and p not in reserved]
    if not inside:
        return None
    span = portlist.format_ranges(inside)
    # The sysctl replaces the whole list, so the new value keeps what is reserved already.
    value = portlist.format_ranges(reserved | set(inside))
    return Finding(
        host, EPHEMERAL,
        f"worker ports {span} are inside the ephemeral port range {low}-{high}, so an outgoing connection "
        "can take one and the worker then fails to bind it ('address already in use') after a restart",
        f"reserve them on the host: sysctl -w net.ipv4.ip_local_reserved_ports={value}, and put "
        f"net.ipv4.ip_local_reserved_ports = {value} in /etc/sysctl.d/90-quil-cluster.conf so it survives a reboot",
    )


def is_local(address: str, interface_addresses: list[str]) -> bool:
    """Tell whether address can be bound on a host with these interface addresses.

    Linux treats all of 127.0.0.0/8 as local once loopback is up, so any
    127.x address counts when one is present.
    """
    try:
        expected = ipaddress.ip_address(address)
        present = {ipaddress.ip_address(a) for a in interface_addresses}
    except ValueError:
        return False
    if expected in present:
        return True
    return expected.version == 4 and expected.is_loopback and any(a.version == 4 and a.is_loopback for a in present)


def check_address(host: str, planned: str, agent_address: str, interface_addresses: list[str]) -> Finding | None:
    """Check that the agent binds the planned worker address and that the host has it on an interface."""
    if agent_address and agent_address != planned:
        return Finding(
            host, ADDRESS,
            f"the agent's worker_address is {agent_address} but the inventory plans {planned}, so apply refuses "
            "this host",
            f"set worker_address: {planned} in the host's agent.yaml and restart the agent, or change the plan "
            f"with quil-coord host set {host} --address {agent_address}, then quil-coord assign and apply",
        )
    if is_local(planned, interface_addresses):
        return None
    found = ", ".join(interface_addresses) or "none"
    return Finding(
        host, ADDRESS,
        f"the planned worker address {planned} is on no interface of the host (it has {found}), so its "
        "workers cannot bind it; a VPN such as Tailscale or WireGuard that is not up yet looks like this",
        "bring the interface up (tailscale up, or wg-quick up wg0) and check it with ip -brief address; if the "
        f"address changed for good, run quil-coord host set {host} --address NEW, then quil-coord assign and apply",
    )


def check_drift(host: str, rendered: str | None, applied: str, on_disk: str) -> Finding | None:
    """Compare the SHA-256 of the host's config.yml with what apply would write now and what it wrote last.

    rendered is None when the coordinator cannot render the config now (no
    assignment yet); then only an edit after the last apply is found.
    """
    diff = f"quil-coord config show --host {host} --diff shows the difference"
    if rendered is not None and on_disk == rendered:
        return None
    if not on_disk:
        if rendered is None and not applied:
            return None
        return Finding(host, DRIFT, "the host has no config.yml yet", "run quil-coord apply")
    if applied and on_disk != applied:
        return Finding(
            host, DRIFT, "config.yml was edited on the host after the last apply, so its workers may bind "
            "other addresses than the rest of the cluster expects",
            f"{diff}; quil-coord apply restores the canonical file (make a wanted change in the control "
            "host's config.yml instead)",
        )
    if rendered is None:
        return None
    return Finding(
        host, DRIFT, "config.yml differs from what apply would push now (the inventory, the assignment or the "
        "control host's config.yml changed since the last apply)", f"{diff}; quil-coord apply pushes it",
    )


def check_control_config(host: str, path: str, error: str | None) -> Finding | None:
    """Report a control host's config.yml that cannot be read or rendered; error is the ConfigError text."""
    if error is None:
        return None
    return Finding(
        host, CONTROL_CONFIG,
        f"the control host's node config cannot be used ({error}), so apply rejects it and the config-drift "
        "check cannot tell whether the hosts' config.yml files are current",
        f"correct {path} where the error points, check it with quil-coord config show, then run quil-coord apply",
    )


def check_versions(versions: dict[str, str], control: str | None) -> list[Finding]:
    """Find hosts whose node release differs from the control host's (or, without one, the most common)."""
    known = {name: version for name, version in versions.items() if version}
    if len(set(known.values())) <= 1:
        return []
    reference = known.get(control or "") or Counter(known.values()).most_common(1)[0][0]
    return [
        Finding(
            name, VERSION,
            f"the host runs node release {version}, the control host runs {reference}; mixed releases can "
            "disagree on the config keys and the protocol",
            "run one release on every host: install it with its .dgst files, point node_binary in each "
            "agent.yaml at it and restart the agent (docs/upgrade.md has the steps)",
        )
        for name, version in sorted(known.items()) if version != reference
    ]


def check_signatures(host: str, binary: str, files: list[str], disabled: bool) -> Finding | None:
    """Find a missing NAME.dgst or NAME.dgst.sig.N next to the node binary, unless the check is off."""
    if disabled:
        return None
    path = PurePosixPath(binary)
    missing = []
    if not any(f.endswith(".dgst") for f in files):
        missing.append(f"{path.name}.dgst")
    if not any(".dgst.sig." in f for f in files):
        missing.append(f"{path.name}.dgst.sig.N")
    if not missing:
        return None
    return Finding(
        host, SIGNATURE,
        f"{' and '.join(missing)} missing in {path.parent} (next to the file the binary path resolves to); with "
        "the signature check on, every node process exits at start ('Digest file not found' or 'Quorum on "
        "signatures not met')",
        f"download the .dgst and .dgst.sig.N files of the same release into {path.parent}; only for a binary "
        "built from source, add --signature-check=false to node_args in agent.yaml instead",
    )


def check_memory(host: str, workers: int, memory_bytes: int, per_worker: int) -> Finding | None:
    """Find a host whose workers' memory limits plus 2 GiB free exceed its memory."""
    need = workers * per_worker + MEMORY_HEADROOM
    if not workers or not memory_bytes or memory_bytes >= need:
        return None
    fit = max(0, (memory_bytes - MEMORY_HEADROOM) // per_worker)
    lower = (f"quil-coord host set {host} --workers {fit}, then quil-coord assign and apply" if fit
             else "add memory to the host or remove it from the cluster")
    return Finding(
        host, MEMORY,
        f"{workers} workers with a memory limit of {_gib(per_worker)} each need {_gib(need)} with 2 GiB left "
        f"free, but the host has {_gib(memory_bytes)}; workers will be killed when memory runs out",
        f"{lower}; or lower engine.dataWorkerMemoryLimit in the control host's config.yml",
    )


def check_gomaxprocs(host: str, value: str, cpus: int) -> Finding | None:
    """Find a GOMAXPROCS in the workers' environment that is not a whole number or exceeds the CPUs."""
    if not value:
        return None
    fix = "remove GOMAXPROCS from node_env in the host's agent.yaml (the node sizes itself) and restart the agent"
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        return Finding(host, GOMAXPROCS, f"GOMAXPROCS={value} in the workers' environment is not a positive "
                       "whole number, so Go ignores it", fix)
    if not cpus or int(value) <= cpus:
        return None
    return Finding(
        host, GOMAXPROCS,
        f"GOMAXPROCS={value} in the workers' environment is above the host's {cpus} CPUs: the node exits with "
        "'GOMAXPROCS is set higher than the number of available CPUs.' when it sizes its own workers, and "
        "oversubscribed workers fall behind on proofs",
        fix,
    )


def _gib(value: int) -> str:
    return f"{value / 1024**3:.1f} GiB"
