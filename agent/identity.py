"""The agent's TLS identity, and its renewal without a restart.

The server credentials are dynamic: gRPC calls fetch() before every new
handshake, and fetch() hands over a new certificate only after install()
changed it, so renewing is one atomic swap. Connections already open keep
the certificate they started with.
"""

from __future__ import annotations

import logging
import threading

import grpc

from ..common import pki
from ..common.errors import TLSError
from .config import AgentConfig

log = logging.getLogger(__name__)


class InstallError(Exception):
    """Raised when a certificate cannot be installed; its message is the reason for the caller."""


class AgentIdentity:
    def __init__(self, config: AgentConfig) -> None:
        pem = pki.load_pem_files(config.tls.key, config.tls.cert, config.tls.ca)
        if pem.identity.role != "agent" or pem.identity.cluster != config.cluster:
            raise TLSError(f"{config.tls.cert}: certificate is for {pem.identity.uri}, not an agent of cluster"
                           f" {config.cluster}; use the bundle written by quil-coord host add")
        self._config = config
        self._lock = threading.Lock()
        self._key, self._cert, self._ca = pem.key_pem, pem.cert_pem, pem.ca_pem
        self.identity = pem.identity
        self.not_after = pem.not_valid_after.timestamp()
        self._version = 0
        self._fetched = 0
        self._pending_key: bytes | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        with self._lock:
            initial = grpc.ssl_server_certificate_configuration([(self._key, self._cert)], root_certificates=self._ca)
        return grpc.dynamic_ssl_server_credentials(initial, self._fetch, require_client_authentication=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Runs on gRPC's accept path before every handshake, so it only compares a counter.
        with self._lock:
            if self._fetched == self._version:
                return None
            self._fetched = self._version
            return grpc.ssl_server_certificate_configuration([(self._key, self._cert)], root_certificates=self._ca)

    def create_csr(self) -> bytes:
        """Make a new key, keep it in memory, and return a signing request for it."""
        key, csr = pki.make_csr(self.identity.name)
        with self._lock:
            self._pending_key = key
        return csr

    def install(self, cert_pem: bytes, ca_bundle_pem: bytes = b"") -> tuple[float, str]:
        """Write and serve a certificate for the pending key; return its expiry time and serial.

        A non-empty ca_bundle_pem replaces the trusted CAs, which is how a CA
        rotation reaches the agent.
        """
        with self._lock:
            key = self._pending_key
        if key is None:
            raise InstallError("no signing request is pending; call CreateCSR first")
        ca = ca_bundle_pem or self._ca
        try:
            identity = pki.check_pair(key, cert_pem, ca)
        except (TLSError, ValueError) as err:
            raise InstallError(str(err)) from err
        if identity != self.identity:
            raise InstallError(f"certificate is for {identity.uri}, not for this agent ({self.identity.uri})")
        # NOTE: a crash between these two writes leaves a key that does not match the
        # certificate; the agent then refuses to start with a clear error, and the host
        # must be enrolled again.
        if ca_bundle_pem:
            pki.write_public(self._config.tls.ca, ca_bundle_pem)
        pki.write_private(self._config.tls.key, key)
        pki.write_public(self._config.tls.cert, cert_pem)
        not_after = pki.load_pem_files(self._config.tls.key, self._config.tls.cert, self._config.tls.ca)
        with self._lock:
            self._key, self._cert, self._ca = key, cert_pem, ca
            self._pending_key = None
            self._version += 1
            self.not_after = not_after.not_valid_after.timestamp()
        serial = pki.serial_hex(cert_pem)
        log.info("renewed: agent certificate (serial %s, valid until %s)", serial, not_after.not_valid_after)
        return self.not_after, serial
