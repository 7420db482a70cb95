"""The supervisor with real child processes: restarts, backoff, stopping, the process table, logs."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest
from helpers import free_port_range

from quil_cluster.agent import bindcheck, listeners
from quil_cluster.agent import supervisor as supervisor_module
from quil_cluster.agent.supervisor import (
    MARKER_ENV, Policy, ProcessInfo, ProcessSpec, Supervisor, backoff_delay, stop_leftovers,
)
from quil_cluster.common.states import State

INSTANCE_ID = "test-instance-1"
LOGGER = supervisor_module.__name__
# Loopback address for the listener tests; other test files use other 127.0.0.x addresses.
LISTEN_ADDRESS = "127.0.0.61"
# Seconds to wait for a state change; far above what any transition needs on an idle host.
DEADLINE = 10.0
POLICY = Policy(start_seconds=0.2, stop_grace_seconds=1, crash_limit=3, crash_window=60, backoff_base=0.05)
# The second exit in a row waits 20 s (16 to 24 s with jitter), so the process stays in BACKOFF.
LONG_BACKOFF = dataclasses.replace(POLICY, backoff_base=20, backoff_cap=100, crash_limit=10, crash_window=1000)
FATAL_DETAIL = (
    "3 failures in 60 s, last: exit status 3;"
    " fix the cause, then run quil-coord restart for this core (or apply again)"
)

EXIT_3 = ("/bin/sh", "-c", "exit 3")
SLEEP = ("/bin/sleep", "1000")
# Prints "ready" after it starts ignoring SIGTERM, so a test can wait for that line before stopping it.
IGNORE_SIGTERM = (
    sys.executable, "-c",
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(1000)\n",
)


# -- helpers ---------------------------------------------------------------


def _spec(directory: Path, argv: tuple[str, ...], core: int = 1, **fields) -> ProcessSpec:
    values = dict(
        core=core, argv=argv, cwd=directory, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        log_path=directory / f"core-{core}.log",
    )
    values.update(fields)
    return ProcessSpec(**values)


def _wait_for(condition: Callable[[], bool], description: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {description}"
        time.sleep(0.02)


def _info(supervisor: Supervisor, core: int) -> ProcessInfo:
    return next(info for info in supervisor.snapshot() if info.core == core)


def _wait_info(supervisor: Supervisor, core: int, condition: Callable[[ProcessInfo], bool], description: str,
               timeout: float = DEADLINE) -> ProcessInfo:
    _wait_for(lambda: condition(_info(supervisor, core)), description, timeout)
    return _info(supervisor, core)


def _wait_state(supervisor: Supervisor, core: int, state: State, timeout: float = DEADLINE) -> ProcessInfo:
    return _wait_info(supervisor, core, lambda info: info.state == state, f"core {core} {state.value}", timeout)


def _messages(caplog: pytest.LogCaptureFixture, level: int | None = None) -> list[str]:
    return [
        record.getMessage() for record in caplog.records
        if record.name == LOGGER and (level is None or record.levelno == level)
    ]


def _is_gone(pid: int, create_time: float) -> bool:
    """Return True once the process with pid and create_time has exited (a zombie counts as exited)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() != create_time or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _text(path: Path) -> str:
    """Return the text of path, or "" while the file does not exist yet."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _read_pid_file(path: Path) -> int:
    _wait_for(lambda: _text(path).endswith("\n"), f"{path.name} written")
    return int(path.read_text())


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = [item.split(b"=", 1) for item in raw.split(b"\0") if item]
    return {key.decode(): value.decode() for key, value in pairs}


def _reap(popen: subprocess.Popen[bytes]) -> None:
    """Kill popen's process group if it is still running, and reap it."""
    if popen.poll() is None:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait(10.0)


def _cleanup(supervisor: Supervisor) -> None:
    # NOTE: reads the private table so that a process the supervisor failed to
    # stop is still killed and reaped, and never outlives the test.
    supervisor.close()
    for record in list(supervisor._records.values()):
        if record.popen is not None:
            _reap(record.popen)


@pytest.fixture
def make_supervisor(tmp_path: Path):
    """A factory of supervisors on tmp_path; every process they started is stopped afterwards."""
    created: list[Supervisor] = []

    def make(policy: Policy = POLICY, begin: bool = True) -> Supervisor:
        supervisor = Supervisor(tmp_path / "processes.json", policy, INSTANCE_ID)
        created.append(supervisor)
        if begin:
            supervisor.begin()
        return supervisor

    try:
        yield make
    finally:
        for supervisor in created:
            if supervisor._thread.is_alive():
                supervisor.stop(sorted(supervisor.specs()))
            _cleanup(supervisor)


@pytest.fixture
def supervisor(make_supervisor) -> Supervisor:
    return make_supervisor()


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


# -- backoff_delay ----------------------------------------------------------


def test_backoff_delay_first_failure_is_immediate():
    assert backoff_delay(1, Policy()) == 0.0


def test_backoff_delay_zero_failures_is_immediate():
    assert backoff_delay(0, Policy()) == 0.0


