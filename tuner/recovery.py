"""What Ray does not recover by itself, in one place: a search or grid that a killed driver, a
killed worker or a restart left with something missing, and the scheduler state Ray never saves.

    before_restore(experiment)   before `Tuner.restore`: a lost checkpoint folder, lost result rows
    after_fit(experiment, grid)  after `Tuner.fit`: trials whose worker died past its retries, failed
    ResumableASHA                ASHA's rungs replayed from the results on restore; min_rung_results
    grow(experiment, trials)     before `Tuner.restore`: a search allowed more trials in all

Everything here reads or writes Ray's own layout (the saved experiment state, checkpoint folders,
result.json) or private state (ASHA's brackets); it was checked against Ray RAY_CHECKED, and the
tests that make each fault (tests/test_tuner.py) fail should a new Ray change it.  No other module
reads a private Ray attribute (tests/test_layout.py).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pyarrow.fs
import ray.cloudpickle
from ray import tune
from ray.air.constants import EXPR_ERROR_FILE, EXPR_ERROR_PICKLE_FILE
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from .experiment import FAILED, listing, parse_rows, read, read_text, result_rows
from .protocol import REPORTED
from .storage import storage_filesystem

RAY_CHECKED = "2.60"  # the Ray version whose layout and private state this module was checked against


def before_restore(experiment: str) -> None:
    """Mend what a killed driver left behind, before Ray restores the experiment; say what was mended."""
    for folder in restore_lost_checkpoints(experiment):
        print(f"{folder}: lost when the search was stopped; put back from the checkpoint that followed it",
              file=sys.stderr)
    for folder in restore_rows(experiment):
        print(f"{folder}/result.json: behind its checkpoints when the search was stopped; rows put back",
              file=sys.stderr)


def grow(experiment: str, trials: int) -> int:
    """Let the restored search make `trials` trials in all; return how many it had been allowed.

    Ray keeps a search's number of trials in its search generator's saved state and restores it
    over the one `Tuner.restore` is given: the state is changed where Ray reads it.  The searcher
    (Optuna's study) is restored as it was, so its sampler goes on from the trials it knows."""
    run = read(experiment)
    saves = sorted(name for name in listing(run.fs, run.path) if name.startswith("search_gen_state-"))
    if not saves:
        raise FileNotFoundError(f"{experiment}: no saved search state to grow (not a search?)")
    path = f"{run.path}/{saves[-1]}"  # Ray restores the newest
    with run.fs.open_input_stream(path) as stream:
        state = ray.cloudpickle.loads(stream.readall())  # Ray's own pickle of the search, as Ray's restore reads it
    allowed = state["total_samples"]
    if trials > allowed:
        state.update(total_samples=trials, finished=False)
        with (storage_filesystem(experiment) or run.fs).open_output_stream(path) as stream:
            stream.write(ray.cloudpickle.dumps(state))
    return allowed


def after_fit(experiment: str, grid: tune.ResultGrid) -> list[str]:
    """Record in Ray's saved state what `fit` knew but did not save (`record_failures`)."""
    return record_failures(experiment, grid)


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
        rungs = self._trial_info[trial.trial_id]._rungs  # Ray's private bracket state: [(epoch, {trial id: result})]
        before = [len(recorded) for _, recorded in rungs]
        action = super().on_trial_result(tune_controller, trial, result)
        judged_by = [size for size, (_, recorded) in zip(before, rungs) if len(recorded) > size]
        if action == TrialScheduler.STOP and judged_by and judged_by[0] < self.min_rung_results:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


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
    row put back has the trial's metrics, not Ray's bookkeeping (time_total_s, timestamp, ...);
    a row is there if a row of its epoch is."""
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
        there = {row["epoch"] for row in rows}
        missing = [row for row in kept if row["epoch"] not in there]
        if not missing and complete == text:
            continue
        rows = sorted(rows + missing, key=lambda row: row["epoch"])
        with fs.open_output_stream(f"{trial.folder}/result.json") as stream:
            stream.write("".join(json.dumps(row) + "\n" for row in rows).encode())
        mended.append(trial.folder)
    return mended


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
