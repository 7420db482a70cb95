"""Strict YAML loading and atomic file writes for the project's own files.

The project's files (agent.yaml, cluster.yaml, hosts.yaml) are read with
duplicate and unknown keys rejected, because a silently ignored key is the
most common way a node runner's intent gets lost.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping."""

    source = "<string>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{self.source}:{line}: duplicate key {key!r} (first at line {seen[key]}); remove one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_mapping(text: str, source: str) -> dict[str, Any]:
    """Parse YAML text whose top level must be a mapping; errors name source and line."""
    loader = _StrictLoader(text)
    loader.source = source
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else 0
        raise ConfigError(f"{source}:{line}: invalid YAML: {err.problem}; fix the syntax at that line") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from err
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, found {type(data).__name__}")
    return data


def read_mapping(path: Path) -> dict[str, Any]:
    """Read and parse a YAML mapping file; a missing or unreadable file is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read file: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err.reason} at byte {err.start}") from err
    return load_mapping(text, str(path))


def reject_unknown_keys(data: dict[str, Any], known: Iterable[str], source: str) -> None:
    """Raise ConfigError for the first key not in known, with a did-you-mean hint."""
    known = list(known)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, backup: bool = False) -> None:
    """Replace path with data so readers see the old or the new file, never a mix.

    The data goes to a temporary file in the same directory, is flushed to
    disk, then renamed over the target. With backup=True the previous file
    is kept as PATH.bak (a hard link, so the old inode is never modified).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if backup and path.exists():
            previous = path.with_name(path.name + ".bak")
            previous.unlink(missing_ok=True)
            os.link(path, previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dump(data: Any) -> bytes:
    """Serialise data as block-style YAML in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).encode()
