"""Write the demo dataset that ships with the package (`--data demo`): simdiffrec/shipped/demo.txt.

Generated, seeded and deterministic, with a planted sequential pattern that a popularity ranking
cannot see: the items form clusters, each item has three successors in its cluster, and a user
walks from item to successor (the first most often) with some jumps to another cluster and some
popular items drawn regardless of where the user is.  So a sequence model can learn who follows
whom, while counting items finds only the popular ones.

    python bench/make_demo.py            # rewrites the shipped file (a test checks it matches)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simdiffrec.files import write_atomic

SHIPPED = Path(__file__).resolve().parents[1] / "simdiffrec" / "shipped" / "demo.txt"
USERS, CLUSTERS, CLUSTER_SIZE = 1500, 20, 20  # 400 items
LENGTHS = (5, 30)  # a user's number of interactions, uniform, both ends included
SUCCESSOR_P = (0.6, 0.25, 0.15)  # chances of an item's first, second and third successor
FOLLOW, JUMP = 0.8, 0.1  # each step: a successor, a jump to another cluster, else a popular item
ZIPF = 0.6  # item popularity ~ 1 / rank^ZIPF, for the popular draws and the clusters users favour


def demo_sequences(seed: int = 0) -> list[list[int]]:
    """One chronological list of item ids (1..CLUSTERS * CLUSTER_SIZE) per user."""
    rng = np.random.default_rng(seed)
    n_items = CLUSTERS * CLUSTER_SIZE
    cluster_of = np.repeat(np.arange(CLUSTERS), CLUSTER_SIZE)
    successors = np.empty((n_items, len(SUCCESSOR_P)), dtype=np.int64)
    for item in range(n_items):
        mates = np.flatnonzero((cluster_of == cluster_of[item]) & (np.arange(n_items) != item))
        successors[item] = rng.choice(mates, len(SUCCESSOR_P), replace=False)
    popularity = 1.0 / np.arange(1, n_items + 1) ** ZIPF
    popularity = rng.permutation(popularity / popularity.sum())  # popular items in every cluster
    cluster_weight = np.bincount(cluster_of, weights=popularity)

    def enter_cluster(exclude: int | None = None) -> int:
        weight = cluster_weight.copy()
        if exclude is not None:
            weight[exclude] = 0
        cluster = rng.choice(CLUSTERS, p=weight / weight.sum())
        return int(rng.choice(np.flatnonzero(cluster_of == cluster)))

    sequences = []
    for _ in range(USERS):
        item = enter_cluster()
        walk = [item]
        for _ in range(int(rng.integers(LENGTHS[0], LENGTHS[1] + 1)) - 1):
            draw = rng.random()
            if draw < FOLLOW:
                item = int(rng.choice(successors[item], p=SUCCESSOR_P))
            elif draw < FOLLOW + JUMP:
                item = enter_cluster(exclude=int(cluster_of[item]))
            else:
                item = int(rng.choice(n_items, p=popularity))
            walk.append(item)
        sequences.append([i + 1 for i in walk])
    return sequences


def demo_text(seed: int = 0) -> str:
    """The sequences as a sequence file: `user item item ...`, users numbered from 1."""
    return "".join(f"{user} {' '.join(map(str, items))}\n" for user, items in enumerate(demo_sequences(seed), 1))


if __name__ == "__main__":
    write_atomic(SHIPPED, demo_text().encode())
    print(f"{SHIPPED}: {SHIPPED.stat().st_size:,} bytes")
