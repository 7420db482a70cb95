"""quil-coord start, stop, restart and logs against real agents on loopback with the stand-in node.

Host A runs the control process and cores 1-2, host B runs core 3. Core 3's
port is taken before the first apply, so core 3 starts in a crash loop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from quil_cluster.coordinator import apply
from quil_cluster.coordinator.demo import LocalCluster

from helpers import DATA, free_port_range

pytestmark = pytest.mark.e2e

HOSTS = {"A": "127.0.0.6", "B": "127.0.0.7"}
HOLD_NOTE = "stopped and held: quil-coord start B --core 3 starts it"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    local = LocalCluster(root)
    control_config = root / "config-1.4.21.yml"
    control_config.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    base = free_port_range(list(HOSTS.values()), 3)
    assert local.init(control_config, "--port-scheme", "global", "--base-port", str(base)) == 0
    assert local.add_host("A", HOSTS["A"], "--control", "--workers", "2") == 0
    assert local.add_host("B", HOSTS["B"], "--workers", "1") == 0
    # Bound but not listening: core 3 fails to bind, and nothing on the port looks like a started worker.
    local.blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    local.blocker.bind((HOSTS["B"], base + 2))
    try:
        for name in HOSTS:
            local.start_agent(name)
        assert local.coord("assign") == 0
        with pytest.MonkeyPatch.context() as patch:
            # Core 3 never listens, so do not wait the full 30 s for it before the control process starts.
            patch.setattr(apply, "WORKERS_READY_TIMEOUT", 2.0)
            assert local.coord("apply", "--no-verify") == 0
        yield local
    finally:
        local.blocker.close()
        local.stop_all()


def _run(capsys, cluster, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cluster.coord(*argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _results(capsys, cluster, *argv) -> tuple[int, list[dict]]:
    code, out, _ = _run(capsys, cluster, *argv, "--json")
    return code, json.loads(out)["results"]


def _lines(out: str) -> list[list[str]]:
    """Split the rows of a table into cells, two or more spaces apart."""
    import re

    return [re.split(r" {2,}", line) for line in out.strip().splitlines()]


def _status(capsys, cluster) -> tuple[int, dict]:
    code, out, _ = _run(capsys, cluster, "status", "--json")
    return code, {h["name"]: {p["core"]: p for p in h["processes"]} for h in json.loads(out)["hosts"]}


def test_restart_of_crashing_core_fails_then_recovers(capsys, cluster):
    code, out, _ = _run(capsys, cluster, "restart", "B", "--core", "3")
    assert code == 4
    [header, row] = _lines(out)
    assert header == ["HOST", "CORE", "RESULT", "PID", "DETAIL"]
    assert row[:3] == ["B", "3", "spawn failed"]
    assert row[-1] == ("exited before it counted as started (exit status 2); the supervisor retries it with "
                       "backoff; see quil-coord logs B --core 3")
    # B runs only core 3, so logs needs no --core.
    code, out, _ = _run(capsys, cluster, "logs", "B", "--lines", "50")
    assert code == 0
    assert "bind: address already in use" in out
    cluster.blocker.close()
    code, results = _results(capsys, cluster, "restart", "B", "--core", "3")
    assert code == 0
    assert [(r["core"], r["result"], r["state"]) for r in results] == [(3, "ok", "running")]


def test_stop_holds_core_and_status_shows_it(capsys, cluster):
    code, out, _ = _run(capsys, cluster, "stop", "B", "--core", "3")
    assert code == 0
    assert _lines(out)[1] == ["B", "3", "ok", HOLD_NOTE]
    code, hosts = _status(capsys, cluster)
    assert code == 0  # held on purpose, so not unhealthy
    held = hosts["B"][3]
    assert (held["state"], held["pid"], held["held"]) == ("stopped", 0, True)
    assert held["detail"] == "held by quil-coord stop; quil-coord start B --core 3 starts it"
    code, out, _ = _run(capsys, cluster, "status")
    [row] = [row for row in _lines(out) if row[:2] == ["B", "3"]]
    assert (row[2], row[-1]) == ("stopped", "held by quil-coord stop; quil-coord start B --core 3 starts it")


def test_apply_keeps_held_core_stopped(capsys, cluster):
    code, out, _ = _run(capsys, cluster, "apply", "--no-verify")
    assert code == 0
    assert "B: warning: core 3 is held stopped by quil-coord stop; quil-coord start B --core 3 starts it" in out
    assert _status(capsys, cluster)[1]["B"][3]["state"] == "stopped"


def test_stop_of_stopped_core_is_a_note(capsys, cluster):
    code, results = _results(capsys, cluster, "stop", "B", "--core", "3")
    assert code == 0
    assert [(r["result"], r["detail"]) for r in results] == [
        ("not running", "was not running; held stopped now: quil-coord start B --core 3 starts it")]


def test_start_ends_hold(capsys, cluster):
    code, results = _results(capsys, cluster, "start", "B")
    assert code == 0
    assert [(r["core"], r["result"], r["state"], r["detail"]) for r in results] == [(3, "ok", "running", "started")]
    code, results = _results(capsys, cluster, "start", "B", "--core", "3")
    assert code == 0
    assert [(r["result"], r["detail"]) for r in results] == [("already running", "already running; nothing done")]
    assert _status(capsys, cluster)[1]["B"][3]["held"] is False


def test_restart_host_gives_new_pids(capsys, cluster):
    before = _status(capsys, cluster)[1]["A"]
    code, results = _results(capsys, cluster, "restart", "A")
    assert code == 0
    assert [(r["core"], r["result"], r["state"]) for r in results] == [(c, "ok", "running") for c in (0, 1, 2)]
    assert all(r["pid"] not in (0, before[r["core"]]["pid"]) for r in results)


def test_core_of_other_host_is_not_assigned(capsys, cluster):
    code, results = _results(capsys, cluster, "start", "B", "--core", "1")
    assert code == 4
    assert [(r["core"], r["result"], r["detail"]) for r in results] == [
        (1, "not assigned",
         "core 1 is not assigned to this host; assign it with quil-coord assign, then run quil-coord apply")]


def test_wait_zero_does_not_wait(capsys, cluster):
    code, results = _results(capsys, cluster, "restart", "B", "--core", "3", "--wait", "0")
    assert code == 0
    assert [r["result"] for r in results] == ["ok"]
    assert results[0]["detail"].startswith("restart requested; not waiting (wait 0) (state ")
    # The restart carries on in the agent.
    deadline = time.monotonic() + 20
    while _status(capsys, cluster)[1]["B"][3]["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize(("argv", "message"), [
    (("start", "Z"), "error: unknown host 'Z'; known hosts: A, B"),
    (("logs", "Z", "--core", "1"), "error: unknown host 'Z'; known hosts: A, B"),
    (("logs", "A"), "error: host A runs cores 0, 1, 2; pass --core N (0 is the control process)"),
])
def test_bad_host_or_missing_core_exits_3(capsys, cluster, argv, message):
    code, out, err = _run(capsys, cluster, *argv)
    assert (code, out, err.strip()) == (3, "", message)


@pytest.mark.parametrize(("argv", "message"), [
    (("stop", "A", "--core", "65536"), "invalid core index '65536': use 0 (the control process) to 65535"),
    (("stop", "A", "--core", "-1"), "invalid core index '-1': use 0 (the control process) to 65535"),
    (("stop", "A", "--wait", "121"), "invalid wait '121': use 0 to 120 seconds"),
    (("logs", "A", "--lines", "0"), "invalid line count '0': use 1 to 10000"),
])
def test_invalid_values_are_usage_errors(capsys, cluster, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cluster.coord(*argv)
    assert exit_info.value.code == 2
    # The usage error shape: the message, then where to read about the option.
    assert capsys.readouterr().err.strip().endswith(f"{message}; see quil-coord {argv[0]} --help")


def test_logs_prints_last_lines_unchanged(capsysbinary, cluster):
    log_file = cluster.root / "hosts" / "A" / "state" / "logs" / "worker-1.log"
    capsysbinary.readouterr()
    assert cluster.coord("logs", "A", "--core", "1", "--lines", "2") == 0
    out = capsysbinary.readouterr().out
    assert out == b"".join(log_file.read_bytes().splitlines(keepends=True)[-2:])


def test_logs_note_when_tail_is_cut(capfdbinary, cluster):
    # A log file without an assigned core is still served; a line of 2 MiB exceeds the 1 MiB tail.
    (cluster.root / "hosts" / "A" / "state" / "logs" / "worker-9.log").write_bytes(b"x" * (2 * 1024 * 1024))
    capfdbinary.readouterr()
    assert cluster.coord("logs", "A", "--core", "9") == 0
    captured = capfdbinary.readouterr()
    assert captured.out == b"x" * (1024 * 1024)
    assert captured.err == (b"note: A: the agent skipped log data to stay within its bounds (1 MiB per second, "
                            b"a tail of 1 MiB)\n")


def test_logs_of_unknown_core_exits_4(capsys, cluster):
    code, _, err = _run(capsys, cluster, "logs", "A", "--core", "8")
    assert code == 4
    assert err.strip() == ("error: A: not_found: core 8 is not assigned to this host and has no log file here; "
                           "check the core with quil-coord status")


def test_logs_follow_ends_quietly_on_ctrl_c(cluster):
    quil_coord = os.path.join(os.path.dirname(sys.executable), "quil-coord")
    process = subprocess.Popen([quil_coord, "--home", str(cluster.home), "logs", "A", "--core", "1", "--follow"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout.read(1)  # the tail arrived, so the stream is open
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert (process.returncode, err) == (130, b"")
