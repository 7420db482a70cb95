"""Port lists in the kernel's sysctl form: "40000-40015,41000"."""

from __future__ import annotations

from .errors import ConfigError


def parse(text: str) -> set[int]:
    """Return the ports a list such as "40000-40015,41000" names; raise ConfigError on bad input."""
    ports: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError as err:
            raise ConfigError(f"port list '{text}': '{part}' is not a port or a range PORT-PORT") from err
        if not 1 <= low <= high <= 65535:
            raise ConfigError(f"port list '{text}': '{part}' is not within 1-65535 with the lower port first")
        ports.update(range(low, high + 1))
    return ports


def format_ranges(ports: set[int] | list[int]) -> str:
    """Return ports in the kernel's form, consecutive ports joined into ranges: "40000-40002,40010"."""
    parts = []
    ordered = sorted(set(ports))
    start = previous = None
    for port in ordered + [None]:
        if start is not None and (port is None or port != previous + 1):
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if port is not None and start is None:
            start = port
        previous = port
    return ",".join(parts)
