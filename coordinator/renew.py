"""Renewal of agent certificates over the agents' own mutual-TLS channel.

The agent makes the new key and sends only a signing request; the
coordinator signs it for the host's recorded identity and names, the agent
installs it and serves it on new connections at once. The old serial is
then revoked, so a copy of the old key is useless from the next apply on.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable

import grpc

from ..common import pki
from ..common.errors import HostError, InventoryError, UnreachableError
from ..common.exitcodes import ExitCode
from ..proto import agent_pb2 as pb
from .bundle import sign_agent_csr
from .client import CALL_TIMEOUT, Credentials, call_error, for_each_host
from .home import Home
from .inventory import Host

log = logging.getLogger(__name__)

# Renewal starts when this fraction of the lifetime is left, moved by up to
# JITTER of the lifetime either way so hosts enrolled together renew apart.
RENEW_WHEN_LEFT = 1 / 3
JITTER = 0.05


def is_due(host: Host, lifetime_seconds: float, now: float, rng: Callable[[], float] = random.random) -> bool:
    if host.cert_not_after is None:
        return False
    renew_at = host.cert_not_after - lifetime_seconds * RENEW_WHEN_LEFT + (2 * rng() - 1) * JITTER * lifetime_seconds
    return now >= renew_at


def renew_host(home: Home, name: str, ca_bundle: bytes | None = None) -> float:
    """Renew one host's agent certificate now; return the new expiry time. Raises HostError.

    The agent also receives the CAs to trust: ca_bundle, or by default the
    current trust bundle (both CAs while the CA is rotated).
    """
    settings = home.load_settings()
    host = next((h for h in home.load_hosts() if h.name == name), None)
    if host is None:
        raise InventoryError(f"unknown host '{name}'; see quil-coord host list")
    channel, stub = Credentials(home).stub(host)
    try:
        csr = stub.CreateCSR(pb.CreateCSRRequest(), timeout=CALL_TIMEOUT).csr_pem
        cert = sign_agent_csr(home, settings.name, host, csr, settings.agent_cert_days)
        bundle = home.trust_bundle() if ca_bundle is None else ca_bundle
        request = pb.InstallCertificateRequest(cert_pem=cert, ca_bundle_pem=bundle)
        reply = stub.InstallCertificate(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        failure = call_error(err)
        kind = UnreachableError if failure.exit_code == ExitCode.UNREACHABLE else HostError
        raise kind(name, f"certificate renewal failed ({failure.reason})") from err
    finally:
        channel.close()
    _record(home, name, cert)
    log.info("renewed: host %s certificate (serial %s)", name, reply.serial)
    return reply.not_after


def _record(home: Home, name: str, cert_pem: bytes) -> None:
    with home.locked():
        hosts = home.load_hosts()
        for host in hosts:
            if host.name == name:
                if host.serial:
                    home.revoke(host.serial)
                host.serial, host.cert_not_after = pki.serial_hex(cert_pem), pki.not_after(cert_pem)
        home.save_hosts(hosts)


def renew_due(home: Home, now: float | None = None) -> dict[str, str]:
    """Renew every certificate that is due; return host name -> 'renewed' or the error."""
    settings = home.load_settings()
    now = time.time() if now is None else now
    due = [h for h in home.load_hosts() if is_due(h, settings.agent_cert_days * 86400, now)]

    def renew(host: Host) -> str:
        try:
            renew_host(home, host.name)
            return "renewed"
        except HostError as err:
            log.warning("%s", err)
            return str(err)

    return for_each_host(due, renew)
