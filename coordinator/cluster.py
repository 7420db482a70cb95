"""Cluster operations behind the commands: init, host changes and assign."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..common import nodeconfig, pki
from ..common.errors import InventoryError, StateError
from . import inventory
from .assign import Plan, assign
from .bundle import write_bundle
from .home import DEFAULT_BASE_PORT, Assignment, Home, Settings
from .inventory import Host
from .render import read_control_config

log = logging.getLogger(__name__)

FACTS_OF = Callable[[list[Host], set[str]], dict]


def detect_generation(config: nodeconfig.NodeConfig) -> str:
    """Guess the node generation from the keys a node writes: 2.1 has P2P worker ports, 2.0 a worker count."""
    engine = config.data.get("engine")
    if not isinstance(engine, dict):
        return "1.4"
    if "dataWorkerP2PMultiaddrs" in engine or "dataWorkerBaseP2PPort" in engine:
        return "2.1"
    if "dataWorkerCount" in engine:
        return "2.0"
    return "1.4"


def init(home: Home, control_config: Path, *, name: str, generation: str | None, port_scheme: str,
         base_port: int | None, stream_base_port: int | None, local: bool = False,
         auto_apply: bool = True, firewall: str = "off") -> Settings:
    """Create the state directory: settings, cluster CA and the coordinator's certificate."""
    if home.file("cluster.yaml").exists():
        raise StateError(f"{home.path} is already initialized; use another --home for a new cluster")
    try:
        inventory.check_name(name)
    except InventoryError:
        raise InventoryError(f"invalid cluster name '{name}': use letters, digits, '.', '_' or '-' "
                             "(at most 63 characters)") from None
    settings = Settings(name=name, node_generation=generation or "1.4",
                        control_config=str(Path(control_config).resolve()), port_scheme=port_scheme,
                        local=local, auto_apply=auto_apply, firewall=firewall)
    config = read_control_config(settings)
    settings.node_generation = generation or detect_generation(config)
    config.worker_lists(settings.node_generation)  # rejects an engine section of the wrong shape
    nodeconfig.check_known_keys(config, settings.node_generation)
    settings.base_port = DEFAULT_BASE_PORT[settings.node_generation] if base_port is None else base_port
    if stream_base_port is not None:
        settings.stream_base_port = stream_base_port
    settings.validate("init")
    with home.locked():
        ca_key, ca_cert = pki.create_ca(name)
        key, cert = pki.issue(ca_key, ca_cert, pki.Identity(name, "coordinator", "coordinator"))
        pki.write_private(home.file("ca.key"), ca_key)
        pki.write_public(home.file("ca.crt"), ca_cert)
        pki.write_private(home.file("coordinator.key"), key)
        pki.write_public(home.file("coordinator.crt"), cert)
        home.save_settings(settings)
        home.save_hosts([])
        home.file("apply.lock").touch(mode=0o600)
    return settings


def add_host(home: Home, host: Host, bundle: Path, *, node_binary: str | None, node_config_dir: str | None,
             state_dir: str | None) -> Path:
    """Register a host and write its agent bundle; returns the bundle's agent.yaml."""
    _check_host(host)
    with home.locked():
        settings = home.load_settings()
        hosts = home.load_hosts()
        inventory.check_unique(hosts + [host])
        path, host.serial, host.cert_not_after = write_bundle(
            home, settings.name, host, bundle, days=settings.agent_cert_days, node_binary=node_binary,
            node_config_dir=node_config_dir, state_dir=state_dir)
        home.save_hosts(hosts + [host])
    return path


def rebundle_host(home: Home, name: str, bundle: Path, *, node_binary: str | None, node_config_dir: str | None,
                  state_dir: str | None) -> Path:
    """Write a fresh bundle for a recorded host (after import, or a changed address); revoke its old certificate."""
    with home.locked():
        settings = home.load_settings()
        hosts = home.load_hosts()
        host = _find(hosts, name)
        old_serial = host.serial
        path, host.serial, host.cert_not_after = write_bundle(
            home, settings.name, host, bundle, days=settings.agent_cert_days, node_binary=node_binary,
            node_config_dir=node_config_dir, state_dir=state_dir)
        if old_serial:
            home.revoke(old_serial)
        home.save_hosts(hosts)
    return path


