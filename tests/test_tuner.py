"""The search end to end on CPU: a small search with ASHA and its exports, packing four trials
onto one (logical) GPU, resuming a search whose driver was killed, the plumbing on a cheap known
objective, tune-all.  One Ray instance (4 CPUs, 1 logical GPU) serves the module."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import optuna
import pandas as pd
import pyarrow.fs
import pytest
import ray
import yaml
from ray import tune
from ray.tune import ExperimentAnalysis

from simdiffrec.cli import main
from tuner import recovery, search, spaces, storage
from simdiffrec.files import atomic_symlink
from tuner.experiment import Trial, export, read, results_frame
from tuner.jobs import plan_all, space_for
from tuner.protocol import BEST, GPU_SHARE, METRIC, MODEL_DIR, REPORTED
from tuner.report import cost
from tuner.status import load
from tuner.trainable import fetch_data, report_checkpoint, reported_rows

from .conftest import synthetic_sequences

SIMDIFFREC = [sys.executable, "-m", "simdiffrec.cli"]
TINY = {"hidden": 16, "inner": 32, "steps": 50, "k_noise": 3, "k_sample": 2, "batch_size": 32, "kcore": 0,
        "max_len": 10, "patience": 100, "dropout": 0.1, "attn_dropout": 0.1}
SPACE = {
    "parameters": {
        "alpha": {"type": "float", "low": 0.1, "high": 0.5},
        "tau_schedule": {"type": "categorical", "choices": ["constant", "linear"]},
        "tau_end": {"type": "float", "low": 0.05, "high": 1.0, "log": True, "when": {"tau_schedule": ["linear"]}},
        "lr": {"type": "float", "low": 3e-4, "high": 1e-2, "log": True},
    },
    "fixed": TINY,
    "points_to_evaluate": [{"alpha": 0.4, "tau_schedule": "constant", "lr": 1e-3}],
    "asha": {"max_epochs": 4, "grace_period": 1, "reduction_factor": 2},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A sequence file (150 users over 150 items: learnable, not learnt in 4 epochs) and the space."""
    folder = tmp_path_factory.mktemp("inputs")
    paths = {"data": folder / "seq.txt", "space": folder / "space.yaml"}
    sequences = synthetic_sequences(n_users=150, n_items=150, length=12, seed=1)
    paths["data"].write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in enumerate(sequences, 1)))
    paths["space"].write_text(yaml.safe_dump(SPACE, sort_keys=False))
    return paths


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"  # tiny epochs checkpoint often
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tune_args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["tune", "--data", str(files["data"]), "--space", str(files["space"]), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def small_search(ray_cluster, files, tmp_path_factory) -> Path:
    """8 trials, 4 at a time, each asking for a quarter of the one GPU."""
    out = tmp_path_factory.mktemp("search")
    assert main(tune_args(files, out, "--num-samples", "8", "--trials-per-gpu", "4", "--max-concurrent", "4")) == 0
    return out


def test_small_search_stops_some_trials_early_and_exports_the_best(small_search):
    results = pd.read_parquet(small_search / "results.parquet")
    trials = results.groupby("trial_id")
    assert trials.ngroups == 8 and set(results["status"]) == {"TERMINATED"}
    assert results.groupby("pid")["trial_id"].nunique().max() > 1  # workers are reused across trials
    assert (trials["epoch"].max() < 4).any(), "ASHA stopped no trial"
    assert trials["epoch"].max().max() == 4
    first = results.iloc[0]  # the space's point comes first
    assert first["number"] == 1
    assert (first["alpha"], first["tau_schedule"], first["lr"]) == (0.4, "constant", 1e-3)

    best = yaml.safe_load((small_search / "best_config.yaml").read_text())
    top = results.loc[results[METRIC].idxmax()]
    assert best["trial"] == top["trial_id"] and best["epoch"] == top["epoch"]  # its best epoch, not its last
    assert best["metrics"][METRIC] == pytest.approx(top[METRIC], abs=1e-12)
    assert best["parameters"]["alpha"] == top["alpha"] and best["config"]["alpha"] == top["alpha"]
    assert best["dataset"]["users"] == 150 and {"ray", "optuna", "torch"} <= set(best["versions"])
    assert (small_search / "best_checkpoint" / "model.pt").is_file()


def test_exported_checkpoint_reproduces_its_valid_metric_in_a_fresh_process(small_search, files):
    best = yaml.safe_load((small_search / "best_config.yaml").read_text())
    run = subprocess.run([*SIMDIFFREC, "evaluate", str(small_search / "best_checkpoint"), "--data", str(files["data"]),
                          "--split", "valid"], capture_output=True, text=True, check=True)
    valid = json.loads(run.stdout)["valid"]
    assert valid["NDCG@10"] == pytest.approx(best["metrics"][METRIC], abs=1e-6)
    assert valid["HR@10"] == pytest.approx(best["metrics"]["valid/HR@10"], abs=1e-6)


def test_a_worker_fetches_the_shared_data_once(ray_cluster, tiny_data):
    ref = ray.put(tiny_data)
    again = ray.cloudpickle.loads(ray.cloudpickle.dumps(ref))  # as the next trial's setup brings it
    assert fetch_data(again) is fetch_data(ref)


def test_four_trials_share_one_gpu_at_once(small_search):
    trials = ExperimentAnalysis(str(small_search / "experiment")).trials
    assert all(t.placement_group_factory.required_resources == {"CPU": 1.0, "GPU": 0.25} for t in trials)
    first = sorted(trials, key=lambda t: t.run_metadata.start_time)[:4]
    starts = [t.run_metadata.start_time for t in first]
    ends = [t.run_metadata.start_time + t.last_result["time_total_s"] for t in first]
    assert max(starts) < min(ends), "the first four trials did not run at the same time"
    # each trial tells the share Ray gave it; the report's GPU-hours are its hours times that share
    assert set(pd.read_parquet(small_search / "results.parquet")[GPU_SHARE]) == {0.25}
    found = load(str(small_search))
    table = cost(found).table
    assert "0.25 (4 trials per GPU)" in table and f"{found.trials['hours'].sum() / 4:.2f}" in table


def test_export_command_rewrites_the_exports_from_the_experiment(small_search, tmp_path):
    assert main(["export", str(small_search / "experiment"), "--out", str(tmp_path)]) == 0
    again, before = (yaml.safe_load((d / "best_config.yaml").read_text()) for d in (tmp_path, small_search))
    assert {k: v for k, v in again.items() if k != "search"} == {k: v for k, v in before.items() if k != "search"}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "results.parquet"),
                                  pd.read_parquet(small_search / "results.parquet"))
    assert (tmp_path / "best_checkpoint" / "model.pt").read_bytes() == \
        (small_search / "best_checkpoint" / "model.pt").read_bytes()


