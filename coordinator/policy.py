"""Expected exposure of every port class, from the node generation and the cluster settings.

Defaults (the node's own behaviour decides them):
  1.4 / 2.0 worker ports   private: the worker serves plain gRPC with no
                           authentication, so only the control host may reach it
  2.1 worker P2P ports     public: the worker blocks until a bootstrap peer can
                           dial it back, and other peers connect to it
  2.1 worker stream ports  private: the control process dials them; peers use
                           the addresses the control process announces instead
A cluster overrides a class with `exposure: {CLASS: public|private}` in cluster.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common.errors import ConfigError, InventoryError
from ..common.firewall import HostPolicy, PortRule
from .assign import Slot
from .home import Settings
from .inventory import Host

CLASSES = ("worker", "p2p", "stream")
EXPOSURES = ("public", "private")
_DEFAULTS = {"1.4": {"worker": "private"}, "2.0": {"worker": "private"},
             "2.1": {"p2p": "public", "stream": "private"}}
_LABELS = {"worker": "worker ports", "p2p": "worker P2P ports", "stream": "worker stream ports"}


@dataclass(frozen=True)
class Target:
    host: str
    core: int
    port_class: str
    address: str
    port: int
    exposure: str

    @property
    def label(self) -> str:
        return f"{self.host} core {self.core} {self.address}:{self.port} ({self.port_class}, {self.exposure})"


def exposures(settings: Settings) -> dict[str, str]:
    """Port class -> exposure for this cluster, defaults overlaid with the settings."""
    result = dict(_DEFAULTS[settings.node_generation])
    for port_class, exposure in (settings.exposure or {}).items():
        if port_class not in result:
            raise ConfigError(f"cluster.yaml: exposure for '{port_class}' does not exist in node "
                              f"{settings.node_generation}; use {', '.join(result)}")
        if exposure not in EXPOSURES:
            raise ConfigError(f"cluster.yaml: exposure '{exposure}' for {port_class}; use public or private")
        result[port_class] = exposure
    return result


def targets(settings: Settings, slots: list[Slot]) -> list[Target]:
    """List every worker port of the assignment with its class and expected exposure."""
    classes = exposures(settings)
    found = []
    for slot in sorted(slots, key=lambda s: s.core):
        ports = {"worker": settings.base_port + slot.offset} if settings.node_generation != "2.1" else {
            "p2p": settings.base_port + slot.offset, "stream": settings.stream_base_port + slot.offset}
        for port_class, port in ports.items():
            found.append(Target(slot.host, slot.core, port_class, slot.address, port, classes[port_class]))
    return found


def expected(target: Target, source: Host, control: Host) -> str | None:
    """What a probe from source should see: 'open', 'blocked', or None when not probed (same host)."""
    if source.name == target.host:
        return None
    if target.exposure == "public" or source.name == control.name:
        return "open"
    return "blocked"


def host_policy(settings: Settings, hosts: list[Host], slots: list[Slot], host: Host) -> HostPolicy:
    """Build the firewall policy of one host: private classes open to the control host only."""
    control = next((h for h in hosts if h.control), None)
    if control is None:
        raise InventoryError("no control host, so no host may reach private worker ports; "
                             "mark one with quil-coord host set NAME --control")
    by_class: dict[str, list[int]] = {}
    exposure_of: dict[str, str] = {}
    for target in targets(settings, [s for s in slots if s.host == host.name]):
        by_class.setdefault(target.port_class, []).append(target.port)
        exposure_of[target.port_class] = target.exposure
    rules = []
    for port_class, ports in sorted(by_class.items()):
        sources = (control.address,) if exposure_of[port_class] == "private" else ()
        label = f"{settings.node_generation} {_LABELS[port_class]}"
        rules.append(PortRule(ports=tuple(sorted(ports)), sources=sources, purpose=label))
    return HostPolicy(host=host.name, address=host.address, rules=tuple(rules))
