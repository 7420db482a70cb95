"""Parse, validate and render the node's config.yml.

The node (1.4.19 to 2.1.0.25) decodes config.yml with gopkg.in/yaml.v2 and
silently ignores keys it does not know, so a misspelt or misplaced worker
list fails late. load()
and worker_addresses() check everything this project relies on and name the
file and line of each problem.

Worker lists per node generation (entry N-1 is the address of core index N):
  1.4, 2.0  engine.dataWorkerMultiaddrs
  2.1       engine.dataWorkerP2PMultiaddrs and engine.dataWorkerStreamMultiaddrs,
            of equal length, plus engine.dataWorkerCount set to that length.
            2.1 ignores engine.dataWorkerMultiaddrs.

render() rewrites only those keys. It splices new text into the original at
the positions that PyYAML's composer reports, so comments, key order and all
other values stay byte-identical, then loads the result to prove it.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import yaml

from . import multiaddr, nodekeys
from .errors import ConfigError, MultiaddrError
from .multiaddr import TcpMultiaddr

__all__ = [
    "GENERATIONS",
    "NodeConfig",
    "WorkerAddress",
    "WorkerLists",
    "check_known_keys",
    "legacy_keys",
    "load",
    "render",
    "sha256_hex",
    "worker_addresses",
]

GENERATIONS = ("1.4", "2.0", "2.1")

ENGINE = "engine"
LEGACY_KEY = "dataWorkerMultiaddrs"
P2P_KEY = "dataWorkerP2PMultiaddrs"
STREAM_KEY = "dataWorkerStreamMultiaddrs"
COUNT_KEY = "dataWorkerCount"

# Worker list keys that a generation does not read, so a value there is lost.
_IGNORED_KEYS = {"1.4": (P2P_KEY, STREAM_KEY), "2.0": (P2P_KEY, STREAM_KEY), "2.1": (LEGACY_KEY,)}

_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"

# Names that _describe() gives the YAML 1.1 scalar types in error messages.
_KIND_NAMES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "timestamp": "a date",
}

# yaml.v2 indents a nested mapping by two spaces.
_INDENT = 2

# Maximum number of values that aliases may repeat in one config, counted as if
# each alias were replaced by a copy of its anchor's value. Code that walks the loaded
# data without tracking shared values (a comparison, json.dumps) pays for every
# copy, and nine levels of ten aliases each repeat 10^9 values in under 500
# bytes. A node config needs no aliases.
MAX_ALIASED_VALUES = 100_000

# A value that render() writes: a worker list, dataWorkerCount, or a new engine section.
Value = Union[list[str], int, dict[str, "Value"]]

# Error location callback: the "source:line" of engine.<name>[index], or of the key when index is None.
Locate = Callable[[str, Union[int, None]], str]

# An edit of the original text, which replaces text[start:end] with the string.
Edit = tuple[int, int, str]


@dataclass(frozen=True)
class WorkerLists:
    """Worker multiaddrs as written. For 1.4 and 2.0, p2p is dataWorkerMultiaddrs and stream is empty."""

    p2p: list[str]
    stream: list[str]


@dataclass(frozen=True)
class WorkerAddress:
    """Addresses of one core index: where the worker listens for the master, and its 2.1 P2P address."""

    listen: TcpMultiaddr
    p2p: TcpMultiaddr | None


@dataclass(frozen=True, eq=False)
class NodeConfig:
    """A loaded config.yml: its text, the plain data and the PyYAML node tree with positions."""

    text: str
    source: str
    data: dict[Any, Any]
    tree: yaml.MappingNode

    def worker_lists(self, generation: str) -> WorkerLists:
        """Read the worker lists of generation, raising ConfigError unless each is a list of strings."""
        if _single_list(generation):
            return WorkerLists(_string_list(self, LEGACY_KEY), [])
        return WorkerLists(_string_list(self, P2P_KEY), _string_list(self, STREAM_KEY))


def load(text: str, source: str = "config.yml") -> NodeConfig:
    """Parse config.yml text, rejecting broken YAML, duplicate keys and a top level that is not a mapping.

    Recursive aliases, and aliases that repeat more than MAX_ALIASED_VALUES
    values, are rejected too.
    """
    try:
        tree = _compose(text, source)
        _reject_duplicates(tree, source)
        data = _construct(text, tree, source)
    except RecursionError as err:
        # PyYAML composes nested lists and mappings by recursion, a few Python frames per level.
        raise ConfigError(
            f"{source}: invalid YAML: lists or mappings nested too deeply to parse; a node config has a few levels"
        ) from err
    return NodeConfig(text, source, data, tree)


def worker_addresses(cfg: NodeConfig, generation: str) -> dict[int, WorkerAddress]:
    """Validate the worker lists of generation and map each core index (1-based) to its addresses."""

    def locate(name: str, index: int | None) -> str:
        node = _list_node(cfg, name, index)
        return f"{cfg.source}:{node.start_mark.line + 1}" if node else cfg.source

    return _build_addresses(generation, cfg.worker_lists(generation), locate)


def legacy_keys(cfg: NodeConfig, generation: str) -> list[str]:
    """Return the dotted names of the non-empty worker lists that generation ignores."""
    _single_list(generation)  # raises ConfigError for an unknown generation
    ignored = [(name, _engine_value(cfg, name)) for name in _IGNORED_KEYS[generation]]
    return [f"{ENGINE}.{name}" for name, value in ignored if value is not None and value.value]


def check_known_keys(cfg: NodeConfig, generation: str) -> None:
    """Raise ConfigError for the first key under engine, p2p or db, in file order, that generation does not read.

    The node ignores such keys without a message. Nested settings are checked
    where nodekeys.SECTION_KEYS lists them. A section or nested setting whose
    value is not a mapping (null, a number, a list) is skipped and left to the
    checks of its type.
    """
    _single_list(generation)  # raises ConfigError for an unknown generation
    for key, value in _merged_entries(cfg.tree):
        if key.value in (ENGINE, "p2p", "db"):
            _check_section(cfg, generation, key.value, value)


def render(cfg: NodeConfig, generation: str, p2p: list[str], stream: list[str] | None = None) -> str:
    """Return cfg's text with the worker lists of generation replaced and every other byte kept.

    Entries are validated like worker_addresses() does and written in
    canonical form. Comments inside a replaced list go with it.
    """
    updates = _updates(cfg, generation, p2p, stream)
    text = _apply(cfg.text, _plan_edits(cfg, updates))
    _verify(cfg, text, updates)
    return text


def sha256_hex(text: str | bytes) -> str:
    """Hash config text (str as UTF-8) and return the hex digest."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


