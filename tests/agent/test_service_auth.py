"""Who may call the agent: mutual TLS in the handshake, then roles per method."""

from __future__ import annotations

import socket
import ssl

import grpc
import pytest

from quil_cluster.common import pki
from quil_cluster.proto import agent_pb2 as pb
from quil_cluster.proto import agent_pb2_grpc as pb_grpc

from agent_harness import ADDRESS

TIMEOUT = 5


def _code(call, request):
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=TIMEOUT)
    return err.value.code()


def test_coordinator_cert_reads_host_facts(running_agent):
    facts = running_agent.client("coordinator").GetHostFacts(pb.GetHostFactsRequest(), timeout=TIMEOUT)
    assert facts.worker_address == ADDRESS
    assert facts.node_binary_path == str(running_agent.config.node_binary)
    assert len(facts.node_binary_sha256) == 64
    assert facts.logical_cpus >= 1


def test_client_without_certificate_fails_handshake(running_agent):
    stub = running_agent.client(None)
    assert _code(stub.GetStatus, pb.GetStatusRequest()) == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_other_ca_fails_handshake(running_agent):
    other = pki.create_ca("test")
    stub = running_agent.client("coordinator", ca=other)
    assert _code(stub.Apply, pb.ApplyRequest()) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_is_rejected(running_agent):
    stub = pb_grpc.AgentStub(grpc.insecure_channel(running_agent.target))
    assert _code(stub.GetStatus, pb.GetStatusRequest()) == grpc.StatusCode.UNAVAILABLE


def test_agent_role_may_not_apply(running_agent):
    stub = running_agent.client("agent")
    assert _code(stub.Apply, pb.ApplyRequest()) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(stub.StopAll, pb.StopAllRequest()) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(stub.GetStatus, pb.GetStatusRequest()) == grpc.StatusCode.PERMISSION_DENIED


def test_observer_role_reads_but_may_not_apply(running_agent):
    stub = running_agent.client("observer")
    assert stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT).processes == []
    assert _code(stub.Apply, pb.ApplyRequest()) == grpc.StatusCode.PERMISSION_DENIED
    # the node config carries private keys, so reading it is the coordinator's alone
    assert _code(stub.GetConfig, pb.GetConfigRequest()) == grpc.StatusCode.PERMISSION_DENIED


def test_certificate_of_other_cluster_is_unauthenticated(running_agent):
    stub = running_agent.client("coordinator", cluster="other")
    assert _code(stub.GetStatus, pb.GetStatusRequest()) == grpc.StatusCode.UNAUTHENTICATED


def _first_bytes(running_agent, context: ssl.SSLContext) -> bytes:
    """Send the HTTP/2 preface over TLS; return what the server sends back (b'' if it hangs up)."""
    host, port = running_agent.target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as raw:
        try:
            with context.wrap_socket(raw) as tls_socket:
                # With TLS 1.3 a rejected client certificate shows on the first read.
                tls_socket.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                return tls_socket.recv(64)
        except (ssl.SSLError, ConnectionResetError):
            return b""


def _raw_context(running_agent) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=running_agent.ca_cert.decode())
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    return context


def test_raw_tls_handshake_without_client_cert_fails(running_agent):
    assert _first_bytes(running_agent, _raw_context(running_agent)) == b""


def test_raw_tls_handshake_with_client_cert_gets_http2(running_agent, tmp_path):
    key, cert = pki.issue(running_agent.ca_key, running_agent.ca_cert, pki.Identity("test", "observer", "probe"))
    (tmp_path / "k.pem").write_bytes(key)
    (tmp_path / "c.pem").write_bytes(cert)
    context = _raw_context(running_agent)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    reply = _first_bytes(running_agent, context)
    # An HTTP/2 SETTINGS frame: 3-byte length, then type 0x04.
    assert reply[3:4] == b"\x04"
