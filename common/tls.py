"""gRPC credentials for mutual TLS, the identity of a call's peer, and authorization by role.

gRPC's TLS layer accepts any client certificate the cluster CA signed (a
client without one fails the handshake). It cannot decide which peer may call
which method, so every server installs AuthorizationInterceptor. That
interceptor reads the quil:// identity of the verified client certificate and
checks its cluster and role against a policy before the servicer runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Set as AbstractSet
from typing import Any, NamedTuple

import grpc

from .errors import TLSError
from .pki import ROLES, Identity, identity_from_cert_pem, serial_hex

__all__ = [
    "MAX_MESSAGE_BYTES",
    "DENIAL_LOG_INTERVAL_SECONDS",
    "NO_IDENTITY_MESSAGE",
    "server_credentials",
    "channel_credentials",
    "secure_channel",
    "peer_identity",
    "peer_serial",
    "AuthorizationInterceptor",
]

logger = logging.getLogger(__name__)

# Maximum size of one gRPC message in either direction, in bytes. It equals the
# receive limit grpcio 1.85 applies when no option is set.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Denials with the same identity, method and status are logged at most once per this many seconds.
DENIAL_LOG_INTERVAL_SECONDS = 60.0
NO_IDENTITY_MESSAGE = "client certificate carries no quil-cluster identity"


def server_credentials(key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> grpc.ServerCredentials:
    """Build server credentials that require a client certificate signed by the CA."""
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=ca_pem,
        require_client_auth=True,
    )


def channel_credentials(key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> grpc.ChannelCredentials:
    """Build client credentials that present the certificate and trust only the CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem,
        private_key=key_pem,
        certificate_chain=cert_pem,
    )


def secure_channel(
    target: str,
    creds: grpc.ChannelCredentials,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """Open a TLS channel to target (HOST:PORT).

    The server certificate must carry a SAN that matches HOST: an IP SAN when
    HOST is an IP address, otherwise a DNS SAN. Keepalive stays at gRPC's
    defaults, under which clients send no keepalive pings. A client that pings
    more often than the server permits gets its connection closed with a GOAWAY
    "too_many_pings" (gRPC core, doc/keepalive.md).
    """
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Agents are dialed directly. Without this option gRPC would read
        # grpc_proxy, https_proxy or http_proxy from the environment and send
        # the connection through that proxy.
        ("grpc.enable_http_proxy", 0),
    ]
    return grpc.secure_channel(target, creds, options=options)


def peer_identity(context: grpc.ServicerContext) -> Identity | None:
    """Return the identity in the client certificate of the call, or None.

    On a server built with server_credentials, gRPC sets x509_pem_cert in the auth
    context only after it has verified the certificate against the CA, so the
    identity can be trusted. None means that
    the call carries no certificate or that the certificate contains no valid identity.
    """
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    try:
        return identity_from_cert_pem(pems[0])
    except TLSError:
        return None


