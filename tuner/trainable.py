"""The Ray Tune function trainable of a search and of a grid alike: one trial = one
`simdiffrec.train` run.

The driver prepares each dataset once and puts it in Ray's object store; each worker process
fetches it once and keeps it (actors are reused between trials), so no trial reads or
re-prepares the data, and worker nodes need no copy of the file.  After every validation pass a
trial reports its metrics (one row: `trial_metrics`) with a checkpoint folder holding

    checkpoint.pt   train()'s resumable state: a restarted trial continues from it
    model/          a search's trial: the model of that epoch as a simdiffrec model folder
    reported.json   every row the trial has reported, this one's last (`report_checkpoint`)

so the checkpoint Ray keeps as a search trial's best (by valid NDCG@10) is directly the exported
model.  A grid's run (`TrialSetup.final`) trains to its end instead: its last evaluation's row
also holds the test metrics of the best model (also without history masking, RecBole's
protocol), and its checkpoint that model and no train state, so a run restarted after it had
finished reports that row again instead of training on.  The device is `auto`: the GPU Ray
assigned (visible as cuda:0), else the CPU.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from ray import tune

from simdiffrec.config import SELECT_BY, Config
from simdiffrec.data import SequenceData
from simdiffrec.device import resolve_device
from simdiffrec.evaluate import evaluate, scorer
from simdiffrec.files import write_atomic
from simdiffrec.model_folder import save_model
from simdiffrec.train import Evaluation, TrainResult, train

from .protocol import BEST, CHECKPOINT_FILE, GPU_SHARE, METRIC, MODEL_DIR, REPORTED
from .signals import quiet_stops_in_callbacks
from .spaces import Space

UNMASKED = "test_unmasked"  # prefix of a grid run's test metrics without history masking
SEARCHED = "data"  # a search's one dataset


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares, handed to workers through the object store."""

    data: dict[str, ray.ObjectRef]  # dataset name -> its prepared SequenceData
    data_info: dict[str, dict[str, Any]]  # dataset name -> its source and statistics, recorded with each model
    configure: Callable[[dict[str, Any]], tuple[str, Config]]  # a trial's parameters -> its dataset and settings
    final: bool = False  # a grid's run: to its end, then the test metrics (else a search's trial)


def make_trainable(setup: TrialSetup) -> Callable[[dict[str, Any]], None]:
    return tune.with_parameters(run_trial, setup=setup)


def search_setup(data: ray.ObjectRef, data_info: dict[str, Any], space: Space) -> TrialSetup:
    """A search's trials: one dataset, the space's settings for at most its max epochs."""
    return TrialSetup({SEARCHED: data}, {SEARCHED: data_info}, functools.partial(searched, space))


def searched(space: Space, params: dict[str, Any]) -> tuple[str, Config]:
    """A search trial's dataset and settings: the space's with the sampled parameters."""
    return SEARCHED, space.config(params, space.asha.max_epochs)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """One trial: train from the checkpoint Ray restarts it from, if any, reporting each evaluation;
    a grid's run reports its last with the test metrics (`final_metrics`), or again if it had."""
    quiet_stops_in_callbacks()  # Ray's SIGTERM when it ends this actor prints no traceback
    dataset, cfg = setup.configure(params)
    data = fetch_data(setup.data[dataset]).shortened(cfg.max_len)  # a searched max_len: cut from the largest
    with tempfile.TemporaryDirectory(prefix="simdiffrec-trial-") as work:
        work = Path(work)
        restored = restore(work / "restored")
        row = finished_row(restored) if restored else None
        if row is not None:  # finished before the experiment recorded it
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(restored))
            return
        rows = reported_rows(restored) if restored else []
        last: dict[str, Any] = {}  # a grid run's last evaluation's row, reported after train's end

        def report(ev: Evaluation) -> None:
            if setup.final and (ev.stopping or ev.epoch == cfg.epochs):
                last.update(trial_metrics(ev))
                return
            with tempfile.TemporaryDirectory(dir=work) as folder:
                ev.save(Path(folder) / CHECKPOINT_FILE)
                if not setup.final:
                    save_model(Path(folder) / MODEL_DIR, ev.model, data.item_ids,
                               metrics={"epoch": ev.epoch, "valid": ev.valid, "data": setup.data_info[dataset]})
                report_checkpoint(rows, trial_metrics(ev), Path(folder))

        resume = restored / CHECKPOINT_FILE if restored else None
        result = train(cfg, data, report=report, resume=resume, test=setup.final)  # a search selects on valid alone
        if setup.final:
            with tempfile.TemporaryDirectory(dir=work) as folder:
                final = final_metrics(cfg, data, result, Path(folder), setup.data_info[dataset])
                report_checkpoint(rows, {**last, **final}, Path(folder))


def restore(folder: Path) -> Path | None:
    """The checkpoint Ray restarts this trial from (after a failure, or in a resumed search or
    grid), put in `folder`; None for a fresh trial."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    checkpoint.to_directory(folder)
    return folder


def finished_row(checkpoint: Path) -> dict[str, Any] | None:
    """The last row of a finished grid run, whose last checkpoint holds no train state; else None."""
    return None if (checkpoint / CHECKPOINT_FILE).is_file() else reported_rows(checkpoint)[-1]


def final_metrics(cfg: Config, data: SequenceData, result: TrainResult, folder: Path,
                  data_info: dict[str, Any]) -> dict[str, Any]:
    """What a finished run adds to its last row: the best model's valid (`best_valid/`) and test
    metrics (also without history masking), its minutes and whether on a GPU; that model saved
    in `folder`."""
    device = resolve_device(cfg.device)
    with torch.no_grad():
        unmasked = evaluate(scorer(cfg, result.model, device), data.test.to(device), mask_history=False)
    save_model(folder / MODEL_DIR, result.model, data.item_ids,
               metrics={"valid": result.valid, "test": result.test, UNMASKED: unmasked,
                        "best_epoch": result.best_epoch, "data": data_info})
    return {**{f"best_valid/{k}": v for k, v in result.valid.items()},
            **{f"test/{k}": v for k, v in result.test.items()},
            **{f"{UNMASKED}/{k}": v for k, v in unmasked.items()},
            "minutes": result.minutes, "gpu": int(device.type == "cuda")}


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
