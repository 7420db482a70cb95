"""Tests for common/tls.py over real gRPC and real mutual TLS on 127.0.0.1."""

from __future__ import annotations

import contextlib
import datetime
import logging
import socket
import ssl
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from quil_cluster.common import pki, tls
from quil_cluster.common.pki import Identity
from quil_cluster.proto import agent_pb2, agent_pb2_grpc

UTC = datetime.timezone.utc
TIMEOUT = 5
SERVICE = "/quil_cluster.agent.v1.Agent/"
COORDINATOR = Identity("alpha", "coordinator", "coordinator")
POLICY = {
    SERVICE + "GetHostFacts": frozenset({"coordinator"}),
    SERVICE + "Apply": frozenset({"coordinator"}),
    # Lets the tests reach a response-streaming method through the interceptor.
    SERVICE + "WatchStatus": frozenset({"coordinator"}),
}
# A client-streaming and a bidirectional method, which the Agent service lacks,
# served by a generic handler.
COUNT = "/quil_cluster.test.Stream/Count"
ECHO = "/quil_cluster.test.Stream/Echo"

Pair = tuple[bytes, bytes]


class HostFactsServicer(agent_pb2_grpc.AgentServicer):
    """Agent servicer that implements GetHostFacts only and reports the caller's identity as hostname."""

    def __init__(self, padding: int = 0) -> None:
        self.padding = padding

    def GetHostFacts(self, request: Any, context: grpc.ServicerContext) -> agent_pb2.HostFacts:
        identity = tls.peer_identity(context)
        hostname = identity.uri if identity is not None else "no identity"
        return agent_pb2.HostFacts(hostname=hostname + "x" * self.padding)


