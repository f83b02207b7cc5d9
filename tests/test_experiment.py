"""Reading a search's experiment and writing its exports, on experiment folders laid out as Ray
writes them (no Ray started): failed trials and non-finite metrics are never the best, what an
interrupted trial had not finished writing is skipped, no pickle is read, an export killed at any
step leaves all exports old or all new, and a folder in use by another search is refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from simdiffrec.cli import main
from simdiffrec.files import locked
from tuner.experiment import EXPORTS, STAGES, export
from tuner.protocol import METRIC, MODEL_DIR

DIVERGED = ("Failure # 1 (occurred at 2026-11-29_01-00-00)\nray::ImplicitFunc.train() (pid=1, ip=10.0.0.1)\n"
            "  File \"simdiffrec/train.py\", line 9, in train\n    raise Diverged(...)\n"
            "simdiffrec.train.Diverged: loss became nan at epoch 2: lower --lr\n")


def trial(number: int, status: str = "TERMINATED", scores=(0.1, 0.2), error: str | None = None) -> dict:
    """A trial as the test writes it: its status, one checkpointed score per epoch."""
    return {"id": f"t{number}", "number": number, "status": status, "scores": scores, "error": error}


def write_experiment(folder: Path, trials: list[dict], source: str = "data") -> Path:
    """An experiment folder in Ray's layout: the state file, and per trial result.json lines and
    checkpoint_NNNNNN/model/ folders."""
    folder.mkdir(parents=True)
    data = []
    for t in trials:
        logdir = f"run_trial_{t['id']}_{t['number']}_alpha={t['number'] / 10}"
        config = {"alpha": t["number"] / 10}
        data.append([json.dumps({"trial_id": t["id"], "experiment_tag": f"{t['number']}_alpha={config['alpha']}",
                                 "status": t["status"], "config": config, "relative_logdir": logdir}), "{}"])
        trial_dir = folder / logdir
        trial_dir.mkdir()
        lines = []
        for i, score in enumerate(t["scores"]):
            name = f"checkpoint_{i:06d}"
            model = trial_dir / name / MODEL_DIR
            model.mkdir(parents=True)
            (model / "metrics.json").write_text(json.dumps({"epoch": i + 1, "data": {"source": source}}))
            (model / "config.yaml").write_text(yaml.safe_dump(config))
            (model / "model.pt").write_bytes(b"weights")
            lines.append(json.dumps({"epoch": i + 1, METRIC: score, "checkpoint_dir_name": name,
                                     "trial_id": t["id"], "config": config}))
        (trial_dir / "result.json").write_text("".join(line + "\n" for line in lines))
        if t["error"]:
            (trial_dir / "error.txt").write_text(t["error"])
    (folder / "experiment_state-2026-11-29_01-00-00.json").write_text(json.dumps({"trial_data": data}))
    return folder


def test_a_failed_trial_or_a_non_finite_metric_is_never_the_best_and_a_failure_says_why(tmp_path):
    experiment = write_experiment(tmp_path / "exp", [
        trial(1, scores=(0.1, 0.3)),
        trial(2, status="ERROR", scores=(0.9,), error=DIVERGED),  # best score, but it failed
        trial(3, scores=(float("nan"), float("inf"))),
        trial(4, status="RUNNING", scores=(0.2,)),  # interrupted: its checkpoints count
    ])
    best = export(str(experiment), tmp_path / "out")
    assert (best["trial"], best["epoch"], best["metrics"][METRIC]) == ("t1", 2, 0.3)
    assert best["search"]["error"] == 1 and best["search"]["terminated"] == 2
    results = pd.read_parquet(tmp_path / "out" / "results.parquet").drop_duplicates("trial_id").set_index("trial_id")
    assert results.loc["t2", "status"] == "ERROR"
    assert results.loc["t2", "error"] == "Diverged: loss became nan at epoch 2: lower --lr"
    assert results["error"].isna().sum() == 3


def test_export_skips_what_an_interrupted_trial_had_not_finished_writing(tmp_path):
    experiment = write_experiment(tmp_path / "exp", [trial(1, scores=(0.1, 0.2)), trial(2, status="PENDING", scores=(0.3,))])
    t1, t2 = sorted(p for p in experiment.iterdir() if p.is_dir())
    with open(t1 / "result.json", "a") as f:  # epoch 3 reported a better checkpoint, its line cut off
        f.write(json.dumps({"epoch": 3, METRIC: 0.9, "checkpoint_dir_name": "checkpoint_000002"})[:30])
    shutil.copytree(t1 / "checkpoint_000001", t1 / "checkpoint_000002")
    (t2 / "result.json").write_text("")  # a checkpoint written, its result not yet
    best = export(str(experiment), tmp_path / "out")
    assert (best["trial"], best["epoch"]) == ("t1", 2)
    results = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert results.loc[results["trial_id"] == "t1", "epoch"].tolist() == [1, 2]
    assert results.loc[results["trial_id"] == "t2", "epoch"].isna().all()
    state = next(experiment.glob("experiment_state-*.json"))
    state.write_text(state.read_text()[:100])  # Ray rewrites its state in place
    with pytest.raises(ValueError, match="cut off"):
        export(str(experiment), tmp_path / "out")


class Payload:
    """Unpickling this touches a file: the test's stand-in for code an attacker would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_export_runs_no_code_from_a_crafted_experiment(tmp_path):
    experiment = write_experiment(tmp_path / "exp", [trial(1), trial(2, status="ERROR", error=DIVERGED)])
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    for name in ("tuner.pkl", "searcher-state-2026-11-29_01-00-00.pkl"):
        (experiment / name).write_bytes(payload)
    state_file = next(experiment.glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    for entry in state["trial_data"]:
        saved = json.loads(entry[0])
        saved["storage"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": payload.hex()}
        entry[0] = json.dumps(saved)
        (experiment / saved["relative_logdir"] / "error.pkl").write_bytes(payload)
        (experiment / saved["relative_logdir"] / "params.pkl").write_bytes(payload)
    state_file.write_text(json.dumps(state))
    export(str(experiment), tmp_path / "out")
    assert not marker.exists()


class Killed(Exception):
    pass


def which(out: Path) -> set[str]:
    """Which experiment each of the three exports comes from (one element: consistent)."""
    config = yaml.safe_load((out / "best_config.yaml").read_text())
    model = json.loads((out / "best_checkpoint" / "metrics.json").read_text())["data"]["source"]
    results = pd.read_parquet(out / "results.parquet")
    return {config["dataset"]["source"], model, "old" if "t1" in set(results["trial_id"]) else "new"}


def test_an_export_killed_at_any_step_leaves_all_old_or_all_new_and_the_next_cleans_up(tmp_path, monkeypatch):
    old = write_experiment(tmp_path / "old", [trial(1)], source="old")
    new = write_experiment(tmp_path / "new", [trial(5), trial(6, scores=(0.5,))], source="new")
    out = tmp_path / "out"
    export(str(old), out)
    primitives = {(os, "replace"), (os, "symlink"), (os, "unlink"), (os, "rename"), (shutil, "rmtree")}
    real = {(m, name): getattr(m, name) for m, name in primitives}
    seen = set()
    for step in range(1, 100):
        calls = [0]

        def dying(m, name):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] == step:
                    raise Killed(f"killed before {name} {args}")
                return real[m, name](*args, **kwargs)
            return call

        for m, name in primitives:
            monkeypatch.setattr(m, name, dying(m, name))
        try:
            export(str(new), out)
            finished = True
        except Killed:
            finished = False
        finally:
            for m, name in primitives:
                monkeypatch.setattr(m, name, real[m, name])
        state = which(out)
        assert len(state) == 1, f"killed at step {step}: exports mixed {state}"
        seen |= state
        export(str(old), out)  # the next export cleans up whatever the killed one left
        assert sorted(p.name for p in (out / STAGES).iterdir()) == sorted(["current", os.readlink(out / STAGES / "current")])
        assert sorted(p.name for p in out.iterdir()) == sorted([STAGES, *EXPORTS])
        if finished:
            break
    assert seen == {"old", "new"} and step > 3


def test_an_export_replaces_an_export_of_the_earlier_layout(tmp_path):
    out = tmp_path / "out"
    (out / "best_checkpoint").mkdir(parents=True)
    (out / "best_config.yaml").write_text("trial: old\n")
    export(str(write_experiment(tmp_path / "exp", [trial(5)], source="new")), out)
    assert which(out) == {"new"}


def test_a_folder_in_use_by_another_search_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "search.yaml").write_text("settings: {seed: 1}\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with locked(out):  # as the running search's driver holds it
        assert main(["tune", "--data", "beauty", "--out", str(out), "--seed", "0"]) == 2
        tune_err = capsys.readouterr().err
        assert main(["export", str(tmp_path / "exp"), "--out", str(out)]) == 2
        export_err = capsys.readouterr().err
    for err in (tune_err, export_err):
        assert len(err.strip().splitlines()) == 1 and f"{out} is in use by another simdiffrec process" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {**before, ".lock": (out / ".lock").read_bytes()}
    assert (out / "search.yaml").read_text() == "settings: {seed: 1}\n"
