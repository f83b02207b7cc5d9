"""From a search's Ray experiment (finished or interrupted) to the files a user keeps:

    best_config.yaml   the best trial's parameters and full settings, its metrics, the dataset,
                       package versions
    best_checkpoint/   that trial's model at its best epoch (a simdiffrec model folder)
    results.parquet    one row per evaluation of every trial: parameters, metrics, status, error

Reading (`read`, `results_frame`, `best`) needs no running Ray and unpickles nothing: the trial
list comes from the experiment state file parsed as plain JSON (its pickled fields are left
undecoded), each trial's rows from its result.json, its reason of failure from error.txt, its
models from its checkpoint folders.  What a trial had not finished writing when its search was
stopped (a cut-off result.json line, a checkpoint without its result) is skipped.  A failed trial
(Ray status ERROR) and a non-finite metric are never the best.

Writing (`export`) stages all three exports in `OUT/.exports/<new>/` and switches them in with
one rename of the link `OUT/.exports/current`; `OUT/best_config.yaml`, `OUT/best_checkpoint` and
`OUT/results.parquet` are links through it.  A reader, or a kill at any moment, therefore sees
all three exports old or all three new; the next export removes what a killed one left behind.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs

from simdiffrec.config import read_yaml, write_yaml
from simdiffrec.files import atomic_symlink, copy_folder, move, remove, switch_folder, write_atomic

from .protocol import METRIC, MODEL_DIR

PACKAGES = ("simdiffrec", "torch", "ray", "optuna", "numpy", "pandas", "pyarrow")
EXPORTS = ("best_config.yaml", "best_checkpoint", "results.parquet")
STAGES = ".exports"  # OUT/.exports/<export>/ holds EXPORTS; OUT/.exports/current links the live one
FAILED = "ERROR"  # Ray's status of a trial that raised (after its retries)


@dataclass
class Trial:
    """One trial as its search left it on storage."""

    trial_id: str
    number: int  # creation order, from Ray's experiment tag "<number>_<params>"
    status: str  # Ray's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    config: dict[str, Any]
    folder: str  # on the experiment's filesystem
    error: str | None = None  # the exception's last line, for a failed trial
    rows: list[dict[str, Any]] = field(default_factory=list)  # each complete line of result.json
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # folder name -> its result row
    latest: str | None = None  # the checkpoint folder Ray's saved state would restore it from


@dataclass
class Experiment:
    location: str  # a URI, or a local folder made absolute
    fs: pyarrow.fs.FileSystem
    path: str
    trials: list[Trial]
    state: str  # the experiment state file read, Ray's newest


def read(experiment: str) -> Experiment:
    """Every trial of `experiment` with its rows, kept checkpoints and status; writes nothing."""
    if "://" not in experiment:
        experiment = str(Path(experiment).resolve())
    fs, path = pyarrow.fs.FileSystem.from_uri(experiment)
    states = sorted(name for name in listing(fs, path) if name.startswith("experiment_state-") and name.endswith(".json"))
    if not states:
        raise FileNotFoundError(f"{experiment}: no Ray Tune experiment there (no experiment_state file)")
    try:  # the newest session's, as Ray picks it
        state = json.loads(read_text(fs, f"{path}/{states[-1]}"))
    except ValueError:  # written in place (a search begun before tuner.storage)
        raise ValueError(f"{experiment}/{states[-1]}: cut off (being written by the search?); try again") from None
    trials = []
    for trial_json, run_json in state["trial_data"]:
        saved = json.loads(trial_json)  # plain JSON: Ray's pickled fields stay hex strings
        folder = f"{path}/{saved['relative_logdir']}"
        last_result = json.loads(run_json).get("last_result") or {}  # every report carries a checkpoint
        trial = Trial(trial_id=saved["trial_id"], number=int(saved["experiment_tag"].split("_")[0]),
                      status=saved["status"], config=saved["config"], folder=folder,
                      latest=last_result.get("checkpoint_dir_name"))
        trial.rows = result_rows(fs, folder)
        present = set(listing(fs, folder))
        trial.checkpoints = {row["checkpoint_dir_name"]: row for row in trial.rows
                             if row.get("checkpoint_dir_name") in present}
        if trial.status == FAILED and "error.txt" in present:
            trial.error = _last_line(read_text(fs, f"{folder}/error.txt"))
        trials.append(trial)
    return Experiment(experiment, fs, path, sorted(trials, key=lambda t: t.number), f"{path}/{states[-1]}")


def results_frame(trials: list[Trial]) -> pd.DataFrame:
    """Every evaluation of every trial (a trial without one still gets a row), in creation order,
    with its status and, for a failed trial, the error.

    A trial restarted from its checkpoint re-reports the epochs it had run past that checkpoint;
    its result.json then holds those epochs twice, and only the later report is kept."""
    frames = []
    for trial in trials:
        rows = pd.DataFrame([{k: v for k, v in row.items() if k != "config"} for row in trial.rows])
        if "epoch" in rows.columns:
            rows = rows.drop_duplicates("epoch", keep="last").sort_values("epoch", ignore_index=True)
        if rows.empty:
            rows = pd.DataFrame([{}])
        frames.append(rows.assign(trial_id=trial.trial_id, number=trial.number, status=trial.status,
                                  error=trial.error, **trial.config))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    front = ["trial_id", "number", "status", "error", *dict.fromkeys(k for t in trials for k in t.config)]
    return table[front + [c for c in table.columns if c not in front]]


def copy_model(run: Experiment, trial: Trial, checkpoint: str, target: Path) -> None:
    """Copy the model folder (MODEL_DIR) of one of `trial`'s checkpoints into the folder `target`;
    one without its model.pt is refused."""
    source = f"{trial.folder}/{checkpoint}/{MODEL_DIR}"
    copy_folder(run.fs, source, target)
    if not (target / "model.pt").is_file():
        raise ValueError(f"{source}: holds no model.pt, so it is no model folder: nothing to export")


def best(trials: list[Trial]) -> tuple[Trial, str, dict[str, Any]] | None:
    """(trial, checkpoint folder name, its metrics) of the highest finite METRIC among the kept
    checkpoints of the trials that did not fail: the best trial at its best epoch, since Ray keeps
    each trial's best-scoring checkpoints."""
    found = None
    for trial in trials:
        if trial.status == FAILED:
            continue
        for name, metrics in trial.checkpoints.items():
            score = metrics.get(METRIC)
            if isinstance(score, (int, float)) and math.isfinite(score) and (found is None or score > found[2][METRIC]):
                found = (trial, name, metrics)
    return found


