"""The canonical config.yml: the control host's file with the worker lists replaced.

For 2.1 the keys that generation ignores are cut, and worker hosts also get
the control host's stream address; every other byte stays as the operator
wrote it.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..common import multiaddr, nodeconfig
from ..common.errors import ConfigError
from .assign import Slot
from .home import Settings


def worker_lists(settings: Settings, slots: list[Slot]) -> tuple[list[str], list[str] | None]:
    """Return the P2P (1.4/2.0: the only) list and, for 2.1, the stream list, in core order."""
    ordered = sorted(slots, key=lambda s: s.core)
    first = [multiaddr.format_tcp(s.address, settings.base_port + s.offset) for s in ordered]
    if settings.node_generation != "2.1":
        return first, None
    stream = [multiaddr.format_tcp(s.address, settings.stream_base_port + s.offset) for s in ordered]
    return first, stream


def read_control_config(settings: Settings) -> nodeconfig.NodeConfig:
    path = Path(settings.control_config)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(
            f"{path}: cannot read the control host's node config ({err.strerror});"
            " fix the path with quil-coord init --control-config or restore the file"
        ) from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from err
    return nodeconfig.load(text, source=str(path))


# Keys 2.1 ignores; a 2.1 master that finds only these falls back to local workers.
LEGACY_2_1 = ("dataWorkerMultiaddrs", "dataWorkerBaseListenPort")


def render(settings: Settings, slots: list[Slot]) -> str:
    """Render the canonical config for the assignment; raises ConfigError on an unusable control config."""
    return render_with_warnings(settings, slots)[0]


def render_with_warnings(settings: Settings, slots: list[Slot]) -> tuple[str, list[str]]:
    """Render the canonical config and list what was changed beyond the worker lists, and why."""
    config = read_control_config(settings)
    warnings = []
    if settings.node_generation == "2.1":
        for key in LEGACY_2_1:
            engine = config.data.get("engine")
            if isinstance(engine, dict) and key in engine:
                config = nodeconfig.load(nodeconfig.remove_key(config, "engine", key), source=settings.control_config)
                warnings.append(f"removed engine.{key} from the pushed config: node 2.1 ignores it (it reads "
                                "dataWorkerP2PMultiaddrs and dataWorkerStreamMultiaddrs); remove it from "
                                f"{settings.control_config} too")
    return _render_lists(settings, slots, config), warnings


def _render_lists(settings: Settings, slots: list[Slot], config: nodeconfig.NodeConfig) -> str:
    # The node ignores misspelt keys silently; refuse to push a config that carries one.
    nodeconfig.check_known_keys(config, settings.node_generation)
    first, stream = worker_lists(settings, slots)
    text = nodeconfig.render(config, settings.node_generation, first, stream)
    # Check the result the way the agents will, so a bad render never leaves here.
    nodeconfig.worker_addresses(nodeconfig.load(text, source=f"rendered {settings.control_config}"),
                                settings.node_generation)
    return text


# The control process's stream port when its config leaves p2p.streamListenMultiaddr empty (2.1).
DEFAULT_STREAM_PORT = 8340


def control_stream_address(config: nodeconfig.NodeConfig, control_address: str) -> str:
    """Address a 2.1 worker host dials to reach the control process: the control host's IP and stream port."""
    p2p = config.data.get("p2p")
    value = p2p.get("streamListenMultiaddr") if isinstance(p2p, dict) else None
    match = re.search(r"/tcp/(\d+)", value or "")
    port = int(match.group(1)) if match else DEFAULT_STREAM_PORT
    return multiaddr.format_tcp(control_address, port)


def render_for_host(settings: Settings, canonical: str, host_is_control: bool, control_address: str) -> str:
    """Return the config one host gets: the canonical one, plus for 2.1 worker hosts the control stream address.

    A 2.1 worker dials the control process at p2p.streamListenMultiaddr, and the
    default /ip4/0.0.0.0/tcp/8340 would point it at its own host.
    """
    if settings.node_generation != "2.1" or host_is_control:
        return canonical
    config = nodeconfig.load(canonical, source=settings.control_config)
    return nodeconfig.set_value(config, "p2p", "streamListenMultiaddr", control_stream_address(config, control_address))


def read_keys(settings: Settings) -> bytes:
    """Read the control host's keys.yml, which 2.1 worker hosts need, from beside the control config.yml."""
    path = Path(settings.control_config).parent / "keys.yml"
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the control host's keys.yml ({err.strerror}); 2.1 workers on other "
                          "hosts need it, so copy it next to the control config.yml") from err