def test_a_full_disk_during_export_is_one_line_and_keeps_the_exports_there(small_search, tmp_path, capsys,
                                                                             monkeypatch):
    """copy_model's OSError ended `export` in a traceback."""
    assert main(["export", str(small_search / "experiment"), "--out", str(tmp_path)]) == 0
    before = (tmp_path / "best_config.yaml").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pyarrow.fs, "copy_files", full_disk)
    capsys.readouterr()
    assert main(["export", str(small_search / "experiment"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simdiffrec export: error: ") and "best_checkpoint" in err[0]
    assert err[0].endswith("cannot write: No space left on device")
    assert (tmp_path / "best_config.yaml").read_bytes() == before
    assert [p.name for p in (tmp_path / ".exports").iterdir() if p.name != "current"] == [
        os.readlink(tmp_path / ".exports" / "current")]


def test_export_refuses_a_best_checkpoint_without_its_model(small_search, tmp_path, capsys):
    """A checkpoint whose model folder lacked model.pt was exported as best_checkpoint/."""
    experiment = tmp_path / "experiment"
    shutil.copytree(small_search / "experiment", experiment)
    best = yaml.safe_load((small_search / "best_config.yaml").read_text())
    trial = next(t for t in read(str(experiment)).trials if t.trial_id == best["trial"])
    [model] = [Path(trial.folder) / name / MODEL_DIR for name in trial.checkpoints
               if trial.checkpoints[name]["epoch"] == best["epoch"]]
    (model / "model.pt").unlink()
    assert main(["export", str(experiment), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"simdiffrec export: error: {model}: holds no model.pt, so it is no model folder: nothing to export"]
    assert not (tmp_path / "out" / "best_config.yaml").exists()


def test_an_export_killed_while_switching_an_earlier_layout_leaves_no_mix(small_search, tmp_path, monkeypatch):
    """An OUT of the layout before `.exports/` held its exports as plain files: each was replaced
    by its link in turn, so a kill between them left old and new exports side by side."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("best_config.yaml", "results.parquet"):
        shutil.copyfile(small_search / name, out / name)
    shutil.copytree(small_search / "best_checkpoint", out / "best_checkpoint")
    linked = []

    def killed_at_the_second_export(link, target):
        if len(linked) == 2:  # .exports/current, then one export
            raise KeyboardInterrupt
        linked.append(link)
        atomic_symlink(link, target)

    monkeypatch.setattr("tuner.experiment.atomic_symlink", killed_at_the_second_export)
    with pytest.raises(KeyboardInterrupt):
        export(str(small_search / "experiment"), out)
    kinds = {name: (out / name).is_symlink() for name in ("best_config.yaml", "best_checkpoint", "results.parquet")
             if (out / name).exists() or (out / name).is_symlink()}
    assert all(kinds.values()), kinds  # no export of the earlier layout beside a new one
    monkeypatch.undo()
    export(str(small_search / "experiment"), out)
    assert (out / "best_checkpoint" / "model.pt").is_file() and (out / "results.parquet").is_symlink()


def test_resume_refuses_other_settings_and_a_fresh_start_refuses_a_used_folder(small_search, files, capsys):
    assert main(tune_args(files, small_search, "--resume", "--seed", "9")) == 2
    assert "seed 0" in capsys.readouterr().err
    assert main(tune_args(files, small_search, "--resume", "--num-samples", "7")) == 2
    assert "search of 8 trials: --resume --num-samples 7 cannot shrink it" in capsys.readouterr().err
    assert main(tune_args(files, small_search)) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_refuses_data_that_changed_since_the_search_began(ray_cluster, files, tmp_path, capsys):
    """Only the path was compared: data changed to the same counts trained the resumed trials on
    it silently.  The record keeps the data's fingerprint; an older record without one warns."""
    data = tmp_path / "seq.txt"
    lines = files["data"].read_text().splitlines(keepends=True)
    data.write_text("".join(lines))
    out = tmp_path / "out"
    args = ["tune", "--data", str(data), "--space", str(files["space"]), "--out", str(out), "--num-samples", "1",
            "--max-epochs", "1"]
    assert main(args) == 0
    record = yaml.safe_load((out / "search.yaml").read_text())
    assert set(record["fingerprint"]) == {"users", "items", "actions", "sha256"}
    user, first, second, *rest = lines[0].split()
    swapped = " ".join([user, second, first, *rest]) + "\n"  # the same users, items and actions
    for changed, named in ((swapped, "sha256"), (lines[0].rstrip() + " 151\n", "items 150 -> 151")):
        data.write_text(changed + "".join(lines[1:]))
        capsys.readouterr()
        assert main([*args, "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"simdiffrec tune: error: {out / 'search.yaml'}: the search began on other data")
        assert named in err[-1] and "Traceback" not in "".join(err)
    data.write_text("".join(lines))
    del record["fingerprint"]
    (out / "search.yaml").write_text(yaml.safe_dump(record))
    assert main([*args, "--resume"]) == 0
    assert "keeps no fingerprint" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--num-samples", "0", "num_samples=0: must be at least 1"),
                                                   ("--max-concurrent", "0", "max_concurrent=0: must be at least 1"),
                                                   ("--trials-per-gpu", "0", "trials_per_gpu=0: must be at least 1"),
                                                   ("--cpus-per-trial", "0", "cpus_per_trial=0.0: must be above 0")])
def test_a_resource_flag_below_its_minimum_is_refused_before_anything_is_written(files, tmp_path, capsys, flag,
                                                                                  value, message):
    assert main(tune_args(files, tmp_path / "out", flag, value)) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"simdiffrec tune: error: {message}"] and not (tmp_path / "out" / "experiment").exists()


def test_a_search_flag_out_of_range_is_refused_before_torch_or_ray_is_imported(tmp_path):
    """`--num-samples 0` was refused after seconds of imports (torch, Ray, Optuna)."""
    code = ("import sys; from simdiffrec.cli import main; "
            f"rc = main(['tune', '--data', 'x.txt', '--out', {str(tmp_path / 'out')!r}, '--num-samples', '0']); "
            "print(rc, [m for m in ('torch', 'ray', 'optuna') if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "2 []"
    assert run.stderr.strip() == "simdiffrec tune: error: num_samples=0: must be at least 1"
    assert not (tmp_path / "out").exists()


def test_bad_data_or_space_fail_in_one_line_before_ray_starts(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tune", "--data", str(tmp_path / "missing.txt"), "--space", str(files["space"]),
                 "--out", str(out)]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    assert not out.exists()  # not even the lock it held (an OUT holding only .lock was left)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SPACE, "parameters": {"alpah": {"type": "float", "low": 0.1, "high": 0.5}}}, sort_keys=False))
    assert main(["tune", "--data", str(files["data"]), "--space", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "alpah" in err
    assert not (out / "experiment").exists()


def test_a_search_whose_driver_is_killed_resumes_every_trial_where_it_was(ray_cluster, files, tmp_path, capfd):
    """Killed with trials finished and trials running, as their folders show (Ray's own snapshot
    of the experiment may lag behind them): on resume the running ones continue from their
    latest checkpoint under their own ids, the finished ones stay finished; only a trial created
    after Ray's last save of the state leaves its folder unused (its parameters are tried anew)."""
    slower = tmp_path / "space.yaml"  # small batches: epochs long enough to interrupt; no trial stopped before 2
    slower.write_text(yaml.safe_dump({**SPACE, "fixed": {**TINY, "batch_size": 8},
                                      "asha": {**SPACE["asha"], "grace_period": 2}}, sort_keys=False))
    args = ["tune", "--data", str(files["data"]), "--space", str(slower), "--out", str(tmp_path / "out"),
            "--num-samples", "6", "--max-concurrent", "2", "--max-epochs", "5"]
    experiment = tmp_path / "out" / "experiment"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1000"}  # no periodic snapshot: only the forced ones
    driver = subprocess.Popen([*SIMDIFFREC, *args], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        trials = _wait_for(experiment, _mid_search)
        deadline = time.monotonic() + 10  # kill when the saved state lags behind a running trial, if it does
        while not _state_lags(experiment, trials) and time.monotonic() < deadline:
            time.sleep(0.02)
            trials = now if _mid_search(now := _on_disk(experiment)) else trials
    finally:
        _kill(driver)
    saved = set(_saved_epochs(experiment))  # a trial created after the last save is unknown to --resume
    finished = {t: rows[-1]["epoch"] for t, rows in trials.items() if rows and rows[-1]["done"] and t in saved}
    running = [t for t, rows in trials.items() if rows and not rows[-1]["done"] and t in saved]
    capfd.readouterr()

    assert main([*args, "--resume"]) == 0
    log = capfd.readouterr().err
    assert "Traceback" not in log and "Error handling checkpoint" not in log
    after = {trial.trial_id for trial in read(str(experiment)).trials}
    assert len(after) == 6 and saved <= after  # no trial the state knew rerun under a new id
    unused = {t: rows for t, rows in _on_disk(experiment).items() if t not in after}
    assert not set(unused) & saved and not any(unused.values())  # never a reported result
    results = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert set(results["trial_id"]) == after and set(results["status"]) == {"TERMINATED"}
    for trial_id, last_epoch in finished.items():
        assert results.loc[results["trial_id"] == trial_id, "epoch"].max() == last_epoch
    for trial_id in running:  # continued from its checkpoint, not from epoch 1
        assert [row["epoch"] for row in _on_disk(experiment)[trial_id]].count(1) == 1
    for trial_id, epochs in results.groupby("trial_id")["epoch"]:  # every epoch up to its last, once
        assert sorted(epochs) == list(range(1, epochs.max() + 1)), trial_id


def waits_for_its_checkpoint_in_the_saved_state(config: dict, experiment: Path) -> None:
    """Reports epoch 1 with a checkpoint, then reports whether Ray's saved state came to hold it."""
    with tempfile.TemporaryDirectory() as folder:
        tune.report({"epoch": 1, METRIC: 0.1, BEST: 0.1}, checkpoint=tune.Checkpoint.from_directory(folder))
    trial_id = tune.get_context().get_trial_id()
    deadline = time.monotonic() + 20
    while not (saved := _saved_epochs(experiment).get(trial_id) == 1) and time.monotonic() < deadline:
        time.sleep(0.1)
    tune.report({"epoch": 2, METRIC: 0.2, BEST: 0.2, "saved": float(saved)})


def test_ray_saves_the_experiment_state_after_every_checkpoint(ray_cluster, tmp_path, monkeypatch):
    """What --resume restores is Ray's saved state: a trial's checkpoint it lacks is lost to a
    killed driver (the trial reruns, or reruns under a new id).  Ray's periodic save is off here."""
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1000")
    space = spaces.parse({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5}},
                          "asha": {"max_epochs": 2, "grace_period": 2, "reduction_factor": 2}}, "saved")
    settings = search.SearchSettings(experiment=str(tmp_path / "exp"), num_samples=1)
    search.run_search(tune.with_parameters(waits_for_its_checkpoint_in_the_saved_state, experiment=tmp_path / "exp"),
               space, settings)
    assert read(settings.experiment).trials[0].rows[-1]["saved"] == 1.0


def counts_epochs_from_its_checkpoint(config: dict) -> None:
    """Epochs 1-3, each with a checkpoint holding its epoch (the worst metric last), then a crash;
    restored, it continues from the epoch its checkpoint holds up to 6."""
    checkpoint = tune.get_checkpoint()
    start = json.loads((Path(checkpoint.path) / "epoch.json").read_text()) if checkpoint else 0
    rows = reported_rows(Path(checkpoint.path)) if checkpoint else []
    for epoch in range(start + 1, 7):
        if epoch == 4 and checkpoint is None:
            raise RuntimeError("killed")
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "epoch.json").write_text(json.dumps(epoch))
            report_checkpoint(rows, {"epoch": epoch, METRIC: 1 / epoch, BEST: 1.0}, Path(folder))


def test_a_trial_whose_saved_checkpoint_ray_deleted_before_the_driver_died_resumes(ray_cluster, tmp_path):
    """Ray deletes a trial's superseded checkpoint when it registers the next, then saves its
    state (and with it the trial's result.json): a driver killed in between leaves a state naming
    a deleted folder, and no row for the newest checkpoint.  That disk is made here from a stopped
    search; the folder and the row are put back before Ray restores the search, and the trial
    continues from its newest checkpoint."""
    space = spaces.parse({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5}},
                          "asha": {"max_epochs": 6, "grace_period": 6, "reduction_factor": 2}}, "lost")
    settings = search.SearchSettings(experiment=str(tmp_path / "exp"), num_samples=1, max_failures=0)
    search.run_search(counts_epochs_from_its_checkpoint, space, settings)
    [trial] = read(settings.experiment).trials
    assert trial.status == "ERROR" and trial.latest == "checkpoint_000002" and "checkpoint_000000" in trial.checkpoints
    folder = Path(trial.folder)  # the race: epoch 4 registered as checkpoint_000003, its predecessor deleted
    (folder / "checkpoint_000002").rename(folder / "checkpoint_000003")
    (folder / "checkpoint_000003" / "epoch.json").write_text("4")
    kept = [*(json.loads((folder / "checkpoint_000003" / REPORTED).read_text())), {"epoch": 4, METRIC: 0.25}]
    (folder / "checkpoint_000003" / REPORTED).write_text(json.dumps(kept))

    assert recovery.restore_lost_checkpoints(settings.experiment) == [f"{trial.folder}/checkpoint_000002"]
    assert recovery.restore_rows(settings.experiment) == [trial.folder]
    [trial] = read(settings.experiment).trials
    assert [row["epoch"] for row in trial.rows] == [1, 2, 3, 4] and trial.rows[-1][METRIC] == 0.25
    search.run_search(counts_epochs_from_its_checkpoint, space, settings, resume=True)
    [trial] = read(settings.experiment).trials
    # (in this same Ray session Ray uploads its own copy of result.json, which never saw epoch 4;
    # a new driver, the case of a killed one, downloads the one above)
    continued = [row["epoch"] for row in trial.rows if row["epoch"] != 4]
    assert trial.status == "TERMINATED" and continued == [1, 2, 3, 5, 6]
    assert not list(folder.glob("*.restoring"))


def test_a_result_file_cut_off_by_a_killed_driver_gets_its_rows_back(ray_cluster, tmp_path):
    """Ray copies result.json to the experiment's folder in place: a driver killed meanwhile can
    leave it empty, cut off mid-line, or short of rows.  Each comes back whole from the rows the
    latest checkpoint kept (Ray's own rows stay as they were); a whole file is left alone."""
    space = spaces.parse({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5}},
                          "asha": {"max_epochs": 6, "grace_period": 6, "reduction_factor": 2}}, "cut")
    settings = search.SearchSettings(experiment=str(tmp_path / "exp"), num_samples=1, max_failures=0)
    search.run_search(counts_epochs_from_its_checkpoint, space, settings)
    [trial] = read(settings.experiment).trials
    results = Path(trial.folder) / "result.json"
    whole = results.read_text()
    lines = whole.splitlines(keepends=True)
    assert len(lines) == 3 and recovery.restore_rows(settings.experiment) == []
    for cut in ("", lines[0] + lines[1][:20], lines[0] + lines[2]):
        results.write_text(cut)
        assert recovery.restore_rows(settings.experiment) == [trial.folder]
        rows = read(settings.experiment).trials[0].rows
        assert [row["epoch"] for row in rows] == [1, 2, 3]
        assert [row for row in rows if "training_iteration" in row] == [json.loads(line) for line in cut.splitlines()
                                                                        if line.endswith("}")]
    assert not [p for p in Path(trial.folder).iterdir() if p.name.endswith((".restoring", ".partial"))]


