"""GetHostFacts over mutual TLS reports what doctor checks."""

from __future__ import annotations

import time
from dataclasses import replace

from quil_cluster.agent import hostinfo
from quil_cluster.agent.service import AgentService
from quil_cluster.proto import agent_pb2 as pb


def test_host_facts_carry_doctor_fields(running_agent):
    before = time.time()
    facts = running_agent.client().GetHostFacts(pb.GetHostFactsRequest(), timeout=10)
    after = time.time()
    assert before <= facts.unix_time <= after
    assert "127.0.0.1" in facts.interface_addresses
    low, high = hostinfo.ephemeral_range() or (0, 0)
    assert (facts.ephemeral_port_low, facts.ephemeral_port_high) == (low, high)
    assert facts.ephemeral_reserved_ports == hostinfo.reserved_ports()
    assert list(facts.signature_files) == []
    assert facts.signature_check_disabled is False
    assert facts.worker_gomaxprocs == ""
    assert 0 < facts.memory_available_bytes <= facts.memory_bytes


def test_host_facts_list_signature_files(running_agent):
    binary = running_agent.config.node_binary
    (binary.parent / f"{binary.name}.dgst").write_text("x")
    (binary.parent / f"{binary.name}.dgst.sig.1").write_text("x")
    facts = running_agent.client().GetHostFacts(pb.GetHostFactsRequest(), timeout=10)
    assert list(facts.signature_files) == [f"{binary.name}.dgst", f"{binary.name}.dgst.sig.1"]


def test_host_facts_read_worker_environment(running_agent):
    # The agent reads node_env once at start, so a servicer with another config replaces a restart.
    config = replace(running_agent.config, node_env={"GOMAXPROCS": "64", "QUILIBRIUM_SIGNATURE_CHECK": "false"})
    servicer = AgentService(config, running_agent.agent.reconciler, identity=None)  # type: ignore[arg-type]
    facts = servicer.GetHostFacts(pb.GetHostFactsRequest(), context=None)  # type: ignore[arg-type]
    assert facts.signature_check_disabled is True
    assert facts.worker_gomaxprocs == "64"
