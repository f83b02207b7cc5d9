"""The one way this project writes a file: to a temporary name beside it, then one rename.

A reader therefore sees the old file or the new one, never half of either; a failed write (a
crash, a full disk) leaves the old file and no temporary behind.  A symbolic link is switched the
same way (`atomic_symlink`), and `locked` keeps two processes from writing one folder at once.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK = ".lock"


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """A temporary path beside `dest` to write to; it becomes `dest` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_symlink(link: str | Path, target: str | Path) -> None:
    """Make `link` point to `target` (relative targets resolve from the link's folder) in one
    rename, so that a reader follows the old target or the new one."""
    link = Path(link)
    with atomic_path(link) as tmp:
        os.symlink(target, tmp)


@contextmanager
def locked(folder: str | Path, flag: str = "--out") -> Iterator[None]:
    """Hold `folder/.lock` for the block; another process holding it makes this a one-line error
    (before anything in the folder is written).  The lock ends with the process, even on kill -9."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise ValueError(f"{folder} is in use by another simdiffrec process{f' ({pid})' if pid else ''}: "
                             f"wait for it to end, or choose another {flag}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
