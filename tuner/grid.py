"""A grid of (run, seed) trainings as one Ray Tune run: the machinery of `finalize` and `reproduce`.

A `Plan` names its datasets and its runs (a dataset and every setting) and the seeds; each
(run, seed) is one trial of a search's trainable (`trainable.run_trial`, `TrialSetup.final`):
trained to its end (early stopping on valid NDCG@10, at most `cfg.epochs`), with a GPU share or
CPUs as a search's trials get them (`search.trial_resources`), checkpointed after each
validation pass so that a failed trial, or the whole grid after an interruption (`resume`),
continues from there.  Its last row also holds the best model's valid and test metrics
(`finished` reads them).

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
from ray import tune

from simdiffrec.config import Config, read_yaml, write_yaml
from simdiffrec.data import load_and_describe
from simdiffrec.files import remove, switch_folder

from . import search
from .experiment import copy_model, read, results_frame
from .jobs import init_ray, prefer_loopback
from .protocol import GRID_RECORD
from .trainable import UNMASKED, TrialSetup, make_trainable

DONE = "test/NDCG@10"  # present in a run's last row only: it finished


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a grid trains: every run on every seed."""

    datasets: dict[str, dict[str, Any]]  # name -> load_data's arguments: source, max_len, kcore, columns
    runs: dict[str, dict[str, Any]]  # name -> {"dataset": a name above, "config": every setting but the seed}
    seeds: list[int]

    def config(self, run: str, seed: int) -> Config:
        return Config.from_dict({**self.runs[run]["config"], "seed": seed}, source=f"run {run}")

    def configure(self, params: dict[str, Any]) -> tuple[str, Config]:
        """A trial's dataset and settings from its parameters (a run and a seed)."""
        run = params["run"]
        return self.runs[run]["dataset"], self.config(run, params["seed"]).replace(device="auto")


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
    setup = TrialSetup(data, info, plan.configure, final=True)
    trainable = tune.with_resources(make_trainable(setup), search.trial_resources(settings))
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
    """One row per finished trial (run, seed, trial_id and its last row's metrics: the best model's
    valid and test, `epochs` its last epoch), read from the experiment without Ray running."""
    frame = results_frame(read(experiment).trials)
    if DONE not in frame.columns:
        return pd.DataFrame(columns=["run", "seed", "trial_id"])
    frame = frame[frame[DONE].notna()].drop_duplicates("trial_id", keep="last")
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("valid/")]).rename(
        columns={c: c.replace("best_valid/", "valid/") for c in frame.columns} | {"epoch": "epochs"})
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
