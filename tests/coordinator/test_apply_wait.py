"""The wait for workers before the control process starts: only hosts still starting workers are polled."""

from __future__ import annotations

from quil_cluster.coordinator import apply as apply_module
from quil_cluster.coordinator.inventory import Host
from quil_cluster.proto import agent_pb2 as pb


class ScriptedStub:
    """An agent whose GetStatus returns the next set of listening cores from a script, then the last one."""

    def __init__(self, rounds: list[set[int]]) -> None:
        self.rounds = rounds
        self.calls = 0

    def GetStatus(self, request: pb.GetStatusRequest, timeout: float) -> pb.StatusResponse:  # noqa: N802 - gRPC name
        listening = self.rounds[min(self.calls, len(self.rounds) - 1)]
        self.calls += 1
        return pb.StatusResponse(processes=[pb.ProcessStatus(core=c, listening=True) for c in sorted(listening)])


class FakeChannel:
    def close(self) -> None:
        pass


class FakeCredentials:
    def __init__(self, stubs: dict[str, ScriptedStub]) -> None:
        self.stubs = stubs

    def stub(self, host: Host) -> tuple[FakeChannel, ScriptedStub]:
        return FakeChannel(), self.stubs[host.name]


HOSTS = [Host("A", "192.0.2.10", "192.0.2.10:7350", control=True), Host("B", "192.0.2.11", "192.0.2.11:7350"),
         Host("C", "192.0.2.12", "192.0.2.12:7350")]
CORES = {"A": [1], "B": [2, 3], "C": []}


def test_wait_polls_only_pending_hosts(monkeypatch):
    monkeypatch.setattr(apply_module.time, "sleep", lambda seconds: None)
    stubs = {"A": ScriptedStub([{1}]), "B": ScriptedStub([{2}, {2}, {2, 3}]), "C": ScriptedStub([set()])}
    pending = apply_module._wait_workers_listening(FakeCredentials(stubs), HOSTS, CORES)
    assert pending == []
    assert stubs["A"].calls == 1
    assert stubs["B"].calls == 3
    assert stubs["C"].calls == 0


def test_wait_returns_cores_never_listening(monkeypatch):
    monkeypatch.setattr(apply_module, "WORKERS_READY_TIMEOUT", 0.3)
    stubs = {"A": ScriptedStub([{1}]), "B": ScriptedStub([{2}]), "C": ScriptedStub([set()])}
    pending = apply_module._wait_workers_listening(FakeCredentials(stubs), HOSTS, CORES)
    assert pending == [3]
    assert stubs["A"].calls == 1
