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


def test_popularity_baseline_matches_the_published_reference():
    """Most-popular on Toys (counts of everything before the test item) vs ../shared/data/README.md."""
    seqs = [list(map(int, line.split()[1:])) for line in shared_file("Toys_and_Games.txt").open()]
    data = SequenceData.from_sequences(seqs)
    m = evaluate(popularity_scorer(data.test, data.n_items), data.test)
    assert m["HR@10"] == pytest.approx(0.0090, abs=5e-5)
    assert m["HR@20"] == pytest.approx(0.0143, abs=5e-5)
