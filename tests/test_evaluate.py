from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simdiffrec.data import EvalSplit, SequenceData
from simdiffrec.evaluate import evaluate, metrics_from_ranks, popularity_scorer, target_ranks

from .conftest import shared_file


def split_of(inputs: list[list[int]], targets: list[int], histories: list[list[int]]) -> EvalSplit:
    width = max(len(x) for x in inputs)
    seq = torch.zeros(len(inputs), width, dtype=torch.long)
    for r, x in enumerate(inputs):
        seq[r, width - len(x):] = torch.tensor(x)
    ptr = np.cumsum([0] + [len(h) for h in histories])
    return EvalSplit(seq, torch.tensor(targets), torch.tensor([i for h in histories for i in h]), ptr)


def test_metrics_equal_hand_computed_values():
    ranks = torch.tensor([0, 1, 4, 9, 30])
    m = metrics_from_ranks(ranks)
    assert m["HR@5"] == pytest.approx(3 / 5)
    assert m["HR@10"] == pytest.approx(4 / 5)
    assert m["HR@20"] == pytest.approx(4 / 5)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 10 + 1 / 31) / 5)


def test_history_is_masked_but_never_the_target():
    # Six items; scores prefer high ids: item 6 > 5 > ... > 1.
    scores = lambda x: torch.arange(1, 7, dtype=torch.float).expand(x.shape[0], -1).clone()  # noqa: E731
    split = split_of(inputs=[[6, 5], [1], [4, 2]], targets=[3, 6, 4],
                     histories=[[6, 5], [1], [4, 2]])
    # user 0: 6 and 5 masked -> 4 beats 3 -> rank 1; user 1: 6 is best -> rank 0;
    # user 2: target 4 is in the history (a repeat) and stays: 6, 5 beat it -> rank 2
    assert target_ranks(scores, split, batch_size=2).tolist() == [1, 0, 2]


def test_without_history_masking_history_items_compete_as_in_recbole():
    scores = lambda x: torch.arange(1, 7, dtype=torch.float).expand(x.shape[0], -1).clone()  # noqa: E731
    split = split_of(inputs=[[6, 5], [1], [4, 2]], targets=[3, 6, 4], histories=[[6, 5], [1], [4, 2]])
    # user 0: 6, 5, 4 beat 3 -> rank 3; user 1: rank 0; user 2: 6, 5 beat 4 -> rank 2
    assert target_ranks(scores, split, batch_size=2, mask_history=False).tolist() == [3, 0, 2]
    assert evaluate(scores, split, mask_history=False)["HR@5"] == 1.0


def test_every_block_size_ranks_as_one_block():
    """Users are scored in blocks (on the CPU 256 at a time, trimmed to each block's longest
    history): a block's edges and width never change a rank, nor which history is masked."""
    rng = np.random.default_rng(0)
    n_items, n_users = 40, 600
    lengths = np.sort(rng.integers(1, 12, n_users))  # rows ordered by history length, as EvalSplit's
    histories = [rng.choice(np.arange(1, n_items + 1), size=n, replace=False).tolist() for n in lengths]
    split = split_of(histories, rng.integers(1, n_items + 1, n_users).tolist(), histories)
    table = torch.from_numpy(rng.permutation((n_items + 1) * n_items).reshape(n_items + 1, n_items)).float()
    table[0] = 0  # padding
    by_history = lambda x: table[x].sum(1)  # noqa: E731  (integers: the sums are exact)
    whole = target_ranks(by_history, split, batch_size=n_users)
    assert len(set(whole.tolist())) > 10  # not a degenerate scorer
    for rows in (None, 7, 256, 599):
        assert torch.equal(target_ranks(by_history, split, batch_size=rows), whole), rows


def test_popularity_baseline_matches_the_published_reference():
    """Most-popular on Toys (counts of everything before the test item) vs ../shared/data/README.md."""
    seqs = [list(map(int, line.split()[1:])) for line in shared_file("Toys_and_Games.txt").open()]
    data = SequenceData.from_sequences(seqs)
    m = evaluate(popularity_scorer(data.test, data.n_items), data.test)
    assert m["HR@10"] == pytest.approx(0.0090, abs=5e-5)
    assert m["HR@20"] == pytest.approx(0.0143, abs=5e-5)


def test_ties_never_favour_the_target():
    """A scorer that gives every item the same score is no better than chance (here: ranks last)."""
    constant = lambda x: torch.zeros(x.shape[0], 50)  # noqa: E731
    split = split_of(inputs=[[1], [2, 3], [4]], targets=[7, 8, 9], histories=[[1], [2, 3], [4]])
    m = evaluate(constant, split)
    candidates = 50 - 2  # the fewest unmasked candidates of any user
    assert m["HR@10"] <= 10 / candidates and m["HR@10"] == 0.0
    # one tie with a single other item: rank 1, not 0
    tied = lambda x: torch.tensor([[5.0, 5.0, 1.0]]).expand(x.shape[0], -1).clone()  # noqa: E731
    assert target_ranks(tied, split_of([[3]], [1], [[3]])).tolist() == [1]


def test_a_nan_or_inf_score_never_gets_a_good_rank():
    nan = lambda x: torch.full((x.shape[0], 6), float("nan"))  # noqa: E731
    split = split_of(inputs=[[1], [2]], targets=[3, 4], histories=[[1], [2]])
    assert target_ranks(nan, split).tolist() == [6, 6]  # target not finite: a miss
    assert evaluate(nan, split)["HR@5"] == 0.0  # (rank 6 = after all 6 items)

    def some_inf(x):  # the target finite and best, but one other item +inf and one NaN
        s = torch.arange(6, dtype=torch.float).expand(x.shape[0], -1).clone()
        s[:, 5] = 10.0  # item 6: the target
        s[:, 0], s[:, 1] = float("inf"), float("nan")
        return s

    assert target_ranks(some_inf, split_of([[3]], [6], [[3]])).tolist() == [2]
    # a non-finite score of a history item is masked like any history item
    assert target_ranks(some_inf, split_of([[1, 2]], [6], [[1, 2]])).tolist() == [0]


def test_the_scorer_takes_the_item_table_product_in_fp32(monkeypatch, tiny_data):
    """Under bf16 autocast (CUDA's, here the CPU's) the encoder may run in bf16, the scores not."""

    from simdiffrec import evaluate as ev
    from simdiffrec.config import Config
    from simdiffrec.model import SimDiffRec

    cfg = Config(hidden=16, inner=32)
    model = SimDiffRec(cfg, tiny_data.n_items, tiny_data.max_len).eval()
    monkeypatch.setattr(ev, "autocast", lambda cfg, device: torch.autocast("cpu", dtype=torch.bfloat16))
    seq = tiny_data.valid.inputs[:8]
    scores = ev.scorer(cfg, model, torch.device("cpu"))(seq)
    assert scores.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.represent(seq)
    assert torch.equal(scores, model.item_logits(h.float()))