def peer_serial(context: grpc.ServicerContext) -> str | None:
    """Return the serial number (lower-case hex) of the call's client certificate, or None."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    try:
        return serial_hex(pems[0])
    except TLSError:
        return None


class _Denial(NamedTuple):
    """The status code and message a denied call is aborted with."""

    code: grpc.StatusCode
    message: str


class AuthorizationInterceptor(grpc.ServerInterceptor):
    """Server interceptor that lets a call through only when the caller's role may call the method.

    policy maps full method names (/quil_cluster.agent.v1.Agent/Apply) to the
    roles allowed to call them. A call is aborted before its handler runs with
      UNAUTHENTICATED    when the client certificate carries no identity of this cluster,
      PERMISSION_DENIED  when the method is missing from the policy or the role is not allowed.
    Methods the server does not implement get UNIMPLEMENTED from gRPC as usual.
    """

    def __init__(
        self,
        cluster: str,
        policy: Mapping[str, frozenset[str]],
        *,
        clock: Callable[[], float] = time.monotonic,
        revoked: Callable[[], AbstractSet[str]] | None = None,
    ) -> None:
        _check_policy(policy)
        self._revoked = revoked
        self._cluster = cluster
        self._policy = dict(policy)
        self._clock = clock
        self._lock = threading.Lock()
        # (identity URI, method, status code) -> (time last logged, denials not logged since)
        self._denials: dict[tuple[str, str, grpc.StatusCode], tuple[float, int]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        # The sync interceptor API passes no ServicerContext here, so the check
        # runs inside a wrapper around the handler, where the context exists.
        return self._wrap(handler, handler_call_details.method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        serializers: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guard_unary(handler.unary_unary, method), **serializers
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guard_stream(handler.unary_stream, method), **serializers
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._guard_unary(handler.stream_unary, method), **serializers
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._guard_stream(handler.stream_stream, method), **serializers
            )
        raise TypeError(f"handler for {method} has no behavior")

    def _guard_unary(
        self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str
    ) -> Callable[..., Any]:
        """Wrap a handler that returns one response."""

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            self._authorize(context, method)
            return behavior(request, context)

        return guarded

    def _guard_stream(
        self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str
    ) -> Callable[..., Iterator[Any]]:
        """Wrap a handler that yields a stream of responses."""

        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            # As a generator this body runs only when gRPC requests the first
            # response, but the check still comes before the real handler.
            self._authorize(context, method)
            yield from behavior(request, context)

        return guarded

    def _authorize(self, context: grpc.ServicerContext, method: str) -> None:
        """Abort the call unless the peer's identity may call method."""
        identity = peer_identity(context)
        denial = self._check_revoked(context) or self._check(identity, method)
        if denial is not None:
            self._log_denial(context, identity, method, denial)
            # abort raises, so the real handler never runs.
            context.abort(denial.code, denial.message)

    def _check(self, identity: Identity | None, method: str) -> _Denial | None:
        """Return why identity may not call method, or None when it may."""
        if identity is None:
            return _Denial(grpc.StatusCode.UNAUTHENTICATED, NO_IDENTITY_MESSAGE)
        if identity.cluster != self._cluster:
            return _Denial(
                grpc.StatusCode.UNAUTHENTICATED,
                f"client certificate belongs to cluster '{identity.cluster}', not '{self._cluster}'",
            )
        # A method missing from the policy is denied to every role.
        if identity.role not in self._policy.get(method, frozenset()):
            short_name = method.rsplit("/", 1)[-1]
            message = f"role '{identity.role}' may not call {short_name}"
            return _Denial(grpc.StatusCode.PERMISSION_DENIED, message)
        return None

    def _check_revoked(self, context: grpc.ServicerContext) -> _Denial | None:
        """Return a denial when the client certificate's serial is on the revocation list."""
        if self._revoked is None:
            return None
        serial = peer_serial(context)
        if serial is not None and serial in self._revoked():
            return _Denial(grpc.StatusCode.UNAUTHENTICATED, f"client certificate {serial} has been revoked")
        return None

    def _log_denial(
        self, context: grpc.ServicerContext, identity: Identity | None, method: str, denial: _Denial
    ) -> None:
        """Log a denial at WARNING, at most once per interval for the same identity, method and code."""
        uri = identity.uri if identity is not None else "none"
        key = (uri, method, denial.code)
        now = self._clock()
        with self._lock:
            entry = self._denials.get(key)
            if entry is not None and now - entry[0] < DENIAL_LOG_INTERVAL_SECONDS:
                self._denials[key] = (entry[0], entry[1] + 1)
                return
            suppressed = entry[1] if entry is not None else 0
            self._denials[key] = (now, 0)

        peer = context.peer()
        fields = {"peer": peer, "identity": uri}
        if suppressed:
            logger.warning(
                "denied: %s peer=%s identity=%s (%s: %s; %d similar denials since the last line not logged)",
                method,
                peer,
                uri,
                denial.code.name,
                denial.message,
                suppressed,
                extra=fields,
            )
        else:
            logger.warning(
                "denied: %s peer=%s identity=%s (%s: %s)",
                method,
                peer,
                uri,
                denial.code.name,
                denial.message,
                extra=fields,
            )


def _check_policy(policy: Mapping[str, frozenset[str]]) -> None:
    """Raise ValueError for a policy entry that can never match or names an unknown role."""
    for method, roles in policy.items():
        if not method.startswith("/") or method.count("/") != 2:
            raise ValueError(f"policy method {method!r} is not a full name like /package.Service/Method")
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise ValueError(
                f"policy for {method} names unknown roles {unknown}; expected {', '.join(ROLES)}"
            )
