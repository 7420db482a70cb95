"""Control over real mutual TLS: start, stop and restart single node processes of a running agent."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import socket
import time

import grpc
import pytest
from agent_harness import ADDRESS, CLUSTER, RunningAgent
from helpers import DATA, free_port_range

from quil_cluster.agent import config as agent_config
from quil_cluster.agent import control
from quil_cluster.agent.service import build_server
from quil_cluster.common import nodeconfig
from quil_cluster.proto import agent_pb2 as pb

TIMEOUT = 30
WAIT = 10.0
START, STOP, RESTART = pb.CONTROL_VERB_START, pb.CONTROL_VERB_STOP, pb.CONTROL_VERB_RESTART
HELD_2 = "held by quil-coord stop; quil-coord start h1 --core 2 starts it"
NOT_ASSIGNED_3 = "core 3 is not assigned to this host; assign it with quil-coord assign, then run quil-coord apply"
# Crash loops end in FATAL after 3 quick failures instead of 10 spread over a minute.
FAST_FATAL = dict(crash_limit=3, backoff_base=0.05)


@dataclasses.dataclass
class Applied:
    agent: RunningAgent
    stub: object
    request: pb.ApplyRequest
    ports: dict[int, int]


def _apply_request(base: int, cores: list[int], run_control: bool) -> pb.ApplyRequest:
    entries = [f"/ip4/{ADDRESS}/tcp/{base + i}" for i in range(2)]
    config = nodeconfig.render(nodeconfig.load((DATA / "config-1.4.21.yml").read_text()), "1.4", entries).encode()
    return pb.ApplyRequest(config_yaml=config, config_sha256=hashlib.sha256(config).hexdigest(), config_generation=1,
                           node_generation=pb.NODE_GENERATION_1_4, cores=cores, run_control=run_control)


def _control(stub, verb, cores, wait=WAIT) -> list[pb.ControlResult]:
    return list(stub.Control(pb.ControlRequest(verb=verb, cores=cores, wait_seconds=wait), timeout=TIMEOUT).results)


def _processes(stub) -> dict[int, pb.ProcessStatus]:
    return {p.core: p for p in stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT).processes}


def _wait_state(stub, core: int, state, timeout: float = 20.0) -> pb.ProcessStatus:
    deadline = time.monotonic() + timeout
    while True:
        process = _processes(stub).get(core)
        if process is not None and process.state == state:
            return process
        assert time.monotonic() < deadline, f"core {core} never reached {pb.ProcessState.Name(state)}: {process}"
        time.sleep(0.05)


def _apply(running_agent: RunningAgent, run_control: bool = True) -> Applied:
    base = free_port_range([ADDRESS], 2)
    stub = running_agent.client()
    request = _apply_request(base, [1, 2], run_control)
    stub.Apply(request, timeout=TIMEOUT)
    for core in [1, 2]:
        _wait_state(stub, core, pb.PROCESS_STATE_RUNNING)
    return Applied(running_agent, stub, request, {1: base, 2: base + 1})


@pytest.fixture
def applied(running_agent) -> Applied:
    return _apply(running_agent)


def _bound_without_listening(port: int) -> socket.socket:
    """Occupy ADDRESS:port so a worker's bind fails, without a listener that would count as the worker started."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((ADDRESS, port))
    except OSError:
        sock.close()
        raise
    return sock


def _hold_warnings(reply: pb.ApplyResponse) -> list[str]:
    # Loopback test ports can sit in the ephemeral range, which adds a warning of its own.
    return [warning for warning in reply.warnings if not warning.startswith("worker ports")]


def _held(running_agent: RunningAgent) -> list[int]:
    return json.loads((running_agent.config.state_dir / "desired.json").read_text())["held"]


# -- stop and the hold ---------------------------------------------------------------


def test_stop_holds_core_through_supervisor_loop(applied):
    old_pid = _processes(applied.stub)[2].pid
    [result] = _control(applied.stub, STOP, [2])
    assert (result.core, result.error, result.state, result.pid) == (2, pb.CONTROL_ERROR_NONE,
                                                                     pb.PROCESS_STATE_STOPPED, 0)
    assert result.detail == "stopped and held: quil-coord start h1 --core 2 starts it"
    # Longer than the start time and a few supervisor loop rounds: nothing brings it back.
    time.sleep(1.5)
    status = _processes(applied.stub)
    assert (status[2].state, status[2].pid, status[2].detail) == (pb.PROCESS_STATE_STOPPED, 0, HELD_2)
    assert (status[2].held, status[1].held) == (True, False)
    assert status[1].state == pb.PROCESS_STATE_RUNNING
    assert _held(applied.agent) == [2]
    assert old_pid not in {p.pid for p in status.values()}


