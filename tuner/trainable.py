"""The Ray Tune function trainable: one trial = one `simdiffrec.train` run.

The driver prepares the dataset once and puts it in Ray's object store; each worker process
fetches it once and keeps it (actors are reused between trials), so no trial reads or
re-prepares the data, and worker nodes need no copy of the file.  After every validation pass a
trial reports its metrics with a checkpoint folder holding

    checkpoint.pt   train()'s resumable checkpoint: a restarted trial continues from it
    model/          the model of that epoch as a simdiffrec model folder (model_folder.save_model)
    reported.json   every row the trial has reported, this one's last (`report_checkpoint`)

so the checkpoint Ray keeps as a trial's best (by valid NDCG@10) is directly the exported model.
The device is `auto`: the GPU Ray assigned (visible as cuda:0), else the CPU.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from simdiffrec.config import SELECT_BY
from simdiffrec.data import SequenceData
from simdiffrec.files import write_atomic
from simdiffrec.model_folder import save_model
from simdiffrec.train import Evaluation, train

from .protocol import BEST, CHECKPOINT_FILE, GPU_SHARE, METRIC, MODEL_DIR, REPORTED
from .spaces import Space


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares, handed to workers through the object store."""

    data: ray.ObjectRef  # the prepared SequenceData
    data_info: dict[str, Any]  # its source and statistics, recorded with each model
    space: Space  # fixed settings and the file to name in errors
    max_epochs: int


def make_trainable(setup: TrialSetup) -> Callable[[dict[str, Any]], None]:
    return tune.with_parameters(run_trial, setup=setup)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    cfg = setup.space.config(params, setup.max_epochs)
    data = fetch_data(setup.data)
    with tempfile.TemporaryDirectory(prefix="simdiffrec-trial-") as work:
        work = Path(work)
        checkpoint = tune.get_checkpoint()
        resume, rows = None, []
        if checkpoint is not None:  # a restarted trial (failure, or a resumed search)
            checkpoint.to_directory(work / "restored")
            resume, rows = work / "restored" / CHECKPOINT_FILE, reported_rows(work / "restored")

        def report(ev: Evaluation) -> None:
            with tempfile.TemporaryDirectory(dir=work) as folder:
                ev.save(Path(folder) / CHECKPOINT_FILE)
                save_model(Path(folder) / MODEL_DIR, ev.model, data.item_ids,
                           metrics={"epoch": ev.epoch, "valid": ev.valid, "data": setup.data_info})
                report_checkpoint(rows, trial_metrics(ev), Path(folder))

        train(cfg, data, report=report, resume=resume, test=False)  # trials select on valid alone


def report_checkpoint(rows: list[dict[str, Any]], metrics: dict[str, Any], folder: Path) -> None:
    """Report `metrics` with the checkpoint in `folder`, which keeps every row the trial has
    reported, this one last (REPORTED; `rows` grows by it).  Ray copies result.json to the
    experiment's folder only now and then, file by file: a driver killed meanwhile can leave it
    behind the checkpoints, or cut off (`recovery.restore_rows` puts the rows back)."""
    rows.append(metrics)
    write_atomic(folder / REPORTED, json.dumps(rows).encode())
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def reported_rows(checkpoint: Path) -> list[dict[str, Any]]:
    """The rows a restored checkpoint kept (REPORTED), [] if it kept none."""
    file = checkpoint / REPORTED
    return json.loads(file.read_text()) if file.is_file() else []


def trial_metrics(ev: Evaluation) -> dict[str, float]:
    """Flat metrics of one evaluation; `epoch` is ASHA's clock.  Ray's progress table shows the
    first four, so the ones that matter come first.  `gpu_share` is the GPU share Ray gave the
    trial (0: a CPU trial), what its hours cost in GPU-hours."""
    return {"epoch": ev.epoch, METRIC: ev.valid[SELECT_BY], BEST: ev.best_valid[SELECT_BY],
            "best_epoch": ev.best_epoch, **{f"valid/{k}": v for k, v in ev.valid.items()},
            **ev.losses, "seconds_per_epoch": ev.seconds_per_epoch,
            GPU_SHARE: ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)}


@functools.lru_cache(maxsize=1)
def fetch_data(ref: ray.ObjectRef) -> SequenceData:
    """The shared dataset, fetched from the object store once per worker process."""
    return ray.get(ref)
