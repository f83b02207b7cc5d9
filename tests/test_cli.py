from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from simdiffrec.cli import add_config_flags, config_from_args, main
from simdiffrec.config import Config, resumable, setting, simdiffrec_only
from simdiffrec.files import locked
from simdiffrec.model_folder import load_model
from simdiffrec.train import RESUMABLE_CHANGES

from .conftest import synthetic_sequences

TINY = ["--hidden", "16", "--inner", "32", "--steps", "50", "--k-noise", "3", "--batch-size", "32",
        "--dropout", "0.1", "--attn-dropout", "0.1", "--lr", "0.005", "--quiet"]


def write_table(path: Path) -> Path:
    """An interaction table with string ids, so the id map is exercised end to end."""
    rows = [f"u{u},i{i},{t}" for u, s in enumerate(synthetic_sequences()) for t, i in enumerate(s)]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture
def seq_file(tmp_path: Path) -> Path:
    return write_table(tmp_path / "tiny.csv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One small trained run (30 items i1..i30) for the tests that read a model folder."""
    root = tmp_path_factory.mktemp("trained")
    data = write_table(root / "tiny.csv")
    assert main(["train", "--data", str(data), "--out", str(root / "run"), "--epochs", "1", *TINY]) == 0
    return root / "run"


def one_line_error(capsys, *parts: str) -> str:
    """The error is the last line of stderr (after the data line, if any), and says all of `parts`."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert ": error: " in last and sum(": error: " in line for line in err.splitlines()) == 1, err
    for part in parts:
        assert part in last, err
    return last


def test_train_writes_metrics_config_and_a_model_that_reproduces_them(seq_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(seq_file), "--out", str(out), "--epochs", "4", *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"valid", "test", "best_epoch", "seconds_per_epoch"}
    assert 1 <= metrics["best_epoch"] <= 4 and metrics["seconds_per_epoch"] > 0
    assert metrics["valid"]["HR@10"] > 0.9  # random ranking scores 0.4-0.5 here: 20-27 candidates
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
    loaded = load_model(out / "best_checkpoint")  # the model's own top 3 after i3 i4 i5, the history left out
    known = [list(loaded.item_ids).index(name) for name in ("i3", "i4", "i5")]
    seq = torch.zeros(1, loaded.max_len, dtype=torch.long)
    seq[0, -3:] = torch.tensor(known)
    with torch.no_grad():
        scores = loaded.model.score(seq)[0]  # column j is item j + 1
    scores[[i - 1 for i in known]] = float("-inf")
    assert items.split() == [str(loaded.item_ids[j + 1]) for j in scores.topk(3).indices.tolist()]


def test_resume_continues_to_more_epochs(seq_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(seq_file), "--out", str(out), "--epochs", "2", *TINY]) == 0
    first = json.loads((out / "metrics.json").read_text())["history"]
    assert main(["train", "--data", str(seq_file), "--out", str(out), "--epochs", "3", "--resume", *TINY]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[:2] == first  # continued, not started anew
    assert "starting from scratch" not in capsys.readouterr().err


def test_a_resume_with_other_settings_is_refused_and_leaves_the_run_as_it_was(seq_file, tmp_path, capsys):
    out = tmp_path / "run"
    run = ["train", "--data", str(seq_file), "--out", str(out), "--epochs", "1", *TINY]
    assert main(run) == 0
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "metrics.json", "checkpoint.pt")}
    capsys.readouterr()
    assert main([*run, "--resume", "--epochs", "2", "--alpha", "0.1"]) == 2
    one_line_error(capsys, "checkpoint.pt", "alpha: 0.4 -> 0.1")
    assert {name: (out / name).read_bytes() for name in before} == before


def test_resuming_a_run_that_stopped_early_trains_no_further(seq_file, tmp_path):
    out = tmp_path / "run"
    run = ["train", "--data", str(seq_file), "--out", str(out), *TINY, "--patience", "1"]
    assert main([*run, "--epochs", "40"]) == 0
    before = json.loads((out / "metrics.json").read_text())
    assert len(before["history"]) < 40  # it stopped on its patience, not on the cap
    assert main([*run, "--epochs", "50", "--resume"]) == 0
    after = json.loads((out / "metrics.json").read_text())
    assert (after["history"], after["best_epoch"], after["test"]) == (before["history"], before["best_epoch"],
                                                                      before["test"])


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


def test_a_column_flag_for_data_without_named_columns_is_refused(tmp_path, capsys):
    """--user-col on a sequence or .inter file was ignored (and a search recorded it as used)."""
    data = tmp_path / "seq.txt"
    data.write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in enumerate(synthetic_sequences(), 1)))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--user-col", "uid", *TINY]) == 2
    one_line_error(capsys, f"{data}: --user-col uid: only a .csv or .parquet file has columns to name")
    assert not (tmp_path / "r").exists()


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


def test_a_device_that_does_not_exist_is_refused_before_any_work(seq_file, tmp_path, capsys):
    assert main(["train", "--data", str(seq_file), "--out", str(tmp_path / "r"), "--device", "gpu"]) == 2
    one_line_error(capsys, "device='gpu'", "not a device")
    assert not (tmp_path / "r").exists()


def test_evaluate_refuses_data_with_another_number_of_items(trained, tmp_path, capsys):
    lines = write_table(tmp_path / "t.csv").read_text().splitlines()
    other = tmp_path / "other.csv"  # i30 gone: 29 items
    other.write_text("\n".join(line for line in lines if ",i30," not in line) + "\n")
    assert main(["evaluate", str(trained / "best_checkpoint"), "--data", str(other)]) == 2
    one_line_error(capsys, str(other), "has 29 items", "trained on 30")


def test_evaluate_refuses_data_that_numbers_its_items_otherwise(trained, tmp_path, capsys):
    other = tmp_path / "other.csv"  # as many items, other ids: i7 is not the model's item 7
    other.write_text(re.sub(r",i(\d+),", r",x\1,", write_table(tmp_path / "t.csv").read_text()))
    assert main(["evaluate", str(trained / "best_checkpoint"), "--data", str(other)]) == 2
    one_line_error(capsys, str(other), "numbers its items otherwise")


def test_a_missing_optional_package_is_one_line(seq_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["tune", "--data", str(seq_file), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'ray'" in err and "not installed" in err


def test_a_diverged_run_is_one_line_and_writes_no_model(seq_file, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--data", str(seq_file), "--out", str(out), *TINY, "--epochs", "3", "--lr", "1e6"]) == 2
    one_line_error(capsys, "at epoch 1", "lower --lr")
    assert not (out / "metrics.json").exists() and not (out / "best_checkpoint").exists()


@pytest.mark.parametrize("flag, value", [("--alpha", "nan"), ("--tau", "inf"), ("--lr", "nan"), ("--dropout", "nan")])
def test_a_float_setting_must_be_finite(seq_file, tmp_path, capsys, flag, value):
    assert main(["train", "--data", str(seq_file), "--out", str(tmp_path / "r"), *TINY, "--epochs", "1",
                 flag, value]) == 2
    one_line_error(capsys, f"{flag[2:]}={value}: must be a finite number")


@pytest.mark.parametrize("flag, value", [("--lr", "1e39"), ("--weight-decay", "1e300")])
def test_a_float_setting_beyond_float32_is_one_line(seq_file, tmp_path, capsys, flag, value):
    """Finite in Python, infinite in float32: Adam's step ended in an overflow traceback."""
    assert main(["train", "--data", str(seq_file), "--out", str(tmp_path / "r"), *TINY, "--epochs", "1",
                 flag, value]) == 2
    one_line_error(capsys, f"{flag[2:].replace('-', '_')}={float(value)!r}: must be at most 3.4e+38 in size")


def test_k_beyond_the_items_is_recorded_as_used(seq_file, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--data", str(seq_file), "--out", str(out), *TINY, "--epochs", "1",
                 "--k-noise", "100000"]) == 0
    assert "k_noise=100000 exceeds the data's 30 items - 1: using 29" in capsys.readouterr().err
    assert Config.load_yaml(out / "config.yaml").k_noise == 29
    assert Config.load_yaml(out / "best_checkpoint" / "config.yaml").k_noise == 29