# Loading


class _AliasCheckingLoader(yaml.SafeLoader):
    """SafeLoader whose composer rejects recursive aliases and counts the values that aliases repeat.

    The composer turns an alias into a second reference to its anchor's node,
    so the tree stays small. Each finished node's expanded size (the node plus
    everything below it, aliases counted in full) is recorded, which makes the
    count linear in the size of the text.
    """

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.aliased_values = 0
        # id() of each finished node -> its expanded size. An anchor whose node has
        # no entry yet is still being composed, so an alias to it is recursive.
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            return self._compose_alias(parent, index)
        node = super().compose_node(parent, index)
        self._sizes[id(node)] = 1 + sum(self._sizes[id(child)] for child in _children(node))
        return node

    def _compose_alias(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        where = f"{self.source}:{event.start_mark.line + 1}"
        node = super().compose_node(parent, index)  # raises ComposerError for an undefined alias
        size = self._sizes.get(id(node))
        if size is None:
            raise ConfigError(
                f"{where}: alias '*{event.anchor}' refers to the list or mapping that contains it "
                "(a recursive value); write the values out in place"
            )
        self.aliased_values += size
        if self.aliased_values > MAX_ALIASED_VALUES:
            raise ConfigError(
                f"{where}: aliases repeat more than {MAX_ALIASED_VALUES} values once this one is expanded; "
                "a node config needs no aliases, so write the values out in place"
            )
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    """Return the nodes directly below node: list items, or mapping keys and values."""
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _compose(text: str, source: str) -> yaml.MappingNode:
    try:
        tree = _compose_checked(text, source)
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_message(err, text, source)) from err
    expected = "expected a mapping with sections such as 'engine:'"
    if tree is None:
        raise ConfigError(f"{source}:1: the file has no settings; {expected}")
    if not isinstance(tree, yaml.MappingNode):
        raise ConfigError(f"{source}:{tree.start_mark.line + 1}: the top level is {_describe(tree)}; {expected}")
    return tree


