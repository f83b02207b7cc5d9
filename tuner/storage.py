"""Where Ray writes an experiment: a local folder gets each file whole or not at all.

Ray copies its driver's staging folder (the experiment state, each trial's result.json, ...)
into the experiment's folder now and then, in place, and workers upload checkpoints the same
way; a process killed in the middle of a copy leaves the file cut off, even empty, and a cut-off
experiment state would make the search unresumable.  Through `storage_filesystem` every file is
written beside its name and renamed onto it when complete.  Object stores (s3://, gs://) write an
object whole already: Ray's own filesystem is used there.
"""

from __future__ import annotations

import io
import os
import uuid

import pyarrow
import pyarrow.fs


def storage_filesystem(experiment: str) -> pyarrow.fs.FileSystem | None:
    """The filesystem Ray should write `experiment` (a folder or a URI) through; None: Ray's choice."""
    return None if "://" in experiment else pyarrow.fs.PyFileSystem(RenamingLocalHandler())


class RenamingLocalHandler(pyarrow.fs.FileSystemHandler):
    """The local filesystem, but for files written through a temporary name."""

    def __init__(self) -> None:
        self.fs = pyarrow.fs.LocalFileSystem()

    def open_output_stream(self, path: str, metadata: dict | None) -> pyarrow.NativeFile:
        return pyarrow.PythonFile(_RenamedWhenClosed(path), mode="w")

    def open_append_stream(self, path: str, metadata: dict | None) -> pyarrow.NativeFile:
        return self.fs.open_append_stream(path, metadata=metadata)

    def get_type_name(self) -> str:
        return "local-renaming"

    def equals(self, other: pyarrow.fs.FileSystemHandler) -> bool:
        return isinstance(other, RenamingLocalHandler)

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list[pyarrow.fs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the root folder")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self.fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            target.upload(source)

    def open_input_stream(self, path: str) -> pyarrow.NativeFile:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pyarrow.NativeFile:
        return self.fs.open_input_file(path)


class _RenamedWhenClosed(io.FileIO):
    """A file written as `.NAME.<random>.partial` beside `path`, renamed onto it when closed; one
    dropped unclosed (its writer failed) is removed instead."""

    def __init__(self, path: str) -> None:
        self.target = path
        folder, name = os.path.split(path)
        super().__init__(os.path.join(folder, f".{name}.{uuid.uuid4().hex}.partial"), "wb")

    def close(self) -> None:
        if not self.closed:
            super().close()
            os.replace(self.name, self.target)

    def __del__(self) -> None:
        if not self.closed:
            io.FileIO.close(self)
            os.remove(self.name)
