"""The canonical config.yml: the control host's file with only the worker lists replaced."""

from __future__ import annotations

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


def render(settings: Settings, slots: list[Slot]) -> str:
    """Render the canonical config for the assignment; raises ConfigError on an unusable control config."""
    config = read_control_config(settings)
    # The node ignores misspelt keys silently; refuse to push a config that carries one.
    nodeconfig.check_known_keys(config, settings.node_generation)
    first, stream = worker_lists(settings, slots)
    text = nodeconfig.render(config, settings.node_generation, first, stream)
    # Check the result the way the agents will, so a bad render never leaves here.
    nodeconfig.worker_addresses(nodeconfig.load(text, source=f"rendered {settings.control_config}"),
                                settings.node_generation)
    return text
