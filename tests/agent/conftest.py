"""Fixtures for the agent tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import free_port_range
from agent_harness import ADDRESS, CLUSTER, RunningAgent, write_agent_files

from quil_cluster.agent import config as agent_config
from quil_cluster.agent.service import build_server
from quil_cluster.common import pki


@pytest.fixture
def running_agent(tmp_path: Path):
    ca_key, ca_cert = pki.create_ca(CLUSTER)
    config = agent_config.load(write_agent_files(tmp_path / "agent", ca_key, ca_cert, free_port_range([ADDRESS], 1)))
    agent = build_server(config)
    try:
        yield RunningAgent(agent, config, f"{ADDRESS}:{agent.port}", ca_key, ca_cert)
    finally:
        agent.stop(stop_processes=True)