def scores_alpha_unless_told_to_crash(config: dict, crash: Path) -> None:
    """alpha at each of 4 epochs; raises before its first report while the file `crash` exists
    and alpha < 0.2."""
    if crash.exists() and config["alpha"] < 0.2:
        raise RuntimeError("killed")
    for epoch in range(1, 5):
        tune.report({"epoch": epoch, METRIC: config["alpha"], BEST: config["alpha"]})


def test_a_resumed_search_judges_its_next_trials_against_the_rungs_it_had(ray_cluster, tmp_path):
    """Ray saves no scheduler state; the trials a resumed search runs must still meet ASHA's
    rungs as the trials before the interruption left them.  Two good trials run to the end, a
    poor one dies unjudged; resumed, it is stopped at the first rung."""
    space = spaces.parse({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5}},
                          "points_to_evaluate": [{"alpha": 0.45}, {"alpha": 0.5}, {"alpha": 0.1}],
                          "asha": {"max_epochs": 4, "grace_period": 1, "reduction_factor": 2}}, "rungs")
    settings = search.SearchSettings(experiment=str(tmp_path / "exp"), num_samples=3, max_concurrent=1,
                                     max_failures=0)
    crash = tmp_path / "crash"
    crash.touch()
    trainable = tune.with_parameters(scores_alpha_unless_told_to_crash, crash=crash)
    search.run_search(trainable, space, settings)
    assert [(t.status, len(t.rows)) for t in read(settings.experiment).trials] == [
        ("TERMINATED", 4), ("TERMINATED", 4), ("ERROR", 0)]
    crash.unlink()
    search.run_search(trainable, space, settings, resume=True)
    assert [len(t.rows) for t in read(settings.experiment).trials] == [4, 4, 1]


