"""quil-coord import: build the inventory and assignment from a hand-made cluster config.yml.

Hosts are grouped by the address of their list entries, and every core keeps
its index: entry N-1 stays core N on the host whose address it names. The
port scheme is global when every port is base + N - 1, else per-host with
each port kept as an offset from the base port.
"""

from __future__ import annotations

from collections import OrderedDict

from ..common import nodeconfig
from ..common.errors import InventoryError
from .assign import Slot
from .home import Assignment, Home
from .inventory import Host
from .render import read_control_config

DEFAULT_AGENT_PORT = 7350


def import_cluster(home: Home, control_address: str | None) -> list[Host]:
    """Record hosts and the assignment found in the control config; refuses when hosts exist already."""
    with home.locked():
        settings = home.load_settings()
        if home.load_hosts():
            raise InventoryError("the inventory already has hosts; import works on a fresh quil-coord init")
        config = read_control_config(settings)
        addresses = nodeconfig.worker_addresses(config, settings.node_generation)
        if not addresses:
            raise InventoryError(f"{settings.control_config}: no worker list to import; it runs local workers only")
        slots = _slots(settings, addresses)
        scheme = "global" if all(s.offset == s.core - 1 for s in slots) else "per-host"
        hosts = _hosts(slots, control_address)
        settings.port_scheme = scheme
        home.save_settings(settings)
        home.save_hosts(hosts)
        home.save_assignment(Assignment(1, slots, [h.assignment_fields() for h in hosts]))
    return hosts


def _slots(settings, addresses: dict[int, nodeconfig.WorkerAddress]) -> list[Slot]:
    slots = []
    for core, address in sorted(addresses.items()):
        offset = _offset(settings, core, address)
        slots.append(Slot(core, _host_name(str(address.listen.ip)), str(address.listen.ip), offset))
    return slots


def _offset(settings, core: int, address: nodeconfig.WorkerAddress) -> int:
    if settings.node_generation == "2.1":
        p2p_offset = address.p2p.port - settings.base_port
        stream_offset = address.listen.port - settings.stream_base_port
        if p2p_offset != stream_offset:
            raise InventoryError(f"core {core}: P2P port {address.p2p.port} and stream port {address.listen.port} "
                                 f"are not the same distance from the base ports {settings.base_port} and "
                                 f"{settings.stream_base_port}; pass matching --base-port and --stream-base-port "
                                 "to quil-coord init")
        offset = p2p_offset
    else:
        offset = address.listen.port - settings.base_port
    if offset < 0:
        raise InventoryError(f"core {core}: port {address.listen.port} is below the base port {settings.base_port}; "
                             "run quil-coord init again with a lower --base-port")
    return offset


def _host_name(address: str) -> str:
    return "h-" + address.replace(".", "-").replace(":", "-")


def _hosts(slots: list[Slot], control_address: str | None) -> list[Host]:
    by_address: OrderedDict[str, int] = OrderedDict()
    for slot in slots:
        by_address[slot.address] = by_address.get(slot.address, 0) + 1
    control = control_address or slots[0].address
    if control not in by_address:
        raise InventoryError(f"--control-address {control} runs no worker in the list; use one of "
                             f"{', '.join(by_address)}")
    return [Host(name=_host_name(address), address=address, agent=_agent_endpoint(address),
                 control=address == control, workers=count)
            for address, count in by_address.items()]


def _agent_endpoint(address: str) -> str:
    return f"[{address}]:{DEFAULT_AGENT_PORT}" if ":" in address else f"{address}:{DEFAULT_AGENT_PORT}"