def _compose_checked(text: str, source: str) -> yaml.Node | None:
    loader = _AliasCheckingLoader(text, source)  # the reader checks for forbidden characters here
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _yaml_message(err: yaml.YAMLError, text: str, source: str) -> str:
    """Format a PyYAML error as one line that starts with source:line."""
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        return f"{source}:{line}: invalid YAML: character {chr(err.character)!r} is not allowed"
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return f"{source}: invalid YAML: " + " ".join(str(err).split())
    line = err.problem_mark.line + 1
    context = ""
    if err.context:
        context_line = err.context_mark.line + 1 if err.context_mark else line
        context = err.context + (f" at line {context_line}" if context_line != line else "") + ", "
    return f"{source}:{line}: invalid YAML: {context}{err.problem} (column {err.problem_mark.column + 1})"


def _reject_duplicates(tree: yaml.Node, source: str) -> None:
    """Raise ConfigError for the first mapping, in document order, that repeats a key."""
    stack: list[tuple[yaml.Node, str]] = [(tree, "")]
    visited: set[int] = set()  # an alias shares the node of its anchor
    while stack:
        node, path = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, path, source)
            stack.extend(reversed([(value, _join(path, key)) for key, value in node.value]))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed([(item, f"{path}[{i}]") for i, item in enumerate(node.value)]))


def _check_keys(mapping: yaml.MappingNode, path: str, source: str) -> None:
    first_lines: dict[tuple[str, str], int] = {}
    for key, _ in mapping.value:
        # Repeated merge keys ('<<') merge several mappings and are no duplicate.
        if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
            continue
        line = key.start_mark.line + 1
        first = first_lines.get((key.tag, key.value))
        if first is not None:
            raise ConfigError(
                f"{source}:{line}: duplicate key '{_join(path, key)}' (first at line {first}); "
                "the node lets the later one override the earlier, so remove one of them"
            )
        first_lines[(key.tag, key.value)] = line


# libyaml's safe loader, or PyYAML's own where PyYAML was built without libyaml.
_FAST_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _construct(text: str, tree: yaml.Node, source: str) -> dict[Any, Any]:
    # The tree is composed again here because constructing merge keys edits the nodes in place.
    # _compose already checked the text, so libyaml's parser may do this second pass: same
    # constructor, a fraction of the time.
    try:
        return yaml.load(text, Loader=_FAST_SAFE_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_message(err, text, source)) from err
    except ValueError as err:
        # PyYAML raises a bare ValueError for values such as the date 2024-02-30.
        node = _first_bad_scalar(tree)
        line = node.start_mark.line + 1 if node else 1
        message = f"{source}:{line}: invalid YAML value: {err}; quote it to keep it as a string"
        raise ConfigError(message) from err


def _first_bad_scalar(tree: yaml.Node) -> yaml.ScalarNode | None:
    """Return the first scalar, in document order, that PyYAML cannot construct."""
    constructor = yaml.SafeLoader("")
    stack = [tree]
    visited: set[int] = set()  # an alias shares the node of its anchor, so each node is tried once
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                constructor.construct_object(node)
            except (ValueError, yaml.YAMLError):
                return node
        else:
            stack.extend(reversed(_children(node)))
    return None


# Reading the worker lists


def _single_list(generation: str) -> bool:
    """Tell whether generation has the one worker list of 1.4 and 2.0. Raise ConfigError if it is unknown."""
    if generation not in GENERATIONS:
        raise ConfigError(f"unknown node generation {generation!r}; use one of {', '.join(GENERATIONS)}")
    return generation != "2.1"


def _engine_mapping(cfg: NodeConfig) -> yaml.MappingNode | None:
    """Return the engine mapping, or None when engine is absent or null."""
    entry = _lookup(cfg.tree, ENGINE)
    if entry is None or _is_null(entry[1]):
        return None
    key, engine = entry
    if not isinstance(engine, yaml.MappingNode):
        raise ConfigError(f"{_line(cfg, engine)}: engine must be a mapping of settings, not {_describe(engine)}")
    if any(name.tag == _MERGE_TAG for name, _ in engine.value):
        raise ConfigError(
            f"{_line(cfg, key)}: engine uses a YAML merge key ('<<'); write its worker settings out in place"
        )
    return engine


