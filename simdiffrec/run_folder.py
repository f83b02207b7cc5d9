"""A training run as a folder, what `simdiffrec train` leaves in OUT:

    config.yaml        every setting (max_len and the k's as the data fixed them)
    checkpoint.pt      train()'s resumable state after each evaluation (`resume` continues it)
    best_checkpoint/   the model at its best valid epoch, a model folder (model_folder.py)
    metrics.json       valid and test of that model, timings, the data, the history

An earlier run in OUT is continued (`resume`) or replaced as a whole (`force`), never half
overwritten: a replacement trains in `OUT/.replacing-*/` and takes the earlier run's place only
once complete, so a failed one leaves the earlier run as it was.  A resume with other settings
is refused before any file changes.  One run at a time: OUT is locked (`files.locked`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from .config import Config, write_yaml
from .data import load_and_describe
from .device import resolve_device
from .files import locked, remove, replace_entries, write_atomic
from .model_folder import save_model
from .train import Evaluation, TrainResult, check_resumable, train

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
BEST_MODEL = "best_checkpoint"
STAGE = ".replacing-"  # OUT/.replacing-*/: a --force run until it is complete


def train_into(out: Path, cfg: Config, source: str | Path, columns: dict[str, str], resume: bool = False,
               force: bool = False, progress: bool = False) -> TrainResult:
    """Load `source`, train `cfg` on it into OUT (a line per evaluation) and write the folder's
    files; return train()'s result.  OUT is locked for the run's life: a second run into it is
    refused before anything in it is read or written."""
    resolve_device(cfg.device)  # a wrong device is refused before the data loads
    with locked(out):
        earlier = [p.name for p in (out / CHECKPOINT, out / METRICS) if p.exists()]
        if earlier and not (resume or force):
            raise ValueError(f"{out} already holds a run ({', '.join(earlier)}): continue it with --resume, "
                             "replace it with --force, or choose another --out")
        for stale in out.glob(f"{STAGE}*"):  # a replacement killed before its end
            remove(stale)
        if resume or not earlier:
            return _train(out, out, cfg, source, columns, resume, progress)
        stage = Path(tempfile.mkdtemp(dir=out, prefix=STAGE))  # --force: the earlier run stays until this one is done
        try:
            result = _train(stage, out, cfg, source, columns, False, progress)
            replace_entries(stage, out, (CONFIG, CHECKPOINT, BEST_MODEL, METRICS))
            return result
        finally:
            remove(stage)


def _train(folder: Path, out: Path, cfg: Config, source: str | Path, columns: dict[str, str], resume: bool,
           progress: bool) -> TrainResult:
    """Train into `folder` (OUT itself, or a stage inside it; errors name OUT's files)."""
    checkpoint = folder / CHECKPOINT
    data, stats = load_and_describe(source, max_len=cfg.max_len, kcore=cfg.kcore, **columns)
    cfg = cfg.replace(max_len=data.max_len).for_items(data.n_items)
    restart = checkpoint if resume and checkpoint.is_file() else None
    if resume and restart is None:
        print(f"no checkpoint at {out / CHECKPOINT}: starting from scratch", file=sys.stderr)
    if restart is not None:
        check_resumable(restart, cfg, data.n_items)  # before config.yaml is rewritten
    write_yaml(folder / CONFIG, cfg.to_dict())

    def report(ev: Evaluation) -> None:
        parts = "  ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in ev.losses.items())
        tqdm.write(f"epoch {ev.epoch:4d}  {parts}"
                   + f"  valid HR@10 {ev.valid['HR@10']:.4f} NDCG@10 {ev.valid['NDCG@10']:.4f}"
                   + f"  best epoch {ev.best_epoch}  {ev.seconds_per_epoch:.1f} s/epoch")
        ev.save(checkpoint)

    result = train(cfg, data, report=report, resume=restart, progress=progress)
    metrics = {"valid": result.valid, "test": result.test, "best_epoch": result.best_epoch,
               "seconds_per_epoch": result.seconds_per_epoch, "eval_seconds": result.eval_seconds,
               "minutes": result.minutes, "data": {"source": str(source), **stats},
               "history": result.history}
    save_model(folder / BEST_MODEL, result.model, data.item_ids,
               metrics={k: metrics[k] for k in ("valid", "test", "best_epoch")})
    write_atomic(folder / METRICS, json.dumps(metrics, indent=2).encode())
    return result
