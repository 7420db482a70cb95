"""Apply over real mutual TLS: hostile and invalid requests are rejected and write nothing."""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest
from agent_harness import ADDRESS
from helpers import DATA, free_port_range

from quil_cluster.common import nodeconfig
from quil_cluster.proto import agent_pb2 as pb

TIMEOUT = 30


def _config(entries: list[str]) -> bytes:
    base = nodeconfig.load((DATA / "config-1.4.21.yml").read_text())
    return nodeconfig.render(base, "1.4", entries).encode()


def _request(config: bytes, cores, run_control=False, **fields) -> pb.ApplyRequest:
    values = dict(config_yaml=config, config_sha256=hashlib.sha256(config).hexdigest(), config_generation=1,
                  node_generation=pb.NODE_GENERATION_1_4, cores=cores, run_control=run_control)
    values.update(fields)
    return pb.ApplyRequest(**values)


def _entries(count: int, address: str = ADDRESS) -> list[str]:
    base = free_port_range([address], count)
    return [f"/ip4/{address}/tcp/{base + i}" for i in range(count)]


def _rejected(running_agent, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        running_agent.client().Apply(request, timeout=TIMEOUT)
    assert not (running_agent.config.node_config_dir / "config.yml").exists()
    return err.value


def _wait_listening(stub, cores, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT)
        if {p.core for p in status.processes if p.listening} >= set(cores):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def test_apply_starts_workers_then_is_idempotent(running_agent):
    stub = running_agent.client()
    config = _config(_entries(2))
    first = stub.Apply(_request(config, [1, 2]), timeout=TIMEOUT)
    assert (first.changed, first.config_changed, list(first.started)) == (True, True, [1, 2])
    status = _wait_listening(stub, [1, 2])
    assert [p.state for p in status.processes] == [pb.PROCESS_STATE_RUNNING] * 2 or all(
        p.state in (pb.PROCESS_STATE_STARTING, pb.PROCESS_STATE_RUNNING) for p in status.processes)
    second = stub.Apply(_request(config, [1, 2]), timeout=TIMEOUT)
    assert (second.changed, list(second.started), list(second.restarted)) == (False, [], [])


def test_apply_writes_config_0600_and_keeps_backup(running_agent):
    stub = running_agent.client()
    entries = _entries(3)
    first, second = _config(entries[:1]), _config(entries)
    stub.Apply(_request(first, [1]), timeout=TIMEOUT)
    stub.Apply(_request(second, [1]), timeout=TIMEOUT)
    directory = running_agent.config.node_config_dir
    assert (directory / "config.yml").read_bytes() == second
    assert (directory / "config.yml.bak").read_bytes() == first
    assert (directory / "config.yml").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["config.yml", "config.yml.bak"]


def test_apply_moves_and_stops_cores(running_agent):
    stub = running_agent.client()
    entries = _entries(4)
    stub.Apply(_request(_config(entries[:2]), [1, 2]), timeout=TIMEOUT)
    moved = [entries[3], entries[1]]
    reply = stub.Apply(_request(_config(moved), [1]), timeout=TIMEOUT)
    assert list(reply.stopped) == [2]
    assert list(reply.restarted) == [1]
    status = _wait_listening(stub, [1])
    assert [(p.core, p.listen_address) for p in status.processes] == [(1, entries[3])]


def test_apply_with_wrong_hash_is_rejected(running_agent):
    err = _rejected(running_agent, _request(_config(_entries(1)), [1], config_sha256="0" * 64))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "config_sha256 does not match the config content; nothing was written"


def test_apply_core_outside_list_is_rejected(running_agent):
    err = _rejected(running_agent, _request(_config(_entries(2)), [3]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "core 3 has no entry in the worker list (length 2)"


def test_apply_core_of_other_host_is_rejected(running_agent):
    entries = [f"/ip4/192.0.2.7/tcp/40000"]
    err = _rejected(running_agent, _request(_config(entries), [1]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == (
        "core 1 would bind /ip4/192.0.2.7/tcp/40000, but this host's worker_address is 127.0.0.5;"
        " fix the host's address in the coordinator inventory"
    )


@pytest.mark.parametrize("cores", [[0], [1, 1], [65536]])
def test_apply_invalid_core_lists_are_rejected(running_agent, cores):
    err = _rejected(running_agent, _request(_config(_entries(1)), cores))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "cores must be distinct indices from 1 to 65535"


@pytest.mark.parametrize("number", [0, 77])
def test_apply_unknown_generation_is_rejected(running_agent, number):
    err = _rejected(running_agent, _request(_config(_entries(1)), [1], node_generation=number))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"unknown node generation {number}; use 1.4, 2.0 or 2.1"


def test_apply_broken_yaml_is_rejected(running_agent):
    err = _rejected(running_agent, _request(b"engine:\n  dataWorkerMultiaddrs: [\n", [1]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("config.yml from the coordinator:")


def test_apply_deeply_nested_yaml_is_rejected(running_agent):
    config = b"engine: " + b"[" * 5000 + b"]" * 5000 + b"\n"
    err = _rejected(running_agent, _request(config, [1]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "config.yml from the coordinator: invalid YAML: lists or mappings nested too deeply to parse;"
        " a node config has a few levels"
    )


def test_apply_billion_laughs_is_rejected(running_agent):
    # Nine levels of ten aliases each: 10^9 strings once expanded.
    lines = [b"l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 10):
        lines.append(f"l{level}: &l{level} [".encode() + b", ".join([f"*l{level - 1}".encode()] * 10) + b"]")
    config = b"\n".join(lines) + b"\nrebuildstart: 2024-02-30\n"
    err = _rejected(running_agent, _request(config, [1]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "config.yml from the coordinator:5: aliases repeat more than 100000 values once this one is expanded;"
        " a node config needs no aliases, so write the values out in place"
    )


def test_apply_binary_garbage_is_rejected(running_agent):
    err = _rejected(running_agent, _request(b"\xff\xfe\x00garbage", [1]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "config is not UTF-8 text (byte 0)"


def test_apply_oversized_message_is_rejected(running_agent):
    huge = b"# " + b"x" * (3 * 1024 * 1024) + b"\n"
    err = _rejected(running_agent, _request(huge, [1]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stop_all_stops_workers_and_forgets_them(running_agent):
    stub = running_agent.client()
    stub.Apply(_request(_config(_entries(2)), [1, 2]), timeout=TIMEOUT)
    _wait_listening(stub, [1, 2])
    assert list(stub.StopAll(pb.StopAllRequest(), timeout=TIMEOUT).stopped) == [1, 2]
    assert list(stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT).processes) == []


def _control_pid(stub) -> int:
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT)
    return next(p.pid for p in status.processes if p.core == 0)


def test_control_process_held_then_started(running_agent):
    stub = running_agent.client()
    config = _config(_entries(1))
    held = stub.Apply(_request(config, [1], run_control=True, hold_control=True), timeout=TIMEOUT)
    assert held.control == pb.CONTROL_ACTION_HELD
    assert [p.core for p in stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT).processes] == [1]
    started = stub.Apply(_request(config, [1], run_control=True), timeout=TIMEOUT)
    assert started.control == pb.CONTROL_ACTION_STARTED
    assert _control_pid(stub) > 0


def test_control_restarts_only_when_worker_list_changes(running_agent):
    stub = running_agent.client()
    entries = _entries(2)
    stub.Apply(_request(_config(entries[:1]), [1], run_control=True), timeout=TIMEOUT)
    first_pid = _control_pid(stub)
    other_keys = _config(entries[:1]).replace(b"pendingCommitWorkers: 4", b"pendingCommitWorkers: 8")
    same_list = stub.Apply(_request(other_keys, [1], run_control=True), timeout=TIMEOUT)
    assert (same_list.config_changed, same_list.control) == (True, pb.CONTROL_ACTION_NONE)
    assert _control_pid(stub) == first_pid
    grown = stub.Apply(_request(_config(entries), [1, 2], run_control=True), timeout=TIMEOUT)
    assert grown.control == pb.CONTROL_ACTION_RESTARTED
    assert _control_pid(stub) not in (0, first_pid)


def test_control_argv_has_no_core_flag(running_agent):
    stub = running_agent.client()
    stub.Apply(_request(_config(_entries(1)), [1], run_control=True), timeout=TIMEOUT)
    import psutil

    argv = psutil.Process(_control_pid(stub)).cmdline()
    assert "--core" not in argv
    assert argv[-2:] == ["--config", str(running_agent.config.node_config_dir)]


def test_worker_argv_follows_node_contract(running_agent):
    stub = running_agent.client()
    stub.Apply(_request(_config(_entries(1)), [1]), timeout=TIMEOUT)
    import os

    import psutil

    status = _wait_listening(stub, [1])
    argv = psutil.Process(status.processes[0].pid).cmdline()
    assert argv[-6:] == ["--config", str(running_agent.config.node_config_dir), "--core", "1",
                         "--parent-process", str(os.getpid())]


def test_watch_status_streams_snapshots(running_agent):
    stub = running_agent.client()
    stub.Apply(_request(_config(_entries(1)), [1]), timeout=TIMEOUT)
    stream = stub.WatchStatus(pb.WatchStatusRequest(interval_seconds=0.2), timeout=TIMEOUT)
    snapshots = [next(stream) for _ in range(3)]
    stream.cancel()
    assert [[p.core for p in s.processes] for s in snapshots] == [[1], [1], [1]]
    assert all(s.config_generation == 1 for s in snapshots)