def _engine_entry(cfg: NodeConfig, name: str) -> tuple[yaml.Node, yaml.Node] | None:
    """Return the key and value nodes of engine.name, or None when it is absent or null."""
    engine = _engine_mapping(cfg)
    entry = _lookup(engine, name) if engine else None
    return None if entry is None or _is_null(entry[1]) else entry


def _engine_value(cfg: NodeConfig, name: str) -> yaml.Node | None:
    entry = _engine_entry(cfg, name)
    return entry[1] if entry else None


def _string_list(cfg: NodeConfig, name: str) -> list[str]:
    value = _engine_value(cfg, name)
    if value is None:
        return []
    if not isinstance(value, yaml.SequenceNode):
        raise ConfigError(
            f"{_line(cfg, value)}: engine.{name} must be a list of multiaddr strings, not {_describe(value)}; "
            f"write one {multiaddr.IP4_HINT} entry per core index"
        )
    for index, item in enumerate(value.value):
        if not (isinstance(item, yaml.ScalarNode) and item.tag == _STR_TAG):
            raise ConfigError(
                f"{_line(cfg, item)}: engine.{name}[{index}] (core {index + 1}) must be a multiaddr string, "
                f"not {_describe(item)}; write it as {multiaddr.IP4_HINT}"
            )
    return [item.value for item in value.value]


def _list_node(cfg: NodeConfig, name: str, index: int | None) -> yaml.Node | None:
    """Return the node of engine.name[index], or the key node when index is None."""
    entry = _engine_entry(cfg, name)
    if entry is None or index is None:
        return entry[0] if entry else None
    return entry[1].value[index]


# Validating worker addresses


def _build_addresses(generation: str, lists: WorkerLists, locate: Locate) -> dict[int, WorkerAddress]:
    if _single_list(generation):
        listen = _parse_entries(LEGACY_KEY, lists.p2p, locate)
        return {core: WorkerAddress(address, None) for core, address in listen.items()}
    if len(lists.p2p) != len(lists.stream):
        where = locate(STREAM_KEY if lists.stream else P2P_KEY, None)
        raise ConfigError(
            f"{where}: engine.{P2P_KEY} has {_entries(len(lists.p2p))} but "
            f"engine.{STREAM_KEY} has {_entries(len(lists.stream))}; give both lists one entry per core index"
        )
    p2p = _parse_entries(P2P_KEY, lists.p2p, locate)
    stream = _parse_entries(STREAM_KEY, lists.stream, locate)
    for core, address in stream.items():
        _reject_unspecified(address, core, locate)
    return {core: WorkerAddress(stream[core], p2p[core]) for core in stream}


def _parse_entries(name: str, entries: list[str], locate: Locate) -> dict[int, TcpMultiaddr]:
    addresses = {}
    for index, entry in enumerate(entries):
        try:
            addresses[index + 1] = multiaddr.parse(entry)
        except MultiaddrError as err:
            where = f"{locate(name, index)}: engine.{name}[{index}] (core {index + 1})"
            raise MultiaddrError(f"{where}: {err}") from err
    return addresses


def _reject_unspecified(address: TcpMultiaddr, core: int, locate: Locate) -> None:
    # Node 2.1.0.16 and later rewrite an unspecified stream address to loopback in
    # both the worker (bind) and the master (dial), so no other host can reach it.
    if not address.ip.is_unspecified:
        return
    loopback = "127.0.0.1" if address.ip.version == 4 else "::1"
    raise ConfigError(
        f"{locate(STREAM_KEY, core - 1)}: engine.{STREAM_KEY}[{core - 1}] (core {core}): '{address}' "
        f"is unreachable from other hosts because the node rewrites {address.ip} to {loopback} "
        "for stream addresses; use the host's concrete address"
    )


# Rendering


