"""What a trial reports, what its checkpoints hold and what a search's folder keeps: the names the
trainable, the search, the exports and the readers agree on.  Light on purpose (no torch, no
Ray), so that code which only reads an experiment or runs a search on another objective does not
pull in the training core."""

from __future__ import annotations

from pathlib import Path

from simdiffrec.config import SELECT_BY

METRIC = f"valid/{SELECT_BY}"  # this evaluation's: what ASHA compares and Ray's checkpoints are scored by
BEST = f"best_valid/{SELECT_BY}"  # the trial's best so far: what Optuna learns from
MODE = "max"
GPU_SHARE = "gpu_share"  # reported with every evaluation: the GPU share Ray gave the trial (0: none)
CHECKPOINT_FILE = "checkpoint.pt"  # in each reported checkpoint: train()'s resumable state
MODEL_DIR = "model"  # in each reported checkpoint: the model of that epoch, a simdiffrec model folder
REPORTED = "reported.json"  # in each reported checkpoint: the metrics it came with (a lost result row's copy)
RECORD = "search.yaml"  # in a search's OUT folder: the settings it started with
SPACE_COPY = "space.yaml"  # in a search's OUT folder: a copy of its space file
GRID_RECORD = "grid.yaml"  # in a finalize or reproduce OUT folder: its plan and where its experiment is


def study_name(experiment: str) -> str:
    """A search's Optuna study name, short enough for optuna-dashboard's list: the search's folder
    (OUT of OUT/experiment), else the experiment's own last name (a URI's too)."""
    parts = (experiment.rstrip("/") if "://" in experiment else str(Path(experiment).resolve())).split("/")
    return parts[-2] if parts[-1] == "experiment" and parts[-2] else parts[-1]
