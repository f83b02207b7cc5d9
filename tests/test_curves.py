"""bench/curves.py: processes of one calibration set share its runs and lose none, and a space
that searches max_len records each run at its own.  Tiny data, two epochs a run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from simdiffrec.config import read_yaml
from simdiffrec.files import locked

from .conftest import synthetic_sequences

spec = importlib.util.spec_from_file_location("curves", Path(__file__).parents[1] / "bench" / "curves.py")
curves = importlib.util.module_from_spec(spec)
sys.modules["curves"] = curves
spec.loader.exec_module(curves)

TINY = {"hidden": 16, "inner": 32, "steps": 50, "k_noise": 3, "k_sample": 2, "batch_size": 32, "kcore": 0,
        "dropout": 0.1, "attn_dropout": 0.1}


@pytest.fixture
def made(tmp_path):
    """A sequence file, and the flags of a set on it with the space `parameters` (points: one per value)."""
    data = tmp_path / "seq.txt"
    sequences = synthetic_sequences(n_users=60, n_items=30, length=12, seed=2)
    data.write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in enumerate(sequences, 1)))

    def flags(name: str, parameter: str, values: list, fixed: dict) -> list[str]:
        space = tmp_path / f"{name}.yaml"
        space.write_text(yaml.safe_dump({
            "parameters": {parameter: {"type": "categorical", "choices": values}}, "fixed": fixed,
            "points_to_evaluate": [{parameter: v} for v in values],
            "asha": {"max_epochs": 2, "grace_period": 1, "reduction_factor": 2}}))
        return ["--data", str(data), "--name", name, "--space", str(space), "--configs", str(len(values)),
                "--seeds", "0", "--epochs", "2", "--work", str(tmp_path / "work" / name), "--out", str(tmp_path / name)]
    return flags


def test_a_run_another_process_holds_is_left_to_it_and_a_later_pass_adds_it(made, tmp_path):
    flags = made("shared", "lr", [1e-3, 2e-3, 3e-3], {**TINY, "max_len": 10})
    with locked(tmp_path / "work" / "shared" / "c00-s0"):  # as a second process training it would
        assert curves.main(flags) == 0
    kept = pd.read_parquet(tmp_path / "shared" / "curves.parquet")
    assert curves.runs_in(kept) == {(1, 0), (2, 0)}
    assert curves.main(flags) == 0
    kept = pd.read_parquet(tmp_path / "shared" / "curves.parquet")
    assert curves.runs_in(kept) == {(0, 0), (1, 0), (2, 0)} and (kept.groupby("config")["epoch"].max() == 2).all()
    assert read_yaml(tmp_path / "shared" / "set.yaml")["runs_done"] == 3


def test_a_space_that_searches_max_len_records_each_run_at_its_own(made, tmp_path):
    """The data is prepared at the longest max_len (10); a run at 4 trains on its cut, where
    before it was refused (the data's max_len and the run's differed)."""
    assert curves.main(made("lengths", "max_len", [4, 10], TINY)) == 0
    assert curves.runs_in(pd.read_parquet(tmp_path / "lengths" / "curves.parquet")) == {(0, 0), (1, 0)}
    assert pd.read_parquet(tmp_path / "lengths" / "configs.parquet")["max_len"].tolist() == [4, 10]


def test_a_later_seed_trains_its_longest_runs_first_and_keeps_each_runs_number():
    recorded = pd.DataFrame({"config": [0, 0, 1, 2, 2], "seed": [0, 0, 0, 0, 0], "seconds": [1.0, 1.0, 9.0, 4.0, 1.0]})
    plan = [(seed, c) for seed in (0, 1) for c in range(4)]
    order = curves.longest_first(plan, recorded)
    # per seed: unknown (config 3) first, then 9, 5 and 2 seconds a run
    assert [run for _, run in order] == [(0, 3), (0, 1), (0, 2), (0, 0), (1, 3), (1, 1), (1, 2), (1, 0)]
    assert sorted(order) == list(enumerate(plan))  # every run once, under its planned number
    assert curves.longest_first(plan, pd.DataFrame()) == list(enumerate(plan))  # nothing recorded: as planned
