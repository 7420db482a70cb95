"""Core index assignment: which host runs `--core N` and on which port.

Rules (node runners' cluster guide, and what the node requires):
  * cores are 1..N without gaps; entry N-1 of the worker list is core N;
  * exactly one host runs the control process;
  * stable: existing cores keep their index and address; a new host or a
    grown host gets new cores appended at the end. Removing a host or
    shrinking one leaves gaps, which the highest cores fill: the fewest
    cores change index, and the plan reports each of them as moved.
Port schemes: 'per-host' counts each host's ports from the base port;
'global' gives core N the port base + N - 1 across the whole cluster.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from ..common.errors import InventoryError
from .inventory import Host

PORT_SCHEMES = ("per-host", "global")


@dataclass(frozen=True)
class Slot:
    core: int
    host: str
    address: str
    # Port offset from the base port(s); the same offset serves 2.1's P2P and stream ports.
    offset: int


@dataclass(frozen=True)
class Ports:
    scheme: str
    # 1.4/2.0 worker port base; for 2.1 the P2P base.
    base: int
    # 2.1 only: base of the stream ports (0 for 1.4/2.0).
    stream_base: int = 0


@dataclass
class Plan:
    slots: list[Slot]
    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    # Cores whose host, address or port changed.
    moved: list[int] = field(default_factory=list)
    # Host name -> how its worker count was chosen.
    sizing: dict[str, str] = field(default_factory=dict)
    # Moved core -> the host it ran on before.
    moved_from: dict[int, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.moved)


def assign(hosts: list[Host], counts: dict[str, int], previous: list[Slot], ports: Ports) -> Plan:
    """Compute the assignment for hosts with the given worker counts, keeping previous where possible."""
    _check_hosts(hosts, counts, ports)
    kept = _keep_previous(hosts, counts, previous)
    slots = _renumber(kept)
    slots = _append_new(hosts, counts, slots, ports)
    slots = _place_ports(slots, ports)
    _check_ports(slots, ports)
    return _diff(previous, slots)


def _check_hosts(hosts: list[Host], counts: dict[str, int], ports: Ports) -> None:
    if not hosts:
        raise InventoryError("no hosts in the inventory; add them with quil-coord host add")
    if not any(h.control for h in hosts):
        raise InventoryError("no control host; mark one with quil-coord host set NAME --control")
    if ports.scheme not in PORT_SCHEMES:
        raise InventoryError(f"unknown port scheme '{ports.scheme}'; use per-host or global")
    for host in hosts:
        if counts.get(host.name, 0) < 1:
            raise InventoryError(f"host {host.name}: worker count must be at least 1")


def _keep_previous(hosts: list[Host], counts: dict[str, int], previous: list[Slot]) -> list[Slot]:
    by_name = {h.name: h for h in hosts}
    used: Counter[str] = Counter()
    kept = []
    for slot in sorted(previous, key=lambda s: s.core):
        host = by_name.get(slot.host)
        if host is None or used[host.name] >= counts[host.name]:
            continue
        used[host.name] += 1
        kept.append(Slot(slot.core, host.name, host.address, slot.offset))
    return kept


def _renumber(kept: list[Slot]) -> list[Slot]:
    """Close the gaps in 1..len(kept) with the cores numbered above it, lowest gap first."""
    count = len(kept)
    gaps = sorted(set(range(1, count + 1)) - {s.core for s in kept})
    movers = sorted((s for s in kept if s.core > count), key=lambda s: s.core)
    moved = {s.core: gap for s, gap in zip(movers, gaps)}
    renumbered = [Slot(moved.get(s.core, s.core), s.host, s.address, s.offset) for s in kept]
    return sorted(renumbered, key=lambda s: s.core)


def _append_new(hosts: list[Host], counts: dict[str, int], slots: list[Slot], ports: Ports) -> list[Slot]:
    have = Counter(s.host for s in slots)
    # The control host comes first in a fresh cluster, as in the node runners' guide.
    ordered = sorted(hosts, key=lambda h: not h.control)
    result = list(slots)
    for host in ordered:
        for _ in range(counts[host.name] - have[host.name]):
            result.append(Slot(len(result) + 1, host.name, host.address, -1))
    return result


def _place_ports(slots: list[Slot], ports: Ports) -> list[Slot]:
    if ports.scheme == "global":
        return [Slot(s.core, s.host, s.address, s.core - 1) for s in slots]
    taken: dict[str, set[int]] = defaultdict(set)
    for slot in slots:
        if slot.offset >= 0:
            taken[slot.host].add(slot.offset)
    placed = []
    for slot in slots:
        offset = slot.offset
        if offset < 0:
            offset = next(i for i in range(len(slots) + 1) if i not in taken[slot.host])
            taken[slot.host].add(offset)
        placed.append(Slot(slot.core, slot.host, slot.address, offset))
    return placed


def _check_ports(slots: list[Slot], ports: Ports) -> None:
    seen: dict[tuple[str, int], int] = {}
    for slot in slots:
        for base in (ports.base, ports.stream_base):
            if not base:
                continue
            port = base + slot.offset
            if port > 65535:
                raise InventoryError(
                    f"core {slot.core} on host {slot.host} would use port {port}; lower the base port {base}"
                )
            key = (slot.address, port)
            if key in seen:
                raise InventoryError(
                    f"cores {seen[key]} and {slot.core} would both bind {slot.address}:{port};"
                    " move the 2.1 P2P and stream base ports further apart"
                )
            seen[key] = slot.core


def _diff(previous: list[Slot], slots: list[Slot]) -> Plan:
    before = {s.core: s for s in previous}
    after = {s.core: s for s in slots}
    moved = sorted(c for c in set(before) & set(after) if before[c] != after[c])
    return Plan(
        slots=slots,
        added=sorted(set(after) - set(before)),
        removed=sorted(set(before) - set(after)),
        moved=moved,
        moved_from={core: before[core].host for core in moved},
    )


def slots_to_rows(slots: list[Slot]) -> list[dict]:
    return [asdict(s) for s in slots]


def slots_from_rows(rows: list[dict]) -> list[Slot]:
    return [Slot(**row) for row in rows]
