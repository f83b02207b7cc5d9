"""A grid of (run, seed) trainings as one Ray Tune run: the machinery of `finalize` and `reproduce`.

A `Plan` names its datasets and its runs (a dataset and every setting) and the seeds; each
(run, seed) is one trial, `simdiffrec.train.train(cfg, data, test=True)` to its end (early
stopping on valid NDCG@10, at most `cfg.epochs`), with a GPU share or CPUs as a search's trials
get them (`search.trial_resources`).  After each validation pass but the last a trial reports
with a checkpoint of train's resumable state, so a failed trial, or the whole grid after an
interruption (`resume`), continues from there.  Its last report holds the final metrics (valid
and test of the best model; test also without history masking, RecBole's protocol) and that
model as a model folder (`MODEL_DIR`), the final metrics last among its rows (`REPORTED`): a
trial restarted after it had finished reports them again instead of training on.

The grid's folder OUT keeps `grid.yaml` (the plan and where the experiment is): `resume`
continues only the same plan.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from ray import tune

from simdiffrec.config import Config, read_yaml, write_yaml
from simdiffrec.data import load_and_describe
from simdiffrec.device import resolve_device
from simdiffrec.evaluate import evaluate, scorer
from simdiffrec.files import remove, switch_folder
from simdiffrec.model_folder import save_model
from simdiffrec.train import Evaluation, train

from . import search
from .experiment import copy_model, read, results_frame
from .jobs import init_ray, prefer_loopback
from .protocol import CHECKPOINT_FILE, GRID_RECORD, MODEL_DIR
from .trainable import fetch_data, report_checkpoint, reported_rows, trial_metrics

DONE = "test/NDCG@10"  # present in a trial's last report only when it finished
UNMASKED = "test_unmasked"  # prefix of the test metrics without history masking


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a grid trains: every run on every seed."""

    datasets: dict[str, dict[str, Any]]  # name -> load_data's arguments: source, max_len, kcore, columns
    runs: dict[str, dict[str, Any]]  # name -> {"dataset": a name above, "config": every setting but the seed}
    seeds: list[int]

    def config(self, run: str, seed: int) -> Config:
        return Config.from_dict({**self.runs[run]["config"], "seed": seed}, source=f"run {run}")


@dataclasses.dataclass(frozen=True)
class GridSetup:
    """What every trial shares, handed to workers through the object store."""

    plan: Plan
    data: dict[str, ray.ObjectRef]  # dataset name -> its prepared SequenceData
    data_info: dict[str, dict[str, Any]]  # dataset name -> its source and statistics


def run_seed(params: dict[str, Any], setup: GridSetup) -> None:
    """One trial: train one run with one seed to its end, then report the final metrics."""
    cfg = setup.plan.config(params["run"], params["seed"]).replace(device="auto")
    dataset = setup.plan.runs[params["run"]]["dataset"]
    data = fetch_data(setup.data[dataset])
    with tempfile.TemporaryDirectory(prefix="simdiffrec-run-") as work:
        work = Path(work)
        checkpoint = tune.get_checkpoint()
        resume, rows = None, []
        if checkpoint is not None:
            restored = work / "restored"
            checkpoint.to_directory(restored)
            final = final_report(restored)
            if final is not None:  # finished before the experiment recorded it
                tune.report(final, checkpoint=tune.Checkpoint.from_directory(restored))
                return
            resume, rows = restored / CHECKPOINT_FILE, reported_rows(restored)

        def report(ev: Evaluation) -> None:
            if ev.stopping or ev.epoch == cfg.epochs:  # the final report follows this evaluation
                return
            with tempfile.TemporaryDirectory(dir=work) as folder:
                ev.save(Path(folder) / CHECKPOINT_FILE)
                report_checkpoint(rows, trial_metrics(ev), Path(folder))

        result = train(cfg, data, report=report, resume=resume, test=True)
        device = resolve_device(cfg.device)
        with torch.no_grad():
            unmasked = evaluate(scorer(cfg, result.model, device), data.test.to(device), mask_history=False)
        final = {**{f"valid/{k}": v for k, v in result.valid.items()},
                 **{f"test/{k}": v for k, v in result.test.items()},
                 **{f"{UNMASKED}/{k}": v for k, v in unmasked.items()},
                 "best_epoch": result.best_epoch, "epochs": result.history[-1]["epoch"],
                 "minutes": result.minutes, "gpu": int(device.type == "cuda")}
        with tempfile.TemporaryDirectory(dir=work) as folder:
            save_model(Path(folder) / MODEL_DIR, result.model, data.item_ids,
                       metrics={"valid": result.valid, "test": result.test, "test_unmasked": unmasked,
                                "best_epoch": result.best_epoch, "data": setup.data_info[dataset]})
            report_checkpoint(rows, final, Path(folder))


