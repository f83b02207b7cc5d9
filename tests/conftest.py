from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from simdiffrec.data import SequenceData

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# One thread a process (this one, the commands it starts, Ray's workers) unless told otherwise:
# torch's default of every core collapses when the suite's own processes or other jobs share them
# (BENCHMARKS.md, "CPU threads on a shared machine"; the Toys test took 295 s with it beside two
# training runs, 43 s with one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    return path


def synthetic_sequences(n_users: int = 120, n_items: int = 30, length: int = 12, seed: int = 0) -> list[list[int]]:
    """Users walk the items in order (i -> i+1, wrapping) from random starts: a learnable pattern."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        start = int(rng.integers(n_items))
        n = int(rng.integers(4, length + 1))
        out.append([(start + j) % n_items + 1 for j in range(n)])
    return out


@pytest.fixture
def tiny_data() -> SequenceData:
    torch.manual_seed(0)
    return SequenceData.from_sequences(synthetic_sequences(), max_len=10)