def test_apply_keeps_held_core_stopped_with_warning(applied):
    _control(applied.stub, STOP, [2])
    reply = applied.stub.Apply(applied.request, timeout=TIMEOUT)
    assert _hold_warnings(reply) == ["core 2 is held stopped by quil-coord stop; quil-coord start h1 --core 2 starts it"]
    assert (list(reply.started), list(reply.restarted)) == ([], [])
    assert _processes(applied.stub)[2].state == pb.PROCESS_STATE_STOPPED
    [result] = _control(applied.stub, START, [2])
    assert (result.error, result.state, result.detail) == (pb.CONTROL_ERROR_NONE, pb.PROCESS_STATE_RUNNING, "started")
    assert result.pid == _processes(applied.stub)[2].pid > 0
    assert _held(applied.agent) == []
    assert _processes(applied.stub)[2].held is False
    assert _hold_warnings(applied.stub.Apply(applied.request, timeout=TIMEOUT)) == []


def test_held_control_process_gets_warning(applied):
    [result] = _control(applied.stub, STOP, [0])
    assert (result.error, result.state) == (pb.CONTROL_ERROR_NONE, pb.PROCESS_STATE_STOPPED)
    reply = applied.stub.Apply(applied.request, timeout=TIMEOUT)
    assert reply.control == pb.CONTROL_ACTION_NONE
    assert _hold_warnings(reply) == ["the control process (core 0) is held stopped by quil-coord stop; "
                                    "quil-coord start h1 --core 0 starts it"]
    assert _processes(applied.stub)[0].state == pb.PROCESS_STATE_STOPPED


def test_apply_without_core_drops_its_hold(applied):
    _control(applied.stub, STOP, [2])
    request = pb.ApplyRequest()
    request.CopyFrom(applied.request)
    del request.cores[1:]
    applied.stub.Apply(request, timeout=TIMEOUT)
    assert _held(applied.agent) == []
    assert 2 not in _processes(applied.stub)


def test_held_core_stays_stopped_after_agent_restart(tmp_path):
    from agent_harness import write_agent_files
    from quil_cluster.common import pki

    ca_key, ca_cert = pki.create_ca(CLUSTER)
    config = agent_config.load(write_agent_files(tmp_path / "agent", ca_key, ca_cert, free_port_range([ADDRESS], 1)))
    first = build_server(config)
    try:
        applied = _apply(RunningAgent(first, config, f"{ADDRESS}:{first.port}", ca_key, ca_cert))
        _control(applied.stub, STOP, [0, 2])
    finally:
        first.stop(stop_processes=True)
    second = build_server(config)
    try:
        stub = RunningAgent(second, config, f"{ADDRESS}:{second.port}", ca_key, ca_cert).client()
        _wait_state(stub, 1, pb.PROCESS_STATE_RUNNING)
        time.sleep(1.5)
        status = _processes(stub)
        assert [(core, p.state, p.pid) for core, p in sorted(status.items()) if core != 1] == [
            (0, pb.PROCESS_STATE_STOPPED, 0), (2, pb.PROCESS_STATE_STOPPED, 0)]
        assert status[2].detail == HELD_2
        [result] = _control(stub, START, [2])
        assert (result.error, result.state) == (pb.CONTROL_ERROR_NONE, pb.PROCESS_STATE_RUNNING)
    finally:
        second.stop(stop_processes=True)


# -- start and restart -----------------------------------------------------------------


def test_restart_running_core_gives_new_pid(applied):
    old_pid = _processes(applied.stub)[1].pid
    [result] = _control(applied.stub, RESTART, [1])
    assert (result.error, result.state, result.detail) == (pb.CONTROL_ERROR_NONE, pb.PROCESS_STATE_RUNNING,
                                                           "restarted")
    assert result.pid not in (0, old_pid)
    assert _processes(applied.stub)[1].pid == result.pid


