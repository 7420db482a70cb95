"""Log reading: the tail, following across rotation, the bounds, and the ReadLog RPC over mutual TLS."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import grpc
import pytest
from agent_harness import ADDRESS
from helpers import DATA, free_port_range

from quil_cluster.agent import logs
from quil_cluster.common import nodeconfig
from quil_cluster.proto import agent_pb2 as pb

TIMEOUT = 30
MIB = 1024 * 1024


def _lines(first: int, last: int) -> bytes:
    return b"".join(b"line %05d\n" % n for n in range(first, last + 1))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _follow(path: Path, lines: int, steps: list, clock: FakeClock) -> list[logs.Chunk]:
    """Run logs.stream with follow; each keep_going() call runs the next step (a function or None) first."""
    pending = list(steps)

    def keep_going() -> bool:
        if not pending:
            return False
        step = pending.pop(0)
        if step is not None:
            step()
        return True

    return list(logs.stream(path, lines, True, keep_going, clock=clock, sleep=clock.sleep))


def _append(path: Path, data: bytes):
    def write() -> None:
        with open(path, "ab") as handle:
            handle.write(data)
    return write


# -- tail ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "lines", "expected"), [
    (_lines(1, 500), 3, _lines(498, 500)),
    (_lines(1, 5), 100, _lines(1, 5)),
    (_lines(1, 5), 5, _lines(1, 5)),
    (_lines(1, 5) + b"partial", 2, b"line 00005\npartial"),
    (b"", 10, b""),
    (b"\n\n\n", 2, b"\n\n"),
])
def test_tail_returns_last_lines_exactly(tmp_path, content, lines, expected):
    path = tmp_path / "worker-1.log"
    path.write_bytes(content)
    reader = logs.LogReader(path)
    try:
        assert reader.tail(lines) == (expected, False)
    finally:
        reader.close()


def test_tail_of_huge_line_is_bounded(tmp_path):
    path = tmp_path / "worker-1.log"
    path.write_bytes(b"x" * (3 * MIB) + b"\n")
    reader = logs.LogReader(path)
    try:
        data, truncated = reader.tail(100)
    finally:
        reader.close()
    assert (len(data), truncated) == (logs.MAX_TAIL_BYTES, True)


def test_tail_of_missing_file_is_empty(tmp_path):
    assert logs.LogReader(tmp_path / "worker-1.log").tail(10) == (b"", False)


@pytest.mark.parametrize(("requested", "clamped"), [(0, 100), (1, 1), (10_000, 10_000), (50_000, 10_000),
                                                    (2**32 - 1, 10_000)])
def test_clamp_lines(requested, clamped):
    assert logs.clamp_lines(requested) == clamped


# -- following ------------------------------------------------------------------------------


def test_follow_sends_new_lines(tmp_path):
    path = tmp_path / "worker-1.log"
    path.write_bytes(_lines(1, 3))
    chunks = _follow(path, 1, [_append(path, _lines(4, 5)), None, _append(path, _lines(6, 6))], FakeClock())
    assert b"".join(c.data for c in chunks) == _lines(3, 6)
    assert not any(c.truncated for c in chunks)


def test_follow_across_copy_and_truncate(tmp_path):
    path = tmp_path / "worker-1.log"
    path.write_bytes(_lines(1, 2))

    def rotate() -> None:
        # What the supervisor does to a live log: copy to .1, then truncate in place.
        _append(path, _lines(3, 4))()
        path.with_name(path.name + ".1").write_bytes(path.read_bytes())
        os.truncate(path, 0)
        _append(path, _lines(5, 5))()

    chunks = _follow(path, 10, [rotate], FakeClock())
    assert b"".join(c.data for c in chunks) == _lines(1, 5)


def test_follow_across_rename_and_new_file(tmp_path):
    path = tmp_path / "worker-1.log"
    path.write_bytes(_lines(1, 2))

    def rotate() -> None:
        # What the supervisor does before spawning a stopped process again.
        _append(path, _lines(3, 3))()
        path.replace(path.with_name(path.name + ".1"))

    chunks = _follow(path, 10, [rotate, None, _append(path, _lines(4, 4))], FakeClock())
    assert b"".join(c.data for c in chunks) == _lines(1, 4)


def test_follow_waits_for_missing_file(tmp_path):
    path = tmp_path / "worker-1.log"
    chunks = _follow(path, 10, [None, _append(path, _lines(1, 2))], FakeClock())
    assert b"".join(c.data for c in chunks) == _lines(1, 2)


def test_fast_writer_is_skipped_to_rate(tmp_path):
    path = tmp_path / "worker-1.log"
    path.write_bytes(_lines(1, 1))
    flood = _lines(1, 99_999) * 3  # about 3.3 MiB at once
    clock = FakeClock()
    chunks = _follow(path, 1, [_append(path, flood)], clock)
    follow = chunks[1:]
    sent = sum(len(c.data) for c in follow)
    assert clock.now == 0.0
    assert follow[0].truncated is True
    assert not any(c.truncated for c in follow[1:])
    assert logs.MAX_RATE_BYTES - logs.MAX_CHUNK_BYTES < sent <= logs.MAX_RATE_BYTES
    assert all(len(c.data) <= logs.MAX_CHUNK_BYTES for c in chunks)
    # The kept part starts at a line boundary and ends with the flood's last line.
    data = b"".join(c.data for c in follow)
    assert data.startswith(b"line ")
    assert data.endswith(b"line 99999\n")


def test_rate_budget_refills_over_time():
    clock = FakeClock()
    budget = logs.RateBudget(1000, clock)
    budget.spend(1000)
    assert budget.available() == 0
    clock.now = 0.25
    assert budget.available() == 250
    clock.now = 10.0
    assert budget.available() == 1000


# -- the ReadLog RPC ---------------------------------------------------------------------------


def _write_log(running_agent, core: int, data: bytes) -> Path:
    path = logs.log_file(running_agent.config.log_dir, core)
    path.write_bytes(data)
    return path


def _read(stub, **fields) -> list[pb.LogChunk]:
    return list(stub.ReadLog(pb.ReadLogRequest(**fields), timeout=TIMEOUT))


def test_read_log_sends_last_lines(running_agent):
    _write_log(running_agent, 5, _lines(1, 20_000))
    stub = running_agent.client()
    assert b"".join(c.data for c in _read(stub, core=5, lines=7)) == _lines(19_994, 20_000)
    assert b"".join(c.data for c in _read(stub, core=5)) == _lines(19_901, 20_000)
    chunks = _read(stub, core=5, lines=50_000)
    assert b"".join(c.data for c in chunks) == _lines(10_001, 20_000)
    assert all(len(c.data) <= logs.MAX_CHUNK_BYTES and not c.truncated for c in chunks)


def test_read_log_of_running_worker(running_agent):
    base = free_port_range([ADDRESS], 1)
    config = nodeconfig.render(nodeconfig.load((DATA / "config-1.4.21.yml").read_text()), "1.4",
                               [f"/ip4/{ADDRESS}/tcp/{base}"]).encode()
    stub = running_agent.client()
    stub.Apply(pb.ApplyRequest(config_yaml=config, config_sha256=hashlib.sha256(config).hexdigest(),
                               config_generation=1, node_generation=pb.NODE_GENERATION_1_4, cores=[1]),
               timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while b"data worker listening" not in b"".join(c.data for c in _read(stub, core=1, lines=10)):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_read_log_follow_sees_new_lines(running_agent):
    path = _write_log(running_agent, 5, _lines(1, 3))
    stream = running_agent.client().ReadLog(pb.ReadLogRequest(core=5, lines=1, follow=True), timeout=TIMEOUT)
    try:
        assert next(stream).data == _lines(3, 3)
        _append(path, _lines(4, 5))()
        received = b""
        while received != _lines(4, 5):
            received += next(stream).data
    finally:
        stream.cancel()


def test_read_log_follow_rate_is_bounded(running_agent):
    path = _write_log(running_agent, 5, _lines(1, 1))
    seconds = 3.0
    stream = running_agent.client().ReadLog(pb.ReadLogRequest(core=5, lines=1, follow=True), timeout=seconds)
    started = time.monotonic()
    sent, truncated = 0, []
    with pytest.raises(grpc.RpcError) as err:
        for index, chunk in enumerate(stream):
            if index == 0:
                _append(path, _lines(1, 99_999) * 10)()  # about 11 MiB at once
                _append(path, _lines(1, 99_999) * 10)()
            sent += len(chunk.data)
            truncated.append(chunk.truncated)
    elapsed = time.monotonic() - started
    print(f"ReadLog follow: {sent} bytes in {elapsed:.2f} s against a 22 MiB flood")
    # The call's deadline ends the stream.
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert truncated[1] is True
    assert sent <= logs.MAX_RATE_BYTES * (1 + elapsed)


def test_read_log_fifth_stream_is_rejected(running_agent):
    _write_log(running_agent, 5, _lines(1, 1))
    stub = running_agent.client()
    streams = [stub.ReadLog(pb.ReadLogRequest(core=5, follow=True), timeout=TIMEOUT) for _ in range(logs.MAX_STREAMS)]
    try:
        for stream in streams:
            assert next(stream).data == _lines(1, 1)
        with pytest.raises(grpc.RpcError) as err:
            _read(stub, core=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == "at most 4 log streams at once; close one and retry"
    finally:
        for stream in streams:
            stream.cancel()
    # The handlers notice the cancel at their next check, 0.2 s later; then the slots are free again.
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            assert b"".join(c.data for c in _read(stub, core=5)) == _lines(1, 1)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline
            time.sleep(0.1)


@pytest.mark.parametrize(("core", "code", "message"), [
    (7, grpc.StatusCode.NOT_FOUND,
     "core 7 is not assigned to this host and has no log file here; check the core with quil-coord status"),
    (0, grpc.StatusCode.NOT_FOUND,
     "core 0 is not assigned to this host and has no log file here; check the core with quil-coord status"),
    (65536, grpc.StatusCode.INVALID_ARGUMENT,
     "core 65536 is out of range; core indices go from 0 (the control process) to 65535"),
    (2**32 - 1, grpc.StatusCode.INVALID_ARGUMENT,
     "core 4294967295 is out of range; core indices go from 0 (the control process) to 65535"),
])
def test_read_log_of_unknown_core_is_rejected(running_agent, core, code, message):
    with pytest.raises(grpc.RpcError) as err:
        _read(running_agent.client(), core=core)
    assert (err.value.code(), err.value.details()) == (code, message)


@pytest.mark.parametrize("role", ["observer", "agent"])
def test_read_log_is_coordinator_only(running_agent, role):
    _write_log(running_agent, 5, _lines(1, 1))
    with pytest.raises(grpc.RpcError) as err:
        _read(running_agent.client(role), core=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == f"role '{role}' may not call ReadLog"
