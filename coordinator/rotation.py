"""Rotation of the cluster CA (with an overlap) and of the coordinator's certificate.

CA rotation, in two commands; ca finish refuses to start until ca rotate has
moved every host, so no agent ends up trusting a CA the coordinator's
certificate does not chain to:
  quil-coord ca rotate   create the next CA (once), then give every agent a
                         certificate of the next CA and a bundle trusting
                         both, and reissue the coordinator's certificate
                         from the next CA. Run it again until no host fails.
  quil-coord ca finish   give every agent a certificate of the next CA and a
                         bundle trusting only it, then make the next CA the
                         current one. Hosts that fail keep trusting both CAs
                         and the rotation stays open until the command
                         succeeds.
"""

from __future__ import annotations

import logging

from ..common import pki
from ..common.errors import HostError, StateError
from .client import for_each_host
from .home import Home
from .inventory import Host
from .renew import renew_host

log = logging.getLogger(__name__)


def rotate_coordinator_cert(home: Home) -> str:
    """Issue a new coordinator certificate from the signing CA; revoke the old one. Returns the new serial."""
    settings = home.load_settings()
    with home.locked():
        old = home.file("coordinator.crt").read_bytes()
        ca_key, ca_cert = home.signing_ca()
        key, cert = pki.issue(ca_key, ca_cert, pki.Identity(settings.name, "coordinator", "coordinator"))
        pki.write_private(home.file("coordinator.key"), key)
        pki.write_public(home.file("coordinator.crt"), cert)
        # Agents learn about the revocation with the next apply.
        home.revoke(pki.serial_hex(old))
    return pki.serial_hex(cert)


def begin_ca_rotation(home: Home) -> dict[str, str]:
    """Create the next CA if needed, move every agent onto it with both CAs trusted."""
    settings = home.load_settings()
    with home.locked():
        if not home.rotating():
            key, cert = pki.create_ca(settings.name)
            pki.write_private(home.file("ca-next.key"), key)
            pki.write_public(home.file("ca-next.crt"), cert)
            log.info("created: next cluster CA (%s)", pki.spki_sha256(cert))
    results = _renew_all(home, home.trust_bundle())
    if not any(r != "renewed" for r in results.values()):
        rotate_coordinator_cert(home)
    return results


def finish_ca_rotation(home: Home) -> dict[str, str]:
    """Make every agent trust only the next CA, then make it the current CA."""
    if not home.rotating():
        raise StateError("no CA rotation is in progress; start one with quil-coord ca rotate")
    next_ca = home.file("ca-next.crt").read_bytes()
    # ca rotate issues the coordinator's certificate from the next CA only after every host
    # moved; until then an agent that trusts only the next CA would lock the coordinator out.
    if not pki.issued_by(home.file("coordinator.crt").read_bytes(), next_ca):
        raise StateError("ca rotate has not moved every host yet; run quil-coord ca rotate until no host "
                         "fails, then ca finish")
    results = _renew_all(home, next_ca)
    failed = sorted(name for name, outcome in results.items() if outcome != "renewed")
    if failed:
        return results
    with home.locked():
        for suffix in ("key", "crt"):
            current, upcoming = home.file(f"ca.{suffix}"), home.file(f"ca-next.{suffix}")
            current.replace(home.file(f"ca.{suffix}.old"))
            upcoming.replace(current)
    log.info("finished: CA rotation; the new CA is %s", pki.spki_sha256(next_ca))
    return results


def _renew_all(home: Home, bundle: bytes) -> dict[str, str]:
    def renew(host: Host) -> str:
        try:
            renew_host(home, host.name, ca_bundle=bundle)
            return "renewed"
        except HostError as err:
            return str(err).removeprefix(f"{host.name}: ")

    return for_each_host(home.load_hosts(), renew)
