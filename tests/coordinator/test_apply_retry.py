"""A retried Apply: planned against the config its own lost first attempt wrote, never against an edit."""

from __future__ import annotations

import hashlib

import grpc
import pytest

from quil_cluster.coordinator import apply as apply_module
from quil_cluster.coordinator.inventory import Host
from quil_cluster.proto import agent_pb2 as pb

TARGET = b"the config the coordinator sends\n"
TARGET_SHA = hashlib.sha256(TARGET).hexdigest()
PLANNED_SHA = hashlib.sha256(b"the config the preflight saw\n").hexdigest()


class Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset"


class FakeStub:
    """An agent whose first Apply reply is lost and whose config.yml then has the hash on_disk."""

    def __init__(self, on_disk: str, failures: int = 1) -> None:
        self.on_disk = on_disk
        self.failures = failures
        self.bases: list[str] = []

    def Apply(self, request: pb.ApplyRequest, timeout: float) -> pb.ApplyResponse:  # noqa: N802 - gRPC name
        self.bases.append(request.base_config_file_sha256)
        assert request.check_base_config is True
        if len(self.bases) <= self.failures:
            raise Unavailable()
        return pb.ApplyResponse(changed=True, config_changed=False)

    def GetStatus(self, request: pb.GetStatusRequest, timeout: float) -> pb.StatusResponse:  # noqa: N802
        return pb.StatusResponse(config_file_sha256=self.on_disk)


class FakeChannel:
    def close(self) -> None:
        pass


class FakeCredentials:
    def __init__(self, stub: FakeStub) -> None:
        self._stub = stub

    def stub(self, host: Host) -> tuple[FakeChannel, FakeStub]:
        return FakeChannel(), self._stub


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("quil_cluster.coordinator.client.time.sleep", slept.append)
    return slept


def _apply(stub: FakeStub) -> apply_module.HostResult:
    request = pb.ApplyRequest(config_yaml=TARGET, config_sha256=TARGET_SHA)
    host = Host(name="B", address="192.0.2.11", agent="192.0.2.11:7350")
    return apply_module._call_apply(FakeCredentials(stub), host, request, PLANNED_SHA)  # type: ignore[arg-type]


def test_retry_after_lost_reply_plans_against_written_config(no_sleep):
    stub = FakeStub(on_disk=TARGET_SHA)
    result = _apply(stub)
    assert stub.bases == [PLANNED_SHA, TARGET_SHA]
    assert result.outcome == "changed"
    assert len(no_sleep) == 1


def test_retry_before_any_write_keeps_planned_hash():
    stub = FakeStub(on_disk=PLANNED_SHA)
    assert _apply(stub).outcome == "changed"
    assert stub.bases == [PLANNED_SHA, PLANNED_SHA]


def test_retry_after_edit_keeps_planned_hash():
    # The agent then rejects the stale plan; the coordinator never adopts a foreign hash.
    stub = FakeStub(on_disk=hashlib.sha256(b"edited by hand\n").hexdigest())
    _apply(stub)
    assert stub.bases == [PLANNED_SHA, PLANNED_SHA]


def test_unreachable_after_all_attempts(no_sleep):
    stub = FakeStub(on_disk=PLANNED_SHA, failures=3)
    result = _apply(stub)
    assert len(stub.bases) == 3
    assert (result.outcome, result.error) == ("unreachable", "unavailable: connection reset")
    assert len(no_sleep) == 2
