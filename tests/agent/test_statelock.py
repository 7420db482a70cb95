"""One agent per state directory: a second agent on the same state_dir stops before it starts anything."""

from __future__ import annotations

import dataclasses
import os

import pytest

from agent_harness import ADDRESS
from helpers import free_port_range
from quil_cluster.agent import statelock
from quil_cluster.agent.service import build_server
from quil_cluster.common.errors import ConfigError
from quil_cluster.proto import agent_pb2 as pb


def test_second_lock_on_state_dir_names_holder(tmp_path):
    first = statelock.acquire(tmp_path)
    try:
        with pytest.raises(ConfigError) as err:
            statelock.acquire(tmp_path)
    finally:
        first.release()
    assert str(err.value) == (f"state_dir {tmp_path} is in use by another quil-agent (pid {os.getpid()}); stop "
                              "that agent first, or give this one a state_dir of its own")


def test_lock_is_free_again_after_release(tmp_path):
    statelock.acquire(tmp_path).release()
    again = statelock.acquire(tmp_path)
    again.release()
    assert (tmp_path / "agent.lock").read_text() == f"{os.getpid()}\n"


def test_second_agent_on_same_state_dir_is_rejected(running_agent):
    other = dataclasses.replace(running_agent.config, listen=f"{ADDRESS}:{free_port_range([ADDRESS], 1)}")
    with pytest.raises(ConfigError) as err:
        build_server(other)
    assert str(err.value).startswith(f"state_dir {other.state_dir} is in use by another quil-agent (pid ")
    # The first agent keeps serving, and no process of the second one started.
    status = running_agent.client().GetStatus(pb.GetStatusRequest(), timeout=10)
    assert list(status.processes) == []
