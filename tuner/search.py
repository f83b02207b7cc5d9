"""A Ray Tune search: seeded Optuna TPE over a Space, ASHA per epoch, GPUs shared by trials.

Works with any function trainable that reports `protocol.METRIC`, `protocol.BEST` and `epoch`,
so the plumbing can be tested on a cheap objective.  The experiment lives at
`SearchSettings.experiment`, a local folder or a cloud URI (s3://...): there Ray keeps every
trial's results and checkpoints and the searcher's state, which is what `resume` restores
(ASHA's rungs, which Ray does not save, are rebuilt from those results).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import pyarrow.fs
import ray
from ray import tune
from ray.air.constants import EXPR_ERROR_FILE, EXPR_ERROR_PICKLE_FILE
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from .experiment import FAILED, listing, parse_rows, read, read_text, result_rows
from .protocol import BEST, METRIC, MODE, REPORTED
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


def make_searcher(space: Space, settings: SearchSettings) -> OptunaSearch:
    """Seeded TPE (with the space's `sampler` settings) learning from each trial's best valid
    NDCG@10; the space's points come first."""
    storage, study = None, settings.experiment  # the experiment's path or URI: unique per search
    if settings.optuna_storage:
        storage = optuna.storages.get_storage(settings.optuna_storage)
        if study in optuna.study.get_all_study_names(storage):
            raise ValueError(f"{settings.optuna_storage} already holds a study {study!r}: "
                             "resume that search (--resume) or give the new one another name")
    sampler = optuna.samplers.TPESampler(seed=settings.seed, **space.sampler)
    return OptunaSearch(space, metric=BEST, mode=MODE, points_to_evaluate=list(space.points),
                        sampler=sampler, study_name=study, storage=storage)


class ResumableASHA(ASHAScheduler):
    """ASHA that recalls its rungs on resume and judges a trial only against a rung of
    `min_rung_results` results.

    Ray saves no scheduler state: a restored search would judge the trials still to come, and a
    restored trial at its next rung, against empty rungs (a trial resumed just past its first rung
    would pass it unjudged).  So each trial's reported results are replayed into its bracket when
    Ray adds it.  Ray's rule stops the second trial at a rung if it falls below the first alone;
    with `min_rung_results` = m a trial goes on unjudged (its result still recorded) while the
    rung holds fewer than m earlier results.  1 is Ray's rule."""

    def __init__(self, *, min_rung_results: int = 1, **asha: Any) -> None:
        super().__init__(**asha)
        self.min_rung_results = min_rung_results

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.has_reported_at_least_once:  # before the search was interrupted
            for row in result_rows(trial.storage.storage_filesystem, trial.path):
                self.on_trial_result(tune_controller, trial, row)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        # Ray's private bracket state (as of Ray 2.60; the rung test fails should it change)
        rungs = self._trial_info[trial.trial_id]._rungs  # [(epoch, {trial id: result})]
        before = [len(recorded) for _, recorded in rungs]
        action = super().on_trial_result(tune_controller, trial, result)
        judged_by = [size for size, (_, recorded) in zip(before, rungs) if len(recorded) > size]
        if action == TrialScheduler.STOP and judged_by and judged_by[0] < self.min_rung_results:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


def make_scheduler(space: Space) -> ASHAScheduler:
    """ASHA on this epoch's valid NDCG@10 (TuneConfig's metric), rungs counted in epochs."""
    return ResumableASHA(time_attr="epoch", max_t=space.asha.max_epochs, grace_period=space.asha.grace_period,
                         reduction_factor=space.asha.reduction_factor, min_rung_results=space.asha.min_rung_results)


def make_tuner(trainable: Callable[[dict[str, Any]], None], settings: SearchSettings, resume: bool,
               tune_config: tune.TuneConfig, checkpoint_config: tune.CheckpointConfig,
               param_space: dict[str, Any] | None = None) -> tune.Tuner:
    """The experiment at `settings.experiment` restored (`resume`) or started: how a search and a
    grid of retrainings (tuner/grid.py) both make their Tuner."""
    # A state save after each trial checkpoint is deliberate (keep one checkpoint), not a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if resume:
        for folder in restore_lost_checkpoints(settings.experiment):
            print(f"{folder}: lost when the search was stopped; put back from the checkpoint that followed it",
                  file=sys.stderr)
        for folder in restore_rows(settings.experiment):
            print(f"{folder}/result.json: behind its checkpoints when the search was stopped; rows put back",
                  file=sys.stderr)
        return tune.Tuner.restore(absolute(settings.experiment), trainable, resume_errored=True,
                                  storage_filesystem=storage_filesystem(settings.experiment))
    storage, name = experiment_location(settings.experiment)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=tune.RunConfig(name=name, storage_path=storage, checkpoint_config=checkpoint_config,
                                                storage_filesystem=storage_filesystem(settings.experiment),
                                                failure_config=tune.FailureConfig(max_failures=settings.max_failures)))


