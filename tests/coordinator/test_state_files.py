"""Corrupt coordinator state files: one exact error line with the path and the .bak, and nothing rewritten."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
from helpers import DATA

from quil_cluster.common.errors import StateError
from quil_cluster.coordinator import tokens
from quil_cluster.coordinator.cli import main
from quil_cluster.coordinator.home import STATE_HEADER, Home

GARBAGE = b"\x8f\x00garbage\xff"

# File -> the hint given when no .bak exists.
FIXES = {
    "cluster.yaml": "fix the file by hand",
    "hosts.yaml": "fix the file by hand",
    "assignment.json": "run quil-coord assign to record a new one",
    "applied.json": "delete it, and the next complete apply records it again",
    "revoked.json": "fix the file by hand (deleting it would trust every revoked certificate again)",
    "tokens.json": "fix the file, or delete it to drop every join token",
}

# File -> what wrong-type content is reported as.
WRONG_TYPE = {
    "cluster.yaml": (b"- a\n- list\n", "expected a mapping of keys at the top level, found list"),
    "hosts.yaml": (b"- a\n- list\n", "expected a mapping of keys at the top level, found list"),
    "assignment.json": (b'"text"', "invalid assignment (expected a JSON object, found a string)"),
    "applied.json": (b'{"core": 1}', "invalid worker list (expected a JSON list, found an object)"),
    "revoked.json": (b'{"serial": "ab12"}', "expected a list of serial numbers, found an object"),
    "tokens.json": (b"[]", "not a version 1 token store"),
}


@pytest.fixture
def home(tmp_path: Path) -> Home:
    """A state directory with every state file written once by the commands that own it."""
    control = tmp_path / "config.yml"
    control.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    path = tmp_path / "coord"
    assert main(["--home", str(path), "init", "--control-config", str(control)]) == 0
    for name, address, extra in (("A", "192.0.2.10", ["--control"]), ("B", "192.0.2.11", [])):
        assert main(["--home", str(path), "host", "add", name, "--address", address, "--agent", f"{address}:7350",
                     "--workers", "1", "--bundle", str(tmp_path / "bundles" / name), *extra]) == 0
    assert main(["--home", str(path), "assign"]) == 0
    home = Home(path)
    home.save_applied(home.load_assignment().slots)
    home.revoke("ab12")
    tokens.create(home, ttl_seconds=600, uses=1, workers=None, host_name=None)
    return home


def _readers(home: Home) -> dict[str, Callable[[], object]]:
    return {
        "cluster.yaml": home.load_settings, "hosts.yaml": home.load_hosts,
        "assignment.json": home.load_assignment, "applied.json": home.load_applied,
        "revoked.json": home.load_revoked, "tokens.json": lambda: tokens.list_tokens(home),
    }


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _truncated(good: bytes) -> bytes:
    """Cut the file in the middle, as a crash of a non-atomic writer would."""
    return good[: len(good) // 2]


def _problem(name: str, damage: str, content: bytes) -> str:
    """The 'what is wrong' part of the expected message."""
    if damage == "empty":
        return "the file is empty"
    if damage == "wrong type":
        return WRONG_TYPE[name][1]
    if name.endswith(".yaml"):
        if damage == "garbage":
            return "not UTF-8 text: invalid start byte at byte 0"
        return f"the file is cut short (the line '# end of {name}' is missing)"
    try:
        json.loads(content)
    except ValueError as err:
        return f"invalid JSON ({err})"
    raise AssertionError(f"{content!r} parses as JSON")


def _damage(good: bytes, name: str, damage: str) -> bytes:
    return {"truncated": _truncated(good), "garbage": GARBAGE, "wrong type": WRONG_TYPE[name][0],
            "empty": b""}[damage]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong type", "empty"])
@pytest.mark.parametrize("name", list(FIXES))
@pytest.mark.parametrize("with_backup", [True, False], ids=["with-bak", "without-bak"])
def test_corrupt_state_file_names_path_and_backup(home, name, damage, with_backup):
    path = home.file(name)
    backup = home.file(name + ".bak")
    if with_backup:
        backup.write_bytes(path.read_bytes())
    else:
        backup.unlink(missing_ok=True)
    content = _damage(path.read_bytes(), name, damage)
    path.write_bytes(content)
    before = _snapshot(home.path)

    with pytest.raises(StateError) as caught:
        _readers(home)[name]()

    tail = f"the previous version is at {backup}" if with_backup else FIXES[name]
    assert str(caught.value) == f"{path}: {_problem(name, damage, content)}; {tail}"
    assert _snapshot(home.path) == before


# A command that reads each file before it contacts any agent.
COMMANDS = {
    "cluster.yaml": ["firewall", "show"], "hosts.yaml": ["firewall", "show"],
    "assignment.json": ["firewall", "show"], "revoked.json": ["status"], "tokens.json": ["token", "list"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_corrupt_state_file_stops_command(home, capsys, name):
    path = home.file(name)
    backup = home.file(name + ".bak")
    backup.write_bytes(path.read_bytes())
    path.write_bytes(GARBAGE)
    before = _snapshot(home.path)
    capsys.readouterr()

    code = main(["--home", str(home.path), *COMMANDS[name]])

    captured = capsys.readouterr()
    assert code == 3
    assert captured.out == ""
    assert captured.err == f"error: {path}: {_problem(name, 'garbage', GARBAGE)}; the previous version is at {backup}\n"
    assert _snapshot(home.path) == before


def test_state_yaml_written_with_end_line(home):
    for name in ("cluster.yaml", "hosts.yaml"):
        text = home.file(name).read_text()
        assert text.startswith(STATE_HEADER)
        assert text.endswith(f"\n# end of {name}\n")


def test_hand_edit_after_end_line_is_read(home):
    path = home.file("hosts.yaml")
    path.write_text(path.read_text() + "# a note added by hand\n")
    assert [h.name for h in home.load_hosts()] == ["A", "B"]


def test_hand_written_yaml_without_header_is_read(home):
    path = home.file("hosts.yaml")
    path.write_text(path.read_text().replace(STATE_HEADER, "").replace("# end of hosts.yaml\n", ""))
    assert [h.name for h in home.load_hosts()] == ["A", "B"]


def test_every_state_write_keeps_backup(home):
    slots = home.load_assignment().slots
    writes = {
        "cluster.yaml": lambda: home.save_settings(home.load_settings()),
        "hosts.yaml": lambda: home.save_hosts(home.load_hosts()),
        "assignment.json": lambda: home.save_assignment(home.load_assignment()),
        "applied.json": lambda: home.save_applied(slots[:1]),
        "revoked.json": lambda: home.revoke("cd34"),
        "tokens.json": lambda: tokens.create(home, ttl_seconds=600, uses=1, workers=None, host_name=None),
    }
    for name, write in writes.items():
        previous = home.file(name).read_bytes()
        write()
        assert home.file(name + ".bak").read_bytes() == previous, name
        assert home.file(name + ".bak").stat().st_mode & 0o777 == 0o600, name



def test_missing_hosts_yaml_of_used_cluster_is_error(home, capsys):
    path = home.file("hosts.yaml")
    path.unlink()
    before = _snapshot(home.path)
    assert main(["--home", str(home.path), "status"]) == 3
    assert capsys.readouterr().err == (
        f"error: {path}: the file is missing although the cluster has hosts (assignment.json or the backup "
        f"exists); the previous version is at {path}.bak\n")
    assert _snapshot(home.path) == before


def test_missing_hosts_yaml_of_new_cluster_is_empty(tmp_path):
    control = tmp_path / "config.yml"
    control.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    assert main(["--home", str(tmp_path / "coord"), "init", "--control-config", str(control)]) == 0
    assert Home(tmp_path / "coord").load_hosts() == []