def _updates(cfg: NodeConfig, generation: str, p2p: list[str], stream: list[str] | None) -> dict[str, Value]:
    """Validate the new lists and return the engine keys to write, in canonical form."""
    single = _single_list(generation)
    if single and stream:
        raise ConfigError(
            f"node generation {generation} has one worker list, engine.{LEGACY_KEY}; pass it as p2p"
        )
    if not single and stream is None:
        raise ConfigError(f"node generation {generation} needs engine.{STREAM_KEY}; pass it as stream")
    addresses = _build_addresses(generation, WorkerLists(p2p, stream or []), lambda name, index: cfg.source)
    listen = [str(address.listen) for address in addresses.values()]
    if single:
        return {LEGACY_KEY: listen}
    peers = [str(address.p2p) for address in addresses.values()]
    return {P2P_KEY: peers, STREAM_KEY: listen, COUNT_KEY: len(listen)}


def _plan_edits(cfg: NodeConfig, updates: dict[str, Value]) -> list[Edit]:
    """List the edits that write updates into engine: replace existing values, add missing keys."""
    entry = _lookup(cfg.tree, ENGINE)
    engine = _engine_mapping(cfg)
    if entry is None:
        return [_insert_keys(cfg.text, cfg.tree, {ENGINE: updates})]
    _reject_alias(cfg, entry)  # new keys would land at the anchor
    if engine is None:
        return [_replace_value(cfg, entry, updates, flow=bool(cfg.tree.flow_style))]
    edits, missing = [], {}
    for name, value in updates.items():
        found = _lookup(engine, name)
        if found is None:
            missing[name] = value
        else:
            edits.append(_replace_value(cfg, found, value, flow=bool(engine.flow_style)))
    if missing:
        edits.append(_insert_keys(cfg.text, engine, missing))
    return edits


def _replace_value(cfg: NodeConfig, entry: tuple[yaml.Node, yaml.Node], value: Value, flow: bool) -> Edit:
    """Replace the value of a mapping entry, keeping a comment on the key's line."""
    _reject_alias(cfg, entry)
    text, (key, old) = cfg.text, entry
    if flow:
        return (old.start_mark.index, _content_end(old), _flow_value(value))
    colon = text.index(":", key.end_mark.index)
    inline, lines = _block_value(value, key.start_mark.column)
    comment = _key_line_comment(text, colon, old)
    end = _line_end(text, _content_end(old))
    return (colon, end, ":" + inline + comment + _join_lines(text, lines))


def _reject_alias(cfg: NodeConfig, entry: tuple[yaml.Node, yaml.Node]) -> None:
    # The composer gives an alias the node of its anchor, which starts before the key.
    key, value = entry
    if value.start_mark.index < key.end_mark.index:
        raise ConfigError(
            f"{_line(cfg, key)}: '{key.value}' is a YAML alias of line {value.start_mark.line + 1}; "
            "write its value in place so that only the worker lists change"
        )


def _key_line_comment(text: str, colon: int, old: yaml.Node) -> str:
    """Return ' # comment' when one follows the old value on the key's line, else ''."""
    line_end = _line_end(text, colon)
    tail_start = colon + 1
    if old.start_mark.index < line_end:
        tail_start = _content_end(old)
        if tail_start > line_end:  # a flow value over several lines takes its comments with it
            return ""
    tail = text[tail_start:line_end].strip()
    return f" {tail}" if tail else ""


def _insert_keys(text: str, mapping: yaml.MappingNode, updates: dict[str, Value]) -> Edit:
    """Add keys after the last entry of a mapping, at the indentation of its first key."""
    if mapping.flow_style:
        return _insert_flow_keys(mapping, updates)
    column = mapping.value[0][0].start_mark.column  # a block mapping has at least one key
    lines = [line for name, value in updates.items() for line in _block_entry(name, value, column)]
    at = _line_end(text, _content_end(mapping))
    return (at, at, _join_lines(text, lines))


def _insert_flow_keys(mapping: yaml.MappingNode, updates: dict[str, Value]) -> Edit:
    entries = ", ".join(f"{name}: {_flow_value(value)}" for name, value in updates.items())
    if not mapping.value:
        at = mapping.start_mark.index + 1  # just after '{'
        return (at, at, entries)
    at = _content_end(mapping.value[-1][1])
    return (at, at, ", " + entries)


def _block_entry(name: str, value: Value, column: int) -> list[str]:
    inline, lines = _block_value(value, column)
    return [" " * column + f"{name}:{inline}", *lines]