def restore_lost_checkpoints(experiment: str) -> list[str]:
    """Give back each trial the checkpoint folder that Ray's saved state restores it from, where a
    killed driver lost it; return the folders put back.

    Ray deletes a trial's superseded checkpoint as it registers the next one and saves its state
    just after: a driver killed in between leaves a state naming a deleted folder, and Ray would
    refuse to restore that trial.  The checkpoint that followed it is copied under that name, so
    the trial continues from it (its checkpoint.pt holds its own epoch) and Ray deletes
    the copy at the trial's next checkpoint, as it had deleted the original."""
    run = read(experiment)
    restored = []
    for trial in run.trials:
        lost = f"{trial.folder}/{trial.latest}"
        if trial.latest is None or run.fs.get_file_info(lost).type != pyarrow.fs.FileType.NotFound:
            continue
        # the next checkpoint, whose registration deleted it: complete, as Ray registers only those
        # (a later one may be cut off)
        successor = min((name for name in listing(run.fs, trial.folder)
                         if name.startswith("checkpoint_") and "." not in name and name > trial.latest), default=None)
        if successor is None:
            continue  # not the race above: Ray's to judge
        # Locally through a folder renamed into place, so that a copy cut off by another kill is
        # never taken for a checkpoint; object stores rename no folders: there, copied in place.
        local = isinstance(run.fs, pyarrow.fs.LocalFileSystem)
        target = f"{lost}.restoring" if local else lost
        run.fs.delete_dir_contents(target, missing_dir_ok=True)
        run.fs.create_dir(target)
        pyarrow.fs.copy_files(f"{trial.folder}/{successor}", target, source_filesystem=run.fs, destination_filesystem=run.fs)
        if local:
            run.fs.move(target, lost)
        restored.append(lost)
    return restored


def restore_rows(experiment: str) -> list[str]:
    """Put back into each trial's result.json the rows its latest checkpoint kept (REPORTED) that
    it lacks, and drop a line cut off at its end (Ray's own reader stops at it); return the trial
    folders mended.

    Ray copies the driver's result.json to the experiment's folder now and then, file by file: a
    driver killed meanwhile leaves it behind the checkpoints (a row the saved state counts,
    missing) or, where it was written in place (not through `storage`), cut off, even empty.  A
    row put back has the trial's metrics, not Ray's bookkeeping (time_total_s, timestamp, ...).
    A row with an epoch is there if a row of its epoch is; one without (a grid run's final
    report), if a row holds all of it."""
    run = read(experiment)
    fs = storage_filesystem(experiment) or run.fs  # each file whole: a kill now cuts off nothing
    mended = []
    for trial in run.trials:
        try:
            kept = json.loads(read_text(run.fs, f"{trial.folder}/{trial.latest}/{REPORTED}")) if trial.latest else []
        except FileNotFoundError:
            kept = []  # a trainable that keeps no rows
        try:
            text = read_text(run.fs, f"{trial.folder}/result.json")
        except FileNotFoundError:
            text = ""
        complete = text[:text.rfind("\n") + 1]
        rows = parse_rows(complete)
        missing = [row for row in kept if not any(_same(row, old) for old in rows)]
        if not missing and complete == text:
            continue
        rows = sorted(rows + missing, key=lambda row: row.get("epoch", math.inf))  # a grid's final report last
        with fs.open_output_stream(f"{trial.folder}/result.json") as stream:
            stream.write("".join(json.dumps(row) + "\n" for row in rows).encode())
        mended.append(trial.folder)
    return mended