def _judged(min_rung_results: int, scores: list[float], epoch: int = 1) -> list[str]:
    """ASHA's verdict (rungs at epochs 1, 3; at most 9) on trials reporting `scores` at `epoch`, in turn."""
    scheduler = recovery.ResumableASHA(metric=METRIC, mode="max", time_attr="epoch", max_t=9, grace_period=1,
                                     reduction_factor=3, min_rung_results=min_rung_results)
    verdicts = []
    for number, score in enumerate(scores):
        trial = SimpleNamespace(trial_id=f"t{number}", has_reported_at_least_once=False)
        scheduler.on_trial_add(None, trial)
        verdicts.append(scheduler.on_trial_result(None, trial, {"epoch": epoch, METRIC: score}))
    return verdicts


def test_a_rung_stops_a_trial_only_once_it_holds_min_rung_results_earlier_results():
    """Ray's rule stops the second trial at a rung for falling below the first alone; with
    min_rung_results = 3 the second and third go on, and the fourth meets the rung's top third."""
    scores = [0.5, 0.1, 0.05, 0.01, 0.6]
    assert _judged(1, scores) == ["CONTINUE", "STOP", "STOP", "STOP", "CONTINUE"]
    assert _judged(3, scores) == ["CONTINUE", "CONTINUE", "CONTINUE", "STOP", "CONTINUE"]
    assert _judged(3, [0.5], epoch=9) == ["STOP"]  # max_t ends a trial whatever the rungs hold


