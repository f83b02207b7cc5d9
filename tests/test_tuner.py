"""The search end to end on CPU: a small search with ASHA and its exports, packing four trials
onto one (logical) GPU, resuming a search whose driver was killed, the plumbing on a cheap known
objective, tune-all.  One Ray instance (4 CPUs, 1 logical GPU) serves the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import ray
import yaml
from ray import tune
from ray.tune import ExperimentAnalysis

from simdiffrec.cli import main
from tuner import search, spaces
from tuner.export import results_frame
from tuner.trainable import BEST, METRIC, fetch_data

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


def test_export_command_rewrites_the_exports_from_the_experiment(small_search, tmp_path):
    assert main(["export", str(small_search / "experiment"), "--out", str(tmp_path)]) == 0
    again, before = (yaml.safe_load((d / "best_config.yaml").read_text()) for d in (tmp_path, small_search))
    assert {k: v for k, v in again.items() if k != "search"} == {k: v for k, v in before.items() if k != "search"}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "results.parquet"),
                                  pd.read_parquet(small_search / "results.parquet"))
    assert (tmp_path / "best_checkpoint" / "model.pt").read_bytes() == \
        (small_search / "best_checkpoint" / "model.pt").read_bytes()


def test_resume_refuses_other_settings_and_a_fresh_start_refuses_a_used_folder(small_search, files, capsys):
    assert main(tune_args(files, small_search, "--resume", "--num-samples", "9")) == 2
    assert "num-samples 8" in capsys.readouterr().err
    assert main(tune_args(files, small_search)) == 2
    assert "--resume" in capsys.readouterr().err


def test_bad_data_or_space_fail_in_one_line_before_ray_starts(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tune", "--data", str(tmp_path / "missing.txt"), "--space", str(files["space"]),
                 "--out", str(out)]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SPACE, "parameters": {"alpah": {"type": "float", "low": 0.1, "high": 0.5}}}, sort_keys=False))
    assert main(["tune", "--data", str(files["data"]), "--space", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "alpah" in err
    assert not (out / "experiment").exists()


def test_a_search_whose_driver_is_killed_resumes_with_every_finished_trial(ray_cluster, files, tmp_path):
    slower = tmp_path / "space.yaml"  # small batches: epochs long enough to interrupt a trial
    slower.write_text(yaml.safe_dump({**SPACE, "fixed": {**TINY, "batch_size": 8}}, sort_keys=False))
    args = ["tune", "--data", str(files["data"]), "--space", str(slower), "--out", str(tmp_path / "out"),
            "--num-samples", "8", "--max-concurrent", "2", "--max-epochs", "12"]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}  # snapshot the experiment state often
    driver = subprocess.Popen([*SIMDIFFREC, *args], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        trials = _snapshot_when(tmp_path / "out" / "experiment", timeout=120, ready=lambda trials: (
            sum(t.status == "TERMINATED" for t in trials) >= 2 and any(_interrupted(t) for t in trials)))
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    finished = {t.trial_id: t.last_result["epoch"] for t in trials if t.status == "TERMINATED"}
    interrupted = [t.trial_id for t in trials if _interrupted(t)]

    assert main([*args, "--resume"]) == 0
    results = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert results["trial_id"].nunique() == 8 and set(results["status"]) == {"TERMINATED"}
    for trial_id, last_epoch in finished.items():
        assert results.loc[results["trial_id"] == trial_id, "epoch"].max() == last_epoch
    for trial_id in interrupted:  # continued from its checkpoint, not from epoch 1
        assert (results.loc[results["trial_id"] == trial_id, "epoch"] == 1).sum() == 1
    assert not results.duplicated(["trial_id", "epoch"]).any()  # re-run epochs listed once


def _interrupted(trial) -> bool:
    """Running with a checkpoint (the saved state lists running trials as PENDING)."""
    return trial.status in ("RUNNING", "PENDING") and trial.checkpoint is not None


def _snapshot_when(experiment: Path, ready, timeout: float) -> list:
    """The trials of the experiment's saved state, once `ready(trials)` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            trials = ExperimentAnalysis(str(experiment)).trials
        except (ValueError, OSError, json.JSONDecodeError):  # not written yet, or being written
            continue
        if ready(trials):
            return trials
    raise AssertionError(f"{experiment} never reached the state to interrupt in {timeout} s")


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
    grid = search.run(quadratic, space, settings)
    best = grid.get_best_result(BEST, "max").config
    assert abs(best["alpha"] - 0.3) < 0.08 and 0.3e-3 < best["lr"] < 3e-3
    study = optuna.load_study(study_name=settings.experiment, storage=database)
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 40
    assert study.best_params == best
    with pytest.raises(ValueError, match="already holds a study"):  # a second search must not mix into it
        search.make_searcher(space, settings)


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


def test_packing_benchmark_runs_on_cpu():
    run = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "packing.py"), "--tiny",
                          "--trials", "1,2", "--epochs", "2"], capture_output=True, text=True, check=True)
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| off | 1 |", "| off | 2 |"))]
    assert len(rows) == 2 and "| 1.00x |" in rows[0]


def test_results_list_each_epoch_of_a_restarted_trial_once():
    """A trial restarted from its epoch-1 checkpoint reports epoch 2 again: one row, the later."""
    trial = SimpleNamespace(trial_id="t1", experiment_tag="0_alpha=0.4", status="TERMINATED", config={"alpha": 0.4})
    reported = pd.DataFrame({"epoch": [1, 2, 2, 3], METRIC: [0.1, 0.2, 0.25, 0.3], "config/alpha": 0.4})
    table = results_frame(SimpleNamespace(trials=[trial]), {"t1": SimpleNamespace(metrics_dataframe=reported)})
    assert table["epoch"].tolist() == [1, 2, 3] and table[METRIC].tolist() == [0.1, 0.25, 0.3]
    assert table.columns[:4].tolist() == ["trial_id", "number", "status", "alpha"]
