"""Linux ambient capabilities: CAP_NET_ADMIN for the firewall commands only.

When the firewall setting is on, systemd starts the agent with CAP_NET_ADMIN
(deploy/quil-agent-firewall.conf). Capabilities in the ambient set pass to
every program the process executes, and node processes must not get this
one. So the agent clears its ambient set at start, before any thread exists,
and raises CAP_NET_ADMIN into the ambient set of one thread only around an
nft or ufw call. Capability sets are per thread on Linux, so node processes,
which other threads spawn, never carry it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Iterator

CAP_NET_ADMIN = 12
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_LOWER = 3
_PR_CAP_AMBIENT_CLEAR_ALL = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class CapabilityError(OSError):
    """Raised when a capability cannot be raised into the ambient set."""


def _prctl(option: int, arg2: int, arg3: int = 0) -> None:
    if _libc.prctl(option, arg2, arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        raise CapabilityError(err, os.strerror(err))


def clear_ambient() -> None:
    """Empty the calling thread's ambient set; threads created afterwards inherit the empty set."""
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)


@contextlib.contextmanager
def ambient(capability: int) -> Iterator[None]:
    """Hold capability in this thread's ambient set for the programs started inside the block.

    Root needs nothing: programs it executes get every capability anyway.
    Raises CapabilityError when the process lacks the capability in its
    permitted and inheritable sets (the unit file did not grant it).
    """
    if os.geteuid() == 0:
        yield
        return
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, capability)
    try:
        yield
    finally:
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_LOWER, capability)