def test_a_local_experiment_is_written_through_renaming_storage(ray_cluster, tmp_path, monkeypatch):
    """Ray's copies of its state and each trial's result.json go through `tuner.storage`, so a kill
    mid-copy cuts no file off (tests/test_storage.py)."""
    written = []
    opened = storage.RenamingLocalHandler.open_output_stream
    monkeypatch.setattr(storage.RenamingLocalHandler, "open_output_stream",
                        lambda self, path, metadata: written.append(Path(path).name) or opened(self, path, metadata))
    space = spaces.parse({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5}},
                          "asha": {"max_epochs": 4, "grace_period": 4, "reduction_factor": 2}}, "renamed")
    settings = search.SearchSettings(experiment=str(tmp_path / "exp"), num_samples=1)
    search.run_search(tune.with_parameters(scores_alpha_unless_told_to_crash, crash=tmp_path / "none"), space, settings)
    assert "result.json" in written and any(name.startswith("experiment_state-") for name in written)
    assert not list((tmp_path / "exp").rglob("*.partial"))


def _saved_epochs(experiment: Path) -> dict[str, int | None]:
    """Each trial's last epoch as Ray's saved experiment state holds it (plain JSON)."""
    try:
        state = json.loads(max(experiment.glob("experiment_state-*.json")).read_text())
    except (ValueError, OSError):  # not there yet, or being written
        return {}
    return {json.loads(t)["trial_id"]: (json.loads(meta).get("last_result") or {}).get("epoch")
            for t, meta in state["trial_data"]}


def _on_disk(experiment: Path) -> dict[str, list[dict]]:
    """Each trial folder's complete result.json lines, by trial id."""
    trials = {}
    for folder in experiment.glob("run_trial_*"):
        lines = (folder / "result.json").read_text().splitlines() if (folder / "result.json").exists() else []
        trials[folder.name.split("_")[2]] = rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # being written
                pass
    return trials


def _wait_for(experiment: Path, ready, timeout: float = 300) -> dict[str, list[dict]]:
    """The trial folders' results once `ready(results)` holds."""
    deadline = time.monotonic() + timeout
    while not ready(trials := _on_disk(experiment)):
        assert time.monotonic() < deadline, f"{experiment} never reached the state to interrupt in {timeout} s"
        time.sleep(0.05)
    return trials


def _kill(driver: subprocess.Popen) -> None:
    """kill -9 the driver and the local Ray it started (its session), if still there."""
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    driver.wait()


def _mid_search(trials: dict[str, list[dict]]) -> bool:
    """Two trials finished and two running with a checkpoint."""
    done = [rows[-1]["done"] for rows in trials.values() if rows]
    return done.count(True) >= 2 and done.count(False) >= 2


def _state_lags(experiment: Path, trials: dict[str, list[dict]]) -> bool:
    """Whether Ray's saved state lacks a running trial's checkpointed epoch."""
    saved = _saved_epochs(experiment)
    return bool(saved) and any(rows and not rows[-1]["done"] and saved.get(trial_id) != rows[-1]["epoch"]
                               for trial_id, rows in trials.items())


def quadratic(config: dict) -> None:
    """A cheap objective with a known optimum: alpha = 0.3, lr = 1e-3."""
    import math

    score = 1 - (config["alpha"] - 0.3) ** 2 - (math.log10(config["lr"]) + 3) ** 2 / 4
    for epoch in (1, 2):
        tune.report({"epoch": epoch, METRIC: score, BEST: score})


def test_the_plumbing_finds_the_optimum_of_a_known_objective(ray_cluster, tmp_path):
    space = spaces.parse({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5},
                                         "lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}},
                          "asha": {"max_epochs": 2, "grace_period": 1, "reduction_factor": 2}}, "quadratic")
    database = f"sqlite:///{tmp_path / 'study.db'}"  # what optuna-dashboard would watch
    settings = search.SearchSettings(experiment=str(tmp_path / "quadratic"), num_samples=40, max_concurrent=2,
                                     seed=3, optuna_storage=database)
    grid = search.run_search(quadratic, space, settings)
    best = grid.get_best_result(BEST, "max").config
    assert abs(best["alpha"] - 0.3) < 0.08 and 0.3e-3 < best["lr"] < 3e-3
    study = optuna.load_study(study_name="quadratic", storage=database)  # the search's folder: short
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 40
    assert study.best_params == best
    assert all(set(t.intermediate_values.values()) == {t.value} and 1 in t.intermediate_values for t in study.trials)
    elsewhere = dataclasses.replace(settings, experiment=str(tmp_path / "other" / "quadratic" / "experiment"))
    with pytest.raises(ValueError, match="already holds a study 'quadratic'"):  # it must not mix into another's
        search.run_search(quadratic, space, elsewhere)
    assert not Path(elsewhere.experiment).exists()


def falls_then_rises(config: dict) -> None:
    """Valid NDCG@10 0.3, 0.1, 0.2 at epochs 1-3; the best so far 0.3 throughout."""
    for epoch, value in enumerate((0.3, 0.1, 0.2), 1):
        tune.report({"epoch": epoch, METRIC: value, BEST: 0.3})


def test_the_optuna_study_keeps_each_epochs_valid_ndcg_as_its_learning_curve(ray_cluster, tmp_path):
    """Ray's OptunaSearch kept the best so far at each report: optuna-dashboard drew no curve."""
    space = spaces.parse({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5}},
                          "asha": {"max_epochs": 3, "grace_period": 3, "reduction_factor": 2}}, "curves")
    database = f"sqlite:///{tmp_path / 'study.db'}"
    settings = search.SearchSettings(experiment=str(tmp_path / "runs" / "curves" / "experiment"), num_samples=1,
                                     optuna_storage=database)
    search.run_search(falls_then_rises, space, settings)
    (trial,) = optuna.load_study(study_name="curves", storage=database).trials
    assert trial.intermediate_values == {1: 0.3, 2: 0.1, 3: 0.2} and trial.value == 0.3
    with dashboard(database) as url:  # what a user watching the search sees
        (study,) = [s for s in get_json(f"{url}/api/studies")["study_summaries"] if s["study_name"] == "curves"]
        detail = get_json(f"{url}/api/studies/{study['study_id']}")
    assert detail["has_intermediate_values"] and detail["trials"][0]["intermediate_values"] == [
        {"step": 1, "value": 0.3}, {"step": 2, "value": 0.1}, {"step": 3, "value": 0.2}]


