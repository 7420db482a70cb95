"""quil-coord's output on a real two-host loopback cluster: terminal tables and progress, plain pipes, JSON.

The terminal tests run the installed console script inside tmux and read the
screen with capture-pane, as a person at a terminal would see it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quil_cluster.coordinator.demo import LocalCluster, free_base_port

pytestmark = pytest.mark.e2e

QUIL_COORD = str(Path(sys.executable).parent / "quil-coord")
HOSTS = {"A": "127.0.0.2", "B": "127.0.0.3"}
# A colour attribute in an SGR sequence: 30-37, 90-97, or 38;5;N / 38;2;R;G;B.
COLOUR_SGR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-7]|9[0-7]|38;[25];[0-9;]+)m")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("output")
    local = LocalCluster(root)
    base = free_base_port(list(HOSTS.values()), 2, start=43000)
    assert local.init(None, "--base-port", str(base)) == 0
    assert local.add_host("A", HOSTS["A"], "--control", "--workers", "2") == 0
    assert local.add_host("B", HOSTS["B"], "--workers", "2") == 0
    try:
        for name in HOSTS:
            local.start_agent(name)
        assert local.coord("assign") == 0
        assert local.coord("apply") == 0
        _wait_all_running(local)
        yield local
    finally:
        local.stop_all()


def _wait_all_running(cluster: LocalCluster, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = _piped(cluster, "status", "--json")
        processes = [p for h in json.loads(result.stdout)["hosts"] for p in h["processes"]]
        if len(processes) == 5 and all(p["state"] == "running" for p in processes):
            return
        assert time.monotonic() < deadline, f"processes not running: {processes}"
        time.sleep(0.2)


def _piped(cluster: LocalCluster, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run quil-coord with stdout and stderr on pipes, as a script would."""
    return subprocess.run([QUIL_COORD, "--home", str(cluster.home), *argv], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env=os.environ | env)


# ---------------------------------------------------------------------------
# Piped output


@pytest.mark.parametrize("argv", [("status",), ("assign",), ("apply",), ("verify",)],
                         ids=["status", "assign", "apply", "verify"])
def test_piped_output_has_no_control_codes(cluster, argv):
    # FORCE_COLOR and a colour TERM would make rich colour a pipe; the plain path never calls rich.
    result = _piped(cluster, *argv, TERM="xterm-256color", FORCE_COLOR="1")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "\x1b" not in result.stderr
    assert result.stdout.strip()


def test_piped_status_is_plain_table(cluster):
    result = _piped(cluster, "status")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["HOST", "CORE", "STATE", "PID", "UPTIME", "RESTARTS", "LISTENING", "DETAIL"]
    rows = [line.split()[:3] for line in lines[1:6]]
    assert sorted(rows) == [["A", "1", "running"], ["A", "2", "running"], ["A", "control", "running"],
                            ["B", "3", "running"], ["B", "4", "running"]]