class StreamHandlers:
    """Client-streaming and bidirectional handlers that record whether they ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def count(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self.calls.append("count")
        return str(sum(1 for _ in requests)).encode()

    def echo(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self.calls.append("echo")
        yield from requests

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "quil_cluster.test.Stream",
            {
                "Count": grpc.stream_unary_rpc_method_handler(self.count),
                "Echo": grpc.stream_stream_rpc_method_handler(self.echo),
            },
        )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def running_server(
    server_pair: Pair,
    ca_pem: bytes,
    *,
    interceptor: grpc.ServerInterceptor | None = None,
    servicer: agent_pb2_grpc.AgentServicer | None = None,
    extra_handlers: tuple[grpc.GenericRpcHandler, ...] = (),
) -> Iterator[str]:
    """Serve the Agent API over mutual TLS on 127.0.0.1 and yield the target to dial."""
    if interceptor is None:
        interceptor = tls.AuthorizationInterceptor("alpha", POLICY)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor])
    try:
        agent_pb2_grpc.add_AgentServicer_to_server(servicer or HostFactsServicer(), server)
        server.add_generic_rpc_handlers(extra_handlers)
        credentials = tls.server_credentials(server_pair[0], server_pair[1], ca_pem)
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def _sign_leaf(ca_pair: Pair, names: list[x509.GeneralName]) -> Pair:
    """Sign a client certificate with exactly the SANs given, which pki.issue cannot produce."""
    ca_key = serialization.load_pem_private_key(ca_pair[0], password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca_pair[1])
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coordinator")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def cluster_ca() -> Pair:
    return pki.create_ca("alpha")


@pytest.fixture
def agent_server_cert(cluster_ca: Pair) -> Pair:
    agent = Identity("alpha", "agent", "host-1")
    return pki.issue(*cluster_ca, agent, ip_addresses=["127.0.0.1"], dns_names=["host-1"])


@pytest.fixture
def agent_target(agent_server_cert: Pair, cluster_ca: Pair) -> Iterator[str]:
    with running_server(agent_server_cert, cluster_ca[1]) as target:
        yield target


@pytest.fixture
def coordinator_cert(cluster_ca: Pair) -> Pair:
    return pki.issue(*cluster_ca, COORDINATOR)


@pytest.fixture
def agent_client_cert(cluster_ca: Pair) -> Pair:
    return pki.issue(*cluster_ca, Identity("alpha", "agent", "host-2"))


@pytest.fixture
def cert_without_identity(cluster_ca: Pair) -> Pair:
    return _sign_leaf(cluster_ca, [x509.DNSName("coordinator")])


@pytest.fixture
def cert_from_other_cluster(cluster_ca: Pair) -> Pair:
    return pki.issue(*cluster_ca, Identity("beta", "coordinator", "coordinator"))


@pytest.fixture
def cert_from_other_ca() -> Pair:
    return pki.issue(*pki.create_ca("alpha"), COORDINATOR)


@pytest.fixture
def expired_coordinator_cert(cluster_ca: Pair) -> Pair:
    return pki.issue(*cluster_ca, COORDINATOR, days=30, not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC))


def _credentials(client_pair: Pair, ca_pair: Pair) -> grpc.ChannelCredentials:
    return tls.channel_credentials(client_pair[0], client_pair[1], ca_pair[1])


def _get_host_facts(channel: grpc.Channel) -> agent_pb2.HostFacts:
    with channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        return stub.GetHostFacts(agent_pb2.GetHostFactsRequest(), timeout=TIMEOUT)


def _rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# Calls that pass the TLS handshake and reach the interceptor


def test_coordinator_cert_gets_host_facts(
    agent_target: str, coordinator_cert: Pair, cluster_ca: Pair
) -> None:
    facts = _get_host_facts(tls.secure_channel(agent_target, _credentials(coordinator_cert, cluster_ca)))

    assert facts.hostname == "quil://alpha/coordinator/coordinator"


def test_coordinator_cert_passes_to_apply_handler(
    agent_target: str, coordinator_cert: Pair, cluster_ca: Pair
) -> None:
    # The test servicer leaves Apply unimplemented, so UNIMPLEMENTED proves the call got past the check.
    with tls.secure_channel(agent_target, _credentials(coordinator_cert, cluster_ca)) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        error = _rpc_error(lambda: stub.Apply(agent_pb2.ApplyRequest(), timeout=TIMEOUT))

    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_agent_cert_apply_permission_denied(
    agent_target: str, agent_client_cert: Pair, cluster_ca: Pair
) -> None:
    with tls.secure_channel(agent_target, _credentials(agent_client_cert, cluster_ca)) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        error = _rpc_error(lambda: stub.Apply(agent_pb2.ApplyRequest(), timeout=TIMEOUT))

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "role 'agent' may not call Apply"


def test_method_missing_from_policy_denied(
    agent_target: str, coordinator_cert: Pair, cluster_ca: Pair
) -> None:
    with tls.secure_channel(agent_target, _credentials(coordinator_cert, cluster_ca)) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        error = _rpc_error(lambda: stub.StopAll(agent_pb2.StopAllRequest(), timeout=TIMEOUT))

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "role 'coordinator' may not call StopAll"


def test_cert_without_identity_unauthenticated(
    agent_target: str, cert_without_identity: Pair, cluster_ca: Pair
) -> None:
    channel = tls.secure_channel(agent_target, _credentials(cert_without_identity, cluster_ca))
    error = _rpc_error(lambda: _get_host_facts(channel))

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "client certificate carries no quil-cluster identity"


def test_cert_from_other_cluster_unauthenticated(
    agent_target: str, cert_from_other_cluster: Pair, cluster_ca: Pair
) -> None:
    channel = tls.secure_channel(agent_target, _credentials(cert_from_other_cluster, cluster_ca))
    error = _rpc_error(lambda: _get_host_facts(channel))

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "client certificate belongs to cluster 'beta', not 'alpha'"


def test_response_stream_checked(
    agent_target: str, agent_client_cert: Pair, coordinator_cert: Pair, cluster_ca: Pair
) -> None:
    def watch(client_pair: Pair) -> grpc.RpcError:
        with tls.secure_channel(agent_target, _credentials(client_pair, cluster_ca)) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            return _rpc_error(lambda: list(stub.WatchStatus(agent_pb2.WatchStatusRequest(), timeout=TIMEOUT)))

    denied = watch(agent_client_cert)
    allowed = watch(coordinator_cert)

    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.details() == "role 'agent' may not call WatchStatus"
    # WatchStatus is unimplemented in the test servicer, so the allowed call ends there.
    assert allowed.code() == grpc.StatusCode.UNIMPLEMENTED


def test_request_streams_checked(
    agent_server_cert: Pair, agent_client_cert: Pair, coordinator_cert: Pair, cluster_ca: Pair
) -> None:
    handlers = StreamHandlers()
    policy = {COUNT: frozenset({"coordinator"}), ECHO: frozenset({"coordinator"})}
    interceptor = tls.AuthorizationInterceptor("alpha", policy)
    extra_handlers = (handlers.generic_handler(),)
    server = running_server(
        agent_server_cert, cluster_ca[1], interceptor=interceptor, extra_handlers=extra_handlers
    )
    with server as target:
        with tls.secure_channel(target, _credentials(coordinator_cert, cluster_ca)) as channel:
            count = channel.stream_unary(COUNT)(iter([b"a", b"b", b"c"]), timeout=TIMEOUT)
            echoed = list(channel.stream_stream(ECHO)(iter([b"a", b"b"]), timeout=TIMEOUT))
        allowed_calls = list(handlers.calls)
        with tls.secure_channel(target, _credentials(agent_client_cert, cluster_ca)) as channel:
            count_denied = _rpc_error(lambda: channel.stream_unary(COUNT)(iter([b"a"]), timeout=TIMEOUT))
            echo_denied = _rpc_error(lambda: list(channel.stream_stream(ECHO)(iter([b"a"]), timeout=TIMEOUT)))

    assert count == b"3"
    assert echoed == [b"a", b"b"]
    assert allowed_calls == ["count", "echo"]
    assert count_denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert count_denied.details() == "role 'agent' may not call Count"
    assert echo_denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert echo_denied.details() == "role 'agent' may not call Echo"
    assert handlers.calls == ["count", "echo"]


# Calls that fail the TLS handshake: the client sees UNAVAILABLE.


def test_client_without_cert_unavailable(agent_target: str, cluster_ca: Pair) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=cluster_ca[1])
    error = _rpc_error(lambda: _get_host_facts(tls.secure_channel(agent_target, credentials)))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_cert_from_other_ca_unavailable(
    agent_target: str, cert_from_other_ca: Pair, cluster_ca: Pair
) -> None:
    channel = tls.secure_channel(agent_target, _credentials(cert_from_other_ca, cluster_ca))
    error = _rpc_error(lambda: _get_host_facts(channel))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_expired_coordinator_cert_unavailable(
    agent_target: str, expired_coordinator_cert: Pair, cluster_ca: Pair
) -> None:
    channel = tls.secure_channel(agent_target, _credentials(expired_coordinator_cert, cluster_ca))
    error = _rpc_error(lambda: _get_host_facts(channel))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_unavailable(agent_target: str) -> None:
    error = _rpc_error(lambda: _get_host_facts(grpc.insecure_channel(agent_target)))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_server_cert_without_ip_san_rejected(cluster_ca: Pair, coordinator_cert: Pair) -> None:
    dns_only = pki.issue(*cluster_ca, Identity("alpha", "agent", "host-1"), dns_names=["host-1"])
    with running_server(dns_only, cluster_ca[1]) as target:
        channel = tls.secure_channel(target, _credentials(coordinator_cert, cluster_ca))
        error = _rpc_error(lambda: _get_host_facts(channel))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_server_cert_from_other_ca_rejected(cluster_ca: Pair, coordinator_cert: Pair) -> None:
    other_ca = pki.create_ca("alpha")
    other_server = pki.issue(*other_ca, Identity("alpha", "agent", "host-1"), ip_addresses=["127.0.0.1"])
    # The server trusts the coordinator's CA, but the coordinator does not trust the server's.
    with running_server(other_server, cluster_ca[1]) as target:
        channel = tls.secure_channel(target, _credentials(coordinator_cert, cluster_ca))
        error = _rpc_error(lambda: _get_host_facts(channel))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


# The handshake itself, seen through Python's ssl module

TLS_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


def _raw_handshake(
    target: str, ca_pem: bytes, client_files: tuple[Path, Path] | None, version: ssl.TLSVersion
) -> bytes:
    """Complete a TLS handshake offering HTTP/2, send the client preface, and return the first bytes read."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    context.minimum_version = version
    context.maximum_version = version
    if client_files is not None:
        context.load_cert_chain(certfile=client_files[0], keyfile=client_files[1])
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=host) as conn:
            # HTTP/2 connection preface followed by an empty SETTINGS frame.
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            return conn.recv(64)


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
def test_raw_handshake_without_client_cert_rejected(
    agent_target: str, cluster_ca: Pair, version: ssl.TLSVersion
) -> None:
    # In TLS 1.2 the server rejects the handshake itself. In TLS 1.3 the client
    # finishes its side first, and the server then finds no client certificate
    # and closes the connection, so the first read gets EOF or an error.
    try:
        first_bytes = _raw_handshake(agent_target, cluster_ca[1], None, version)
    except (ssl.SSLError, ConnectionError):
        return

    assert first_bytes == b""


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
def test_raw_handshake_with_client_cert_gets_settings(
    agent_target: str, cluster_ca: Pair, coordinator_cert: Pair, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    cert_file, key_file = tmp_path / "coordinator.crt", tmp_path / "coordinator.key"
    pki.write_public(cert_file, coordinator_cert[1])
    pki.write_private(key_file, coordinator_cert[0])
    first_bytes = _raw_handshake(agent_target, cluster_ca[1], (cert_file, key_file), version)

    # An HTTP/2 frame header: 3 bytes length, then type 0x04 (SETTINGS).
    assert len(first_bytes) >= 9
    assert first_bytes[3] == 0x04


# Message size and peer_identity


def test_secure_channel_limits_message_size(
    agent_server_cert: Pair, coordinator_cert: Pair, cluster_ca: Pair
) -> None:
    with running_server(agent_server_cert, cluster_ca[1], servicer=HostFactsServicer(padding=4096)) as target:
        credentials = _credentials(coordinator_cert, cluster_ca)
        small_channel = tls.secure_channel(target, credentials, max_message_bytes=1024)
        small = _rpc_error(lambda: _get_host_facts(small_channel))
        large = _get_host_facts(tls.secure_channel(target, credentials, max_message_bytes=8192))

    assert small.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert large.hostname.startswith("quil://alpha/coordinator/coordinator")


def test_secure_channel_ignores_proxy_env(
    agent_target: str, coordinator_cert: Pair, cluster_ca: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bound socket that never listens gives a proxy address that refuses connections.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        for name in ("grpc_proxy", "https_proxy", "http_proxy"):
            monkeypatch.setenv(name, proxy)
        credentials = _credentials(coordinator_cert, cluster_ca)
        facts = _get_host_facts(tls.secure_channel(agent_target, credentials))
        # A channel with gRPC's default options dials the proxy and fails.
        through_proxy = _rpc_error(lambda: _get_host_facts(grpc.secure_channel(agent_target, credentials)))

    assert facts.hostname == "quil://alpha/coordinator/coordinator"
    assert through_proxy.code() == grpc.StatusCode.UNAVAILABLE


class StubContext:
    def __init__(self, auth_context: dict[str, list[bytes]]) -> None:
        self._auth_context = auth_context

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth_context


def test_peer_identity_missing_cert() -> None:
    assert tls.peer_identity(StubContext({"transport_security_type": [b"ssl"]})) is None


def test_peer_identity_unparsable_cert() -> None:
    assert tls.peer_identity(StubContext({"x509_pem_cert": [b"not a certificate"]})) is None


def test_peer_identity_reads_cert(coordinator_cert: Pair) -> None:
    assert tls.peer_identity(StubContext({"x509_pem_cert": [coordinator_cert[1]]})) == COORDINATOR


# Logging of denials


def test_denial_logged_with_peer_and_identity(
    agent_target: str, agent_client_cert: Pair, cluster_ca: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="quil_cluster.common.tls"):
        with tls.secure_channel(agent_target, _credentials(agent_client_cert, cluster_ca)) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            _rpc_error(lambda: stub.Apply(agent_pb2.ApplyRequest(), timeout=TIMEOUT))

    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelno == logging.WARNING
    assert record.peer.startswith("ipv4:127.0.0.1:")
    assert record.identity == "quil://alpha/agent/host-2"
    assert record.getMessage() == (
        f"denied: {SERVICE}Apply peer={record.peer} identity=quil://alpha/agent/host-2 "
        "(PERMISSION_DENIED: role 'agent' may not call Apply)"
    )
    assert "PRIVATE KEY" not in caplog.text
    assert "CERTIFICATE" not in caplog.text


def test_denial_without_identity_logged(
    agent_target: str, cert_without_identity: Pair, cluster_ca: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="quil_cluster.common.tls"):
        channel = tls.secure_channel(agent_target, _credentials(cert_without_identity, cluster_ca))
        _rpc_error(lambda: _get_host_facts(channel))

    assert [record.identity for record in caplog.records] == ["none"]
    assert caplog.records[0].getMessage().endswith(
        "(UNAUTHENTICATED: client certificate carries no quil-cluster identity)"
    )


def test_repeated_denials_rate_limited(
    agent_server_cert: Pair, agent_client_cert: Pair, cluster_ca: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    interceptor = tls.AuthorizationInterceptor("alpha", POLICY, clock=clock)

    def call_apply() -> None:
        stub = agent_pb2_grpc.AgentStub(channel)
        _rpc_error(lambda: stub.Apply(agent_pb2.ApplyRequest(), timeout=TIMEOUT))

    with caplog.at_level(logging.WARNING, logger="quil_cluster.common.tls"):
        with running_server(agent_server_cert, cluster_ca[1], interceptor=interceptor) as target:
            with tls.secure_channel(target, _credentials(agent_client_cert, cluster_ca)) as channel:
                call_apply()
                clock.now += 10
                call_apply()
                call_apply()
                records_within_interval = len(caplog.records)
                clock.now += tls.DENIAL_LOG_INTERVAL_SECONDS
                call_apply()

    assert records_within_interval == 1
    assert len(caplog.records) == 2
    assert caplog.records[1].getMessage().endswith(
        "(PERMISSION_DENIED: role 'agent' may not call Apply; "
        "2 similar denials since the last line not logged)"
    )


# Policy validation


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (
            {"Apply": frozenset({"coordinator"})},
            "policy method 'Apply' is not a full name like /package.Service/Method",
        ),
        (
            {SERVICE + "Apply": frozenset({"admin"})},
            f"policy for {SERVICE}Apply names unknown roles ['admin']; expected coordinator, agent, observer",
        ),
    ],
)
def test_interceptor_rejects_invalid_policy(policy: dict[str, frozenset[str]], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        tls.AuthorizationInterceptor("alpha", policy)

    assert str(caught.value) == message


def test_interceptor_rejects_role_given_as_string() -> None:
    policy: Any = {SERVICE + "Apply": "coordinator"}

    with pytest.raises(ValueError, match=r"names unknown roles"):
        tls.AuthorizationInterceptor("alpha", policy)
