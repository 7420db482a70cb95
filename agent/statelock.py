"""One agent per state directory: an exclusive lock held for the agent's whole run.

Two agents on one state_dir would both restore desired.json and start every
process twice, and each would take the other's processes for leftovers. The
lock is an flock on state_dir/agent.lock, so the kernel drops it when the
process dies, even by SIGKILL, and a restarted agent never finds it stale.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..common.errors import ConfigError

LOCK_NAME = "agent.lock"


class StateLock:
    """The held lock; release() gives it up (the agent's stop, or a failed start)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def acquire(state_dir: Path) -> StateLock:
    """Take the state directory's lock and record this pid in it; raise ConfigError when another agent has it."""
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"state_dir {state_dir} is in use by another quil-agent (pid {holder}); stop that "
                          "agent first, or give this one a state_dir of its own") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(fd)
