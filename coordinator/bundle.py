"""Agent bundles: key, certificate, CA and a complete agent.yaml for one host."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from ..common import pki
from ..common.errors import StateError
from ..common.yamlio import dump
from .home import Home
from .inventory import Host

# Defaults written into a bundle's agent.yaml; --node-binary etc. override them.
DEFAULT_NODE_BINARY = "/opt/quilibrium/node/node"
DEFAULT_NODE_CONFIG_DIR = "/var/lib/quil-agent/node/.config"
DEFAULT_STATE_DIR = "/var/lib/quil-agent/state"


def agent_names(host: Host) -> tuple[list[str], list[str]]:
    """IP and DNS names an agent certificate needs: the address the coordinator dials, and the host name."""
    agent_host = host.agent.rpartition(":")[0].strip("[]")
    try:
        return [str(ipaddress.ip_address(agent_host))], [host.name]
    except ValueError:
        return [], [agent_host, host.name]


def issue_agent_cert(home: Home, cluster: str, host: Host, days: int) -> tuple[bytes, bytes]:
    """Issue the agent's key and certificate, valid for the address the coordinator dials."""
    ca_key, ca_cert = home.signing_ca()
    ips, dns = agent_names(host)
    identity = pki.Identity(cluster=cluster, role="agent", name=host.name)
    return pki.issue(ca_key, ca_cert, identity, ip_addresses=ips, dns_names=dns, days=days)


def sign_agent_csr(home: Home, cluster: str, host: Host, csr_pem: bytes, days: int) -> bytes:
    """Sign an agent's signing request for the host's identity and names (never the request's)."""
    ca_key, ca_cert = home.signing_ca()
    ips, dns = agent_names(host)
    identity = pki.Identity(cluster=cluster, role="agent", name=host.name)
    return pki.sign_csr(ca_key, ca_cert, csr_pem, identity, ip_addresses=ips, dns_names=dns, days=days)


def write_bundle(home: Home, cluster: str, host: Host, directory: Path, *, days: int, node_binary: str | None,
                 node_config_dir: str | None, state_dir: str | None) -> tuple[Path, str, float]:
    """Write the bundle into directory (created 0700).

    Returns agent.yaml's path, the certificate's serial and its expiry time.

    Raises StateError rather than overwrite an existing key.
    """
    directory = Path(directory)
    if (directory / "agent.key").exists():
        raise StateError(f"{directory}/agent.key already exists; choose an empty --bundle directory")
    key, cert = issue_agent_cert(home, cluster, host, days)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise StateError(f"--bundle {directory}: cannot create the directory ({err.strerror})") from err
    pki.write_private(directory / "agent.key", key)
    pki.write_public(directory / "agent.crt", cert)
    pki.write_public(directory / "ca.crt", home.trust_bundle())
    config = {
        "cluster": cluster,
        "listen": host.agent,
        "worker_address": host.address,
        "node_binary": node_binary or DEFAULT_NODE_BINARY,
        "node_config_dir": node_config_dir or DEFAULT_NODE_CONFIG_DIR,
        "state_dir": state_dir or DEFAULT_STATE_DIR,
        "tls": {"cert": "agent.crt", "key": "agent.key", "ca": "ca.crt"},
    }
    pki.write_public(directory / "agent.yaml", dump(config))
    return directory / "agent.yaml", pki.serial_hex(cert), pki.not_after(cert)
