"""Hosts of the cluster and the checks every change to them passes."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..common.errors import ConfigError, InventoryError
from ..common.yamlio import reject_unknown_keys as _reject_unknown_keys

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
_DNS = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
# Workers on one host; more than this is almost certainly a typo.
MAX_WORKERS_PER_HOST = 4096


@dataclass
class Host:
    name: str
    # IP address the host's data workers bind.
    address: str
    # HOST:PORT of the host's agent.
    agent: str
    control: bool = False
    # Fixed worker count, or None to derive it from cpus - reserve.
    workers: int | None = None
    # CPUs kept free for the host (and the control process); None: 1 on the control host, else 0.
    reserve: int | None = None
    # Logical CPUs; None: ask the agent.
    cpus: int | None = None
    # Serial number (hex) of the agent certificate issued to the host, revoked when it is removed.
    serial: str | None = None
    # Unix time when that certificate expires; renewal starts at about two thirds of its lifetime.
    cert_not_after: float | None = None
    # A host that runs no node processes and only probes ports for quil-coord verify.
    probe_only: bool = False
    # Firewall the agent manages for the host's worker ports: off, nftables or ufw.
    firewall: str = "off"
    # CPUs counted for a derived worker count: logical (threads) or physical (cores).
    cpu_basis: str = "logical"

    def assignment_fields(self) -> dict[str, Any]:
        """Return the fields an assignment depends on; certificate renewals leave them unchanged."""
        return {k: v for k, v in self.to_dict().items() if k not in ("serial", "cert_not_after")}

    def to_dict(self) -> dict[str, Any]:
        defaults = {"probe_only": False, "firewall": "off", "cpu_basis": "logical"}
        return {k: v for k, v in asdict(self).items() if v is not None and defaults.get(k, object()) != v}

    def worker_count(self, cpus: int | None) -> int:
        """Number of workers: the fixed count, or the CPUs left after the reserve."""
        return self.sizing(cpus, None, 0)[0]

    def sizing(self, cpus: int | None, memory_bytes: int | None, worker_memory: int) -> tuple[int, str]:
        """Return the worker count and how it was chosen.

        A derived count is the CPUs (--cpus, else the agent's count on the host's
        CPU basis) minus the reserve, capped so that count x worker_memory leaves
        MEMORY_HEADROOM of the host's memory free when the memory is known.
        """
        if self.workers is not None:
            return self.workers, f"{self.workers} set with --workers"
        reserve = self.reserve
        if reserve is None:
            reserve = 1 if self.control else 0
        if cpus is None:
            raise InventoryError(f"host {self.name}: CPU count unknown; set it with --cpus or --workers")
        # A count reported by an agent is capped like --cpus, so a bogus report cannot exhaust memory.
        if not 1 <= cpus <= MAX_WORKERS_PER_HOST:
            raise InventoryError(f"host {self.name}: CPU count {cpus} is outside 1-{MAX_WORKERS_PER_HOST}; pass --workers")
        count = cpus - reserve
        if count < 1:
            raise InventoryError(
                f"host {self.name}: {cpus} CPUs minus reserve {reserve} leaves no worker; lower --reserve"
            )
        reason = f"{cpus} {self.cpu_basis} CPUs - reserve {reserve}"
        if memory_bytes and worker_memory:
            fit = (memory_bytes - MEMORY_HEADROOM) // worker_memory
            if fit < 1:
                raise InventoryError(f"host {self.name}: {_gib(memory_bytes)} of memory leaves no room for one "
                                     f"worker of {_gib(worker_memory)} plus {_gib(MEMORY_HEADROOM)} free; "
                                     "lower engine.dataWorkerMemoryLimit or pass --workers")
            if fit < count:
                count = int(fit)
                reason += (f", capped to {count} so {count} x {_gib(worker_memory)} leaves "
                           f"{_gib(MEMORY_HEADROOM)} of {_gib(memory_bytes)} free")
        return count, reason


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InventoryError(
            f"invalid host name '{name}': use letters, digits, '.', '_' or '-' (at most 63 characters)"
        )
    return name


def check_address(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as err:
        raise InventoryError(f"invalid --address '{address}': not an IP address") from err
    if ip.is_unspecified or ip.is_multicast:
        raise InventoryError(f"invalid --address '{address}': workers need the host's concrete unicast address")
    return str(ip)


def check_agent(agent: str) -> str:
    """Validate HOST:PORT (IPv6 in brackets); the host must be a concrete address or a DNS name."""
    host, _, port = agent.rpartition(":")
    if not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InventoryError(f"invalid --agent '{agent}': use HOST:PORT with a port from 1 to 65535")
    bracketed = host.startswith("[") and host.endswith("]")
    if ":" in host and not bracketed:
        raise InventoryError(f"invalid --agent '{agent}': write an IPv6 address in brackets, [ADDR]:PORT")
    bare = host[1:-1] if bracketed else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        if not _DNS.match(bare):
            raise InventoryError(f"invalid --agent '{agent}': '{bare}' is neither an IP address nor a DNS name") from None
        return agent
    if address.is_unspecified or address.is_multicast:
        raise InventoryError(f"invalid --agent '{agent}': the coordinator must dial a concrete address")
    return agent


def check_counts(workers: int | None, reserve: int | None, cpus: int | None) -> None:
    if workers is not None and reserve is not None:
        raise InventoryError("give either --workers or --reserve, not both")
    if workers is not None and not 1 <= workers <= MAX_WORKERS_PER_HOST:
        raise InventoryError(f"invalid worker count {workers}: use 1 to {MAX_WORKERS_PER_HOST}")
    if reserve is not None and reserve < 0:
        raise InventoryError(f"invalid --reserve {reserve}: use 0 or more")
    if cpus is not None and not 1 <= cpus <= MAX_WORKERS_PER_HOST:
        raise InventoryError(f"invalid --cpus {cpus}: use 1 to {MAX_WORKERS_PER_HOST}")


def check_unique(hosts: list[Host]) -> None:
    """Raise InventoryError when two hosts share a name, worker address or agent endpoint, or two are control."""
    for field in ("name", "address", "agent"):
        seen: dict[str, str] = {}
        for host in hosts:
            value = getattr(host, field)
            if value in seen:
                raise InventoryError(
                    f"{field} {value} is already used by host {seen[value]}; give host {host.name} its own"
                )
            seen[value] = host.name
    controls = [h.name for h in hosts if h.control]
    if len(controls) > 1:
        raise InventoryError(
            f"hosts {' and '.join(controls)} are both marked control; a cluster has one control process"
        )


_OPTIONAL_INTS = ("workers", "reserve", "cpus")
# Memory left free on a host after its workers' memory limits (bytes).
MEMORY_HEADROOM = 2 * 1024**3
FIREWALL_MODES = ("off", "nftables", "ufw")


def from_dicts(rows: Any, source: str) -> list[Host]:
    """Build hosts from hosts.yaml rows, checking every field as host add would."""
    if not isinstance(rows, list):
        raise InventoryError(f"{source}: 'hosts' must be a list")
    hosts = [_host_from_row(row, f"{source}: host entry {index + 1}") for index, row in enumerate(rows)]
    check_unique(hosts)
    return hosts


def reject_unknown_keys(row: dict, known: list[str], where: str) -> None:
    try:
        _reject_unknown_keys(row, known, where)
    except ConfigError as err:
        raise InventoryError(str(err)) from None


def _host_from_row(row: Any, where: str) -> Host:
    if not isinstance(row, dict):
        raise InventoryError(f"{where}: expected a mapping of host fields")
    reject_unknown_keys(row, [f.name for f in fields(Host)], where)
    for key in ("name", "address", "agent"):
        if not isinstance(row.get(key), str):
            raise InventoryError(f"{where}: '{key}' must be a string")
    for key in ("control", "probe_only"):
        if not isinstance(row.get(key, False), bool):
            raise InventoryError(f"{where}: '{key}' must be true or false")
    if row.get("cpu_basis", "logical") not in ("logical", "physical"):
        raise InventoryError(f"{where}: cpu_basis '{row.get('cpu_basis')}' is not logical or physical")
    if row.get("firewall", "off") not in FIREWALL_MODES:
        raise InventoryError(f"{where}: firewall '{row.get('firewall')}' is not one of {', '.join(FIREWALL_MODES)}")
    for key in _OPTIONAL_INTS:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InventoryError(f"{where}: '{key}' must be a whole number")
    host = Host(**row)
    try:
        check_name(host.name)
        host.address = check_address(host.address)
        check_agent(host.agent)
        check_counts(host.workers, host.reserve, host.cpus)
    except InventoryError as err:
        raise InventoryError(f"{where}: {err}") from None
    return host


def _gib(value: int) -> str:
    return f"{value / 1024**3:.1f} GiB"
