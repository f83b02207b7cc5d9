"""Full-ranking evaluation: every item is a candidate, the user's history is masked.

The target's rank is the number of other candidates scored at least as high: a tie counts
against the target, so a model can never gain from a tie (a constant scorer ranks every target
last).  A score that is not finite counts as above the target, and a target whose own score is
not finite is a miss, so a diverged model scores zero, never perfect.  Items the user already
interacted with are removed from the candidates, except the target itself (repeat purchases
exist in the Amazon data and must stay findable).  `mask_history=False` keeps them, as RecBole
(on which the paper's numbers were computed) does for sequential models.  Metrics are summed on
the device and read once at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .config import Config
from .data import EvalSplit
from .device import autocast

if TYPE_CHECKING:
    from .model import SimDiffRec

Scorer = Callable[[torch.Tensor], torch.Tensor]  # (b, w) left-padded inputs -> (b, n_items) scores
KS = (5, 10, 20)


def block_rows(device: torch.device) -> int:
    """Users scored at once.  On the CPU small blocks are 2.5-3× faster (bench/eval_blocks.py:
    rows are ordered by history length, so a small block trims more padding, and its score
    matrix stays in cache); on an accelerator a large block asks the device fewer times."""
    return 256 if device.type == "cpu" else 4096


def block_width(lengths: np.ndarray, max_len: int) -> int:
    """Positions a block of rows with these history lengths is trimmed to: its longest, at least one."""
    return int(min(max_len, max(1, lengths.max())))


def metric_names(ks: tuple[int, ...] = KS) -> list[str]:
    return [f"{m}@{k}" for m in ("HR", "NDCG") for k in ks] + ["MRR"]


def target_ranks(score: Scorer, split: EvalSplit, batch_size: int | None = None,
                 mask_history: bool = True) -> torch.Tensor:
    """0-based rank of each user's target among all items (not in their history, unless
    `mask_history` is False), on the device; `batch_size` users at a time (default `block_rows`)."""
    n_users, max_len = split.inputs.shape
    device = split.inputs.device
    batch_size = batch_size or block_rows(device)
    lengths = np.diff(split.history_ptr)
    ranks = []
    for start in range(0, n_users, batch_size):
        stop = min(start + batch_size, n_users)
        width = block_width(lengths[start:stop], max_len)
        scores = score(split.inputs[start:stop, max_len - width:]).float()
        targets = (split.targets[start:stop] - 1)[:, None]
        target_scores = scores.gather(1, targets)
        ahead = (scores >= target_scores) | ~scores.isfinite()  # ties and NaN/inf count against
        if mask_history:
            lo, hi = split.history_ptr[start], split.history_ptr[stop]
            rows = torch.repeat_interleave(torch.arange(stop - start, device=device),
                                           torch.from_numpy(lengths[start:stop]).to(device),
                                           output_size=int(hi - lo))  # known here: no device sync
            ahead[rows, split.history_items[lo:hi] - 1] = False
        ahead.scatter_(1, targets, False)  # the target is not ahead of itself
        rank = ahead.sum(1)
        ranks.append(torch.where(target_scores[:, 0].isfinite(), rank, scores.shape[1]))
    return torch.cat(ranks)


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """HR@k, NDCG@k (one relevant item: 1/log2(rank+2) inside the top k) and MRR."""
    ranks = ranks.double()
    gains = 1.0 / torch.log2(ranks + 2)
    values = [(ranks < k).double().mean() for k in ks]
    values += [torch.where(ranks < k, gains, 0.0).mean() for k in ks]
    values.append((1.0 / (ranks + 1)).mean())
    return dict(zip(metric_names(ks), torch.stack(values).tolist()))


def evaluate(score: Scorer, split: EvalSplit, ks: tuple[int, ...] = KS, batch_size: int | None = None,
             mask_history: bool = True) -> dict[str, float]:
    return metrics_from_ranks(target_ranks(score, split, batch_size, mask_history), ks)


def scorer(cfg: Config, model: "SimDiffRec", device: torch.device) -> Scorer:
    """The model's full-ranking scores, the same for every evaluation (training's, `simdiffrec
    evaluate`'s, the benchmark's): the encoder under training's autocast, the product with the
    item table in fp32, because bf16 scores tie often (most test targets on Beauty) and a tie
    must be decided by the model, not by rounding."""
    def score(seq: torch.Tensor) -> torch.Tensor:
        with autocast(cfg, device):
            return model.item_logits(model.represent(seq), fp32=True)

    return score


def popularity_scorer(split: EvalSplit, n_items: int) -> Scorer:
    """The most-popular baseline: every user gets the item counts of all histories of `split`
    (everything that happened before that split's targets) as scores."""
    counts = torch.bincount(split.history_items, minlength=n_items + 1)[1:].float()
    return lambda inputs: counts.expand(inputs.shape[0], -1).clone()