def test_a_key_given_twice_in_a_config_file_names_file_line_and_key(seq_file, tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("alpha: 0.1\nbeta: 0.2\nalpha: 0.4\n")
    assert main(["train", "--data", str(seq_file), "--out", str(tmp_path / "r"), "--config", str(conf)]) == 2
    one_line_error(capsys, f"{conf}:3", "duplicate key 'alpha'")


def test_train_never_silently_replaces_an_earlier_run(seq_file, tmp_path, capsys):
    out = tmp_path / "r"
    run = ["train", "--data", str(seq_file), "--out", str(out), *TINY, "--epochs", "1"]
    assert main(run) == 0
    before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(run) == 2
    one_line_error(capsys, str(out), "--resume", "--force")
    assert (out / "metrics.json").read_bytes() == before
    # --force replaces the earlier run as a whole, once the new one is complete: a replacement
    # that fails leaves the earlier run as it was (it used to be deleted before training)
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main([*run, "--force", "--seed", "7", "--lr", "1e6"]) == 2
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == files
    assert main([*run, "--force", "--seed", "7"]) == 0
    assert (out / "metrics.json").read_bytes() != before and Config.load_yaml(out / "config.yaml").seed == 7
    assert sorted(p.name for p in out.iterdir()) == [".lock", "best_checkpoint", "checkpoint.pt", "config.yaml",
                                                     "metrics.json"]


def test_train_refuses_an_out_another_process_is_writing(seq_file, tmp_path, capsys):
    """Two `train --out` at once both ran: config.yaml held one run's settings, the model the
    other's.  The second is refused in one line and writes nothing."""
    out = tmp_path / "r"
    with locked(out):  # as a running train holds it
        assert main(["train", "--data", str(seq_file), "--out", str(out), *TINY, "--epochs", "1"]) == 2
        assert [p.name for p in out.iterdir()] == [".lock"]
    one_line_error(capsys, str(out), "in use by another simdiffrec process")
    assert main(["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "new"), *TINY]) == 2
    assert not (tmp_path / "new").exists()  # a failed train leaves no OUT holding only its lock


def test_without_a_terminal_train_prints_lines_not_bars(seq_file, tmp_path, capsys):
    args = ["train", "--data", str(seq_file), "--out", str(tmp_path / "r"), "--epochs", "2",
            *[a for a in TINY if a != "--quiet"]]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\x1b[" not in captured.err
    assert [line.split()[:2] for line in captured.out.splitlines() if line.startswith("epoch")] == \
        [["epoch", "1"], ["epoch", "2"]]


def test_recommend_names_unknown_ids_and_never_returns_the_history(trained, capsys):
    folder = str(trained / "best_checkpoint")
    capsys.readouterr()
    assert main(["recommend", folder, "--history", "i3 abc 99999999 i4", "-k", "28"]) == 0
    captured = capsys.readouterr()
    assert "abc 99999999" in captured.err and len(captured.err.strip().splitlines()) == 1
    items = captured.out.strip().split("\t")[1].split()
    assert len(items) == 28 and not {"i3", "i4"} & set(items)
    for k in ("0", "29"):  # 30 items, 2 in the history: 1..28
        assert main(["recommend", folder, "--history", "i3 i4", "-k", k]) == 2
        one_line_error(capsys, f"k={k}", "between 1 and 28")


def test_recommend_refuses_a_model_folder_without_its_id_map(trained, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(trained / "best_checkpoint", folder)
    (folder / "items.parquet").unlink()
    assert main(["recommend", str(folder), "--history", "i3"]) == 2
    one_line_error(capsys, str(folder / "items.parquet"))


def test_a_crafted_or_damaged_model_file_is_one_line_and_runs_nothing(trained, tmp_path, capsys):
    import shutil

    from .test_files import Payload

    folder = tmp_path / "model"
    shutil.copytree(trained / "best_checkpoint", folder)
    marker = tmp_path / "code-ran"
    torch.save({"n_items": Payload(marker)}, folder / "model.pt")
    assert main(["recommend", str(folder), "--history", "i3"]) == 2
    one_line_error(capsys, str(folder / "model.pt"), "refused")
    assert not marker.exists()
    (folder / "model.pt").write_bytes(b"")
    assert main(["evaluate", str(folder), "--data", "x.csv"]) == 2
    one_line_error(capsys, str(folder / "model.pt"))


@pytest.mark.parametrize("key, value", [("n_items", 10**12), ("n_items", 1e12), ("max_len", -1)])
def test_a_model_file_with_crafted_sizes_is_one_line(trained, tmp_path, capsys, key, value):
    """Plain values that its weights do not have built a model of that size: an allocation or
    negative-dimension traceback."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(trained / "best_checkpoint", folder)
    payload = torch.load(folder / "model.pt", weights_only=True)
    torch.save({**payload, key: value}, folder / "model.pt")
    assert main(["recommend", str(folder), "--history", "i3"]) == 2
    one_line_error(capsys, str(folder / "model.pt"), f"{key}={value!r} does not fit its weights")


def test_a_model_with_nan_weights_is_refused_not_answered_with_items_one_to_k(trained, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(trained / "best_checkpoint", folder)
    payload = torch.load(folder / "model.pt", weights_only=True)
    payload["state_dict"]["encoder.items.weight"][3, 0] = float("nan")
    torch.save(payload, folder / "model.pt")
    assert main(["recommend", str(folder), "--history", "i3"]) == 2
    one_line_error(capsys, str(folder / "model.pt"), "NaN or infinite values (encoder.items.weight)")


def test_an_id_map_naming_an_item_twice_is_refused(trained, tmp_path, capsys):
    """With i3 twice, recommend could return one i3 for a history holding the other."""
    import shutil

    import pandas as pd

    folder = tmp_path / "model"
    shutil.copytree(trained / "best_checkpoint", folder)
    ids = pd.read_parquet(folder / "items.parquet")
    ids.loc[ids["item_id"] == "i4", "item_id"] = "i3"
    ids.to_parquet(folder / "items.parquet", index=False)
    assert main(["recommend", str(folder), "--history", "i3"]) == 2
    one_line_error(capsys, str(folder / "items.parquet"), "item id 'i3' appears more than once")


def test_a_checkpoint_with_a_crafted_loop_state_is_one_line(seq_file, tmp_path, capsys):
    out = tmp_path / "run"
    run = ["train", "--data", str(seq_file), "--out", str(out), "--epochs", "1", *TINY]
    assert main(run) == 0
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**payload, "state": {"epoch": -1, "planted": 1}}, out / "checkpoint.pt")
    capsys.readouterr()
    assert main([*run[:-len(TINY) - 2], "--epochs", "2", *TINY, "--resume"]) == 2
    one_line_error(capsys, str(out / "checkpoint.pt"), "loop or random state is not what this project wrote")


def test_every_flag_says_what_it_does():
    from simdiffrec.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            assert text and not text.startswith("("), f"{name} {action.option_strings or action.dest}: {text!r}"
    max_len = next(a for a in commands["train"]._actions if a.dest == "max_len")
    assert "None" not in max_len.help and "50" in max_len.help


def test_threads_default_to_one_on_a_busy_machine(monkeypatch, seq_file, tmp_path, capsys):
    from simdiffrec import device

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.setattr(device.os, "getloadavg", lambda: (6.0, 6.0, 6.0))
    assert device.default_threads() == 1
    monkeypatch.setattr(device.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert device.default_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert device.default_threads() == 2
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--data", str(seq_file), "--out", str(tmp_path / "r"), "--threads", "0"]) == 2
        one_line_error(capsys, "--threads 0")
    finally:
        torch.set_num_threads(threads)


def test_the_epoch_line_names_each_loss_and_health_number(seq_file, tmp_path, capsys):
    assert main(["train", "--data", str(seq_file), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch"))
    assert all(f" {name} " in line for name in ("sr", "d", "cl", "cl_view_cos", "cl_substituted", "cl_margin"))


def test_a_setting_added_as_one_field_gets_its_flag_help_type_choices_and_role():
    """docs/house.md's "adding a setting": the field says everything; nothing else lists it."""
    @dataclasses.dataclass
    class Wider(Config):
        gate: float = setting(0.5, "how far the gate opens", simdiffrec_only=True)
        mode: str = setting("a", "which mode", choices=("a", "b"), resumable=True)

    parser = argparse.ArgumentParser()
    add_config_flags(parser, Wider)
    cfg = config_from_args(parser.parse_args(["--gate", "0.7", "--mode", "b"]), Wider)
    assert (cfg.gate, cfg.mode) == (0.7, "b") and "how far the gate opens (default 0.5)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    with pytest.raises(ValueError, match="gate='wide' must be a number"):
        Wider.from_dict({"gate": "wide"}, source="settings.yaml")
    with pytest.raises(ValueError, match="mode='c': must be one of a, b"):
        Wider(mode="c")
    assert "gate" in simdiffrec_only(Wider) and "mode" in resumable(Wider)
    assert "gate" not in simdiffrec_only() and resumable() == RESUMABLE_CHANGES