@contextlib.contextmanager
def dashboard(database: str) -> Iterator[str]:
    """optuna-dashboard (the `dashboard` extra) serving `database` on 127.0.0.1; its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), database, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                get_json(f"{url}/api/meta")
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def interrupts_once(config: dict, driver: int, log: Path, at: int) -> None:
    """-(alpha - 0.3)² - (log10 lr + 3)² at two epochs; the `at`-th trial to start sends the
    driver SIGINT (as Ctrl-C does), once: restarted, it counts again."""
    with log.open("a") as started:
        started.write(f"{config['alpha']}\n")
    if len(log.read_text().splitlines()) == at:
        os.kill(driver, signal.SIGINT)
        time.sleep(5)  # the driver stops the search meanwhile
    score = -(config["alpha"] - 0.3) ** 2 - (math.log10(config["lr"]) + 3) ** 2
    for epoch in (1, 2):
        tune.report({"epoch": epoch, METRIC: score, BEST: score})


def test_a_resumed_search_samples_on_from_its_restored_study(ray_cluster, tmp_path):
    """Interrupted after its fifth trial had started and resumed, a search proposes the same
    configurations as one never interrupted: its TPE sampler (multivariate, group, constant
    liar) went on from the study it had, neither starting over nor sampling at random."""
    space = spaces.parse({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5},
                                         "lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}},
                          "points_to_evaluate": [{"alpha": 0.45, "lr": 1e-2}],
                          "sampler": {"multivariate": True, "group": True, "constant_liar": True,
                                      "n_startup_trials": 2},
                          "asha": {"max_epochs": 2, "grace_period": 2, "reduction_factor": 2}}, "sampler")

    def proposed(settings: search.SearchSettings) -> list[tuple[float, float]]:
        trials = sorted(read(settings.experiment).trials, key=lambda t: t.number)
        return [(t.config["alpha"], t.config["lr"]) for t in trials]

    whole = search.SearchSettings(experiment=str(tmp_path / "whole"), num_samples=8, max_concurrent=1)
    search.run_search(tune.with_parameters(interrupts_once, driver=os.getpid(), log=tmp_path / "whole.log", at=0),
               space, whole)
    cut = search.SearchSettings(experiment=str(tmp_path / "cut"), num_samples=8, max_concurrent=1)
    trainable = tune.with_parameters(interrupts_once, driver=os.getpid(), log=tmp_path / "cut.log", at=5)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(trainable, space, cut)
    assert len(read(cut.experiment).trials) < 8
    search.run_search(trainable, space, cut, resume=True)
    assert len(set(proposed(cut))) == 8 and proposed(cut) == proposed(whole)


def test_a_finished_search_grown_with_more_trials_samples_as_one_started_that_large(ray_cluster, tmp_path):
    """`--resume --num-samples N` on a finished search: its sampler goes on from its study, so the
    grown search proposes what a search of N trials from the start would have."""
    space = spaces.parse({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5},
                                         "lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}},
                          "sampler": {"n_startup_trials": 2},
                          "asha": {"max_epochs": 2, "grace_period": 2, "reduction_factor": 2}}, "grow")
    trainable = tune.with_parameters(interrupts_once, driver=os.getpid(), log=tmp_path / "log", at=0)
    whole = search.SearchSettings(experiment=str(tmp_path / "whole"), num_samples=5, max_concurrent=1)
    search.run_search(trainable, space, whole)
    grown = search.SearchSettings(experiment=str(tmp_path / "grown"), num_samples=3, max_concurrent=1)
    search.run_search(trainable, space, grown)
    search.run_search(trainable, space, dataclasses.replace(grown, num_samples=5), resume=True)
    configs = [[(t.config["alpha"], t.config["lr"]) for t in read(s.experiment).trials] for s in (whole, grown)]
    assert len(set(configs[1])) == 5 and configs[1] == configs[0]
    assert all(t.status == "TERMINATED" for t in read(grown.experiment).trials)


def test_tune_resume_with_more_trials_grows_the_search_and_records_it(ray_cluster, files, tmp_path, capsys):
    out, database = tmp_path / "grows", f"sqlite:///{tmp_path / 'study.db'}"
    assert main(tune_args(files, out, "--num-samples", "1", "--max-epochs", "1", "--optuna-storage", database)) == 0
    assert main(tune_args(files, out, "--resume", "--num-samples", "2")) == 0
    assert len(read(str(out / "experiment")).trials) == 2
    assert yaml.safe_load((out / "search.yaml").read_text())["settings"]["num_samples"] == 2
    assert len(optuna.load_study(study_name="grows", storage=database).trials) == 2
    assert f"the Optuna study 'grows', with each trial's learning curve: optuna-dashboard {database}" in (
        capsys.readouterr().out)
    assert main(["status", str(out)]) == 0
    assert "trials: 2 of 2 | 2 finished" in capsys.readouterr().out


def report_alpha_with_a_model(config: dict, epoch: int) -> None:
    """Report alpha at `epoch` with a checkpoint holding a model folder (what export copies)."""
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / MODEL_DIR
        model.mkdir()
        (model / "metrics.json").write_text(json.dumps({"data": {"source": "test"}}))
        (model / "config.yaml").write_text(yaml.safe_dump(config))
        (model / "model.pt").write_bytes(b"")  # export copies it, never reads it
        tune.report({"epoch": epoch, METRIC: config["alpha"], BEST: config["alpha"]},
                    checkpoint=tune.Checkpoint.from_directory(folder))


def diverges_when_alpha_is_high(config: dict) -> None:
    """Scores alpha, with a model checkpoint per epoch; above alpha 0.3 the second epoch raises."""
    for epoch in (1, 2):
        if epoch == 2 and config["alpha"] > 0.3:
            raise ValueError("loss became nan at epoch 2: lower --lr")
        report_alpha_with_a_model(config, epoch)


def test_a_failed_trial_is_recorded_with_its_reason_and_the_searcher_told_it_failed(ray_cluster, tmp_path, capfd):
    space = spaces.parse({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5}},
                          "points_to_evaluate": [{"alpha": 0.45}, {"alpha": 0.2}],
                          "asha": {"max_epochs": 2, "grace_period": 2, "reduction_factor": 2}}, "diverging")
    database = f"sqlite:///{tmp_path / 'study.db'}"
    settings = search.SearchSettings(experiment=str(tmp_path / "exp"), num_samples=4, max_concurrent=2,
                                     optuna_storage=database, max_failures=1)
    search.run_search(diverges_when_alpha_is_high, space, settings)
    best = export(settings.experiment, tmp_path / "out")
    assert best["parameters"]["alpha"] <= 0.3  # the failed trials scored higher
    results = pd.read_parquet(tmp_path / "out" / "results.parquet").drop_duplicates("trial_id")
    failed = results[results["alpha"] > 0.3]
    assert len(failed) >= 1 and (failed["status"] == "ERROR").all()
    assert (failed["error"] == "ValueError: loss became nan at epoch 2: lower --lr").all()
    assert results.loc[results["alpha"] <= 0.3, "error"].isna().all()
    study = optuna.load_study(study_name="exp", storage=database)
    states = {t.params["alpha"]: t.state for t in study.trials}
    assert states[0.45] == optuna.trial.TrialState.FAIL and states[0.2] == optuna.trial.TrialState.COMPLETE
    assert re.search(r"^trial #1 \w+ failed: ValueError: loss became nan at epoch 2: lower --lr$",
                     capfd.readouterr().out, re.M)  # one line, its reason


def kills_its_worker_when_alpha_is_high(config: dict) -> None:
    """Scores alpha for 4 epochs with a model checkpoint each; above alpha 0.3 its worker process
    dies (kill -9) after epoch 3, as a killed or out-of-memory worker does."""
    for epoch in range(1, 5):
        report_alpha_with_a_model(config, epoch)
        if epoch == 3 and config["alpha"] > 0.3:
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_trial_whose_worker_dies_past_its_retries_is_failed_everywhere_and_never_the_best(ray_cluster, tmp_path,
                                                                                          capsys):
    """Ray's saved state kept such a trial RUNNING: it was exported as the best, `status` called
    it interrupted.  Now results, status, export and the Optuna study all say it failed."""
    space = spaces.parse({"parameters": {"alpha": {"type": "float", "low": 0.1, "high": 0.5}},
                          "points_to_evaluate": [{"alpha": 0.45}, {"alpha": 0.2}],
                          "asha": {"max_epochs": 4, "grace_period": 4, "reduction_factor": 2}}, "killed")
    database = f"sqlite:///{tmp_path / 'study.db'}"
    settings = search.SearchSettings(experiment=str(tmp_path / "exp"), num_samples=2, max_concurrent=1,
                                     optuna_storage=database, max_failures=0)
    search.run_search(kills_its_worker_when_alpha_is_high, space, settings)
    killed, kept = read(settings.experiment).trials
    assert (killed.status, kept.status) == ("ERROR", "TERMINATED")
    assert killed.error == "The actor is dead because its worker process has died."
    best = export(settings.experiment, tmp_path / "out")
    assert best["trial"] == kept.trial_id and best["search"]["error"] == 1
    results = pd.read_parquet(tmp_path / "out" / "results.parquet").drop_duplicates("trial_id")
    assert results.set_index("trial_id").loc[killed.trial_id, ["status", "error"]].tolist() == ["ERROR", killed.error]
    assert load(settings.experiment).trials.set_index("trial_id").loc[killed.trial_id, "outcome"] == "failed"
    study = optuna.load_study(study_name="exp", storage=database)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]


def test_ctrl_c_stops_the_search_in_one_line_that_says_how_to_continue_and_export_works(ray_cluster, files, tmp_path):
    slower = tmp_path / "space.yaml"
    slower.write_text(yaml.safe_dump({**SPACE, "fixed": {**TINY, "batch_size": 8}}, sort_keys=False))
    args = ["tune", "--data", str(files["data"]), "--space", str(slower), "--out", str(tmp_path / "out"),
            "--num-samples", "6", "--max-concurrent", "2", "--max-epochs", "12"]
    driver = subprocess.Popen([*SIMDIFFREC, *args], start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "out" / "experiment", lambda trials: any(trials.values()))
        driver.send_signal(signal.SIGINT)  # as Ctrl-C does
        err = driver.communicate(timeout=120)[1]
    finally:
        _kill(driver)
    assert driver.returncode == 130
    assert "Traceback" not in err and "Tuner.restore" not in err
    ours = [line for line in err.splitlines() if line.startswith("simdiffrec")]
    assert ours == ["simdiffrec tune: interrupted; continue with: simdiffrec " + " ".join(args) + " --resume"]
    assert main(["export", str(tmp_path / "out" / "experiment"), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "best_checkpoint" / "model.pt").is_file()


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_stop_signal_once_every_trial_runs_ends_unfinished_and_resume_finishes(ray_cluster, files, tmp_path, signum,
                                                                               code, said):
    """Ray marks the trials it stops TERMINATED in what fit returns: a Ctrl-C once the last trial
    had started passed for a finished search (exit 0, exports), and SIGTERM ran sys.exit inside
    fit (a crash dump, no hint).  Both now end in one line with the --resume command, export
    nothing, and leave the trials interrupted; --resume finishes them."""
    slower = tmp_path / "space.yaml"  # no ASHA stop: both trials run their 20 epochs
    slower.write_text(yaml.safe_dump({**SPACE, "fixed": {**TINY, "batch_size": 8},
                                      "asha": {"max_epochs": 20, "grace_period": 20, "reduction_factor": 2}},
                                     sort_keys=False))
    out = tmp_path / "out"
    args = ["tune", "--data", str(files["data"]), "--space", str(slower), "--out", str(out), "--num-samples", "2",
            "--max-concurrent", "2"]
    driver = subprocess.Popen([*SIMDIFFREC, *args], start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "experiment", lambda trials: len(trials) == 2 and all(
            rows and not rows[-1]["done"] for rows in trials.values()))  # the last trial has reported
        driver.send_signal(signum)
        err = driver.communicate(timeout=120)[1]
    finally:
        _kill(driver)
    assert driver.returncode == code, err
    own = "\n".join(line for line in err.splitlines() if " pid=" not in line)  # not the workers' forwarded lines
    assert "Traceback" not in own and "Tuner.restore" not in own
    ours = [line for line in err.splitlines() if line.startswith("simdiffrec")]
    assert ours == [f"simdiffrec tune: {said}; continue with: simdiffrec " + " ".join(args) + " --resume"]
    assert not (out / "best_config.yaml").exists() and not (out / "results.parquet").exists()
    assert set(load(str(out)).trials["outcome"]) == {"interrupted"}

    assert main([*args, "--resume"]) == 0
    results = pd.read_parquet(out / "results.parquet")
    assert set(results["status"]) == {"TERMINATED"} and results.groupby("trial_id")["epoch"].max().tolist() == [20, 20]


def test_a_second_search_into_a_taken_experiment_records_nothing(ray_cluster, files, tmp_path, monkeypatch, capsys):
    """Two OUTs of one name under $SIMDIFFREC_STORAGE share one experiment: the second was refused
    only after writing its search.yaml, which --resume then followed into the first search."""
    monkeypatch.setenv("SIMDIFFREC_STORAGE", str(tmp_path / "storage"))
    first = tune_args(files, tmp_path / "a" / "x", "--num-samples", "1", "--max-epochs", "1")
    assert main(first) == 0
    capsys.readouterr()
    second = tmp_path / "b" / "x"
    assert main(tune_args(files, second, "--num-samples", "1", "--max-epochs", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"simdiffrec tune: error: {tmp_path / 'storage' / 'x'} already holds an experiment: "
                       "continue it with --resume, or choose another --out or --experiment")
    assert not (second / "search.yaml").exists()
    assert main(tune_args(files, second, "--resume")) == 2
    assert "no search to resume" in capsys.readouterr().err


def test_tune_all_runs_a_search_per_dataset_and_a_summary(ray_cluster, files, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMDIFFREC_STORAGE", str(tmp_path / "storage"))  # as cluster.yaml sets it
    spaces_dir = tmp_path / "spaces"
    spaces_dir.mkdir()
    for name in ("one", "two"):
        (spaces_dir / f"{name}.yaml").write_text(yaml.safe_dump({**SPACE, "points_to_evaluate": []}, sort_keys=False))
    datasets = f"one={files['data']},two={files['data']}"
    assert main(["tune-all", "--datasets", datasets, "--space-dir", str(spaces_dir), "--out", str(tmp_path / "all"),
                 "--num-samples", "2", "--max-epochs", "1"]) == 0
    summary = pd.read_parquet(tmp_path / "all" / "summary.parquet")
    assert list(summary["dataset"]) == ["one", "two"] and (summary["trials"] == 2).all()
    assert "| one |" in (tmp_path / "all" / "summary.md").read_text()
    for name in ("one", "two"):
        assert (tmp_path / "all" / name / "best_checkpoint" / "model.pt").is_file()
        assert (tmp_path / "storage" / name).is_dir()


def test_tune_all_picks_each_space_by_the_datasets_name_also_for_a_file(tmp_path):
    """`beauty=PATH` searched default.yaml: Beauty's own points and grace period went unused."""
    beauty, other, named = plan_all("beauty=data/Beauty.txt,mine=data/mine.txt,toys", tmp_path, None, None)
    assert space_for(beauty) == spaces.find("beauty") and space_for(named) == spaces.find("toys")
    assert space_for(other) == spaces.find("default")


