"""From a search's Ray experiment (finished or interrupted) to the files a user keeps:

    best_config.yaml   the best trial's parameters and full settings, its metrics, the dataset,
                       package versions
    best_checkpoint/   that trial's model at its best epoch (a simdiffrec model folder)
    results.parquet    one row per evaluation of every trial: parameters, metrics, status

It reads only what Ray wrote (experiment state, each trial's result.json and checkpoints), so it
runs without Ray started, on a local folder or a cloud URI.  Every file is written atomically
(`simdiffrec/files.py`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs
import yaml
from ray.air.result import Result
from ray.tune import ExperimentAnalysis

from simdiffrec.files import write_atomic

from .protocol import METRIC, MODEL_DIR

PACKAGES = ("simdiffrec", "torch", "ray", "optuna", "numpy", "pandas", "pyarrow")


def export(experiment: str, out: str | Path) -> dict[str, Any]:
    """Write the three exports of `experiment` into `out`; return best_config.yaml's content."""
    analysis, results = read(experiment)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_parquet(out / "results.parquet", results_frame(analysis, results))
    best = _best(analysis, results)
    if best is None:
        raise ValueError(f"{experiment}: no trial has reported a checkpoint yet; nothing to export")
    trial, checkpoint, metrics = best
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        checkpoint.to_directory(tmp)
        model = Path(tmp) / MODEL_DIR
        saved = json.loads((model / "metrics.json").read_text())
        settings = yaml.safe_load((model / "config.yaml").read_text())
        _replace_dir(model, out / "best_checkpoint")
    statuses = pd.Series([t.status for t in analysis.trials]).value_counts()
    config = {
        "dataset": saved.get("data"),
        "metric": METRIC,
        "trial": trial.trial_id,
        "epoch": int(metrics["epoch"]),
        "parameters": dict(trial.config),
        "metrics": {k: float(v) for k, v in metrics.items() if k.startswith("valid/")},
        "config": settings,
        "search": {"experiment": str(experiment), "trials": len(analysis.trials),
                   **{status.lower(): int(n) for status, n in statuses.items()}},
        "versions": versions(),
    }
    write_atomic(out / "best_config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    return config


def read(experiment: str) -> tuple[ExperimentAnalysis, dict[str, Result | None]]:
    """The experiment's trials (its saved state) and what each reported (its folder), from files
    alone: a finished, interrupted or still running search, a local folder or a URI."""
    fs, path = _filesystem(experiment)
    try:
        analysis = ExperimentAnalysis(path, storage_filesystem=fs)
    except ValueError:
        raise FileNotFoundError(f"{experiment}: no Ray Tune experiment there (no experiment_state file)") from None
    return analysis, {trial.trial_id: _result(trial.path, fs) for trial in analysis.trials}


def results_frame(analysis: ExperimentAnalysis, results: dict[str, Result | None]) -> pd.DataFrame:
    """Every evaluation of every trial (a trial without one still gets a row), trials in the
    order the searcher created them (`number`, from Ray's experiment tag "<number>_<params>").

    A trial restarted from its checkpoint re-reports the epochs it had run past that checkpoint;
    its result.json then holds those epochs twice, and only the later report is kept."""
    frames = []
    for trial in analysis.trials:
        result = results[trial.trial_id]
        rows = result.metrics_dataframe if result is not None else pd.DataFrame()
        rows = rows.drop(columns=[c for c in rows.columns if c.startswith("config/")])
        if "epoch" in rows.columns:
            rows = rows.drop_duplicates("epoch", keep="last").sort_values("epoch", ignore_index=True)
        if rows.empty:
            rows = pd.DataFrame([{}])
        number = int(trial.experiment_tag.split("_")[0])
        frames.append(rows.assign(trial_id=trial.trial_id, number=number, status=trial.status, **dict(trial.config)))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True).sort_values("number", kind="stable", ignore_index=True)
    front = ["trial_id", "number", "status", *dict.fromkeys(k for t in analysis.trials for k in t.config)]
    return table[front + [c for c in table.columns if c not in front]]


def _best(analysis: ExperimentAnalysis, results: dict[str, Result | None]):
    """(trial, checkpoint, metrics) of the highest METRIC among all kept checkpoints: the best
    trial at its best epoch, since Ray keeps each trial's best-scoring checkpoints."""
    best = None
    for trial in analysis.trials:
        result = results[trial.trial_id]
        for checkpoint, metrics in (result.best_checkpoints or []) if result else []:
            score = metrics.get(METRIC)
            if score is not None and score == score and (best is None or score > best[2][METRIC]):
                best = (trial, checkpoint, metrics)
    return best


def _result(trial_path: str, fs: pyarrow.fs.FileSystem) -> Result | None:
    """What a trial wrote, read from its folder (fresher than an interrupted run's state file)."""
    try:
        return Result.from_path(trial_path, storage_filesystem=fs)
    except (RuntimeError, ValueError, KeyError):  # a running trial's files: nothing reported yet, a
        return None  # half-written result.json line, or a checkpoint folder ahead of its result line


def _filesystem(experiment: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" not in experiment:
        experiment = str(Path(experiment).resolve())
    return pyarrow.fs.FileSystem.from_uri(experiment)


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
    return pd.DataFrame([{"dataset": dataset, "trials": best["search"]["trials"], "best_trial": best["trial"],
                          "epoch": best["epoch"], METRIC: best["metrics"][METRIC],
                          "valid/HR@10": best["metrics"]["valid/HR@10"], **best["parameters"]}
                         for dataset, best in best_configs.items()])


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


def _replace_dir(source: Path, target: Path) -> None:
    """Move a finished folder into place; the old one, if any, is removed only afterwards."""
    staged = target.with_name(target.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.move(str(source), staged)
    old = target.with_name(target.name + ".old")
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)