def test_piped_watch_prints_snapshots(cluster):
    process = subprocess.Popen([QUIL_COORD, "--home", str(cluster.home), "status", "--watch", "--interval", "0.5"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        headers = 0
        while headers < 2:
            line = process.stdout.readline()
            assert line, "status --watch ended before its second snapshot"
            headers += line.startswith("HOST ")
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert err == ""
    assert "\x1b" not in rest


def test_piped_watch_json_prints_one_object_per_line(cluster):
    process = subprocess.Popen([QUIL_COORD, "--home", str(cluster.home), "status", "--watch", "--json",
                                "--interval", "0.5"], stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        snapshots = [json.loads(process.stdout.readline()) for _ in range(2)]
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert [[h["name"] for h in s["hosts"]] for s in snapshots] == [["A", "B"], ["A", "B"]]


# ---------------------------------------------------------------------------
# JSON schemas: exact key sets and value types, as docs/cli.md lists them

PROCESS = {"core": int, "pid": int, "state": str, "restarts": int, "uptime_seconds": float,
           "listen_address": str, "listening": bool, "last_exit_status": (int, type(None)), "cpu_percent": float,
           "rss_bytes": int, "detail": str, "held": bool}
STATUS_HOST = {"name": str, "address": str, "agent": str, "reachable": bool, "expected_cores": list,
               "processes": [PROCESS], "config_generation": int, "cert_expires_in_days": (float, type(None)),
               "node_version": str, "drifted": bool, "drifted_keys": list, "error": str}
ASSIGN = {"config_generation": int, "recorded": bool, "added": list, "removed": list, "moved": list,
          "moved_from": dict, "sizing": dict, "workers": [{"core": int, "host": str, "multiaddr": str}]}
APPLY_HOST = {"name": str, "outcome": str, "config_changed": bool, "started": list, "stopped": list,
              "restarted": list, "control": str, "firewall_changed": bool, "warnings": list, "error": str}
APPLY = {"config_generation": int, "config_sha256": str, "seconds": float, "warnings": list, "hosts": [APPLY_HOST]}
VERIFY = {"ok": bool, "local": bool, "probes": list, "agent_ports": dict, "violations": list, "errors": dict}
HOST = {"name": str, "address": str, "agent": str, "control": bool, "workers": (int, type(None)),
        "reserve": (int, type(None)), "cpus": (int, type(None)), "serial": (str, type(None)),
        "cert_not_after": (float, type(None)), "probe_only": bool, "firewall": str, "cpu_basis": str}
TOKEN = {"id": str, "created": float, "expires": float, "uses_total": int, "uses_left": int,
         "workers": (int, type(None)), "host_name": (str, type(None)), "revoked": bool,
         "last_used": (float, type(None)), "state": str}
FIREWALL_HOST = {"host": str, "address": str, "rules": [{"ports": list, "sources": list, "purpose": str}],
                 "nftables": str, "ufw": list}


def _check_schema(value, schema, where: str = "$") -> None:
    if isinstance(schema, dict):
        assert isinstance(value, dict), where
        assert sorted(value) == sorted(schema), where
        for key, inner in schema.items():
            _check_schema(value[key], inner, f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list) and value, f"{where}: expected a non-empty list"
        for index, item in enumerate(value):
            _check_schema(item, schema[0], f"{where}[{index}]")
    else:
        assert isinstance(value, schema), f"{where}: {value!r} is not {schema}"
        # bool is a subclass of int, so a bool must not pass as a number.
        assert not (isinstance(value, bool) and schema in (int, float)), f"{where}: {value!r} is a bool"


def _json(cluster: LocalCluster, *argv: str) -> dict:
    result = _piped(cluster, *argv, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_json_schema(cluster):
    _check_schema(_json(cluster, "status"), {"hosts": [STATUS_HOST]})


def test_assign_json_schema(cluster):
    _check_schema(_json(cluster, "assign", "--dry-run"), ASSIGN)


def test_apply_json_schema(cluster):
    report = _json(cluster, "apply", "--no-verify")
    _check_schema(report, APPLY)
    assert [(h["name"], h["outcome"]) for h in report["hosts"]] == [("A", "unchanged"), ("B", "unchanged")]


def test_verify_json_schema(cluster):
    report = _json(cluster, "verify")
    _check_schema(report, VERIFY)
    assert report == {"ok": True, "local": True, "probes": [], "agent_ports": {"A": "rejected", "B": "rejected"},
                      "violations": [], "errors": {}}


def test_host_list_json_schema(cluster):
    _check_schema(_json(cluster, "host", "list"), {"hosts": [HOST]})


def test_token_list_json_schema(cluster):
    assert _piped(cluster, "token", "create", "--workers", "2").returncode == 0
    tokens = _json(cluster, "token", "list")
    _check_schema(tokens, {"tokens": [TOKEN]})
    assert tokens["tokens"][0]["state"] == "valid"


def test_firewall_show_json_schema(cluster):
    rules = _json(cluster, "firewall", "show")
    _check_schema(rules, {"hosts": [FIREWALL_HOST]})
    assert [h["host"] for h in rules["hosts"]] == ["A", "B"]
    assert rules["hosts"][1]["rules"][0]["sources"] == ["127.0.0.2"]


# ---------------------------------------------------------------------------
# Terminal output through tmux


class Tmux:
    """A private tmux server (its own socket) whose windows run one command each."""

    def __init__(self, socket_name: str) -> None:
        self.socket_name = socket_name
        # The panes' environment comes from this server; drop what would change the output under test.
        self.env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TMUX", "COLUMNS")}

    def tmux(self, *argv: str) -> str:
        result = subprocess.run(["tmux", "-L", self.socket_name, *argv], capture_output=True, text=True,
                                env=self.env, timeout=30)
        assert result.returncode == 0, f"tmux {' '.join(argv)}: {result.stderr.strip()}"
        return result.stdout

    def start(self, name: str, command: str, width: int = 160, height: int = 50) -> None:
        """Run command in a new window that stays open and prints EXIT=status when it ends."""
        self.tmux("new-session", "-d", "-s", name, "-x", str(width), "-y", str(height),
                  f"{command}; echo EXIT=$?; sleep 600")

    def screen(self, name: str, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", name)

    def wait_for(self, name: str, pattern: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(name)
            if re.search(pattern, screen):
                return screen
            assert time.monotonic() < deadline, f"{pattern!r} not on the screen of {name}:\n{screen}"
            time.sleep(0.1)

    def keys(self, name: str, *keys: str) -> None:
        self.tmux("send-keys", "-t", name, *keys)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket_name, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux(request):
    if shutil.which("tmux") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is missing in CI; .ci/run installs it with apt-get")
        pytest.skip("tmux is not installed; install it (apt-get install tmux) to run the terminal tests")
    # One server per test: a server that kill-server just ended may still hold the socket.
    server = Tmux(f"quil-coord-test-{os.getpid()}-{request.node.name}")
    try:
        yield server
    finally:
        server.close()


def _command(cluster: LocalCluster, *argv: str, env: str = "") -> str:
    return f"{env} {QUIL_COORD} --home {cluster.home} {' '.join(argv)}".strip()


def _table_rows(screen: str) -> list[list[str]]:
    """Cells of the body rows of a rich table (lines framed by │)."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")]
            for line in screen.splitlines() if line.startswith("│")]


def test_terminal_status_shows_bordered_table(cluster, tmux):
    tmux.start("status", _command(cluster, "status"))
    screen = tmux.wait_for("status", r"EXIT=\d+")
    assert "EXIT=0" in screen
    lines = screen.splitlines()
    assert lines[0].startswith("┏━")
    assert [c.strip() for c in lines[1].strip("┃").split("┃")] == [
        "HOST", "CORE", "STATE", "PID", "UPTIME", "RESTARTS", "LISTENING", "DETAIL"]
    assert lines[2].startswith("┡━")
    rows = _table_rows(screen)
    assert sorted((r[0], r[1], r[2], r[6]) for r in rows) == [
        ("A", "1", "running", "yes"), ("A", "2", "running", "yes"), ("A", "control", "running", ""),
        ("B", "3", "running", "yes"), ("B", "4", "running", "yes")]
    assert all(r[3].isdigit() for r in rows)
    assert any(line.startswith("└─") for line in lines)


def test_terminal_status_is_coloured_unless_no_color(cluster, tmux):
    tmux.start("colour", _command(cluster, "status"))
    tmux.wait_for("colour", r"EXIT=0")
    assert COLOUR_SGR.search(tmux.screen("colour", escapes=True))
    tmux.start("plain", _command(cluster, "status", env="NO_COLOR=1"))
    tmux.wait_for("plain", r"EXIT=0")
    screen = tmux.screen("plain", escapes=True)
    assert "┃" in screen
    assert not COLOUR_SGR.search(screen)


def test_terminal_with_dumb_term_gets_plain_text(cluster, tmux):
    tmux.start("dumb", _command(cluster, "status", env="TERM=dumb"))
    screen = tmux.wait_for("dumb", r"EXIT=\d+")
    assert "EXIT=0" in screen
    assert screen.splitlines()[0].split() == ["HOST", "CORE", "STATE", "PID", "UPTIME", "RESTARTS", "LISTENING",
                                              "DETAIL"]
    assert "┃" not in screen
    assert "│" not in screen


def test_terminal_assign_shows_table(cluster, tmux):
    tmux.start("assign", _command(cluster, "assign", "--dry-run"))
    screen = tmux.wait_for("assign", r"EXIT=\d+")
    assert "EXIT=0" in screen
    assert [c.strip() for c in screen.splitlines()[1].strip("┃").split("┃")] == ["CORE", "HOST", "MULTIADDR",
                                                                                 "CHANGE"]
    assert [(r[0], r[1]) for r in _table_rows(screen)] == [("1", "A"), ("2", "A"), ("3", "B"), ("4", "B")]
    assert "dry run: nothing recorded" in screen


def test_terminal_apply_shows_progress_per_host(cluster, tmux):
    # A stopped agent keeps its host's step on the board until it is continued.
    agent_b = cluster.agents["B"].process
    agent_b.send_signal(signal.SIGSTOP)
    try:
        tmux.start("apply", _command(cluster, "apply"))
        board = tmux.wait_for("apply", r"(?m)^\S*\s+B\s+(preflight|applying)\s+\d+\.\d")
    finally:
        agent_b.send_signal(signal.SIGCONT)
    assert re.search(r"(?m)^\s*HOST\s+STEP\s+SECONDS\s*$", board)
    assert re.search(r"(?m)^\S*\s+A\s+\S", board)
    screen = tmux.wait_for("apply", r"EXIT=\d+")
    assert "EXIT=0" in screen
    # The board is gone; the result table and the verify summary stay.
    assert "SECONDS" not in screen
    assert [(r[0], r[1]) for r in _table_rows(screen)] == [("A", "unchanged"), ("B", "unchanged")]
    assert "0 probes, 0 violations; ok" in screen


def test_terminal_watch_refreshes_in_place(cluster, tmux):
    tmux.start("watch", _command(cluster, "status", "--watch", "--interval", "0.5"))
    first = tmux.wait_for("watch", r"refreshed \d\d:\d\d:\d\d")
    stamp = re.search(r"refreshed (\d\d:\d\d:\d\d)", first).group(1)
    later = tmux.wait_for("watch", rf"refreshed (?!{stamp})\d\d:\d\d:\d\d", timeout=30)
    # Redrawn in place: one table on the screen, not one per refresh.
    assert later.count("┃ HOST") == 1
    assert len(_table_rows(later)) == 5
    tmux.keys("watch", "C-c")
    screen = tmux.wait_for("watch", r"EXIT=\d+")
    assert "EXIT=0" in screen
    assert "Traceback" not in screen