@pytest.mark.parametrize("verb", [RESTART, START])
def test_start_or_restart_clears_fatal(running_agent, verb):
    supervisor = running_agent.agent.supervisor
    supervisor.policy = dataclasses.replace(supervisor.policy, **FAST_FATAL)
    base = free_port_range([ADDRESS], 2)
    blocker = _bound_without_listening(base + 1)
    try:
        stub = running_agent.client()
        stub.Apply(_apply_request(base, [1, 2], False), timeout=TIMEOUT)
        fatal = _wait_state(stub, 2, pb.PROCESS_STATE_FATAL)
        assert fatal.detail.startswith("3 failures in 180 s, last: exit status 2;")
    finally:
        blocker.close()
    [result] = _control(stub, verb, [2])
    assert (result.error, result.state) == (pb.CONTROL_ERROR_NONE, pb.PROCESS_STATE_RUNNING)
    assert result.pid == _processes(stub)[2].pid > 0


def test_start_all_after_stop_all(applied):
    stopped = _control(applied.stub, STOP, [])
    assert [(r.core, r.error, r.state) for r in stopped] == [(c, pb.CONTROL_ERROR_NONE, pb.PROCESS_STATE_STOPPED)
                                                           for c in (0, 1, 2)]
    assert _held(applied.agent) == [0, 1, 2]
    started = _control(applied.stub, START, [])
    assert [(r.core, r.error, r.state) for r in started] == [(c, pb.CONTROL_ERROR_NONE, pb.PROCESS_STATE_RUNNING)
                                                           for c in (0, 1, 2)]
    assert _held(applied.agent) == []


# -- result errors -------------------------------------------------------------------------


def test_start_running_core_is_already_running(applied):
    pid = _processes(applied.stub)[1].pid
    [result] = _control(applied.stub, START, [1])
    assert (result.error, result.state, result.pid, result.detail) == (
        pb.CONTROL_ERROR_ALREADY_RUNNING, pb.PROCESS_STATE_RUNNING, pid, "already running; nothing done")


def test_stop_stopped_core_is_not_running(applied):
    _control(applied.stub, STOP, [2])
    [result] = _control(applied.stub, STOP, [2])
    assert (result.error, result.state, result.pid) == (pb.CONTROL_ERROR_NOT_RUNNING, pb.PROCESS_STATE_STOPPED, 0)
    assert result.detail == "was not running; held stopped now: quil-coord start h1 --core 2 starts it"


@pytest.mark.parametrize("verb", [START, STOP, RESTART])
def test_core_of_other_host_is_not_assigned(applied, verb):
    [result] = _control(applied.stub, verb, [3])
    assert (result.core, result.error, result.state, result.pid) == (3, pb.CONTROL_ERROR_NOT_ASSIGNED,
                                                                     pb.PROCESS_STATE_STOPPED, 0)
    assert result.detail == NOT_ASSIGNED_3


def test_control_process_of_worker_host_is_not_assigned(running_agent):
    applied = _apply(running_agent, run_control=False)
    [result] = _control(applied.stub, START, [0])
    assert result.error == pb.CONTROL_ERROR_NOT_ASSIGNED
    assert result.detail == ("this host does not run the control process; run quil-coord host set h1 --control, "
                             "then quil-coord assign and quil-coord apply")


def test_start_of_crashing_binary_is_spawn_failed(running_agent):
    # Without a control process no connection to the worker leaves its port in TIME_WAIT, so the port can be bound.
    applied = _apply(running_agent, run_control=False)
    _control(applied.stub, STOP, [2])
    blocker = _bound_without_listening(applied.ports[2])
    try:
        [result] = _control(applied.stub, START, [2])
    finally:
        blocker.close()
    assert result.error == pb.CONTROL_ERROR_SPAWN_FAILED
    assert result.detail == ("exited before it counted as started (exit status 2); the supervisor retries it "
                             "with backoff; see quil-coord logs h1 --core 2")
    log = (applied.agent.config.log_dir / "worker-2.log").read_text()
    assert "bind: address already in use" in log


def test_wait_zero_starts_without_waiting(applied):
    _control(applied.stub, STOP, [2])
    [result] = _control(applied.stub, START, [2], wait=0)
    assert result.error == pb.CONTROL_ERROR_NONE
    state = pb.ProcessState.Name(result.state).removeprefix("PROCESS_STATE_").lower()
    assert state in ("starting", "running")
    assert result.detail == f"start requested; not waiting (wait 0) (state {state})"
    _wait_state(applied.stub, 2, pb.PROCESS_STATE_RUNNING)


