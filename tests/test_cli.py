from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from simdiffrec.cli import main
from simdiffrec.config import Config

from .conftest import synthetic_sequences

TINY = ["--hidden", "16", "--inner", "32", "--steps", "50", "--k-noise", "3", "--batch-size", "32",
        "--dropout", "0.1", "--attn-dropout", "0.1", "--lr", "0.005", "--quiet"]


@pytest.fixture
def seq_file(tmp_path: Path) -> Path:
    """An interaction table with string ids, so the id map is exercised end to end."""
    path = tmp_path / "tiny.csv"
    rows = [f"u{u},i{i},{t}" for u, s in enumerate(synthetic_sequences()) for t, i in enumerate(s)]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return path


def test_train_writes_metrics_config_and_a_model_that_reproduces_them(seq_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(seq_file), "--out", str(out), "--epochs", "4", *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"valid", "test", "best_epoch", "seconds_per_epoch"}
    assert 1 <= metrics["best_epoch"] <= 4 and metrics["seconds_per_epoch"] > 0
    assert metrics["valid"]["HR@10"] > 0.3
    cfg = Config.load_yaml(out / "config.yaml")
    assert cfg.hidden == 16 and cfg.max_len == 50 and cfg.epochs == 4
    assert (out / "checkpoint.pt").is_file() and (out / "best_checkpoint" / "model.pt").is_file()
    capsys.readouterr()

    assert main(["evaluate", str(out / "best_checkpoint"), "--data", str(seq_file)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["valid"] == pytest.approx(metrics["valid"], abs=1e-9)
    assert again["test"] == pytest.approx(metrics["test"], abs=1e-9)

    assert main(["recommend", str(out / "best_checkpoint"), "--history", "i3 i4 i5", "-k", "3"]) == 0
    line = capsys.readouterr().out.strip()
    history, items = line.split("\t")
    assert history == "i3 i4 i5" and len(items.split()) == 3
    assert not set(items.split()) & {"i3", "i4", "i5"}


def test_resume_continues_to_more_epochs(seq_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(seq_file), "--out", str(out), "--epochs", "2", *TINY]) == 0
    assert main(["train", "--data", str(seq_file), "--out", str(out), "--epochs", "3", "--resume", *TINY]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_config_file_and_flags_combine(seq_file, tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"alpha": 0.2, "k_sample": 3, "epochs": 1}))
    out = tmp_path / "run"
    assert main(["train", "--data", str(seq_file), "--out", str(out), "--config", str(conf), "--alpha", "0.3", *TINY]) == 0
    cfg = Config.load_yaml(out / "config.yaml")
    assert (cfg.alpha, cfg.k_sample, cfg.epochs) == (0.3, 3, 1)


@pytest.mark.parametrize("args, message", [
    (["--alpha", "-1"], "alpha=-1.0: must be >= 0"),
    (["--tau-schedule", "cosine"], "tau_end=None"),
    (["--heads", "3"], "divisible by heads=3"),
])
def test_bad_settings_get_one_line_errors(seq_file, tmp_path, capsys, args, message):
    assert main(["train", "--data", str(seq_file), "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_data_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3 4\n2 5 x 7\n")
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "Traceback" not in err
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_bad_config_file_names_file_and_key(tmp_path, capsys, seq_file):
    conf = tmp_path / "c.yaml"
    conf.write_text("alpha: 0.2\nk_nosie: 3\n")
    assert main(["train", "--data", str(seq_file), "--out", str(tmp_path / "r"), "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert str(conf) in err and "k_nosie" in err


def test_cpu_only_machine_rejects_cuda(seq_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--data", str(seq_file), "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_a_missing_optional_package_is_one_line(seq_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["tune", "--data", str(seq_file), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'ray'" in err and "not installed" in err
