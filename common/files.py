"""Atomic file replacement shared by every writer in the project."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, backup: bool = False,
                 owner: tuple[int, int] | None = None) -> None:
    """Replace path with data so readers see the old or the new file, never a mix.

    The data goes to a temporary file in the same directory (created 0600 by
    mkstemp, then set to mode, which the umask cannot narrow), is flushed to
    disk, then renamed over the target. With backup=True the previous file
    is kept as PATH.bak (a hard link, so the old inode is never modified).
    owner, a (uid, gid) pair, is set on the file before the rename.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if backup and path.exists():
            previous = backup_path(path)
            previous.unlink(missing_ok=True)
            os.link(path, previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def backup_path(path: Path) -> Path:
    """Return where write_atomic(path, ..., backup=True) keeps the previous version."""
    path = Path(path)
    return path.with_name(path.name + ".bak")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
