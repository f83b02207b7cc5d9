"""The one way this project writes a file: to a temporary name beside it, then one rename; and
the one way it reads a torch file back.

A reader therefore sees the old file or the new one, never half of either; a failed write (a
crash, a full disk) leaves the old file and no temporary behind.  A symbolic link is switched the
same way (`atomic_symlink`), and `locked` keeps two processes from writing one folder at once.
A torch file is read with `weights_only`: tensors and plain values only, so a crafted file cannot
run code when loaded.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence


class FileFault(ValueError):
    """A file that cannot be written, or read back as what this project wrote; names the file."""


LOCK = ".lock"


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """A temporary path beside `dest` to write to; it becomes `dest` only if the block succeeds."""
    dest = Path(dest)
    with writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with writing(dest):
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def writing(dest: str | Path) -> Iterator[None]:
    """Around the writing of `dest`: an OSError there (a full disk, no permission) becomes one line
    naming the file.  Only the writing: a failed download inside `atomic_path` keeps its own error."""
    try:
        yield
    except OSError as err:
        raise FileFault(f"{dest}: cannot write: {err.strerror or err}") from err


def write_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, writing(path):
        tmp.write_bytes(data)


def atomic_symlink(link: str | Path, target: str | Path) -> None:
    """Make `link` point to `target` (relative targets resolve from the link's folder) in one
    rename, so that a reader follows the old target or the new one."""
    link = Path(link)
    with atomic_path(link) as tmp:
        os.symlink(target, tmp)


def replace_entries(stage: str | Path, folder: str | Path, names: Sequence[str]) -> None:
    """Make `folder`'s entries `names` those in `stage` (an entry `stage` lacks is removed), each in
    one rename, in the order given, after removing the last: a reader that takes the last name's
    presence for "complete" never sees a mix as complete.  A folder replaced is set aside into
    `stage` first (a rename cannot replace a folder that holds files); `stage` is the caller's to
    remove."""
    stage, folder = Path(stage), Path(folder)
    with writing(folder / names[-1]):
        (folder / names[-1]).unlink(missing_ok=True)
    for name in names:
        dest, new = folder / name, stage / name
        with writing(dest):
            if dest.is_dir() and not dest.is_symlink():
                os.replace(dest, stage / f".replaced-{name}")
            elif not new.exists():
                dest.unlink(missing_ok=True)
            if new.exists():
                os.replace(new, dest)


def in_use(folder: str | Path) -> bool:
    """Whether a live process holds `folder`'s lock (`locked`): one that was killed holds none."""
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at close, a moment later
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextmanager
def locked(folder: str | Path) -> Iterator[None]:
    """Hold `folder/.lock` for the block; another process holding it makes this a one-line error
    (before anything in the folder is written).  The lock ends with the process, even on kill -9.
    A folder made here that holds nothing but the lock at the end is removed: a command that
    failed before writing leaves no trace."""
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise ValueError(f"{folder} is in use by another simdiffrec process{f' ({pid})' if pid else ''}: "
                             "wait for it to end, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        if made and [entry.name for entry in folder.iterdir()] == [LOCK]:  # removed while still held
            (folder / LOCK).unlink()
            folder.rmdir()
        os.close(fd)


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save through `atomic_path`; keep `obj` to tensors and plain values (`read_torch`)."""
    import torch

    with atomic_path(path) as tmp, writing(path):
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's writer reports a full disk so, not as an OSError
            raise FileFault(f"{path}: cannot write: {str(err).splitlines()[0]} (is the disk full?)") from err


def read_torch(path: str | Path, keys: Iterable[str], map_location: Any = None) -> dict[str, Any]:
    """A dict saved by `save_torch` holding `keys`, read with `weights_only`.  A file holding other
    Python objects is refused without running them; a truncated or corrupt one is one line."""
    import pickle

    import torch

    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise FileFault(f"{path}: refused: it holds Python objects besides tensors and plain values "
                        "(never loaded, since loading them could run code), or it is corrupt") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise FileFault(f"{path}: truncated or corrupt, cannot be read "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    missing = [k for k in keys if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise FileFault(f"{path}: not a file this project wrote (no {', '.join(missing)})")
    return payload
