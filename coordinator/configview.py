"""quil-coord config show: the rendered config of a host, or its difference from the host's file.

The node's config.yml carries private keys, so every value under a secret key
is masked before anything is printed, in the file and in the diff alike.
"""

from __future__ import annotations

import difflib
import re

import grpc

from ..common.errors import HostError, InventoryError
from ..proto import agent_pb2 as pb
from .client import CALL_TIMEOUT, Credentials, call_error
from .cluster import check_assignment_current
from .home import Home
from .render import read_control_config, render, render_for_host

# Quoted, so the masked text is still valid YAML (a bare * starts an alias).
MASK = "\"********\""
# Keys whose values are secrets in any node generation's config.yml.
SECRET_KEYS = ("peerPrivKey", "encryptionKey")
_SECRET_LINE = re.compile(r"^(\s*(?:%s)\s*:\s*)(\S.*)$" % "|".join(SECRET_KEYS), re.M)


def mask(text: str) -> str:
    """Replace the value of every secret key with a fixed mask."""
    return _SECRET_LINE.sub(lambda m: m.group(1) + MASK, text)


def rendered_for(home: Home, name: str | None) -> tuple[str, str]:
    """Return (host name, rendered config) for the named host, or the control host by default."""
    settings = home.load_settings()
    hosts = [h for h in home.load_hosts() if not h.probe_only]
    assignment = check_assignment_current(home, home.load_assignment(), home.load_hosts())
    control = next(h for h in hosts if h.control)
    host = control if name is None else next((h for h in hosts if h.name == name), None)
    if host is None:
        raise InventoryError(f"unknown host '{name}'; known hosts: {', '.join(h.name for h in hosts)}")
    read_control_config(settings)
    text = render_for_host(settings, render(settings, assignment.slots), host.control, control.address)
    return host.name, text


def show(home: Home, name: str | None) -> str:
    return mask(rendered_for(home, name)[1])


def diff(home: Home, name: str | None) -> str:
    """Unified diff from the host's current config.yml to the rendered one, secrets masked."""
    host_name, text = rendered_for(home, name)
    host = next(h for h in home.load_hosts() if h.name == host_name)
    channel, stub = Credentials(home).stub(host)
    try:
        reply = stub.GetConfig(pb.GetConfigRequest(), timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        raise HostError(host_name, f"cannot read its config.yml ({call_error(err).reason})") from err
    finally:
        channel.close()
    current = reply.config_yaml.decode("utf-8", errors="replace") if reply.exists else ""
    lines = difflib.unified_diff(mask(current).splitlines(keepends=True), mask(text).splitlines(keepends=True),
                                 fromfile=f"{host_name}: config.yml now", tofile=f"{host_name}: after apply")
    return "".join(lines) or f"{host_name}: config.yml is up to date\n"