def _same(row: dict[str, Any], old: dict[str, Any]) -> bool:
    return old.get("epoch") == row["epoch"] if "epoch" in row else row.items() <= old.items()


def refuse_taken(experiment: str) -> None:
    """A new search's experiment must not exist yet: it may be another search's."""
    if tune.Tuner.can_restore(experiment):
        raise ValueError(f"{experiment} already holds an experiment: "
                         "continue it with --resume, or choose another --out or --experiment")


def run(trainable: Callable[[dict[str, Any]], None], space: Space, settings: SearchSettings,
        resume: bool = False) -> tune.ResultGrid:
    """Run (or, with `resume`, continue) the search to its end; Ray must be initialised."""
    exists = tune.Tuner.can_restore(settings.experiment)
    if resume and not exists:
        raise FileNotFoundError(f"{settings.experiment}: no experiment to resume")
    if not resume and exists:
        refuse_taken(settings.experiment)
    tuner = make_tuner(
        tune.with_resources(trainable, trial_resources(settings)), settings, resume,
        tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=make_searcher(space, settings) if not resume else None,
                        scheduler=make_scheduler(space), num_samples=settings.num_samples,
                        max_concurrent_trials=settings.max_concurrent, reuse_actors=True),
        tune.CheckpointConfig(num_to_keep=settings.keep_checkpoints, checkpoint_score_attribute=METRIC,
                              checkpoint_score_order=MODE))
    return fit(tuner, settings.experiment, settings.num_samples)


def fit(tuner: tune.Tuner, experiment: str, trials: int) -> tune.ResultGrid:
    """Run `tuner` (of `trials` trials in all) to its end and record its failures
    (`record_failures`); raise `Stopped` if a stop signal or anything else ended it before.

    Ray marks the trials it stops on Ctrl-C TERMINATED in the ResultGrid it returns, as if they
    had finished: whether the experiment is finished is read from the state Ray saved."""
    with stopping_fit() as received:
        grid = tuner.fit()
    record_failures(experiment, grid)
    if received:
        raise Stopped(received[0])
    run = read(experiment)
    if len(run.trials) < trials or any(t.status not in (Trial.TERMINATED, FAILED) for t in run.trials):
        raise Stopped(signal.SIGINT)  # Ray stopped on a signal of its own (SIGUSR1): as on Ctrl-C
    return grid


def record_failures(experiment: str, grid: tune.ResultGrid) -> list[str]:
    """Mark failed, in Ray's saved state, each trial that `fit` ended as failed but the state
    keeps unfinished; return their folders' names.

    Ray saves a trial's end when it stops the trial's worker.  A trial whose worker died (killed,
    out of memory) on its last allowed try has no worker left to stop, so the state keeps it
    RUNNING: `export` would rank it, `status` would call it interrupted, and `--resume` would
    continue it as if nothing had happened.  The ResultGrid `fit` returns knows that it failed
    (and Ray wrote its error.txt)."""
    failed = {result.path.rstrip("/").rsplit("/", 1)[-1] for result in grid if result.error is not None}
    run = read(experiment)
    saved = json.loads(read_text(run.fs, run.state))
    marked = []
    for entry in saved["trial_data"]:
        trial, metadata = (json.loads(part) for part in entry)
        if trial["relative_logdir"] in failed and trial["status"] != FAILED:
            trial["status"] = FAILED
            metadata.update(error_filename=EXPR_ERROR_FILE, pickled_error_filename=EXPR_ERROR_PICKLE_FILE)
            entry[:] = [json.dumps(trial), json.dumps(metadata)]
            marked.append(trial["relative_logdir"])
    if marked:
        with (storage_filesystem(experiment) or run.fs).open_output_stream(run.state) as stream:
            stream.write(json.dumps(saved).encode())
    return marked


def _no_restore_hint(record: logging.LogRecord) -> bool:
    """Ray's closing words after Ctrl-C name `Tuner.restore(...)`; the command line names --resume."""
    return "Tuner.restore" not in record.getMessage()


logging.getLogger("ray.tune.tune").addFilter(_no_restore_hint)