def test_packing_benchmark_runs_on_cpu():
    run = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "packing.py"), "--tiny",
                          "--trials", "1,2", "--epochs", "2"], capture_output=True, text=True, check=True)
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| off | 1 |", "| off | 2 |"))]
    assert len(rows) == 2
    (_, _, per1, total1, ratio1, _, _), (_, _, per2, total2, ratio2, _, _) = (
        [cell.strip().replace(",", "").rstrip("x") for cell in row.strip("|").split("|")] for row in rows)
    assert float(total1) == float(per1) > 0 and float(ratio1) == 1  # one trial: itself the reference
    # two trials: the sum of their rates (each rounded)
    assert float(total2) == pytest.approx(2 * float(per2), rel=0.01, abs=2)
    assert float(ratio2) == pytest.approx(float(total2) / float(total1), abs=0.01)


def test_a_search_from_the_shell_prints_our_lines_alone(files, tmp_path):
    """A user's `tune` starts its own Ray, whose workers' log lines reach the console: Ray's
    "Checkpoint successfully created" after every epoch, colour codes in a log file, its notice
    that token authentication is on. None of them remains."""
    run = subprocess.run([sys.executable, "-m", "simdiffrec.cli", *tune_args(files, tmp_path / "out", "--num-samples",
                          "2", "--max-epochs", "2")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    ours = ("data ", "trial #", "best trial ", "still rising ", "exports in ")
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    evaluations = pd.read_parquet(tmp_path / "out" / "results.parquet").dropna(subset=["epoch"])
    assert sum(line.startswith("trial #") for line in lines) == len(evaluations) >= 3  # ASHA may stop one at 1
    assert [line for line in lines if not line.startswith(ours) and "A new study created" not in line] == []


def test_a_stop_inside_a_weakref_callback_prints_nothing_while_other_errors_still_do():
    """Ray ends a finished trial's actor with SIGTERM; its handler's SystemExit, landing in a weakref
    callback, was printed as "Exception ignored in ..." on the search's console."""
    code = ("import weakref\nfrom tuner.signals import quiet_stops_in_callbacks\n"
            "quiet_stops_in_callbacks(); quiet_stops_in_callbacks()\n"
            "class Item: pass\n"
            "def stop(_): raise SystemExit(1)\n"
            "def fail(_): raise ValueError('an error of its own')\n"
            "a, b = Item(), Item(); refs = weakref.ref(a, stop), weakref.ref(b, fail)\n"
            "del a, b\nprint('went on')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parents[1])
    assert run.returncode == 0 and run.stdout == "went on\n", run.stderr
    assert "SystemExit" not in run.stderr and run.stderr.count("ValueError: an error of its own") == 1


def test_results_list_each_epoch_of_a_restarted_trial_once():
    """A trial restarted from its epoch-1 checkpoint reports epoch 2 again: one row, the later."""
    rows = [{"epoch": e, METRIC: v, "config": {"alpha": 0.4}} for e, v in [(1, 0.1), (2, 0.2), (2, 0.25), (3, 0.3)]]
    trial = Trial(trial_id="t1", number=0, status="TERMINATED", config={"alpha": 0.4}, folder="t1", rows=rows)
    table = results_frame([trial])
    assert table["epoch"].tolist() == [1, 2, 3] and table[METRIC].tolist() == [0.1, 0.25, 0.3]
    assert table.columns[:5].tolist() == ["trial_id", "number", "status", "error", "alpha"]


def test_a_search_prints_one_plain_line_per_evaluation_and_says_where_its_outputs_are(ray_cluster, files, tmp_path,
                                                                                        capfd):
    out = tmp_path / "out"
    assert main(tune_args(files, out, "--num-samples", "2", "--max-epochs", "3")) == 0
    printed = capfd.readouterr().out
    evaluations = [line for line in printed.splitlines() if re.match(r"trial #\d+ \w+ epoch \d+: valid/NDCG@10 ", line)]
    results = pd.read_parquet(out / "results.parquet")
    assert len(evaluations) == len(results.dropna(subset=["epoch"]))  # one line per evaluation
    assert "\x1b[" not in printed and "╭" not in printed and "Current best trial" not in printed  # no Ray boxes
    assert sum("best trial" in line for line in printed.splitlines()) == 1
    experiment = str((out / "experiment").resolve())
    assert f"tensorboard --logdir {experiment}" in printed and f"simdiffrec report {experiment}" in printed
