"""What a running search or grid prints: one line per trial evaluation, instead of Ray's boxes.

    trial #3 a1b2c3d4 epoch 12: valid/NDCG@10 0.0612 (its best 0.0630 at epoch 9), ~4:10 to its cap
    trial #3 a1b2c3d4 finished: valid/NDCG@10 0.0630, test/NDCG@10 0.0588 (epoch 9 of 19)
    trial #5 e5f6a7b8 failed: ValueError: loss became nan at epoch 2 ...

Ray runs with `verbose=0` (no config, result or status boxes, no "Current best trial" that ranks
by the last epoch rather than the best); the lines carry no terminal codes, so a log file reads
as the terminal did.  The ETA is the trial's own: its epochs left to the cap at its pace so far.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from ray import tune

from .protocol import BEST, METRIC


class EvaluationLines(tune.Callback):
    """One line per reported evaluation, one per finished or failed trial (`max_epochs`: the cap
    the ETA counts to)."""

    def __init__(self, max_epochs: int) -> None:
        self.max_epochs = max_epochs

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        print(line(trial, result, self.max_epochs), flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = [line for line in str(trial.get_error() or "").splitlines() if line.strip()]
        print(f"{name(trial)} failed: {error[-1].strip() if error else 'see its error.txt'}", flush=True)


def name(trial: Any) -> str:
    """`trial #N ID`, N the order the searcher proposed it in (as `status` numbers trials)."""
    return f"trial #{trial.experiment_tag.split('_')[0]} {trial.trial_id}"


def line(trial: Any, result: dict[str, Any], max_epochs: int) -> str:
    """A trial's report as one line: an evaluation, or a grid run's last, which holds its test metrics."""
    epoch = int(result["epoch"])
    if "test/NDCG@10" in result:
        return (f"{name(trial)} finished: {METRIC} {result[BEST]:.4f}, test/NDCG@10 "
                f"{result['test/NDCG@10']:.4f} (epoch {result['best_epoch']} of {epoch})")
    left = max(max_epochs - epoch, 0) * result.get("seconds_per_epoch", math.nan)
    eta = f", ~{datetime.timedelta(seconds=round(left))} to its cap" if math.isfinite(left) else ""
    return (f"{name(trial)} epoch {epoch}: {METRIC} {result[METRIC]:.4f} (its best {result.get(BEST, math.nan):.4f}"
            f" at epoch {result.get('best_epoch')}){eta}")
