"""Strict YAML loading for the project's own files.

The project's files (agent.yaml, cluster.yaml, hosts.yaml) are read with
duplicate and unknown keys rejected, because a silently ignored key is the
most common way a node runner's intent gets lost.
"""

from __future__ import annotations

import difflib
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
    try:
        # The reader rejects non-printable characters already while the loader is built.
        loader = _StrictLoader(text)
    except yaml.reader.ReaderError as err:
        raise _reader_error(err, source) from err
    loader.source = source
    try:
        data = loader.get_single_data()
    except yaml.reader.ReaderError as err:
        raise _reader_error(err, source) from err
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else 0
        raise ConfigError(f"{source}:{line}: invalid YAML: {err.problem}; fix the syntax at that line") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from err
    except RecursionError as err:
        # PyYAML composes nested lists and mappings by recursion, a few Python frames per level.
        raise ConfigError(
            f"{source}: invalid YAML: lists or mappings nested too deeply to parse; this file needs a few levels"
        ) from err
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, found {type(data).__name__}")
    return data


def _reader_error(err: yaml.reader.ReaderError, source: str) -> ConfigError:
    return ConfigError(f"{source}: invalid YAML: character #x{err.character:04x} at position {err.position} "
                       "is not allowed in YAML; remove it")


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


def dump(data: Any) -> bytes:
    """Serialise data as block-style YAML in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).encode()
