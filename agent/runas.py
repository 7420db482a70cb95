"""Run node processes as another user (agent.yaml `node_user`).

The real data worker checks `--parent-process` with kill(pid, 0) every
second and exits when that fails. kill() fails with EPERM when the worker
runs as another user than the agent, so such a worker would exit within a
second of its start. A worker of another user therefore gets no
`--parent-process`, and its life is tied to the agent with the parent-death
signal instead:

    setpriv --reuid UID --regid GID --init-groups --no-new-privs --pdeathsig KILL -- NODE ARGS

setpriv (util-linux 2.33 or later) changes the credentials first and sets
PR_SET_PDEATHSIG after that, because Linux clears the parent-death signal
on a credential change. Then it execs the node in the same process, so the
pid, the pidfd and the process group that the supervisor tracks stay valid.
PR_SET_PDEATHSIG fires when the thread that forked the process exits, not
only the whole process, so the supervisor forks every node process from its
own loop thread, which lives as long as the agent supervises anything.
"""

from __future__ import annotations

import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import ConfigError

# Minimum util-linux release whose setpriv has --pdeathsig.
SETPRIV_HINT = "install util-linux 2.33 or later"


@dataclass(frozen=True)
class RunAs:
    """The user node processes run as, when it is not the agent's own user."""

    user: str
    uid: int
    gid: int
    # Absolute path of setpriv, found when agent.yaml was loaded.
    setpriv: str

    def wrap(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        """Return argv prefixed with the setpriv call that switches to this user."""
        return (
            self.setpriv, "--reuid", str(self.uid), "--regid", str(self.gid), "--init-groups",
            "--no-new-privs", "--pdeathsig", "KILL", "--", *argv,
        )

    def owner(self) -> tuple[int, int]:
        return self.uid, self.gid


def resolve(user: str, source: str) -> RunAs | None:
    """Look up node_user; return None when it is empty or the agent's own user.

    Raises ConfigError (naming source) when the user does not exist, when the
    agent cannot switch users (it is not root), or when setpriv is missing.
    """
    if not user:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            f"{source}: node_user '{user}' does not exist on this host; create it (useradd --system {user})"
            " or remove node_user"
        ) from None
    if entry.pw_uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        raise ConfigError(
            f"{source}: node_user '{user}' needs the agent to run as root to switch users (it runs as uid"
            f" {os.geteuid()}); remove node_user or run the agent as root"
        )
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise ConfigError(f"{source}: node_user '{user}' needs the setpriv program, which is not on PATH;"
                          f" {SETPRIV_HINT}")
    return RunAs(user=user, uid=entry.pw_uid, gid=entry.pw_gid, setpriv=setpriv)


def give_directory(path: Path, run_as: RunAs | None) -> None:
    """Create path (mode 0700) if missing and, with run_as, make that user its owner.

    Only the directory itself changes owner, not what is inside it.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid)