def test_wait_zero_still_reports_already_running(applied):
    [result] = _control(applied.stub, START, [2], wait=0)
    assert (result.error, result.state) == (pb.CONTROL_ERROR_ALREADY_RUNNING, pb.PROCESS_STATE_RUNNING)
    assert result.detail == "already running; nothing done"


def test_pending_actions_are_bounded(applied):
    lock = applied.agent.agent.reconciler.lock
    lock.acquire()
    try:
        # The first request waits its full second for the lock, then returns; the action stays queued.
        started = time.monotonic()
        [result] = _control(applied.stub, STOP, [1], wait=1.0)
        elapsed = time.monotonic() - started
        print(f"Control with wait_seconds=1 behind a held lock returned after {elapsed:.3f} s")
        assert 1.0 <= elapsed < 3.0
        assert (result.error, result.state) == (pb.CONTROL_ERROR_TIMEOUT, pb.PROCESS_STATE_RUNNING)
        for _ in range(control.MAX_PENDING_ACTIONS - 1):
            [result] = _control(applied.stub, START, [1], wait=0)
            assert result.error == pb.CONTROL_ERROR_NONE
            assert result.detail == "start queued behind another change; not waiting (wait 0)"
        with pytest.raises(grpc.RpcError) as err:
            _control(applied.stub, START, [1], wait=0)
    finally:
        lock.release()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == ("4 start, stop or restart requests are still in progress on this agent; "
                                   "wait for them (quil-coord status) and retry")


# -- hostile input -----------------------------------------------------------------------------


@pytest.mark.parametrize(("request_fields", "message"), [
    (dict(verb=pb.CONTROL_VERB_UNSPECIFIED, cores=[1]),
     "verb 0 (CONTROL_VERB_UNSPECIFIED) is not valid; use START, STOP or RESTART"),
    (dict(verb=77, cores=[1]), "verb 77 (unknown) is not valid; use START, STOP or RESTART"),
    (dict(verb=START, cores=[65536]),
     "core 65536 is out of range; core indices go from 0 (the control process) to 65535"),
    (dict(verb=STOP, cores=[1, 2**32 - 1]),
     "core 4294967295 is out of range; core indices go from 0 (the control process) to 65535"),
    (dict(verb=STOP, cores=list(range(1, 5001))), "5000 cores requested; the limit is 4097"),
    (dict(verb=RESTART, cores=[2, 1, 2]), "core 2 is listed more than once"),
    (dict(verb=START, cores=[1], wait_seconds=math.nan), "wait_seconds is NaN; give a number of seconds from 0 to 120"),
])
def test_invalid_requests_are_rejected(applied, request_fields, message):
    pids = {core: p.pid for core, p in _processes(applied.stub).items()}
    with pytest.raises(grpc.RpcError) as err:
        applied.stub.Control(pb.ControlRequest(**request_fields), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == message
    # Nothing was touched, and the agent keeps serving.
    assert {core: p.pid for core, p in _processes(applied.stub).items()} == pids
    assert _held(applied.agent) == []


def test_every_core_index_at_once(applied):
    results = _control(applied.stub, START, list(range(4097)), wait=WAIT)
    assert len(results) == 4097
    errors = {r.core: r.error for r in results}
    assert [c for c, e in errors.items() if e == pb.CONTROL_ERROR_ALREADY_RUNNING] == [0, 1, 2]
    assert sum(1 for e in errors.values() if e == pb.CONTROL_ERROR_NOT_ASSIGNED) == 4094


def test_wait_is_clamped_to_120_seconds(applied):
    [result] = _control(applied.stub, STOP, [2], wait=1e300)
    assert (result.error, result.state) == (pb.CONTROL_ERROR_NONE, pb.PROCESS_STATE_STOPPED)
    # A negative wait counts as 0, so the reply does not wait for the new state.
    [result] = _control(applied.stub, START, [2], wait=-5)
    assert result.error == pb.CONTROL_ERROR_NONE
    assert result.detail.startswith("start requested; not waiting (wait 0) (state ")


@pytest.mark.parametrize("role", ["observer", "agent"])
def test_control_is_coordinator_only(applied, role):
    with pytest.raises(grpc.RpcError) as err:
        applied.agent.client(role).Control(pb.ControlRequest(verb=STOP, cores=[1]), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == f"role '{role}' may not call Control"
    assert _processes(applied.stub)[1].state == pb.PROCESS_STATE_RUNNING
