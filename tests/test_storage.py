"""The experiment's folder gets each file Ray writes whole or not at all."""

from __future__ import annotations

import gc
import os

from tuner.storage import storage_filesystem


def test_a_file_is_its_old_self_until_the_new_one_is_complete(tmp_path):
    fs = storage_filesystem(str(tmp_path))
    (tmp_path / "result.json").write_text("old\n")
    stream = fs.open_output_stream(str(tmp_path / "result.json"))
    stream.write(b"new, and more to come")
    assert (tmp_path / "result.json").read_text() == "old\n"  # what a kill now leaves
    stream.close()
    assert os.listdir(tmp_path) == ["result.json"] and (tmp_path / "result.json").read_text() == "new, and more to come"


def test_a_stream_its_writer_dropped_leaves_nothing(tmp_path):
    stream = storage_filesystem(str(tmp_path)).open_output_stream(str(tmp_path / "params.json"))
    stream.write(b"{")
    del stream
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_object_stores_keep_rays_own_filesystem():
    assert storage_filesystem("s3://bucket/experiment") is None