def test_backoff_delay_doubles_from_base():
    delays = [backoff_delay(failures, Policy(), rng=lambda: 0.5) for failures in range(2, 9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


def test_backoff_delay_stays_at_cap():
    assert backoff_delay(40, Policy(), rng=lambda: 0.5) == 30.0


def test_backoff_delay_jitter_bounds():
    policy = Policy(backoff_base=1.0)
    assert backoff_delay(2, policy, rng=lambda: 0.0) == pytest.approx(0.8)
    assert backoff_delay(2, policy, rng=lambda: 1.0) == pytest.approx(1.2)


def test_backoff_delay_random_jitter_bounded():
    delays = [backoff_delay(2, Policy(backoff_base=1.0)) for _ in range(200)]
    assert min(delays) >= 0.8
    assert max(delays) <= 1.2


# -- restarts and crash loops ---------------------------------------------------


def test_start_returns_after_spawn(make_supervisor, tmp_path):
    supervisor = make_supervisor(dataclasses.replace(POLICY, start_seconds=30))
    supervisor.start(_spec(tmp_path, SLEEP))
    info = _info(supervisor, 1)
    assert info.state == State.STARTING
    assert info.pid > 0
    assert info.restarts == 0


def test_start_before_begin_queues_launch(make_supervisor, tmp_path):
    supervisor = make_supervisor(begin=False)
    supervisor.start(_spec(tmp_path, SLEEP))
    queued = _info(supervisor, 1)
    assert queued.state == State.STOPPED
    assert queued.pid == 0
    supervisor.begin()
    info = _wait_state(supervisor, 1, State.RUNNING)
    assert info.pid > 0
    assert info.restarts == 0


def test_spawn_runs_on_loop_thread_without_preexec(make_supervisor, tmp_path, monkeypatch):
    calls: list[tuple[str, dict]] = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        calls.append((threading.current_thread().name, kwargs))
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(supervisor_module.subprocess, "Popen", recording_popen)
    supervisor = make_supervisor()
    supervisor.start(_spec(tmp_path, SLEEP))
    os.kill(_wait_state(supervisor, 1, State.RUNNING).pid, signal.SIGKILL)
    _wait_info(supervisor, 1, lambda i: i.state == State.RUNNING and i.restarts == 1, "restart")
    assert [thread for thread, _ in calls] == ["supervisor", "supervisor"]
    for _, kwargs in calls:
        assert "preexec_fn" not in kwargs
        assert kwargs["close_fds"] is True
        assert kwargs["process_group"] == 0


def test_restart_backs_off_after_crash(make_supervisor, tmp_path, info_logs):
    supervisor = make_supervisor(LONG_BACKOFF)
    supervisor.start(_spec(tmp_path, EXIT_3))
    info = _wait_info(supervisor, 1, lambda i: i.state == State.BACKOFF and i.restarts == 1, "second exit")
    assert info.last_exit == 3
    assert info.pid == 0
    assert info.detail.startswith("exit status 3; 2 failures in 1000 s, restarting in ")
    started = [m for m in _messages(info_logs) if m.startswith("started: worker core=1 (pid ")]
    assert len(started) == 2
    warnings = _messages(info_logs, logging.WARNING)
    assert warnings[0] == "exited: worker core=1 (exit status 3; not expected, restarting in 0.0 s)"


def test_backoff_detail_shows_second_delay(make_supervisor, tmp_path):
    supervisor = make_supervisor(LONG_BACKOFF)
    supervisor.start(_spec(tmp_path, EXIT_3))
    info = _wait_info(supervisor, 1, lambda i: i.state == State.BACKOFF and i.restarts == 1, "second exit")
    delay = float(info.detail.removeprefix("exit status 3; 2 failures in 1000 s, restarting in ").removesuffix(" s"))
    assert 16.0 <= delay <= 24.0


def test_crash_loop_ends_fatal(supervisor, tmp_path, info_logs):
    supervisor.start(_spec(tmp_path, EXIT_3))
    info = _wait_state(supervisor, 1, State.FATAL)
    assert info.detail == FATAL_DETAIL
    assert info.restarts == 2
    assert info.last_exit == 3
    assert info.pid == 0
    assert _messages(info_logs, logging.ERROR) == [f"fatal: worker core=1 ({FATAL_DETAIL})"]
    assert len(_messages(info_logs, logging.WARNING)) == 2


def test_fatal_process_is_not_restarted(supervisor, tmp_path, info_logs):
    supervisor.start(_spec(tmp_path, EXIT_3))
    _wait_state(supervisor, 1, State.FATAL)
    # Far longer than any backoff of POLICY: a restart would show up in this window.
    time.sleep(1.0)
    info = _info(supervisor, 1)
    assert info.state == State.FATAL
    assert info.pid == 0
    assert info.restarts == 2
    started = [m for m in _messages(info_logs) if m.startswith("started: ")]
    assert len(started) == 3


def test_fatal_process_starts_again_on_start(supervisor, tmp_path):
    supervisor.start(_spec(tmp_path, EXIT_3))
    _wait_state(supervisor, 1, State.FATAL)
    supervisor.start(_spec(tmp_path, SLEEP))
    info = _wait_state(supervisor, 1, State.RUNNING)
    assert info.restarts == 0
    assert info.detail == ""


def test_sigkill_while_running_restarts_once(supervisor, tmp_path):
    supervisor.start(_spec(tmp_path, SLEEP))
    first = _wait_state(supervisor, 1, State.RUNNING)
    os.kill(first.pid, signal.SIGKILL)
    info = _wait_info(supervisor, 1, lambda i: i.state == State.RUNNING and i.restarts == 1, "restart")
    assert info.last_exit == -9
    assert info.pid != first.pid
    assert info.pid > 0


def test_spawn_missing_binary_backs_off(make_supervisor, tmp_path, info_logs):
    supervisor = make_supervisor(LONG_BACKOFF)
    supervisor.start(_spec(tmp_path, (str(tmp_path / "missing-node"),)))
    _wait_for(lambda: len(_messages(info_logs, logging.WARNING)) == 2, "second failed spawn")
    info = _info(supervisor, 1)
    assert info.state == State.BACKOFF
    # Never started, so restarts stays 0 and the detail carries the failures.
    assert info.detail.startswith("spawn failed: No such file or directory; 2 failures in 1000 s, restarting in ")
    assert info.pid == 0
    assert info.last_exit is None
    assert info.restarts == 0
    assert _messages(info_logs, logging.WARNING)[0] == (
        "exited: worker core=1 (spawn failed: No such file or directory; not expected, restarting in 0.0 s)"
    )


def test_spawn_missing_binary_ends_fatal(make_supervisor, tmp_path):
    # Four attempts: a retry that waited for the 10 s log check instead of its
    # backoff would need more than DEADLINE to reach FATAL.
    supervisor = make_supervisor(dataclasses.replace(POLICY, crash_limit=4))
    supervisor.start(_spec(tmp_path, (str(tmp_path / "missing-node"),)))
    info = _wait_state(supervisor, 1, State.FATAL)
    assert info.detail == (
        "4 failures in 60 s, last: spawn failed: No such file or directory;"
        " fix the cause, then run quil-coord restart for this core (or apply again)"
    )
    assert info.pid == 0


def test_start_running_core_raises(supervisor, tmp_path):
    supervisor.start(_spec(tmp_path, SLEEP))
    pid = _info(supervisor, 1).pid
    with pytest.raises(RuntimeError) as err:
        supervisor.start(_spec(tmp_path, SLEEP))
    assert str(err.value) == f"worker core=1 is already running (pid {pid})"


def test_start_running_control_process_raises(supervisor, tmp_path):
    supervisor.start(_spec(tmp_path, SLEEP, core=0))
    pid = _info(supervisor, 0).pid
    with pytest.raises(RuntimeError) as err:
        supervisor.start(_spec(tmp_path, SLEEP, core=0))
    assert str(err.value) == f"control process is already running (pid {pid})"


# -- STARTING -> RUNNING ------------------------------------------------------


def test_listening_process_runs_before_start_seconds(make_supervisor, tmp_path):
    supervisor = make_supervisor(dataclasses.replace(POLICY, start_seconds=30))
    port = free_port_range([LISTEN_ADDRESS], 1)
    listener = (
        sys.executable, "-c",
        "import socket, sys, time\n"
        "server = socket.socket()\n"
        "server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "server.bind((sys.argv[1], int(sys.argv[2])))\n"
        "server.listen()\n"
        "time.sleep(1000)\n",
        LISTEN_ADDRESS, str(port),
    )
    supervisor.start(_spec(tmp_path, listener, listen=(LISTEN_ADDRESS, port),
                           listen_multiaddr=f"/ip4/{LISTEN_ADDRESS}/tcp/{port}"))
    info = _wait_state(supervisor, 1, State.RUNNING)
    assert info.listening is True
    assert info.listen_address == f"/ip4/{LISTEN_ADDRESS}/tcp/{port}"


def test_status_never_shows_listening_process_starting(make_supervisor, tmp_path):
    supervisor = make_supervisor(dataclasses.replace(POLICY, start_seconds=30))
    port = free_port_range([LISTEN_ADDRESS], 1)
    listener = (
        sys.executable, "-c",
        "import socket, sys, time\n"
        "server = socket.socket()\n"
        "server.bind((sys.argv[1], int(sys.argv[2])))\n"
        "server.listen()\n"
        "time.sleep(1000)\n",
        LISTEN_ADDRESS, str(port),
    )
    supervisor.start(_spec(tmp_path, listener, listen=(LISTEN_ADDRESS, port),
                           listen_multiaddr=f"/ip4/{LISTEN_ADDRESS}/tcp/{port}"))
    deadline = time.monotonic() + 20
    while True:
        [info] = supervisor.snapshot()
        if info.listening:
            break
        assert time.monotonic() < deadline, f"never listened: {info}"
    # The snapshot that first finds the port listening also counts the process as started.
    assert info.state == State.RUNNING


def test_silent_process_stays_starting(make_supervisor, tmp_path):
    supervisor = make_supervisor(dataclasses.replace(POLICY, start_seconds=30))
    port = free_port_range([LISTEN_ADDRESS], 1)
    supervisor.start(_spec(tmp_path, SLEEP, listen=(LISTEN_ADDRESS, port)))
    time.sleep(1.0)
    info = _info(supervisor, 1)
    assert info.state == State.STARTING
    assert info.listening is False


def test_process_runs_after_start_seconds(supervisor, tmp_path):
    supervisor.start(_spec(tmp_path, SLEEP))
    info = _wait_state(supervisor, 1, State.RUNNING)
    assert info.restarts == 0
    assert info.start_time > 0


# -- environment --------------------------------------------------------------


def test_spawned_process_has_marker_env(supervisor, tmp_path):
    supervisor.start(_spec(tmp_path, SLEEP, env={"QUIL_TEST_VALUE": "seven"}))
    environ = _environ(_info(supervisor, 1).pid)
    assert environ[MARKER_ENV] == INSTANCE_ID
    assert environ["QUIL_TEST_VALUE"] == "seven"


def test_restarted_process_has_marker_env(supervisor, tmp_path):
    supervisor.start(_spec(tmp_path, SLEEP))
    os.kill(_wait_state(supervisor, 1, State.RUNNING).pid, signal.SIGKILL)
    info = _wait_info(supervisor, 1, lambda i: i.state == State.RUNNING and i.restarts == 1, "restart")
    assert _environ(info.pid)[MARKER_ENV] == INSTANCE_ID


def test_spawned_process_leads_own_group(supervisor, tmp_path):
    supervisor.start(_spec(tmp_path, SLEEP))
    pid = _info(supervisor, 1).pid
    assert os.getpgid(pid) == pid


# -- stop -------------------------------------------------------------------


def test_stop_terminates_process_on_sigterm(supervisor, tmp_path, info_logs):
    supervisor.start(_spec(tmp_path, SLEEP))
    info = _wait_state(supervisor, 1, State.RUNNING)
    create_time = psutil.Process(info.pid).create_time()
    assert supervisor.stop([1]) == [1]
    assert supervisor.states() == {}
    assert _is_gone(info.pid, create_time)
    assert f"stopped: worker core=1 (pid {info.pid}, exit status -15)" in _messages(info_logs)
    assert _messages(info_logs, logging.WARNING) == []


def test_stop_kills_process_ignoring_sigterm(supervisor, tmp_path, caplog):
    supervisor.start(_spec(tmp_path, IGNORE_SIGTERM))
    _wait_for(lambda: (tmp_path / "core-1.log").read_text() == "ready\n", "SIGTERM ignored")
    pid = _info(supervisor, 1).pid
    create_time = psutil.Process(pid).create_time()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert supervisor.stop([1]) == [1]
    assert _is_gone(pid, create_time)
    assert _messages(caplog, logging.WARNING) == [
        f"worker core=1 (pid {pid}) still running 1.0 s after SIGTERM (stop_grace_seconds); sending SIGKILL"
    ]
    assert supervisor.states() == {}


def _kill_if_alive(pid: int, create_time: float) -> None:
    if not _is_gone(pid, create_time):
        os.kill(pid, signal.SIGKILL)


def test_stop_kills_whole_process_group(supervisor, tmp_path):
    child_pid_file = tmp_path / "child.pid"
    script = f"/bin/sleep 1000 & echo $! > {shlex.quote(str(child_pid_file))}; wait"
    supervisor.start(_spec(tmp_path, ("/bin/sh", "-c", script)))
    child = _read_pid_file(child_pid_file)
    create_time = psutil.Process(child).create_time()
    try:
        assert supervisor.stop([1]) == [1]
        _wait_for(lambda: _is_gone(child, create_time), "grandchild exit")
    finally:
        _kill_if_alive(child, create_time)


def test_stop_kills_group_member_ignoring_sigterm(supervisor, tmp_path, caplog):
    # The leader exits on SIGTERM at once; its child ignores SIGTERM and must get SIGKILL.
    child_pid_file = tmp_path / "child.pid"
    child_log = tmp_path / "child.log"
    script = (
        f"{shlex.join(IGNORE_SIGTERM)} > {shlex.quote(str(child_log))} &"
        f" echo $! > {shlex.quote(str(child_pid_file))}; wait"
    )
    supervisor.start(_spec(tmp_path, ("/bin/sh", "-c", script)))
    leader = _info(supervisor, 1).pid
    child = _read_pid_file(child_pid_file)
    create_time = psutil.Process(child).create_time()
    try:
        _wait_for(lambda: _text(child_log) == "ready\n", "SIGTERM ignored in child")
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert supervisor.stop([1]) == [1]
        _wait_for(lambda: _is_gone(child, create_time), "grandchild exit")
    finally:
        _kill_if_alive(child, create_time)
    assert _messages(caplog, logging.WARNING) == [
        f"worker core=1 (pid {leader}) exited, but its process group is still running 1.0 s after SIGTERM"
        " (stop_grace_seconds); sending SIGKILL"
    ]


def test_stop_removes_backoff_process(make_supervisor, tmp_path):
    supervisor = make_supervisor(LONG_BACKOFF)
    supervisor.start(_spec(tmp_path, EXIT_3))
    _wait_info(supervisor, 1, lambda i: i.state == State.BACKOFF and i.restarts == 1, "second exit")
    assert supervisor.stop([1]) == []
    assert supervisor.states() == {}


def test_stop_unknown_core_returns_empty(supervisor):
    assert supervisor.stop([7]) == []


def test_stop_leaves_other_cores_running(supervisor, tmp_path):
    supervisor.start(_spec(tmp_path, SLEEP, core=1))
    supervisor.start(_spec(tmp_path, SLEEP, core=2))
    _wait_state(supervisor, 2, State.RUNNING)
    assert supervisor.stop([1]) == [1]
    assert supervisor.states() == {2: State.RUNNING}


# -- the process table and leftovers ----------------------------------------------


def _table_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def test_process_table_lists_live_processes(supervisor, tmp_path):
    table = tmp_path / "processes.json"
    supervisor.start(_spec(tmp_path, SLEEP, core=1))
    supervisor.start(_spec(tmp_path, ("/bin/sleep", "999"), core=2))
    _wait_for(lambda: len(_table_rows(table)) == 2, "two rows in processes.json")
    pids = {info.core: info.pid for info in supervisor.snapshot()}
    assert sorted(_table_rows(table), key=lambda row: row["core"]) == [
        {"core": 1, "pid": pids[1], "create_time": psutil.Process(pids[1]).create_time(), "argv": list(SLEEP),
         "instance": INSTANCE_ID},
        {"core": 2, "pid": pids[2], "create_time": psutil.Process(pids[2]).create_time(),
         "argv": ["/bin/sleep", "999"], "instance": INSTANCE_ID},
    ]
    assert table.stat().st_mode & 0o777 == 0o600


def test_process_table_drops_stopped_process(supervisor, tmp_path):
    table = tmp_path / "processes.json"
    supervisor.start(_spec(tmp_path, SLEEP, core=1))
    supervisor.start(_spec(tmp_path, SLEEP, core=2))
    _wait_for(lambda: len(_table_rows(table)) == 2, "two rows in processes.json")
    supervisor.stop([1])
    _wait_for(lambda: [row["core"] for row in _table_rows(table)] == [2], "row of core 1 removed")


def test_stop_leftovers_stops_matching_rows(make_supervisor, tmp_path):
    table = tmp_path / "processes.json"
    earlier = make_supervisor()
    earlier.start(_spec(tmp_path, SLEEP, core=1))
    earlier.start(_spec(tmp_path, SLEEP, core=2))
    _wait_for(lambda: len(_table_rows(table)) == 2, "two rows in processes.json")
    earlier.close()
    leftovers = {row["pid"]: row["create_time"] for row in _table_rows(table)}
    # A live process that is not ours: one row has the wrong create time, one the wrong argv.
    other = subprocess.Popen(SLEEP, process_group=0)
    try:
        other_time = psutil.Process(other.pid).create_time()
        rows = _table_rows(table) + [
            {"core": 3, "pid": other.pid, "create_time": other_time + 100.0, "argv": list(SLEEP)},
            {"core": 4, "pid": other.pid, "create_time": other_time, "argv": ["/bin/sleep", "999"]},
        ]
        table.write_text(json.dumps(rows))
        assert stop_leftovers(table, 1.0) == [1, 2]
        for pid, create_time in leftovers.items():
            assert _is_gone(pid, create_time)
        assert other.poll() is None
    finally:
        _reap(other)


def _exec_wrapper(directory: Path) -> Path:
    """Write a node binary that is a shell script which execs sleep, as launcher scripts do."""
    path = directory / "node-wrapper"
    path.write_text(f'#!/bin/sh\nexec {shlex.join(SLEEP)}\n')
    path.chmod(0o755)
    return path


def test_stop_leftovers_stops_exec_wrapper(make_supervisor, tmp_path):
    table = tmp_path / "processes.json"
    argv = (str(_exec_wrapper(tmp_path)), "--core", "1")
    earlier = make_supervisor()
    earlier.start(_spec(tmp_path, argv, core=1))
    _wait_for(lambda: len(_table_rows(table)) == 1, "one row in processes.json")
    pid = _info(earlier, 1).pid
    leftover = psutil.Process(pid)
    _wait_for(lambda: leftover.cmdline() == list(SLEEP), "the wrapper's exec of sleep")
    # The agent was killed: its loop is gone, its process keeps running.
    earlier.close()
    assert _table_rows(table)[0]["argv"] == list(argv)
    assert stop_leftovers(table, 1.0) == [1]
    assert _is_gone(pid, leftover.create_time())


@pytest.mark.parametrize("marker", [None, "other-instance"], ids=["no-marker", "other-marker"])
def test_stop_leftovers_skips_unmarked_process(tmp_path, marker):
    table = tmp_path / "processes.json"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if marker is not None:
        env[MARKER_ENV] = marker
    other = subprocess.Popen(SLEEP, process_group=0, env=env)
    try:
        # Same pid and create time, another command line: a reused pid.
        table.write_text(json.dumps([
            {"core": 3, "pid": other.pid, "create_time": psutil.Process(other.pid).create_time(),
             "argv": ["/opt/node", "--core", "3"], "instance": INSTANCE_ID},
        ]))
        assert stop_leftovers(table, 1.0) == []
        assert other.poll() is None
    finally:
        _reap(other)


def test_stop_leftovers_skips_row_with_bad_core(tmp_path):
    table = tmp_path / "processes.json"
    other = subprocess.Popen(SLEEP, process_group=0)
    try:
        table.write_text(json.dumps([
            {"core": "three", "pid": other.pid, "create_time": psutil.Process(other.pid).create_time(),
             "argv": list(SLEEP)},
        ]))
        assert stop_leftovers(table, 1.0) == []
        assert other.poll() is None
    finally:
        _reap(other)


def test_stop_leftovers_skips_dead_and_broken_rows(tmp_path):
    table = tmp_path / "processes.json"
    dead = subprocess.Popen(("/bin/true",))
    dead.wait()
    table.write_text(json.dumps([
        {"core": 1, "pid": dead.pid, "create_time": 0.0, "argv": ["/bin/true"]},
        {"core": 2, "pid": "not a pid", "create_time": 0.0, "argv": []},
        {"core": 3},
    ]))
    assert stop_leftovers(table, 1.0) == []


def test_stop_leftovers_missing_table_returns_empty(tmp_path):
    assert stop_leftovers(tmp_path / "processes.json", 1.0) == []


def test_stop_leftovers_unreadable_table_returns_empty(tmp_path, caplog):
    table = tmp_path / "processes.json"
    table.write_text("[{\"core\": 1,")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert stop_leftovers(table, 1.0) == []
    assert len(_messages(caplog, logging.WARNING)) == 1


@pytest.mark.parametrize("content", ["5", "null", "{\"core\": 1}", "\"text\""])
def test_stop_leftovers_rejects_non_list_table(tmp_path, caplog, content):
    table = tmp_path / "processes.json"
    table.write_text(content)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert stop_leftovers(table, 1.0) == []
    assert len(_messages(caplog, logging.WARNING)) == 1


def test_stop_leftovers_kills_process_ignoring_sigterm(tmp_path, caplog):
    table = tmp_path / "processes.json"
    ready = tmp_path / "ready.log"
    with open(ready, "wb") as output:
        leftover = subprocess.Popen(IGNORE_SIGTERM, stdout=output, process_group=0)
    try:
        _wait_for(lambda: ready.read_text() == "ready\n", "SIGTERM ignored")
        create_time = psutil.Process(leftover.pid).create_time()
        table.write_text(json.dumps([
            {"core": 5, "pid": leftover.pid, "create_time": create_time, "argv": list(IGNORE_SIGTERM)},
        ]))
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert stop_leftovers(table, 0.5) == [5]
        assert _is_gone(leftover.pid, create_time)
        assert _messages(caplog, logging.WARNING) == [
            f"leftover pid {leftover.pid} still running 0.5 s after SIGTERM; sending SIGKILL"
        ]
    finally:
        _reap(leftover)


def test_stop_leftovers_kills_group_member(tmp_path):
    table = tmp_path / "processes.json"
    child_pid_file = tmp_path / "child.pid"
    child_log = tmp_path / "child.log"
    script = (
        f"{shlex.join(IGNORE_SIGTERM)} > {shlex.quote(str(child_log))} &"
        f" echo $! > {shlex.quote(str(child_pid_file))}; wait"
    )
    argv = ("/bin/sh", "-c", script)
    leftover = subprocess.Popen(argv, process_group=0)
    child = _read_pid_file(child_pid_file)
    child_time = psutil.Process(child).create_time()
    try:
        _wait_for(lambda: _text(child_log) == "ready\n", "SIGTERM ignored in child")
        row = {"core": 6, "pid": leftover.pid, "create_time": psutil.Process(leftover.pid).create_time(),
               "argv": list(argv)}
        table.write_text(json.dumps([row]))
        assert stop_leftovers(table, 0.5) == [6]
        _wait_for(lambda: _is_gone(child, child_time), "grandchild exit")
    finally:
        _kill_if_alive(child, child_time)
        _reap(leftover)


# -- logs ---------------------------------------------------------------------


def _write(path: Path, size: int, fill: bytes) -> bytes:
    data = fill * size
    path.write_bytes(data)
    return data


def test_rotate_if_large_shifts_backups(make_supervisor, tmp_path):
    supervisor = make_supervisor(dataclasses.replace(POLICY, log_max_bytes=4096, log_backups=2), begin=False)
    log_path = tmp_path / "core-1.log"
    current = _write(log_path, 5000, b"c")
    previous = _write(tmp_path / "core-1.log.1", 100, b"b")
    _write(tmp_path / "core-1.log.2", 100, b"a")
    supervisor._rotate_if_large(log_path)
    assert not log_path.exists()
    assert (tmp_path / "core-1.log.1").read_bytes() == current
    assert (tmp_path / "core-1.log.2").read_bytes() == previous
    assert not (tmp_path / "core-1.log.3").exists()


def test_rotate_if_large_ignores_small_file(make_supervisor, tmp_path):
    supervisor = make_supervisor(dataclasses.replace(POLICY, log_max_bytes=4096), begin=False)
    log_path = tmp_path / "core-1.log"
    data = _write(log_path, 4095, b"x")
    supervisor._rotate_if_large(log_path)
    assert log_path.read_bytes() == data
    assert not (tmp_path / "core-1.log.1").exists()


def test_rotate_if_large_ignores_missing_file(make_supervisor, tmp_path):
    supervisor = make_supervisor(begin=False)
    supervisor._rotate_if_large(tmp_path / "core-1.log")
    assert list(tmp_path.iterdir()) == []


def test_rotate_if_large_truncates_live_log(make_supervisor, tmp_path):
    supervisor = make_supervisor(dataclasses.replace(POLICY, log_max_bytes=4096), begin=False)
    log_path = tmp_path / "core-1.log"
    data = _write(log_path, 5000, b"x")
    inode = log_path.stat().st_ino
    supervisor._rotate_if_large(log_path, truncate=True)
    assert log_path.stat().st_size == 0
    assert log_path.stat().st_ino == inode
    assert (tmp_path / "core-1.log.1").read_bytes() == data


def test_restart_rotates_log_keeping_backups(make_supervisor, tmp_path):
    policy = dataclasses.replace(POLICY, crash_limit=4, log_max_bytes=4096, log_backups=2)
    supervisor = make_supervisor(policy)
    noisy_exit = (sys.executable, "-c", "import sys\nsys.stdout.write('x' * 10000)\nsys.exit(3)\n")
    supervisor.start(_spec(tmp_path, noisy_exit))
    _wait_state(supervisor, 1, State.FATAL)
    assert sorted(path.name for path in tmp_path.glob("core-1.log*")) == [
        "core-1.log", "core-1.log.1", "core-1.log.2",
    ]
    for name in ("core-1.log", "core-1.log.1", "core-1.log.2"):
        assert (tmp_path / name).read_bytes() == b"x" * 10000


def test_running_process_log_rotates(make_supervisor, tmp_path):
    supervisor = make_supervisor(dataclasses.replace(POLICY, log_max_bytes=4096, log_check_seconds=0.2))
    noisy = (sys.executable, "-c", "import sys, time\nsys.stdout.write('x' * 100000)\nsys.stdout.flush()\n"
             "time.sleep(1000)\n")
    log_path = tmp_path / "core-1.log"
    rotated = tmp_path / "core-1.log.1"
    supervisor.start(_spec(tmp_path, noisy))
    # The copy is written before the live file is truncated, so an empty live file means done.
    _wait_for(lambda: rotated.exists() and log_path.stat().st_size == 0, "core-1.log rotated")
    assert rotated.read_bytes() == b"x" * 100000
    assert _wait_state(supervisor, 1, State.RUNNING).restarts == 0


def test_rotated_live_log_keeps_appending(make_supervisor, tmp_path):
    supervisor = make_supervisor(dataclasses.replace(POLICY, log_max_bytes=4096, log_check_seconds=0.2))
    go_file = tmp_path / "go"
    # Writes 100000 bytes, then one line more once the test creates the file "go".
    noisy = (sys.executable, "-c",
             "import os, sys, time\nsys.stdout.write('x' * 100000)\nsys.stdout.flush()\n"
             "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.02)\n"
             "print('after rotation', flush=True)\ntime.sleep(1000)\n", str(go_file))
    log_path = tmp_path / "core-1.log"
    supervisor.start(_spec(tmp_path, noisy))
    _wait_for(lambda: (tmp_path / "core-1.log.1").exists() and log_path.stat().st_size == 0, "core-1.log rotated")
    go_file.touch()
    _wait_for(lambda: log_path.stat().st_size > 0, "line after rotation")
    assert log_path.read_bytes() == b"after rotation\n"


def test_failed_rotation_keeps_loop_running(make_supervisor, tmp_path, caplog):
    policy = dataclasses.replace(POLICY, log_max_bytes=4096, log_backups=1, log_check_seconds=0.2)
    supervisor = make_supervisor(policy)
    noisy = (sys.executable, "-c", "import sys, time\nsys.stdout.write('x' * 10000)\nsys.stdout.flush()\n"
             "time.sleep(1000)\n")
    log_path = tmp_path / "core-1.log"
    failed = f"log rotation failed: {log_path} ("
    # A directory where the rotated copy belongs makes the copy fail.
    (tmp_path / "core-1.log.1").mkdir()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        supervisor.start(_spec(tmp_path, noisy))
        _wait_for(lambda: any(m.startswith(failed) for m in _messages(caplog)), "failed rotation of the live log")
        first = _wait_state(supervisor, 1, State.RUNNING)
        os.kill(first.pid, signal.SIGKILL)
        info = _wait_info(supervisor, 1, lambda i: i.state == State.RUNNING and i.restarts == 1, "restart")
    assert info.last_exit == -9


def test_failed_table_write_keeps_loop_running(make_supervisor, tmp_path, caplog):
    # A directory where processes.json belongs makes every table write fail.
    (tmp_path / "processes.json").mkdir()
    supervisor = make_supervisor()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        supervisor.start(_spec(tmp_path, SLEEP))
        first = _wait_state(supervisor, 1, State.RUNNING)
        os.kill(first.pid, signal.SIGKILL)
        info = _wait_info(supervisor, 1, lambda i: i.state == State.RUNNING and i.restarts == 1, "restart")
    assert info.last_exit == -9
    table = tmp_path / "processes.json"
    assert any(message.startswith(f"process table write failed: {table} (") for message in _messages(caplog))


# -- WAITING: bind address on no interface ------------------------------------------

# Documentation range (192.0.2.0/24): never assigned to an interface here.
ABSENT_ADDRESS = "192.0.2.1"


def _absent_spec(directory: Path, argv: tuple[str, ...] = SLEEP) -> ProcessSpec:
    return _spec(directory, argv, listen=(ABSENT_ADDRESS, 41000), binds=(f"/ip4/{ABSENT_ADDRESS}/tcp/41000",))


@pytest.fixture
def extra_addresses(monkeypatch) -> set:
    """Addresses that bindcheck.local_addresses() returns in addition to the real ones."""
    added: set = set()
    real = bindcheck.local_addresses
    monkeypatch.setattr(bindcheck, "local_addresses", lambda: real() | added)
    return added


def test_missing_address_waits_without_failure(supervisor, tmp_path, info_logs):
    supervisor.start(_absent_spec(tmp_path))
    info = _info(supervisor, 1)
    assert info.state == State.WAITING
    assert info.detail == f"waiting for address {ABSENT_ADDRESS} to appear on an interface"
    assert info.pid == 0
    # Several address polls (every 0.5 s) and far more than POLICY's crash loop needs.
    time.sleep(1.5)
    info = _info(supervisor, 1)
    assert info.state == State.WAITING
    assert info.restarts == 0
    assert info.last_exit is None
    assert _messages(info_logs) == [
        f"waiting: worker core=1 (address {ABSENT_ADDRESS} is on no interface; starting when it appears)"
    ]
    assert supervisor.stop([1]) == []
    assert supervisor.states() == {}


def test_waiting_process_starts_when_address_appears(supervisor, tmp_path, extra_addresses, info_logs):
    supervisor.start(_absent_spec(tmp_path))
    assert _info(supervisor, 1).state == State.WAITING
    extra_addresses.add(ipaddress.ip_address(ABSENT_ADDRESS))
    info = _wait_state(supervisor, 1, State.RUNNING)
    assert info.restarts == 0
    assert info.detail == ""
    assert "address up: worker core=1; starting" in _messages(info_logs)


def test_crashed_process_waits_for_lost_address(supervisor, tmp_path, extra_addresses):
    address = ipaddress.ip_address(ABSENT_ADDRESS)
    extra_addresses.add(address)
    supervisor.start(_absent_spec(tmp_path))
    first = _wait_state(supervisor, 1, State.RUNNING)
    extra_addresses.discard(address)
    # Make the next read of the interface addresses see the loss at once.
    time.sleep(POLICY.address_poll_seconds)
    os.kill(first.pid, signal.SIGKILL)
    waiting = _wait_state(supervisor, 1, State.WAITING)
    assert waiting.last_exit == -9
    assert waiting.restarts == 0
    extra_addresses.add(address)
    info = _wait_state(supervisor, 1, State.RUNNING)
    assert info.restarts == 1
    assert info.pid != first.pid


def test_wildcard_and_loopback_never_wait(supervisor, tmp_path):
    port = free_port_range(["0.0.0.0", "127.77.0.1"], 3)
    for core, address in ((1, "/ip4/0.0.0.0"), (2, "/ip4/127.77.0.1"), (3, "/ip6/::")):
        ip = address.split("/")[2]
        supervisor.start(_spec(tmp_path, SLEEP, core=core, listen=(ip, port + core),
                               binds=(f"{address}/tcp/{port + core}",)))
    for core in (1, 2, 3):
        assert _info(supervisor, core).state in (State.STARTING, State.RUNNING)


# -- held ports ------------------------------------------------------------------------

FOREIGN_LISTENER = (
    "import socket, sys, time\n"
    "server = socket.socket()\n"
    "server.bind((sys.argv[1], int(sys.argv[2])))\n"
    "server.listen()\n"
    "time.sleep(1000)\n"
)


def _foreign_listener(directory: Path, address: str, port: int) -> subprocess.Popen[bytes]:
    """Start a process the supervisor did not start, listening on address:port."""
    script = directory / "listener.py"
    script.write_text(FOREIGN_LISTENER)
    proc = subprocess.Popen([sys.executable, str(script), address, str(port)], process_group=0)
    _wait_for(lambda: listeners.is_listening(address, port, listeners.listening()), f"listener on {address}:{port}")
    return proc


def _held_reason(proc: subprocess.Popen[bytes], address: str, port: int) -> str:
    command = " ".join(proc.args)
    if len(command) > bindcheck.MAX_COMMAND_CHARS:
        command = command[: bindcheck.MAX_COMMAND_CHARS - 3] + "..."
    return f"port {address}:{port} is already in use by pid {proc.pid} ({command}); stop that process or free the port"


@pytest.mark.parametrize("foreign_address", [LISTEN_ADDRESS, "0.0.0.0"], ids=["same-address", "wildcard"])
def test_held_port_reported_and_ends_fatal(supervisor, tmp_path, info_logs, foreign_address):
    port = free_port_range([LISTEN_ADDRESS, "0.0.0.0"], 1)
    foreign = _foreign_listener(tmp_path, foreign_address, port)
    try:
        supervisor.start(_spec(tmp_path, SLEEP, listen=(LISTEN_ADDRESS, port),
                               binds=(f"/ip4/{LISTEN_ADDRESS}/tcp/{port}",)))
        info = _wait_state(supervisor, 1, State.FATAL)
        reason = _held_reason(foreign, LISTEN_ADDRESS, port)
        assert info.detail == (f"3 failures in 60 s, last: {reason};"
                               " fix the cause, then run quil-coord restart for this core (or apply again)")
        assert info.pid == 0
        assert info.restarts == 0
        # Not the agent's process: reported, never signalled.
        assert foreign.poll() is None
        warnings = _messages(info_logs, logging.WARNING)
        assert warnings[0] == f"not started: worker core=1 ({reason}; retrying in 0.0 s)"
        assert len(warnings) == 2
        assert [m for m in _messages(info_logs) if m.startswith("started: ")] == []
    finally:
        _reap(foreign)


def test_held_port_freed_starts_process(make_supervisor, tmp_path):
    supervisor = make_supervisor(dataclasses.replace(POLICY, backoff_base=0.5, crash_limit=10, crash_window=1000))
    port = free_port_range([LISTEN_ADDRESS], 1)
    foreign = _foreign_listener(tmp_path, LISTEN_ADDRESS, port)
    try:
        supervisor.start(_spec(tmp_path, SLEEP, listen=(LISTEN_ADDRESS, port)))
        reported = _wait_info(supervisor, 1, lambda i: i.state == State.BACKOFF and "already in use" in i.detail,
                              "held port reported")
        assert reported.pid == 0
    finally:
        _reap(foreign)
    info = _wait_state(supervisor, 1, State.RUNNING)
    assert info.restarts == 1
    assert info.detail == ""


# -- the crash-loop guard cannot be turned off -------------------------------------------


def test_min_crash_window_default_policy():
    # 0 + 0.5 + 1 + 2 + 4 + 8 + 16 + 30 + 30 s of backoff, each at +20 % jitter.
    assert supervisor_module.min_crash_window(10, Policy()) == pytest.approx(109.8)


@pytest.mark.parametrize(("changes", "message"), [
    ({"crash_window": 60.0},
     "crash_window 60.0 s is shorter than the 109.8 s a process that exits at once needs to fail 10 times,"
     " so the crash-loop guard could never trip; use at least 110 s"),
    ({"crash_limit": 1}, "crash_limit must be an integer of at least 2, not 1"),
    ({"crash_limit": 0}, "crash_limit must be an integer of at least 2, not 0"),
    ({"crash_limit": True}, "crash_limit must be an integer of at least 2, not True"),
    ({"crash_window": float("nan")},
     "crash_window nan s is shorter than the 109.8 s a process that exits at once needs to fail 10 times,"
     " so the crash-loop guard could never trip; use at least 110 s"),
])
def test_policy_rejects_disabled_guard(changes, message):
    with pytest.raises(ValueError) as err:
        Policy(**changes)
    assert str(err.value) == message


def test_instant_crash_reaches_fatal_with_growing_delays(make_supervisor, tmp_path, info_logs):
    policy = dataclasses.replace(POLICY, backoff_base=0.05, crash_limit=6, crash_window=10)
    supervisor = make_supervisor(policy)
    supervisor.start(_spec(tmp_path, EXIT_3))
    info = _wait_state(supervisor, 1, State.FATAL)
    assert info.restarts == 5
    delays = [float(m.rsplit("restarting in ", 1)[1].removesuffix(" s)"))
              for m in _messages(info_logs, logging.WARNING)]
    assert delays[0] == 0.0
    # 0.05, 0.1, 0.2, 0.4 s with +/-20 % jitter, rounded to 0.1 s in the log line.
    assert delays == sorted(delays)
    assert delays[-1] >= 0.3
    assert len(delays) == 5


def test_unexpected_exit_kills_rest_of_group(supervisor, tmp_path):
    child_pid_file = tmp_path / "child.pid"
    script = f"/bin/sleep 1000 & echo $! > {shlex.quote(str(child_pid_file))}; wait"
    supervisor.start(_spec(tmp_path, ("/bin/sh", "-c", script)))
    leader = _info(supervisor, 1).pid
    child = _read_pid_file(child_pid_file)
    create_time = psutil.Process(child).create_time()
    try:
        os.kill(leader, signal.SIGKILL)
        _wait_for(lambda: _is_gone(child, create_time), "the old leader's child killed")
        info = _wait_info(supervisor, 1, lambda i: i.restarts == 1 and i.pid != leader, "restart")
        assert info.last_exit == -9
    finally:
        _kill_if_alive(child, create_time)


# -- snapshot -------------------------------------------------------------------------


class _CountingEvent(threading.Event):
    """An Event that counts the threads that called wait()."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters = 0

    def wait(self, timeout=None):
        self.waiters += 1
        return super().wait(timeout)


def test_concurrent_snapshots_share_one_reading(supervisor, tmp_path, monkeypatch):
    supervisor.start(_spec(tmp_path, SLEEP))
    _wait_state(supervisor, 1, State.RUNNING)
    real_read = supervisor._read_snapshot
    entered, release = threading.Event(), threading.Event()
    readings = []

    def blocking_read():
        readings.append(1)
        entered.set()
        release.wait(DEADLINE)
        return real_read()

    monkeypatch.setattr(supervisor, "_read_snapshot", blocking_read)
    results: list[list[ProcessInfo]] = []
    threads = [threading.Thread(target=lambda: results.append(supervisor.snapshot())) for _ in range(4)]
    threads[0].start()
    assert entered.wait(DEADLINE)
    counting = _CountingEvent()
    supervisor._snapshot_reading.done = counting
    for thread in threads[1:]:
        thread.start()
    _wait_for(lambda: counting.waiters == 3, "three callers waiting for the shared reading")
    release.set()
    for thread in threads:
        thread.join(DEADLINE)
    # The leader sets the event when its reading is complete.
    assert counting.is_set()
    assert len(readings) == 1
    assert len(results) == 4
    assert all(result == results[0] for result in results)
    assert results[0][0].state == State.RUNNING
    # Each caller gets its own objects.
    assert len({id(result[0]) for result in results}) == 4