def final_report(restored: Path) -> dict[str, Any] | None:
    """The final metrics a finished run's last checkpoint holds (it has no train state to resume),
    else None."""
    if (restored / CHECKPOINT_FILE).is_file():
        return None
    return reported_rows(restored)[-1]


def train_plan(plan: Plan, out: Path, settings: search.SearchSettings, resume: bool = False,
        ray_address: str | None = None) -> pd.DataFrame:
    """Train the plan (or, with `resume`, continue the one in OUT) as one Ray Tune run; return
    `finished(...)`.  Settings other than the resources must match OUT's record on resume."""
    for name in plan.runs:
        plan.config(name, plan.seeds[0])  # a bad setting fails here, before Ray starts
    settings = _record(plan, out, settings, resume)
    init_ray(prefer_loopback(ray_address))
    data, info = {}, {}
    for name, spec in plan.datasets.items():
        prepared, stats = load_and_describe(spec["source"], max_len=spec["max_len"], kcore=spec["kcore"],
                                            **spec["columns"])
        data[name], info[name] = ray.put(prepared), {"source": spec["source"], **stats}
    trainable = tune.with_resources(tune.with_parameters(run_seed, setup=GridSetup(plan, data, info)),
                                    search.trial_resources(settings))
    tuner = search.make_tuner(
        trainable, settings, resume,
        tune.TuneConfig(max_concurrent_trials=settings.max_concurrent, reuse_actors=True),
        tune.CheckpointConfig(num_to_keep=1), max(run["config"]["epochs"] for run in plan.runs.values()),
        param_space={"run": tune.grid_search(list(plan.runs)), "seed": tune.grid_search(list(plan.seeds))})
    search.fit(tuner, settings.experiment, len(plan.runs) * len(plan.seeds))
    runs = finished(settings.experiment)
    missing = len(plan.runs) * len(plan.seeds) - len(runs)
    if missing:
        print(f"{missing} of {len(plan.runs) * len(plan.seeds)} runs did not finish (see {settings.experiment}); "
              "the tables hold the others: --resume retries them", file=sys.stderr)
    return runs


def _record(plan: Plan, out: Path, settings: search.SearchSettings, resume: bool) -> search.SearchSettings:
    """Write OUT's record of a new grid, or check a resumed one against it; the settings to use."""
    path = out / GRID_RECORD
    if resume:
        if not path.is_file():
            raise FileNotFoundError(f"{out}: nothing to resume ({GRID_RECORD} is missing)")
        record = read_yaml(path)
        if record["plan"] != dataclasses.asdict(plan):
            changed = sorted(k for k, v in dataclasses.asdict(plan).items() if record["plan"][k] != v)
            raise ValueError(f"{path}: these runs were started with other {', '.join(changed)}: "
                             "--resume continues them with the flags they were started with")
        if not tune.Tuner.can_restore(record["experiment"]):
            raise FileNotFoundError(f"{record['experiment']}: no experiment to resume")
        return dataclasses.replace(settings, experiment=record["experiment"])
    if tune.Tuner.can_restore(settings.experiment):
        raise ValueError(f"{settings.experiment} already holds an experiment: continue it with --resume, "
                         "or choose another --out")
    write_yaml(path, {"plan": dataclasses.asdict(plan), "experiment": settings.experiment})
    return settings


def finished(experiment: str) -> pd.DataFrame:
    """One row per finished trial (run, seed, trial_id and its final metrics), read from the
    experiment without Ray running."""
    frame = results_frame(read(experiment).trials)
    if DONE not in frame.columns:
        return pd.DataFrame(columns=["run", "seed", "trial_id"])
    frame = frame[frame[DONE].notna()].drop_duplicates("trial_id", keep="last")
    keep = ["run", "seed", "trial_id", *(c for c in frame.columns
                                        if c.split("/")[0] in ("valid", "test", UNMASKED)),
            "best_epoch", "epochs", "minutes", "gpu"]
    counts = {c: int for c in ("seed", "best_epoch", "epochs", "gpu")}  # read back as floats beside NaN rows
    return frame[keep].astype(counts).sort_values(["run", "seed"], ignore_index=True)


def save_final_model(experiment: str, trial_id: str, target: Path) -> None:
    """The model a finished trial trained (its best epoch's), as a model folder at `target` (a link
    to it, switched in one rename: never absent, never half-copied)."""
    run = read(experiment)
    trial = next(t for t in run.trials if t.trial_id == trial_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    stage.chmod(0o755)  # mkdtemp's 0o700 would hide the model from other users
    try:
        copy_model(run, trial, max(trial.checkpoints), stage)  # the last: the finished run's
    except BaseException:
        remove(stage)
        raise
    switch_folder(target, stage)  # the earlier model stays until the link points at this one