def export(experiment: str, out: str | Path) -> dict[str, Any]:
    """Write the three exports of `experiment` into `out` at once; return best_config.yaml's
    content.  The caller holds `simdiffrec.files.locked(out)`."""
    run = read(experiment)
    found = best(run.trials)
    if found is None:
        raise ValueError(f"{experiment}: no trial has a finished checkpoint with a finite {METRIC}; nothing to export")
    stages = Path(out) / STAGES
    stages.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=stages, prefix="export-"))
    stage.chmod(0o755)  # mkdtemp's 0o700 would hide the exports from other users
    try:
        config = _stage(run, found, stage)
    except BaseException:
        remove(stage)
        raise
    _switch(Path(out), stage)
    return config


def _stage(run: Experiment, found: tuple[Trial, str, dict[str, Any]], stage: Path) -> dict[str, Any]:
    """Write the three exports into `stage`; return best_config.yaml's content."""
    trial, checkpoint, metrics = found
    model = stage / "best_checkpoint"
    copy_model(run, trial, checkpoint, model)
    saved = json.loads((model / "metrics.json").read_text())
    statuses = pd.Series([t.status for t in run.trials]).value_counts()
    config = {
        "dataset": saved.get("data"),
        "metric": METRIC,
        "trial": trial.trial_id,
        "epoch": int(metrics["epoch"]),
        "parameters": dict(trial.config),
        "metrics": {k: float(v) for k, v in metrics.items() if k.startswith("valid/")},
        "config": read_yaml(model / "config.yaml"),
        "search": {"experiment": run.location, "trials": len(run.trials),
                   **{status.lower(): int(n) for status, n in statuses.items()}},
        "versions": versions(),
    }
    write_yaml(stage / "best_config.yaml", config)
    _write_parquet(stage / "results.parquet", results_frame(run.trials))
    return config


def _switch(out: Path, stage: Path) -> None:
    """Make `stage` the live export with one link switch (`.exports/current`; the earlier exports
    go), link the user-facing names through it, and remove anything else a kill left behind."""
    stages = out / STAGES
    switch_folder(stages / "current", stage)
    earlier = [out / name for name in EXPORTS if (out / name).exists() and not (out / name).is_symlink()]
    if earlier:  # exports of an earlier layout: all set aside before any link, so a kill leaves no mix
        aside = Path(tempfile.mkdtemp(dir=stages, prefix="earlier-"))
        for path in earlier:
            move(path, aside / path.name)
    for name in EXPORTS:
        link, target = out / name, Path(STAGES) / "current" / name
        if not (link.is_symlink() and Path(os.readlink(link)) == target):
            atomic_symlink(link, target)
    for entry in stages.iterdir():
        if entry.name not in ("current", stage.name):
            remove(entry)


def listing(fs: pyarrow.fs.FileSystem, folder: str) -> list[str]:
    """Names in `folder` (none if it does not exist)."""
    try:
        return [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(folder))]
    except FileNotFoundError:
        return []


def read_text(fs: pyarrow.fs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as stream:
        return stream.read().decode(errors="replace")


def result_rows(fs: pyarrow.fs.FileSystem, folder: str) -> list[dict[str, Any]]:
    """The complete lines of a trial's result.json (a line cut off by a stopped search is not)."""
    try:
        text = read_text(fs, f"{folder}/result.json")
    except FileNotFoundError:
        return []
    return parse_rows(text)


def parse_rows(text: str) -> list[dict[str, Any]]:
    """The rows of a result.json's text, but for lines that are not JSON objects."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _last_line(text: str) -> str:
    """An exception's one-line message from Ray's error.txt (its traceback ends with it), without
    the module path of its class: `Diverged: loss became nan at epoch 2: lower --lr`; a long one
    cut to its first sentence."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "failed (error.txt is empty)"
    if len(last) > 200:  # Ray's word on a dead worker runs to 600 characters: its first sentence
        last = last.split(". ", 1)[0].rstrip(".") + "."
    kind, sep, message = last.partition(": ")
    return f"{kind.rsplit('.', 1)[-1]}{sep}{message}" if sep and " " not in kind else last


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def summary(best_configs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per dataset: its best trial, metrics and parameters (tune-all's closing table)."""
    return pd.DataFrame([{"dataset": dataset, "trials": top["search"]["trials"], "best_trial": top["trial"],
                          "epoch": top["epoch"], METRIC: top["metrics"][METRIC],
                          "valid/HR@10": top["metrics"]["valid/HR@10"], **top["parameters"]}
                         for dataset, top in best_configs.items()])


def write_summary(table: pd.DataFrame, out: str | Path) -> None:
    out = Path(out)
    _write_parquet(out / "summary.parquet", table)
    write_atomic(out / "summary.md", markdown(table).encode())


def markdown(table: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if value != value else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    write_atomic(path, frame.to_parquet(index=False))