def remove_host(home: Home, name: str) -> None:
    """Remove a host from the inventory and revoke its agent certificate."""
    with home.locked():
        hosts = home.load_hosts()
        host = _find(hosts, name)
        if host.serial:
            home.revoke(host.serial)
        home.save_hosts([h for h in hosts if h.name != name])


def set_host(home: Home, name: str, **changes: object) -> Host:
    """Change fields of a host; --workers and --reserve replace each other."""
    with home.locked():
        hosts = home.load_hosts()
        current = _find(hosts, name)
        values = {k: v for k, v in changes.items() if v is not None}
        # --workers and --reserve replace each other (the parser allows only one).
        if "workers" in values:
            values["reserve"] = None
        elif "reserve" in values:
            values["workers"] = None
        updated = replace(current, **values)
        _check_host(updated)
        hosts = [updated if h.name == name else h for h in hosts]
        inventory.check_unique(hosts)
        home.save_hosts(hosts)
        return updated


def run_assign(home: Home, facts_of: FACTS_OF, dry_run: bool) -> tuple[Plan, Assignment]:
    """Compute the assignment and record it unless dry_run; facts_of queries agents for CPUs and memory."""
    with home.locked():
        settings = home.load_settings()
        hosts = home.load_hosts()
        previous = home.load_assignment()
        workers = [h for h in hosts if not h.probe_only]
        sizing = worker_sizing(workers, facts_of, worker_memory(read_control_config(settings)))
        counts = {name: count for name, (count, _) in sizing.items()}
        plan = assign(workers, counts, previous.slots if previous else [], settings.ports())
        plan.sizing = {name: f"{count} workers: {reason}" for name, (count, reason) in sizing.items()}
        generation = previous.config_generation if previous else 0
        if plan.changed or previous is None:
            generation += 1
        recorded = Assignment(generation, plan.slots, [h.assignment_fields() for h in hosts])
        if not dry_run:
            home.save_assignment(recorded)
        return plan, recorded


def worker_sizing(hosts: list[Host], facts_of: FACTS_OF, memory_per_worker: int) -> dict[str, tuple[int, str]]:
    """Host name -> (worker count, how it was chosen); see Host.sizing."""
    derived = [h for h in hosts if h.workers is None]
    required = {h.name for h in derived if h.cpus is None}
    facts = facts_of(derived, required) if derived else {}
    sizing = {}
    for host in hosts:
        found = facts.get(host.name)
        cpus = host.cpus
        if cpus is None and found is not None:
            cpus = found.physical_cpus if host.cpu_basis == "physical" else found.logical_cpus
        sizing[host.name] = host.sizing(cpus, found.memory_bytes if found else None, memory_per_worker)
    return sizing


# Effective engine.dataWorkerMemoryLimit when the config leaves it 0 (1792 MiB, every generation).
DEFAULT_WORKER_MEMORY = 1879048192


def worker_memory(config) -> int:
    engine = config.data.get("engine")
    value = engine.get("dataWorkerMemoryLimit") if isinstance(engine, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else DEFAULT_WORKER_MEMORY


def _check_host(host: Host) -> None:
    inventory.check_name(host.name)
    host.address = inventory.check_address(host.address)
    inventory.check_agent(host.agent)
    inventory.check_counts(host.workers, host.reserve, host.cpus)
    if host.probe_only and (host.control or host.workers or host.reserve is not None):
        raise InventoryError(f"host {host.name}: a probe-only host runs no processes; drop --control, "
                             "--workers and --reserve")


def _find(hosts: list[Host], name: str) -> Host:
    for host in hosts:
        if host.name == name:
            return host
    known = ", ".join(h.name for h in hosts) or "none"
    raise InventoryError(f"unknown host '{name}'; known hosts: {known}")


def check_assignment_current(home: Home, assignment: Assignment | None, hosts: list[Host]) -> Assignment:
    """Raise unless an assignment exists and the inventory has not changed since it was made."""
    if assignment is None:
        raise InventoryError("no assignment recorded; run quil-coord assign first")
    if assignment.hosts != [h.assignment_fields() for h in hosts]:
        raise InventoryError("the inventory changed since the last assign; run quil-coord assign, then apply")
    return assignment
