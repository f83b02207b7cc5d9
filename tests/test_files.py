"""Model folders and checkpoints: loading never runs code from the file, a damaged file or a full
disk is one line naming the file, and a failed write leaves no temporary behind."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from simdiffrec.config import Config
from simdiffrec.files import FileFault, save_torch, write_atomic
from simdiffrec.model import SimDiffRec
from simdiffrec.model_folder import load_model, save_model
from simdiffrec.train import load_checkpoint, save_checkpoint, TrainState

CFG = Config(hidden=16, inner=32, steps=50, k_noise=3)


class Payload:
    """Unpickling this creates `marker`: what a crafted file could do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def model_and_files(tmp_path: Path) -> tuple[SimDiffRec, Path, Path]:
    model = SimDiffRec(CFG, 20, 10)
    folder = save_model(tmp_path / "model", model)
    optimizer = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path / "checkpoint.pt", CFG, model, optimizer, TrainState(), model.state_dict())
    return model, folder / "model.pt", tmp_path / "checkpoint.pt"


def load_both(model: SimDiffRec, model_pt: Path, checkpoint: Path) -> None:
    with pytest.raises(FileFault) as err:
        load_model(model_pt.parent)
    assert str(model_pt) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileFault) as err:
        load_checkpoint(checkpoint, CFG, model, torch.optim.Adam(model.parameters()))
    assert str(checkpoint) in str(err.value) and "\n" not in str(err.value)


def test_what_is_saved_loads_back(tmp_path):
    model, model_pt, checkpoint = model_and_files(tmp_path)
    loaded = load_model(model_pt.parent)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))
    assert list(loaded.item_ids[1:]) == list(range(1, 21))  # no id map given: the model's own ids
    saved = TrainState(epoch=3, best_score=0.25, best_epoch=2, best_valid={"NDCG@10": 0.25}, bad_evals=1,
                       history=[{"epoch": 1, "loss_sr": 2.5}])
    save_checkpoint(checkpoint, CFG, model, torch.optim.Adam(model.parameters()), saved, model.state_dict())
    rng = torch.get_rng_state()
    torch.manual_seed(1)  # another model and random state: the file alone must bring them back
    fresh = SimDiffRec(CFG, 20, 10)
    state, best = load_checkpoint(checkpoint, CFG, fresh, torch.optim.Adam(fresh.parameters()))
    assert state == saved and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())


def test_loading_runs_no_code_from_the_file(tmp_path):
    model, model_pt, checkpoint = model_and_files(tmp_path)
    marker = tmp_path / "code-ran"
    for path in (model_pt, checkpoint):
        payload = torch.load(path, weights_only=True)
        payload["config"] = Payload(marker)
        torch.save(payload, path)
    load_both(model, model_pt, checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "other dict"])
def test_a_damaged_file_is_one_line_naming_it(tmp_path, damage):
    model, model_pt, checkpoint = model_and_files(tmp_path)
    for path in (model_pt, checkpoint):
        data = path.read_bytes()
        if damage == "other dict":
            torch.save({"weights": torch.zeros(3)}, path)
        else:
            path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2],
                              "garbage": bytes(range(256)) * 8}[damage])
    load_both(model, model_pt, checkpoint)


def test_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    model = SimDiffRec(CFG, 20, 10)

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a fi")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(FileFault, match=r"model\.pt: cannot write: No space left on device"):
        save_model(tmp_path / "model", model)
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: full_disk(data, self))
    with pytest.raises(FileFault, match=r"metrics\.json: cannot write: No space left on device"):
        write_atomic(tmp_path / "model" / "metrics.json", b"{}")
    assert not list(tmp_path.rglob("*.tmp"))


def test_torchs_own_write_failure_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError (here, what it raises writing to /dev/full),
    which ended `train` in a traceback."""
    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a fi")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(FileFault, match=r"checkpoint\.pt: cannot write: .*unexpected pos 704 vs 598 \(is the disk full"):
        save_torch({"epoch": 1}, tmp_path / "checkpoint.pt")
    assert not list(tmp_path.iterdir())
