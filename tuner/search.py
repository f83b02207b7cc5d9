"""A Ray Tune search: seeded Optuna TPE over a Space, ASHA per epoch, GPUs shared by trials.

Works with any function trainable that reports `protocol.METRIC`, `protocol.BEST` and `epoch`,
so the plumbing can be tested on a cheap objective.  The experiment lives at
`SearchSettings.experiment`, a local folder or a cloud URI (s3://...): there Ray keeps every
trial's results and checkpoints and the searcher's state, which is what `resume` restores
(ASHA's rungs, which Ray does not save, are rebuilt from those results).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from . import recovery
from .console import EvaluationLines
from .experiment import FAILED, read
from .protocol import BEST, METRIC, MODE, study_name
from .settings import check as check_settings
from .signals import Stopped, stopping_fit
from .spaces import Space
from .storage import storage_filesystem

@dataclass
class SearchSettings:
    experiment: str  # local folder or URI of the Ray experiment
    num_samples: int = 20
    trials_per_gpu: int = 1  # each trial asks for 1/trials_per_gpu of a GPU
    cpus_per_trial: float = 1.0
    gpu: str = "auto"  # auto: GPU trials when the cluster has GPUs now; always: also on an autoscaler still at 0
    max_concurrent: int = 8
    seed: int = 0
    optuna_storage: str | None = None  # e.g. sqlite:///study.db, for optuna-dashboard; None: in memory
    max_failures: int = 2  # retries of a failed trial, from its latest checkpoint
    # per trial, the best by METRIC (Ray also keeps the latest).  Ray saves the experiment's state
    # whenever a trial has made this many checkpoints: with 1, the state --resume restores knows
    # every trial's latest checkpoint, so no trial is rerun from scratch or under a new id.
    keep_checkpoints: int = 1

    def __post_init__(self) -> None:
        self.experiment = absolute(self.experiment)
        check_settings(dataclasses.asdict(self))


def absolute(experiment: str) -> str:
    """A URI as it is, a local folder made absolute (Ray reads relative paths as URIs)."""
    return experiment.rstrip("/") if "://" in experiment else str(Path(experiment).resolve())


def experiment_location(experiment: str) -> tuple[str, str]:
    """(storage_path, name), as Ray's RunConfig wants them."""
    storage, _, name = absolute(experiment).rpartition("/")
    return storage, name


def trial_resources(settings: SearchSettings) -> dict[str, float]:
    """CPUs and a GPU share per trial; CPU-only trials when no GPU is (or will be) there."""
    gpus = settings.gpu == "always" or (settings.gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    return {"cpu": settings.cpus_per_trial, "gpu": 1 / settings.trials_per_gpu if gpus else 0}


class EpochCurves(OptunaSearch):
    """OptunaSearch whose study also keeps each epoch's valid NDCG@10 as the trial's intermediate
    value at that epoch (optuna-dashboard draws them as learning curves).  Ray's own keeps the
    searcher's metric, the best so far, and never a trial's last report (Ray hands that to
    `on_trial_complete` alone); the trial's value stays its best."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_epoch: dict[str, int] = {}  # per trial, the epoch last kept

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if result["epoch"] > self.last_epoch.get(trial_id, 0) and math.isfinite(result[METRIC]):  # once an epoch
            super().on_trial_result(trial_id, {**result, self.metric: result[METRIC],
                                               TRAINING_ITERATION: result["epoch"]})
            self.last_epoch[trial_id] = result["epoch"]

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if result and "epoch" in result:
            self.on_trial_result(trial_id, result)
        super().on_trial_complete(trial_id, result, error)


def make_searcher(space: Space, settings: SearchSettings) -> OptunaSearch:
    """Seeded TPE (with the space's `sampler` settings) learning from each trial's best valid
    NDCG@10; the space's points come first."""
    storage = optuna.storages.get_storage(settings.optuna_storage) if settings.optuna_storage else None
    with warnings.catch_warnings():  # `group` is experimental in Optuna 4: said once per search, not news
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=settings.seed, **space.sampler)
    return EpochCurves(space, metric=BEST, mode=MODE, points_to_evaluate=list(space.points),
                       sampler=sampler, study_name=study_name(settings.experiment), storage=storage)


def make_scheduler(space: Space) -> ASHAScheduler:
    """ASHA on this epoch's valid NDCG@10 (TuneConfig's metric), rungs counted in epochs."""
    return recovery.ResumableASHA(time_attr="epoch", max_t=space.asha.max_epochs, grace_period=space.asha.grace_period,
                         reduction_factor=space.asha.reduction_factor, min_rung_results=space.asha.min_rung_results)


def make_tuner(trainable: Callable[[dict[str, Any]], None], settings: SearchSettings, resume: bool,
               tune_config: tune.TuneConfig, checkpoint_config: tune.CheckpointConfig, max_epochs: int,
               param_space: dict[str, Any] | None = None) -> tune.Tuner:
    """The experiment at `settings.experiment` restored (`resume`) or started: how a search and a
    grid of retrainings (tuner/grid.py) both make their Tuner.  Ray prints nothing of its own;
    `console.EvaluationLines` prints a line per evaluation (trials of at most `max_epochs`)."""
    # A state save after each trial checkpoint is deliberate (keep one checkpoint), not a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # its experiment box prints even at verbose=0
    if resume:
        recovery.before_restore(settings.experiment)
        return tune.Tuner.restore(absolute(settings.experiment), trainable, resume_errored=True,
                                  storage_filesystem=storage_filesystem(settings.experiment))
    storage, name = experiment_location(settings.experiment)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=tune.RunConfig(name=name, storage_path=storage, checkpoint_config=checkpoint_config,
                                                storage_filesystem=storage_filesystem(settings.experiment),
                                                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                                verbose=0, callbacks=[EvaluationLines(max_epochs)]))


