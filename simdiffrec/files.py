"""The one way this project writes a file: to a temporary name beside it, then one rename; and
the one way it reads a torch file back.

A reader therefore sees the old file or the new one, never half of either; a failed write (a
crash, a full disk) leaves the old file and no temporary behind.  A symbolic link is switched the
same way (`atomic_symlink`), and a folder is replaced by switching a link to its new copy
(`switch_folder`); `locked` keeps two processes from writing one folder at once.  No other
module writes, moves or deletes a file (tests/test_layout.py), but the two that write Ray's own
experiment layout through its file systems (tuner/storage.py, tuner/recovery.py).
A torch file is read with `weights_only`: tensors and plain values only, so a crafted file cannot
run code when loaded.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    import pyarrow.fs


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


@contextmanager
def atomic_stream(dest: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `dest` through piece by piece (a download): `dest` only once the
    block succeeds, nothing if it fails."""
    with atomic_path(dest) as tmp:
        with writing(dest):
            out = open(tmp, "wb")
        with out:  # not inside `writing`: a failed download keeps its own error
            yield out


def copy_folder(fs: "pyarrow.fs.FileSystem", source: str, target: str | Path) -> None:
    """Copy the folder `source` on `fs` (local, or an experiment's object store) into the local
    folder `target` (made if missing); a full disk is one line naming it."""
    import pyarrow.fs

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    with writing(target):
        pyarrow.fs.copy_files(source, str(target), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())


def remove(path: str | Path) -> None:
    """Remove a file, link or folder (with all it holds) that this project staged or set aside;
    nothing there: nothing to do."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def move(source: str | Path, dest: str | Path) -> None:
    """Rename `source` to `dest` (the same file system) in one step."""
    with writing(dest):
        os.replace(source, dest)


def switch_folder(link: str | Path, stage: str | Path) -> None:
    """Make `link` a symbolic link to `stage`, a folder beside it, in one rename: a reader finds the
    folder it pointed at or `stage`, never none.  Then remove the folders beside `stage` named
    like it (`.NAME-...`: earlier ones, and any a kill left).  A real folder at `link` (written
    before links) is set aside first, so only then is `link` briefly absent."""
    link, stage = Path(link), Path(stage)
    prefix = stage.name.rsplit("-", 1)[0] + "-"
    if link.is_dir() and not link.is_symlink():
        move(link, link.with_name(f"{prefix}earlier"))
    atomic_symlink(link, stage.name)
    for entry in link.parent.iterdir():
        if entry.name.startswith(prefix) and entry.name != stage.name:
            remove(entry)


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
