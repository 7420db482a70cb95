"""The stale-plan guard of Apply: a config.yml other than the planned one stops the request before any change."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from agent_harness import ADDRESS
from helpers import DATA, free_port_range

from quil_cluster.common import nodeconfig
from quil_cluster.proto import agent_pb2 as pb

TIMEOUT = 30


def _config(count: int) -> bytes:
    # Worker ports away from the range the agent fixture takes its own port from.
    base = free_port_range([ADDRESS], count, start=47000)
    entries = [f"/ip4/{ADDRESS}/tcp/{base + i}" for i in range(count)]
    return nodeconfig.render(nodeconfig.load((DATA / "config-1.4.21.yml").read_text()), "1.4", entries).encode()


def _request(config: bytes, cores: list[int], base: str | None) -> pb.ApplyRequest:
    request = pb.ApplyRequest(config_yaml=config, config_sha256=hashlib.sha256(config).hexdigest(),
                              config_generation=1, node_generation=pb.NODE_GENERATION_1_4, cores=cores)
    if base is not None:
        request.check_base_config = True
        request.base_config_file_sha256 = base
    return request


def _message(path, on_disk: str, planned: str) -> str:
    return (f"{path} changed underneath since the plan: sha256 on disk {on_disk}, planned against {planned}; "
            "nothing was changed; review the edit with quil-coord config show --diff, then run quil-coord apply "
            "again")


def test_missing_config_matches_empty_base(running_agent):
    config = _config(1)
    reply = running_agent.client().Apply(_request(config, [1], base=""), timeout=TIMEOUT)
    assert reply.config_changed is True
    assert list(reply.started) == [1]
    assert (running_agent.config.node_config_dir / "config.yml").read_bytes() == config


def test_missing_config_rejects_planned_hash(running_agent):
    planned = "ab" * 32
    with pytest.raises(grpc.RpcError) as caught:
        running_agent.client().Apply(_request(_config(1), [1], base=planned), timeout=TIMEOUT)
    path = running_agent.config.node_config_dir / "config.yml"
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == _message(path, "(no file)", "abababababab")
    assert not path.exists()
    assert running_agent.agent.reconciler.supervisor.specs() == {}


def test_present_config_rejects_empty_base(running_agent):
    stub = running_agent.client()
    config = _config(2)
    stub.Apply(_request(config, [1, 2], base=None), timeout=TIMEOUT)
    path = running_agent.config.node_config_dir / "config.yml"
    desired = (running_agent.config.state_dir / "desired.json").read_bytes()
    specs = running_agent.agent.reconciler.supervisor.specs()

    with pytest.raises(grpc.RpcError) as caught:
        stub.Apply(_request(_config(1), [], base=""), timeout=TIMEOUT)

    on_disk = hashlib.sha256(config).hexdigest()[:12]
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == _message(path, on_disk, "(no file)")
    assert path.read_bytes() == config
    assert (running_agent.config.state_dir / "desired.json").read_bytes() == desired
    assert running_agent.agent.reconciler.supervisor.specs() == specs


def test_matching_base_applies(running_agent):
    stub = running_agent.client()
    first, second = _config(1), _config(2)
    stub.Apply(_request(first, [1], base=None), timeout=TIMEOUT)
    reply = stub.Apply(_request(second, [1, 2], base=hashlib.sha256(first).hexdigest()), timeout=TIMEOUT)
    assert reply.config_changed is True
    assert list(reply.started) == [2]