def refuse_taken(settings: SearchSettings) -> None:
    """A new search's experiment and Optuna study must not exist yet: they may be another search's."""
    if tune.Tuner.can_restore(settings.experiment):
        raise ValueError(f"{settings.experiment} already holds an experiment: "
                         "continue it with --resume, or choose another --out or --experiment")
    study, storage = study_name(settings.experiment), settings.optuna_storage
    if storage and study in optuna.study.get_all_study_names(optuna.storages.get_storage(storage)):
        raise ValueError(f"{storage} already holds a study {study!r}: resume that search (--resume), choose "
                         f"another --out, or delete the study (optuna delete-study --study-name {study} "
                         f"--storage {storage})")


def run_search(trainable: Callable[[dict[str, Any]], None], space: Space, settings: SearchSettings,
        resume: bool = False) -> tune.ResultGrid:
    """Run (or, with `resume`, continue) the search to its end, to `settings.num_samples` trials in
    all (more than it was started with grows it); Ray must be initialised."""
    if resume and not tune.Tuner.can_restore(settings.experiment):
        raise FileNotFoundError(f"{settings.experiment}: no experiment to resume")
    if resume:
        recovery.grow(settings.experiment, settings.num_samples)
    else:
        refuse_taken(settings)
    tuner = make_tuner(
        tune.with_resources(trainable, trial_resources(settings)), settings, resume,
        tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=make_searcher(space, settings) if not resume else None,
                        scheduler=make_scheduler(space), num_samples=settings.num_samples,
                        max_concurrent_trials=settings.max_concurrent, reuse_actors=True),
        tune.CheckpointConfig(num_to_keep=settings.keep_checkpoints, checkpoint_score_attribute=METRIC,
                              checkpoint_score_order=MODE), space.asha.max_epochs)
    return fit(tuner, settings.experiment, settings.num_samples)


def fit(tuner: tune.Tuner, experiment: str, trials: int) -> tune.ResultGrid:
    """Run `tuner` (of `trials` trials in all) to its end and record its failures
    (`recovery.after_fit`); raise `Stopped` if a stop signal or anything else ended it before.

    Ray marks the trials it stops on Ctrl-C TERMINATED in the ResultGrid it returns, as if they
    had finished: whether the experiment is finished is read from the state Ray saved."""
    with stopping_fit() as received:
        grid = tuner.fit()
    recovery.after_fit(experiment, grid)
    if received:
        raise Stopped(received[0])
    run = read(experiment)
    if len(run.trials) < trials or any(t.status not in (Trial.TERMINATED, FAILED) for t in run.trials):
        raise Stopped(signal.SIGINT)  # Ray stopped on a signal of its own (SIGUSR1): as on Ctrl-C
    return grid


def _no_restore_hint(record: logging.LogRecord) -> bool:
    """Ray's closing words after Ctrl-C name `Tuner.restore(...)`; the command line names --resume."""
    return "Tuner.restore" not in record.getMessage()


logging.getLogger("ray.tune.tune").addFilter(_no_restore_hint)