def _block_value(value: Value, column: int) -> tuple[str, list[str]]:
    """Return the text after 'key:' and the lines below it, in yaml.v2 block style."""
    if isinstance(value, dict):
        column += _INDENT
        return "", [line for name, item in value.items() for line in _block_entry(name, item, column)]
    if isinstance(value, list) and value:
        # yaml.v2 writes list items at the column of their key.
        return "", [" " * column + f"- {item}" for item in value]
    return " " + _flow_value(value), []


def _flow_value(value: Value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{name}: {_flow_value(item)}" for name, item in value.items()) + "}"
    if isinstance(value, list):
        # Not every YAML parser accepts ':' in a plain scalar inside a flow list, so such
        # entries are quoted. NOTE: whether yaml.v2 needs the quotes is not checked.
        return "[" + ", ".join(f'"{item}"' if ":" in item else item for item in value) + "]"
    return str(value)


def _apply(text: str, edits: list[Edit]) -> str:
    # From the end backwards, so earlier positions stay valid. An insertion at
    # the end of a replaced span is applied first and so stays after it.
    for start, end, replacement in sorted(edits, key=lambda edit: edit[0], reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _verify(cfg: NodeConfig, text: str, updates: dict[str, Value]) -> None:
    """Load the rendered text and check that only the updated engine keys changed."""
    expected = copy.deepcopy(cfg.data)
    engine = expected.get(ENGINE) or {}
    engine.update(updates)
    expected[ENGINE] = engine
    try:
        rendered = load(text, cfg.source)
    except ConfigError as err:
        raise ConfigError(f"{cfg.source}: rendering the worker lists produced invalid YAML ({err})") from err
    if rendered.data != expected:
        raise ConfigError(
            f"{cfg.source}: rendering the worker lists would change other settings, "
            "probably through a YAML anchor or alias; write the engine worker keys as plain values"
        )


# Checking key names


def _check_section(cfg: NodeConfig, generation: str, path: str, node: yaml.Node) -> None:
    """Check the keys of the mapping at the dotted path, then the nested mappings that SECTION_KEYS lists."""
    if not isinstance(node, yaml.MappingNode):
        return
    sections = nodekeys.SECTION_KEYS[generation]
    for key, value in _merged_entries(node):
        name = f"{path}.{key.value}"
        if key.value in sections[path]:
            if name in sections:
                _check_section(cfg, generation, name, value)
        elif name not in nodekeys.IGNORED_KEYS[generation]:
            raise ConfigError(f"{_line(cfg, key)}: {_unknown_key_message(generation, path, key.value)}")


def _unknown_key_message(generation: str, path: str, name: str) -> str:
    head = f"unknown key '{path}.{name}' for node {generation}"
    others = [
        other
        for other, sections in nodekeys.SECTION_KEYS.items()
        if other != generation and name in sections.get(path, ())
    ]
    if others:
        replacement = nodekeys.REPLACEMENTS.get(generation, {}).get(f"{path}.{name}")
        action = f"use '{replacement}' instead" if replacement else "remove it"
        return f"{head}; it is a node {' and '.join(others)} key, which node {generation} ignores, so {action}"
    matches = difflib.get_close_matches(name, sorted(nodekeys.SECTION_KEYS[generation][path]), n=1)
    if matches:
        hint = f"did you mean '{matches[0]}'?"
    else:
        hint = f"check its spelling against the keys that node {generation} writes to a new config.yml."
    return f"{head}; {hint} The node ignores unknown keys, so fix or remove it"


def _merged_entries(mapping: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
    """Return the entries of mapping in file order, with the entries of a merge key ('<<') in its place.

    yaml.v2 applies merge keys too, so the merged names reach the node.
    load() rejects list and mapping keys, which PyYAML cannot hash, so every
    key is a scalar. Merge values that are not mappings are skipped, because
    load() rejects them as well.
    """
    entries = []
    for key, value in mapping.value:
        if key.tag != _MERGE_TAG:
            entries.append((key, value))
            continue
        merged = value.value if isinstance(value, yaml.SequenceNode) else [value]
        for item in merged:
            if isinstance(item, yaml.MappingNode):
                entries.extend(_merged_entries(item))
    return entries


# Node tree helpers


def _lookup(mapping: yaml.MappingNode, name: str) -> tuple[yaml.Node, yaml.Node] | None:
    """Return the (key, value) nodes of a string key. It is unique because load() rejects duplicates."""
    for key, value in mapping.value:
        if isinstance(key, yaml.ScalarNode) and key.tag == _STR_TAG and key.value == name:
            return key, value
    return None


def _content_end(node: yaml.Node) -> int:
    """Return the index just after the last character of node's content.

    PyYAML ends a block mapping or sequence at the next token, after any
    trailing blank and comment lines, so take the end of its last scalar.
    """
    while isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(node, yaml.MappingNode) else last
    return node.end_mark.index


def _line_end(text: str, index: int) -> int:
    """Return the index of the line break that ends the line at index, or len(text).

    An index at the start of a line counts as the end of the previous line,
    which is where PyYAML ends a block scalar (| or >).
    """
    if index > 0 and text[index - 1] == "\n":
        index -= 1
    else:
        found = text.find("\n", index)
        index = len(text) if found < 0 else found
    if index < len(text) and index > 0 and text[index - 1] == "\r":
        index -= 1
    return index


def _join_lines(text: str, lines: list[str]) -> str:
    newline = "\r\n" if "\r\n" in text else "\n"
    return "".join(newline + line for line in lines)


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if _is_null(node):
        return "null"
    kind = node.tag.rsplit(":", 1)[-1]
    return f"{_KIND_NAMES.get(kind, kind)} ({node.value!r})"


def _entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


def _line(cfg: NodeConfig, node: yaml.Node) -> str:
    return f"{cfg.source}:{node.start_mark.line + 1}"


def _join(path: str, key: yaml.Node) -> str:
    name = key.value if isinstance(key, yaml.ScalarNode) else "?"
    return f"{path}.{name}" if path else name


def set_value(cfg: NodeConfig, section: str, key: str, value: str) -> str:
    """Return cfg's text with section.key set to the string value and every other byte kept.

    The key is added at the end of the section when missing. Raises ConfigError
    when the section is missing or not a mapping, or when the edit would change
    anything else (an alias, say).
    """
    entry = _lookup(cfg.tree, section)
    if entry is None or not isinstance(entry[1], yaml.MappingNode) or not entry[1].value:
        raise ConfigError(f"{cfg.source}: no '{section}' settings to put {section}.{key} in; add a {section} section")
    mapping = entry[1]
    found = _lookup(mapping, key)
    if found is None:
        edit = _insert_keys(cfg.text, mapping, {key: value})  # type: ignore[dict-item]
    else:
        node = found[1]
        edit = (node.start_mark.index, node.end_mark.index, json.dumps(value))
    text = _apply(cfg.text, [edit])
    expected = copy.deepcopy(cfg.data)
    expected[section][key] = value
    if load(text, cfg.source).data != expected:
        raise ConfigError(f"{cfg.source}: setting {section}.{key} would change other settings, probably through "
                          "a YAML anchor or alias; write it as a plain value")
    return text


def remove_key(cfg: NodeConfig, section: str, key: str) -> str:
    """Return cfg's text without the lines of section.key; every other byte is kept.

    Only block mappings are edited; a key inside a flow mapping ({...}) raises
    ConfigError with the fix.
    """
    entry = _lookup(cfg.tree, section)
    found = _lookup(entry[1], key) if entry is not None and isinstance(entry[1], yaml.MappingNode) else None
    if found is None:
        return cfg.text
    if entry[1].flow_style:
        raise ConfigError(f"{_line(cfg, found[0])}: remove {section}.{key} by hand; it sits in a flow mapping")
    name, value = found
    start = cfg.text.rfind("\n", 0, name.start_mark.index) + 1
    end = _line_end(cfg.text, _content_end(value))
    end = end + 1 if end < len(cfg.text) and cfg.text[end] == "\n" else end
    text = cfg.text[:start] + cfg.text[end:]
    expected = copy.deepcopy(cfg.data)
    del expected[section][key]
    if load(text, cfg.source).data != expected:
        raise ConfigError(f"{cfg.source}: removing {section}.{key} would change other settings; remove it by hand")
    return text
