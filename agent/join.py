"""quil-agent join: enroll this host with a join token.

  1. fetch the coordinator's certificate chain without trusting it, and find
     the CA whose public key matches the pinned --ca-hash; stop if none does
  2. open a TLS channel that trusts only that CA, so the token goes only to
     the real coordinator
  3. make a private key here (it never leaves the host) and send a signing
     request with the host facts and the proposed worker address
  4. check the returned certificate against the key and the CA, then write
     agent.key (0600), agent.crt, ca.crt and agent.yaml
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl

import _ssl  # the certificate encodings of the private chain API
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ..common import pki
from ..common.errors import ConfigError, QuilClusterError, StateError, TLSError, UnreachableError
from ..common.yamlio import dump
from ..proto import enroll_pb2 as epb
from ..proto import enroll_pb2_grpc as epb_grpc
from .config import split_host_port

log = logging.getLogger(__name__)

# Seconds allowed for the pin check and for the join call.
CONNECT_TIMEOUT = 10.0
JOIN_TIMEOUT = 30.0
DEFAULT_AGENT_PORT = 7350


class JoinFailed(QuilClusterError):
    """Raised when the coordinator rejects the join."""


@dataclass(frozen=True)
class JoinOptions:
    coordinator: str
    token: str
    ca_hash: str
    directory: Path
    address: str | None = None
    agent_port: int = DEFAULT_AGENT_PORT
    node_binary: str = "/opt/quilibrium/node/node"
    node_config_dir: str = "/var/lib/quil-agent/node/.config"
    state_dir: str = "/var/lib/quil-agent/state"


def join(options: JoinOptions) -> Path:
    """Enroll this host; return the path of the written agent.yaml."""
    directory = Path(options.directory)
    if (directory / "agent.key").exists():
        raise StateError(f"{directory}/agent.key already exists; this host has joined already")
    host, port = split_host_port(options.coordinator, "coordinator address")
    # 1. pin
    ca_pem = fetch_pinned_ca(host, port, options.ca_hash)
    address = options.address or detect_address(host, port)
    # 2-3. join
    key_pem, csr_pem = pki.make_csr(socket.gethostname())
    reply = _call_join(options, ca_pem, csr_pem, address)
    # 4. files
    pki.check_pair(key_pem, reply.cert_pem, ca_pem)
    return _write_files(options, directory, key_pem, reply, ca_pem)


def fetch_pinned_ca(host: str, port: int, ca_hash: str) -> bytes:
    """Return the PEM of the CA in the server's chain whose key matches ca_hash; raise TLSError otherwise."""
    if not ca_hash.startswith("sha256:") or len(ca_hash) != 71:
        raise ConfigError(f"invalid --ca-hash '{ca_hash}': expected sha256: and 64 hex digits")
    chain = _unverified_chain(host, port)
    for candidate in chain[1:] + chain[:1]:
        if pki.spki_sha256(candidate).lower() == ca_hash.lower() and _issued_by(chain[0], candidate):
            return candidate
    raise TLSError(
        f"could not verify the coordinator at {host}:{port}: no certificate in its chain matches --ca-hash;"
        " check the address and the hash printed by quil-coord token create"
    )


def _unverified_chain(host: str, port: int) -> list[bytes]:
    # Nothing is trusted yet, so the chain is read without verification and
    # then checked against the pinned hash.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT) as raw:
            with context.wrap_socket(raw) as tls_socket:
                # NOTE: Python 3.13 made this public; 3.11 and 3.12 have it only on the private _sslobj.
                getter = getattr(tls_socket, "get_unverified_chain", None) or tls_socket._sslobj.get_unverified_chain
                return [_to_pem(cert) for cert in getter() or []]
    except ssl.SSLError as err:
        raise TLSError(f"could not verify the coordinator at {host}:{port}: {err}") from err
    except OSError as err:
        raise UnreachableError(f"{host}:{port}", f"cannot connect to the coordinator ({err.strerror or err}); "
                               "check the address and that quil-coord serve runs") from err


def _to_pem(cert: object) -> bytes:
    if isinstance(cert, bytes):
        der = cert
    else:
        der = cert.public_bytes(_ssl.ENCODING_DER)  # type: ignore[attr-defined]
    return ssl.DER_cert_to_PEM_cert(der).encode()


def _issued_by(leaf_pem: bytes, ca_pem: bytes) -> bool:
    try:
        x509.load_pem_x509_certificate(leaf_pem).verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def detect_address(host: str, port: int) -> str:
    """Return the local address this host uses to reach the coordinator (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return str(ipaddress.ip_address(probe.getsockname()[0]))


def _call_join(options: JoinOptions, ca_pem: bytes, csr_pem: bytes, address: str) -> epb.JoinResponse:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    channel = grpc.secure_channel(options.coordinator, credentials, options=[("grpc.enable_http_proxy", 0)])
    request = epb.JoinRequest(
        token=options.token, csr_pem=csr_pem, hostname=socket.gethostname(),
        logical_cpus=psutil.cpu_count() or 0, physical_cpus=psutil.cpu_count(logical=False) or 0,
        memory_bytes=psutil.virtual_memory().total, worker_address=address, agent_port=options.agent_port,
    )
    try:
        return epb_grpc.EnrollmentStub(channel).Join(request, timeout=JOIN_TIMEOUT)
    except grpc.RpcError as err:
        raise JoinFailed(f"join failed: {err.details() or err.code().name}") from err
    finally:
        channel.close()


def _write_files(options: JoinOptions, directory: Path, key_pem: bytes, reply: epb.JoinResponse,
                 ca_pem: bytes) -> Path:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki.write_private(directory / "agent.key", key_pem)
    pki.write_public(directory / "agent.crt", reply.cert_pem)
    pki.write_public(directory / "ca.crt", ca_pem)
    config = {
        "cluster": reply.cluster, "listen": reply.agent_listen, "worker_address": reply.worker_address,
        "node_binary": options.node_binary, "node_config_dir": options.node_config_dir,
        "state_dir": options.state_dir, "tls": {"cert": "agent.crt", "key": "agent.key", "ca": "ca.crt"},
    }
    pki.write_public(directory / "agent.yaml", dump(config))
    log.info("joined: cluster %s as host %s", reply.cluster, reply.host_name)
    return directory / "agent.yaml"
