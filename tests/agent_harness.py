"""Agents started inside the test process with a fresh cluster CA, and clients of every kind."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from quil_cluster.agent import config as agent_config
from quil_cluster.agent.service import Agent, build_server
from quil_cluster.common import pki, tls
from quil_cluster.common.yamlio import dump
from quil_cluster.simnode import write_wrapper
from quil_cluster.proto import agent_pb2_grpc as pb_grpc

CLUSTER = "test"
ADDRESS = "127.0.0.5"


@dataclass
class RunningAgent:
    agent: Agent
    config: agent_config.AgentConfig
    target: str
    ca_key: bytes
    ca_cert: bytes

    def client(self, role: str | None = "coordinator", *, ca: tuple[bytes, bytes] | None = None,
               cluster: str = CLUSTER) -> pb_grpc.AgentStub:
        """A stub with a certificate of role from the cluster CA (or ca); role None: no certificate."""
        if role is None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.ca_cert)
        else:
            ca_key, ca_cert = ca or (self.ca_key, self.ca_cert)
            key, cert = pki.issue(ca_key, ca_cert, pki.Identity(cluster, role, "client"))
            creds = tls.channel_credentials(key, cert, self.ca_cert)
        return pb_grpc.AgentStub(tls.secure_channel(self.target, creds))


def node_wrapper(directory: Path, version: str = "1.4.21") -> Path:
    return write_wrapper(directory, version)


def write_agent_files(root: Path, ca_key: bytes, ca_cert: bytes, port: int, **overrides) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    key, cert = pki.issue(ca_key, ca_cert, pki.Identity(CLUSTER, "agent", "h1"), ip_addresses=[ADDRESS])
    pki.write_private(root / "agent.key", key)
    pki.write_public(root / "agent.crt", cert)
    pki.write_public(root / "ca.crt", ca_cert)
    values = {
        "cluster": CLUSTER, "listen": f"{ADDRESS}:{port}", "worker_address": ADDRESS,
        "node_binary": str(node_wrapper(root)), "node_config_dir": str(root / "node" / ".config"),
        "state_dir": str(root / "state"), "tls": {"cert": "agent.crt", "key": "agent.key", "ca": "ca.crt"},
        "stop_grace_seconds": 2,
    }
    values.update(overrides)
    (root / "agent.yaml").write_bytes(dump(values))
    return root / "agent.yaml"
