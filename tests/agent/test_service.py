"""The assembled agent: status watches per role, and a restart after the agent was killed."""

from __future__ import annotations

import hashlib
import os
import signal
import time

import grpc
import psutil
import pytest
from agent_harness import ADDRESS, CLUSTER, RunningAgent, write_agent_files
from helpers import DATA, free_port_range

from quil_cluster.agent import config as agent_config
from quil_cluster.agent import service
from quil_cluster.agent.service import build_server
from quil_cluster.common import nodeconfig, pki
from quil_cluster.proto import agent_pb2 as pb

TIMEOUT = 30
WATCH = pb.WatchStatusRequest(interval_seconds=0.2)


def _open_watches(stub, count: int) -> list:
    """Open count status watches and wait for the first snapshot of each, so each keeps its slot."""
    streams = []
    for _ in range(count):
        stream = stub.WatchStatus(WATCH, timeout=TIMEOUT)
        next(stream)
        streams.append(stream)
    return streams


def _watch_error(stub) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        next(stub.WatchStatus(WATCH, timeout=TIMEOUT))
    return err.value


@pytest.mark.parametrize(("full", "other"), [("observer", "coordinator"), ("coordinator", "observer")])
def test_watch_status_pools_are_per_role(running_agent, full, other):
    streams = _open_watches(running_agent.client(full), service.WATCH_SLOTS[full])
    try:
        err = _watch_error(running_agent.client(full))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details() == f"at most 4 status watches at once for role '{full}'; close one and retry"
        assert next(running_agent.client(other).WatchStatus(WATCH, timeout=TIMEOUT)).processes == []
    finally:
        for stream in streams:
            stream.cancel()


def test_watch_status_slot_freed_after_cancel(running_agent):
    observer = running_agent.client("observer")
    for stream in _open_watches(observer, service.WATCH_SLOTS["observer"]):
        stream.cancel()
    # The handler notices the cancel at its next snapshot, 0.2 s later.
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            stream = observer.WatchStatus(WATCH, timeout=TIMEOUT)
            next(stream)
            stream.cancel()
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "no watch slot freed after the streams were cancelled"
            time.sleep(0.1)


def test_watch_status_ends_after_max_seconds(running_agent, monkeypatch):
    assert service.MAX_WATCH_SECONDS == 600.0
    monkeypatch.setattr(service, "MAX_WATCH_SECONDS", 0.5)
    started = time.monotonic()
    snapshots = list(running_agent.client("observer").WatchStatus(WATCH, timeout=TIMEOUT))
    assert 1 <= len(snapshots) <= 4
    assert time.monotonic() - started < TIMEOUT


def _apply_request(port: int) -> pb.ApplyRequest:
    base = nodeconfig.load((DATA / "config-1.4.21.yml").read_text())
    config = nodeconfig.render(base, "1.4", [f"/ip4/{ADDRESS}/tcp/{port}"]).encode()
    return pb.ApplyRequest(
        config_yaml=config, config_sha256=hashlib.sha256(config).hexdigest(), config_generation=1,
        node_generation=pb.NODE_GENERATION_1_4, cores=[1], run_control=True,
    )


def _running_pids(stub) -> dict[int, int]:
    """Wait until the worker listens and the control process runs; return their pids by core."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT)
        pids = {p.core: p.pid for p in status.processes if p.pid}
        if set(pids) == {0, 1} and all(p.listening for p in status.processes if p.core == 1):
            return pids
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def _is_gone(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() != create_time or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_restart_after_kill_replaces_processes(tmp_path):
    ca_key, ca_cert = pki.create_ca(CLUSTER)
    config = agent_config.load(write_agent_files(tmp_path / "agent", ca_key, ca_cert, free_port_range([ADDRESS], 1)))
    killed = build_server(config)
    try:
        stub = RunningAgent(killed, config, f"{ADDRESS}:{killed.port}", ca_key, ca_cert).client()
        # Searched after the agent bound its port, so the search skips that one.
        stub.Apply(_apply_request(free_port_range([ADDRESS], 1)), timeout=TIMEOUT)
        old = {core: (pid, psutil.Process(pid).create_time()) for core, pid in _running_pids(stub).items()}
        # The node binary is a wrapper script that execs Python, so no command line matches the recorded argv.
        assert psutil.Process(old[1][0]).cmdline()[0] != str(config.node_binary)
    finally:
        # What SIGKILL leaves: no API, no supervisor loop, node processes still running.
        killed.server.stop(None).wait(5.0)
        killed.supervisor.close()
        # The kernel drops the state directory's flock when the process dies.
        killed.state_lock.release()
    restarted = build_server(config)
    try:
        for core, (pid, create_time) in old.items():
            assert _is_gone(pid, create_time), f"core {core} (pid {pid}) from the killed agent still runs"
        stub = RunningAgent(restarted, config, f"{ADDRESS}:{restarted.port}", ca_key, ca_cert).client()
        new = _running_pids(stub)
        assert new.keys() == old.keys()
        assert all(new[core] != old[core][0] for core in new)
    finally:
        restarted.stop(stop_processes=True)
        # NOTE: reads the killed supervisor's private table to reap its children, which
        # the restarted agent stopped, so that no Popen object outlives them unreaped.
        for record in killed.supervisor._records.values():
            if record.popen is not None:
                if record.popen.poll() is None:
                    _kill_group(record.popen.pid)
                record.popen.wait(TIMEOUT)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
