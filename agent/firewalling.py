"""The firewall the agent manages for its worker ports (one nftables table, or its own ufw rules).

The coordinator sends the policy; the agent only ever touches its own table
(`inet quil_cluster`) or ufw rules carrying its comment, and runs nft or ufw
with argument lists built from validated addresses and ports. Applying the
same policy again does nothing, because the rendered rules are compared
with the ones applied last.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from typing import Callable

from ..common import firewall
from . import capabilities
from ..common.firewall import HostPolicy

log = logging.getLogger(__name__)


class FirewallManager:
    def __init__(self, runner: Callable[..., subprocess.CompletedProcess] | None = None) -> None:
        self._runner = runner or _run_with_net_admin
        self.nft = shutil.which("nft") or "/usr/sbin/nft"
        self.ufw = shutil.which("ufw") or "/usr/sbin/ufw"

    def converge(self, mode: str, policy: HostPolicy | None, current: tuple[str, str]) -> tuple[str, str]:
        """Bring the firewall to mode and policy; return the new (mode, rules hash).

        current is the (mode, rules hash) applied last. Raises FirewallError or ConfigError.
        """
        if mode not in firewall.MODES:
            raise firewall.FirewallError(f"unknown firewall mode '{mode}'; use off, nftables or ufw")
        digest = _digest(mode, policy)
        if (mode, digest) == current:
            return current
        self._remove(current[0], keep=mode)
        if mode == "nftables":
            firewall.apply_nft(policy, nft=self.nft, runner=self._runner)
        elif mode == "ufw":
            firewall.apply_ufw(policy, ufw=self.ufw, runner=self._runner)
        log.info("firewall: %s for %s (%s)", mode, policy.host if policy else "this host", digest[:12])
        return mode, digest

    def _remove(self, previous: str, keep: str) -> None:
        # Switching modes removes what the old mode left; the same mode replaces its own rules itself.
        if previous == "nftables" and keep != "nftables":
            firewall.remove_nft(nft=self.nft, runner=self._runner)
        elif previous == "ufw" and keep != "ufw":
            firewall.remove_ufw(ufw=self.ufw, runner=self._runner)


def _run_with_net_admin(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    """Run a firewall command with CAP_NET_ADMIN passed to it and to nothing else."""
    try:
        with capabilities.ambient(capabilities.CAP_NET_ADMIN):
            return subprocess.run(argv, **kwargs)  # type: ignore[call-overload]
    except capabilities.CapabilityError as err:
        raise firewall.FirewallError(
            f"cannot run {argv[0]}: the agent lacks CAP_NET_ADMIN ({err.strerror}); install "
            "deploy/quil-agent-firewall.conf as a drop-in of quil-agent.service, or set the host's firewall off"
        ) from err


def _digest(mode: str, policy: HostPolicy | None) -> str:
    if mode == "off" or policy is None:
        return ""
    text = firewall.render_nft(policy) if mode == "nftables" else "\n".join(firewall.render_ufw(policy))
    return hashlib.sha256(text.encode()).hexdigest()
