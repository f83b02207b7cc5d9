"""finalize and reproduce end to end on CPU: a tiny search retrained with two seeds into final.md,
final.parquet and a final model that `simdiffrec evaluate` opens; the paper's grid on a tiny
file named beauty; resume.  One Ray instance (4 CPUs) serves the module."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml

from simdiffrec.cli import main
from simdiffrec.config import SIMDIFFREC_ONLY, Config
from simdiffrec.files import locked
from simdiffrec.model_folder import load_model
from tuner import grid, search, verdict
from tuner.experiment import read
from tuner.protocol import CHECKPOINT_FILE
from tuner.retrain import FINAL_PATIENCE, REPRODUCE, SASREC, RetrainRequest, _settings, baselines, chosen_trials
from tuner.trainable import finished_row

from .conftest import synthetic_sequences
from .test_tuner import SPACE, TINY

SIMDIFFREC = [sys.executable, "-m", "simdiffrec.cli"]


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # never a `ray start` one
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "seq.txt"
    sequences = synthetic_sequences(n_users=150, n_items=40, length=12, seed=1)
    path.write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in enumerate(sequences, 1)))
    return path


@pytest.fixture(scope="module")
def tiny_search(ray_cluster, data_file, tmp_path_factory) -> Path:
    """A finished search of three trials, two epochs each."""
    out = tmp_path_factory.mktemp("search")
    space = tmp_path_factory.mktemp("space") / "space.yaml"
    asha = {"max_epochs": 2, "grace_period": 2, "reduction_factor": 2}
    space.write_text(yaml.safe_dump({**SPACE, "asha": asha}, sort_keys=False))
    assert main(["tune", "--data", str(data_file), "--space", str(space), "--out", str(out),
                 "--num-samples", "3", "--gpu", "never"]) == 0
    return out


@pytest.fixture(scope="module")
def final(tiny_search) -> Path:
    assert main(["finalize", str(tiny_search / "experiment"), "--seeds", "2", "--top", "2",
                 "--max-epochs", "2", "--gpu", "never"]) == 0
    return tiny_search / "final"  # the default --out


def test_finalize_writes_one_row_per_configuration_and_per_run(final, tiny_search):
    table = pd.read_parquet(final / "final.parquet")
    assert table["configuration"].tolist() == ["top-1", "top-2", "start-1",  # the space's point, not in the top 2
                                               "baseline", "sasrec-defaults", "baseline-top-2"]  # lr differs
    assert table["is_baseline"].tolist() == [False, False, False, True, True, True] and (table["seeds"] == 2).all()
    assert table["baseline"].tolist() == ["baseline", "baseline-top-2", "sasrec-defaults", "", "", ""]
    assert table["start"].tolist() == [False, False, True, False, True, False]
    winner = table.loc[table["valid/NDCG@10_mean"].idxmax(), "configuration"]
    assert (final / "final.md").read_text().startswith(f"**Winner: {winner}**")
    for split in ("valid", "test"):
        for m in verdict.METRICS:
            assert {f"{split}/{m}_mean", f"{split}/{m}_std"} <= set(table.columns)
    assert table.loc[3, "test/NDCG@10_diff"] == 0 and pd.isna(table.loc[3, "test/NDCG@10_p"])
    assert set(table["device"]) == {"cpu"} and (table["minutes_total"] > 0).all()
    assert (table["epochs_mean"] == 2).all()

    results = pd.read_parquet(tiny_search / "results.parquet")
    best = results.groupby("trial_id")["valid/NDCG@10"].max().sort_values(ascending=False)
    top1 = results[results["trial_id"] == best.index[0]].iloc[0]
    assert table.loc[0, "param/alpha"] == top1["alpha"] and table.loc[0, "param/lr"] == top1["lr"]
    assert table.loc[3, "param/alpha"] == 0.0  # the baseline: SASRec with the best's other settings
    assert table.loc[5, "param/lr"] == table.loc[1, "param/lr"]
    assert table.loc[4, "param/lr"] == Config.lr and table.loc[2, "param/alpha"] == SPACE["points_to_evaluate"][0]["alpha"]
    planned = {name: run["config"] for name, run in
               yaml.safe_load((final / "grid.yaml").read_text())["plan"]["runs"].items()}
    assert planned["baseline"] == {**planned["top-1"], **SASREC}
    assert planned["baseline-top-2"] == {**planned["top-2"], **SASREC,
                                         **{k: planned["top-1"][k] for k in SIMDIFFREC_ONLY}}
    assert planned["sasrec-defaults"] == {**planned["start-1"], **SASREC,  # the point's lr is the default
                                          **{k: planned["top-1"][k] for k in SIMDIFFREC_ONLY}}

    runs = pd.read_parquet(final / "final_runs.parquet")
    assert list(runs.columns) == verdict.RUN_COLUMNS and len(runs) == 12
    top = runs[runs["configuration"] == "top-1"]
    assert table.loc[0, "test/HR@10_mean"] == pytest.approx(top["test/HR@10"].mean())
    base = runs[runs["configuration"] == "baseline"].set_index("seed")["test/HR@10"]
    assert table.loc[0, "test/HR@10_diff"] == pytest.approx((top.set_index("seed")["test/HR@10"] - base).mean())
    top2, base2 = (runs[runs["configuration"] == c].set_index("seed")["test/HR@10"] for c in ("top-2", "baseline-top-2"))
    assert table.loc[1, "test/HR@10_diff"] == pytest.approx((top2 - base2).mean())
    assert "paired t-test" in (final / "final.md").read_text()


def test_status_reads_a_finalize_folder_as_its_grid_of_runs(final, capsys):
    assert main(["status", str(final)]) == 0
    text = capsys.readouterr().out
    assert "trials: 12 of 12 | 12 finished, 0 early-stopped, 0 ASHA-stopped, 0 running, 0 pending, 0 failed" in text
    runs = pd.read_parquet(final / "final_runs.parquet")
    best = runs.loc[runs["valid/NDCG@10"].idxmax()]
    assert f"{best['valid/NDCG@10']:.4f} at epoch" in text
    assert f"run={best['configuration']} seed={best['seed']}" in text
    assert main(["report", str(final), "--out", str(final.parent / "report")]) == 2  # a page of searches only
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a search" in err and f"simdiffrec status {final}" in err


def test_the_final_model_is_the_median_seed_and_evaluate_reproduces_it(final, data_file):
    table = pd.read_parquet(final / "final.parquet")
    runs = pd.read_parquet(final / "final_runs.parquet")
    chosen = verdict.median_seed(runs, table.loc[table["valid/NDCG@10_mean"].idxmax(), "configuration"])
    run = subprocess.run([*SIMDIFFREC, "evaluate", str(final / "final_checkpoint"), "--data", str(data_file)],
                         capture_output=True, text=True, check=True)
    metrics = json.loads(run.stdout)
    assert metrics["valid"]["NDCG@10"] == pytest.approx(chosen["valid/NDCG@10"], abs=1e-6)
    assert metrics["test"]["HR@10"] == pytest.approx(chosen["test/HR@10"], abs=1e-6)
    unmasked = subprocess.run([*SIMDIFFREC, "evaluate", str(final / "final_checkpoint"), "--data", str(data_file),
                               "--split", "test", "--no-mask-history"], capture_output=True, text=True, check=True)
    saved = json.loads((final / "final_checkpoint" / "metrics.json").read_text())
    assert json.loads(unmasked.stdout)["test"]["HR@10"] == pytest.approx(saved["test_unmasked"]["HR@10"], abs=1e-6)


def test_finalize_resumes_its_finished_runs_and_refuses_other_flags(final, tiny_search, capsys):
    before = pd.read_parquet(final / "final_runs.parquet")
    grid_experiment = yaml.safe_load((final / "grid.yaml").read_text())["experiment"]
    reported = {t.trial_id: len(t.rows) for t in read(grid_experiment).trials}
    experiment = str(tiny_search / "experiment")
    assert main(["finalize", experiment, "--seeds", "2", "--top", "2", "--max-epochs", "2", "--resume"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(final / "final_runs.parquet"), before)
    assert {t.trial_id: len(t.rows) for t in read(grid_experiment).trials} == reported  # nothing retrained
    assert main(["finalize", experiment, "--seeds", "3", "--top", "2", "--max-epochs", "2", "--resume"]) == 2
    assert "seeds" in capsys.readouterr().err
    assert main(["finalize", experiment, "--seeds", "2", "--top", "2", "--max-epochs", "2"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_a_restored_grid_trial_reports_again_only_from_a_final_checkpoint(final, tmp_path):
    """A finished run's last checkpoint holds its last row (an evaluation's, with the test metrics)
    and no train state: restored, the trial reports that row again; one with train state trains on."""
    for trial in read(str(final / "experiment")).trials:
        reported = finished_row(Path(trial.folder) / trial.latest)
        assert grid.DONE in reported and "epoch" in reported
        assert all(trial.rows[-1][k] == v for k, v in reported.items())
    training = tmp_path / "training"
    training.mkdir()
    (training / CHECKPOINT_FILE).write_bytes(b"")
    assert finished_row(training) is None


def test_finalize_also_retrains_trials_named_by_number(tiny_search, tmp_path, capsys):
    experiment = str(tiny_search / "experiment")
    results = pd.read_parquet(tiny_search / "results.parquet")
    best = results.groupby("trial_id")["valid/NDCG@10"].max().sort_values(ascending=False)
    number = {t.trial_id: t.number for t in read(experiment).trials}
    last = number[best.index[-1]]
    out = tmp_path / "final"
    assert main(["finalize", experiment, "--seeds", "1", "--top", "1", "--trials", f"{last},{number[best.index[0]]}",
                 "--max-epochs", "1", "--gpu", "never", "--out", str(out)]) == 0
    table = pd.read_parquet(out / "final.parquet")
    assert last == 1  # the space's point, tried first, scored lowest: it is not retrained twice as start-1
    assert table["configuration"].tolist() == ["top-1", "trial-1",  # top-1 not twice
                                               "baseline", "sasrec-defaults"]  # trial 1's lr is the default
    assert table["start"].tolist() == [False, True, False, True]
    assert table.loc[1, "param/alpha"] == results[results["trial_id"] == best.index[-1]]["alpha"].iloc[0]
    assert f"trial #{last} (trial-{last})" in (out / "final.md").read_text()
    assert main(["finalize", experiment, "--trials", "99", "--out", str(tmp_path / "other")]) == 2
    assert f"--trials 99: {experiment} has no trial #99" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_finalize_refuses_a_search_that_is_still_running(tiny_search, capsys):
    """finalize took the top K of a half-finished leaderboard and started a second Ray."""
    with locked(tiny_search):  # as the running search holds it
        assert main(["finalize", str(tiny_search / "experiment"), "--out", str(tiny_search / "early"),
                     "--seeds", "1", "--gpu", "never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"simdiffrec finalize: error: {tiny_search}: the search is still running (it holds "
                   f"{tiny_search / '.lock'}): finalize it once it has ended (simdiffrec status {tiny_search} follows it)"]
    assert not (tiny_search / "early").exists()


def test_configurations_share_a_baseline_unless_sasrec_would_train_them_differently():
    top1 = Config(alpha=0.3, tau=0.5, k_noise=5, lr=1e-3).to_dict()
    configs = {"top-1": top1,
               "top-2": {**top1, "alpha": 0.1, "beta": 0.2, "tau": 0.05, "k_sample": 3},  # SimDiffRec's own only
               "trial-7": {**top1, "lr": 3e-3, "k_noise": 50}}
    settings, compared, _ = baselines(configs)
    assert compared == {"top-1": "baseline", "top-2": "baseline", "trial-7": "baseline-trial-7"}
    assert settings == {"baseline": {**top1, **SASREC},
                        "baseline-trial-7": {**top1, **SASREC, "lr": 3e-3}}  # k_noise: top-1's, unread
    # SASRec at the defaults: a run of its own, shared by configurations at the defaults ...
    defaults = Config().to_dict()
    settings, compared, named = baselines({"top-1": {**top1, "lr": 3e-3}, "start-1": {**top1, "alpha": 0.1}}, defaults)
    assert compared == {"top-1": "baseline", "start-1": "sasrec-defaults"} and named == "sasrec-defaults"
    assert settings["sasrec-defaults"] == {**defaults, **SASREC, **{k: top1[k] for k in SIMDIFFREC_ONLY}}
    # ... or a configuration that is SASRec-CE at the defaults (a sasrec-family trial), which needs no baseline
    settings, compared, named = baselines({"top-1": {**top1, "lr": 3e-3}, "start-2": {**defaults, **SASREC}}, defaults)
    assert list(settings) == ["baseline"] and compared == {"top-1": "baseline"} and named == "start-2"
    # ... unless top-1's baseline is it (top-1's lr is the default)
    assert list(baselines(configs, defaults)[0]) == ["baseline", "baseline-trial-7"]
    assert baselines(configs, defaults)[2] == "baseline"


@pytest.mark.parametrize("flags, message", [(["--max-epochs", "0"], "--max-epochs 0: must be at least 1"),
                                            (["--patience", "0"], "--patience 0: must be at least 1"),
                                            (["--seeds", "0"], "--seeds 0: must be at least 1")])
def test_finalize_refuses_a_count_below_one(tiny_search, tmp_path, capsys, flags, message):
    out = tmp_path / "final"
    assert main(["finalize", str(tiny_search / "experiment"), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_finalize_takes_the_searchs_folder_as_status_and_report_do(tiny_search, capsys):
    """Given OUT, finalize looked for search.yaml in OUT's parent and named that file missing."""
    assert main(["finalize", str(tiny_search), "--seeds", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["simdiffrec finalize: error: --seeds 0: must be at least 1"]


def test_a_top_beyond_the_searchs_trials_is_said(tiny_search):
    """--top 9 of a search with 3 trials retrained 3 without a word."""
    with pytest.warns(UserWarning, match=r"--top 9: .* has 3 trials without errors that reported .*; retraining those 3"):
        chosen = chosen_trials(str(tiny_search / "experiment"), 9)
    assert list(chosen) == ["top-1", "top-2", "top-3"]


def test_a_searched_max_len_trains_each_configuration_at_its_own(ray_cluster, data_file, tmp_path):
    """The data is prepared once, at the longest max_len searched (10, the sequences reach 12);
    each trial and each run finalize retrains cuts its own from it and keeps it in its model,
    and `evaluate` (which prepares the data at the model's max_len) scores what the run scored."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "parameters": {"max_len": {"type": "categorical", "choices": [4, 10]}},
        "fixed": {k: v for k, v in TINY.items() if k != "max_len"}, "points_to_evaluate": [{"max_len": 4}, {"max_len": 10}],
        "asha": {"max_epochs": 2, "grace_period": 2, "reduction_factor": 2}}))
    search = tmp_path / "search"
    assert main(["tune", "--data", str(data_file), "--space", str(space), "--out", str(search), "--num-samples", "2",
                 "--gpu", "never"]) == 0
    best = yaml.safe_load((search / "best_config.yaml").read_text())["parameters"]["max_len"]
    assert load_model(search / "best_checkpoint").model.encoder.positions.num_embeddings == best
    assert main(["finalize", str(search / "experiment"), "--seeds", "1", "--top", "2", "--max-epochs", "2",
                 "--gpu", "never"]) == 0
    final = search / "final"
    table = pd.read_parquet(final / "final.parquet").set_index("configuration")
    assert sorted(table.loc[["top-1", "top-2"], "param/max_len"]) == [4, 10]
    # SASRec-CE at the defaults trains at the data's max_len, 10: it is the max_len-10 run's baseline, trained once
    assert len(table) == 4
    ten = table.index[(table["param/max_len"] == 10) & ~table["is_baseline"]][0]
    assert table.loc[table.loc[ten, "baseline"], "start"]  # the defaults are a starting point
    runs = pd.read_parquet(final / "final_runs.parquet").set_index("configuration")
    winner = table["valid/NDCG@10_mean"].idxmax()
    assert load_model(final / "final_checkpoint").model.encoder.positions.num_embeddings == table.loc[winner, "param/max_len"]
    run = subprocess.run([*SIMDIFFREC, "evaluate", str(final / "final_checkpoint"), "--data", str(data_file)],
                         capture_output=True, text=True, check=True)
    assert json.loads(run.stdout)["valid"]["NDCG@10"] == pytest.approx(runs.loc[winner, "valid/NDCG@10"], abs=1e-6)


def test_reproduce_trains_the_papers_grid_beside_its_numbers(ray_cluster, data_file, tmp_path):
    out = tmp_path / "reproduce"
    assert main(["reproduce", "--datasets", f"beauty={data_file}", "--seeds", "1", "--max-epochs", "1",
                 "--gpu", "never", "--out", str(out)]) == 0
    table = pd.read_parquet(out / "table.parquet")
    assert table["configuration"].tolist() == list(REPRODUCE) and (table["seeds"] == 1).all()
    simdiffrec = table.set_index("configuration").loc["simdiffrec"]
    assert simdiffrec["paper/HR@10"] == 0.0932
    assert simdiffrec["gap/HR@10"] == pytest.approx(simdiffrec["test_unmasked/HR@10_mean"] - 0.0932)
    runs = pd.read_parquet(out / "runs.parquet")
    assert (runs["test_unmasked/HR@10"] <= runs["test/HR@10"] + 1e-12).all()  # masking only removes competitors
    record = yaml.safe_load((out / "grid.yaml").read_text())["plan"]
    assert record["runs"]["beauty.simdiffrec"]["config"]["alpha"] == 0.4  # Section 5.4's Beauty setting
    assert record["runs"]["beauty.no-k_sample"]["config"]["hard_negative"] is False
    assert "| simdiffrec | HR@10 | 1 |" in (out / "table.md").read_text()


RUN_GRID = """
import sys, yaml
from pathlib import Path
from tuner import grid, search
plan = grid.Plan(**yaml.safe_load(Path(sys.argv[1]).read_text()))
out = Path(sys.argv[2])
grid.train_plan(plan, out, search.SearchSettings(experiment=str(out / "experiment"), max_concurrent=2, gpu="never"))
"""


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_stopped_grid_ends_in_one_line_and_tables_nothing(data_file, tmp_path, signum, code, said):
    """A grid stopped by Ctrl-C wrote its tables from the runs that had finished and exited 0;
    SIGTERM exited mid-fit with a crash dump."""
    out = tmp_path / "out"
    args = ["reproduce", "--datasets", f"beauty={data_file}", "--seeds", "1", "--max-epochs", "50", "--gpu", "never",
            "--max-concurrent", "2", "--out", str(out)]
    driver = subprocess.Popen([*SIMDIFFREC, *args], start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(_reported(out / "experiment").values()):  # a run has reported an evaluation
            assert time.monotonic() < deadline, "no run ever reported"
            time.sleep(0.1)
        driver.send_signal(signum)
        err = driver.communicate(timeout=120)[1]
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the local Ray it started, if still there
        except ProcessLookupError:
            pass
        driver.wait()
    assert driver.returncode == code, err
    ours = [line for line in err.splitlines() if line.startswith("simdiffrec")]
    assert ours == [f"simdiffrec reproduce: {said}; continue with: simdiffrec " + " ".join(args) + " --resume"]
    assert not (out / "table.md").exists() and not (out / "runs.parquet").exists()


def _reported(experiment: Path) -> dict[str, list[dict]]:
    """Each trial's complete result.json lines (what it reported so far), by trial id."""
    try:
        return {t.trial_id: t.rows for t in read(str(experiment)).trials}
    except (ValueError, OSError):  # no saved state yet
        return {}


def test_an_interrupted_grid_continues_each_run_from_its_checkpoint(ray_cluster, data_file, tmp_path):
    slow = {**TINY, "batch_size": 8, "epochs": 12, "patience": 100}  # epochs long enough to interrupt a run
    plan = grid.Plan(datasets={"d": {"source": str(data_file), "columns": {}, "max_len": 10, "kcore": 0}},
                     runs={"a": {"dataset": "d", "config": slow},
                           "b": {"dataset": "d", "config": {**slow, "alpha": 0.1}}},
                     seeds=[0, 1])
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(dataclasses.asdict(plan)))
    out = tmp_path / "out"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}  # snapshot the experiment state often
    driver = subprocess.Popen([sys.executable, "-c", RUN_GRID, str(tmp_path / "plan.yaml"), str(out)], env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:  # until one run is done and another has reported (so checkpointed) but is not
            trials = _reported(out / "experiment")
            last = [grid.DONE in rows[-1] for rows in trials.values() if rows]  # a finished run's last report
            if True in last and False in last:
                break
            assert time.monotonic() < deadline, "the grid never reached the state to interrupt"
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    interrupted = [trial_id for trial_id, rows in trials.items() if rows and grid.DONE not in rows[-1]]

    runs = grid.train_plan(plan, out, search.SearchSettings(experiment=str(out / "experiment"), gpu="never"), resume=True)
    assert sorted(zip(runs["run"], runs["seed"])) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert (runs["epochs"] == 12).all()
    rows = {t.trial_id: t.rows for t in read(str(out / "experiment")).trials}
    for trial_id in interrupted:  # continued from its checkpoint, not from epoch 1 (every report, as written)
        assert sum(row.get("epoch") == 1 for row in rows[trial_id]) == 1


def test_finalize_lets_runs_converge_with_patience_20_unless_told_otherwise():
    searched = {**Config().to_dict(), "patience": 10}
    assert _settings(searched, RetrainRequest(settings={}), FINAL_PATIENCE)["patience"] == 20
    assert _settings({**searched, "patience": 30}, RetrainRequest(settings={}), FINAL_PATIENCE)["patience"] == 30
    assert _settings(searched, RetrainRequest(settings={}, patience=5), FINAL_PATIENCE)["patience"] == 5
    assert _settings(searched, RetrainRequest(settings={}))["patience"] == 10  # reproduce: as given
