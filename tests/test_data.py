"""The file readers, k-core, renumbering and `load_data`, on tiny files and the real benchmarks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simdiffrec.data import SequenceData, describe, load_data, to_sequences
from simdiffrec.readers import DataError, kcore, read_file, read_inter, read_sequence_file, read_table

from .conftest import shared_file, synthetic_sequences


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def rows(df: pd.DataFrame) -> list[tuple]:
    return list(df[["user", "item", "time"]].itertuples(index=False, name=None))


def grid_rows(n_users: int, n_items: int) -> list[tuple[int, int, int]]:
    """Every user rates every item, user u's items in order (u + j) % n_items at times j."""
    return [(u, (u + j) % n_items + 1, j) for u in range(1, n_users + 1) for j in range(n_items)]


# --- sequence file --------------------------------------------------------------------------

def test_sequence_file_keeps_line_order_and_positions(tmp_path):
    df = read_sequence_file(write(tmp_path / "s.txt", "7 3 1 2\n\n2 5 3\n"))
    assert rows(df) == [(7, 3, 0), (7, 1, 1), (7, 2, 2), (2, 5, 0), (2, 3, 1)]


@pytest.mark.parametrize("text, expected", [
    ("", "empty file"),
    ("\n  \n", "empty file"),
    ("1 2 3\n4\n", ":2: user 4 has no items"),
    ("1 2 3\n4 5 x6\n", ":2: 'x6' is not an integer id"),
    ("1 2 3\n1 4 5\n", ":2: user 1 already has a line (line 1)"),
])
def test_sequence_file_errors_name_file_and_line(tmp_path, text, expected):
    path = write(tmp_path / "bad.txt", text)
    with pytest.raises(DataError, match=str(path)) as err:
        read_sequence_file(path)
    assert expected in str(err.value)


# --- RecBole .inter -------------------------------------------------------------------------

def test_inter_finds_columns_by_name_and_sorts_stably_by_time(tmp_path):
    path = write(tmp_path / "x.inter",
                 "item_id:token\trating:float\tuser_id:token\ttimestamp:float\n"
                 "10\t4\t1\t300\n11\t3\t2\t100\n12\t5\t1\t100\n13\t1\t1\t100\n")
    assert rows(read_inter(path)) == [(2, 11, 100), (1, 12, 100), (1, 13, 100), (1, 10, 300)]


def test_inter_ids_become_integers_only_when_all_are_plain_integers(tmp_path):
    header = "user_id:token\titem_id:token\ttimestamp:float\n"
    df = read_inter(write(tmp_path / "a.inter", header + "u1\t007\t1\nu2\t7\t2\n"))
    assert df["user"].tolist() == ["u1", "u2"] and df["item"].tolist() == ["007", "7"]
    assert read_inter(write(tmp_path / "b.inter", header + "5\t7\t1\n"))["item"].dtype == np.int64


@pytest.mark.parametrize("text, expected", [
    ("", "empty file"),
    ("user_id:token\titem:token\ttimestamp:float\n1\t2\t3\n",
     "no item_id column in header 'user_id:token\\titem:token\\ttimestamp:float'"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\n", ":3: expected 3 tab-separated"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n\n1\t2\tsoon\n", ":4: time 'soon' is not a number"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t\t3\n", ":2: no value for item_id"),
    ("user_id:token\titem_id:token\ttimestamp:float\n", "no interactions"),
])
def test_inter_errors_name_file_and_line(tmp_path, text, expected):
    path = write(tmp_path / "bad.inter", text)
    with pytest.raises(DataError, match=str(path)) as err:
        read_inter(path)
    assert expected in str(err.value)


# --- CSV and Parquet tables ------------------------------------------------------------------

def test_csv_with_date_strings_and_custom_columns(tmp_path):
    path = write(tmp_path / "t.csv", "who,what,when,extra\n"
                 "b,x,2020-01-02,1\na,y,2020-01-01,2\nb,z,2020-01-01,3\nb,w,2020-01-02,4\n")
    df = read_table(path, "who", "what", "when")
    assert [r[:2] for r in rows(df)] == [("a", "y"), ("b", "z"), ("b", "x"), ("b", "w")]
    assert pd.api.types.is_datetime64_any_dtype(df["time"])


def test_parquet_round_trip_sorts_by_numeric_time(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"user_id": [1, 1, 2], "item_id": ["b", "a", "c"],
                  "timestamp": [5.0, 1.0, 3.0]}).to_parquet(path)
    assert rows(read_table(path)) == [(1, "a", 1.0), (2, "c", 3.0), (1, "b", 5.0)]


@pytest.mark.parametrize("text, expected", [
    ("user_id,item\n1,2\n", "no column 'item_id', 'timestamp'; available: 'user_id', 'item'"),
    ("user_id,item_id,timestamp\n1,2,3\n1,,4\n", ":3: no value for item_id"),
    ("user_id,item_id,timestamp\n1,2,3\n1,3,later\n", ":3: time 'later' is not a number"),
    ("user_id,item_id,timestamp\n1,2,2020-01-01\n1,3,soon\n", ":3: time 'soon' is not a date"),
    ("user_id,item_id,timestamp\n", "no interactions"),
    ("", "cannot read"),
])
def test_csv_errors_name_file_and_line(tmp_path, text, expected):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError, match=str(path)) as err:
        read_table(path)
    assert expected in str(err.value)


def test_parquet_null_names_the_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"user_id": [1, None], "item_id": [1, 2], "timestamp": [1, 2]}).to_parquet(path)
    with pytest.raises(DataError, match=f"{path}: row 1 .*no value for user_id"):
        read_table(path)


def test_read_file_rejects_unknown_suffix(tmp_path):
    path = write(tmp_path / "x.json", "{}")
    with pytest.raises(DataError, match=f"{path}: unknown file type '.json'"):
        read_file(path)


# --- k-core and renumbering ----------------------------------------------------------------

def test_kcore_repeats_until_stable():
    # Items b and d occur once; dropping them leaves users 1 and 3 with one item, and dropping
    # those users leaves items a and c once: the chain collapses to the 2x2 block of users 4, 5.
    chain = [(1, "a"), (1, "b"), (2, "a"), (2, "c"), (3, "c"), (3, "d")]
    block = [(4, "e"), (4, "f"), (5, "e"), (5, "f")]
    df = pd.DataFrame([(u, i, t) for t, (u, i) in enumerate(chain + block)], columns=["user", "item", "time"])
    assert [r[:2] for r in rows(kcore(df, 2))] == block
    assert len(kcore(df, 0)) == len(kcore(df, 1)) == len(df)


def test_to_sequences_orders_ids_and_round_trips():
    df = pd.DataFrame({"user": ["u2", "u1", "u2", "u2", "u1"], "item": ["10", "9", "9", "b", "10"],
                       "time": [3, 1, 1, 3, 2]})
    sequences, item_ids, user_ids = to_sequences(df)
    assert item_ids.tolist() == [None, "10", "9", "b"]  # text ids order as text
    assert user_ids.tolist() == ["u1", "u2"]
    restored = [item_ids[s].tolist() for s in sequences]
    assert restored == [["9", "10"], ["9", "10", "b"]]  # by time, ties in row order


def test_to_sequences_orders_integer_ids_numerically():
    df = pd.DataFrame({"user": [10, 9, 9], "item": [10, 9, 100], "time": [0, 0, 1]})
    sequences, item_ids, user_ids = to_sequences(df)
    assert item_ids.tolist() == [0, 9, 10, 100] and user_ids.tolist() == [9, 10]
    assert [s.tolist() for s in sequences] == [[1, 3], [2]]


# --- load_data end to end -------------------------------------------------------------------

def write_every_format(tmp_path: Path, table: list[tuple[int, int, int]]) -> list[Path]:
    frame = pd.DataFrame(table, columns=["user_id", "item_id", "timestamp"])
    txt = tmp_path / "d.txt"
    txt.write_text("".join(f"{u} {' '.join(map(str, g['item_id']))}\n"
                           for u, g in frame.groupby("user_id", sort=False)))
    inter = tmp_path / "d.inter"
    frame.sample(frac=1, random_state=0).to_csv(
        inter, sep="\t", index=False, header=["user_id:token", "item_id:token", "timestamp:float"])
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    return [txt, inter, tmp_path / "d.csv", tmp_path / "d.parquet"]


@pytest.mark.parametrize("index", range(4))
def test_load_data_end_to_end_on_every_format(tmp_path, index):
    table = grid_rows(6, 5)
    path = write_every_format(tmp_path, table)[index]
    data = load_data(path)
    assert (data.n_users, data.n_items, data.max_len) == (6, 5, 50)
    last = {u: i for u, i, _ in table}  # the last item of each user is the test target
    assert data.item_ids[data.test.targets.numpy()].tolist() == [last[u] for u in data.user_ids]
    assert describe(data) == {"users": 6, "items": 5, "actions": 30, "avg_length": 5.0,
                              "sparsity": 0.0}


def test_load_data_drops_short_users_with_a_warning(tmp_path):
    path = write(tmp_path / "s.txt", "1 1 2 3\n2 1 2\n3 3\n")
    with pytest.warns(UserWarning, match="dropped 2 user"):
        data = load_data(path, kcore=0, max_len=4)
    assert (data.n_users, data.n_items, data.max_len) == (1, 3, 4)


def test_load_data_refilters_items_after_dropping_short_users(tmp_path):
    # With k=2, user 2 has two items and must go; that leaves item 4 once, so it goes too.
    path = write(tmp_path / "s.txt", "1 1 2 3 4\n2 4 1\n3 1 2 3\n")
    with pytest.warns(UserWarning):
        data = load_data(path, kcore=2)
    assert data.n_items == 3 and data.item_ids.tolist() == [0, 1, 2, 3]


def test_load_data_errors_when_nothing_is_left(tmp_path):
    path = write(tmp_path / "s.txt", "1 1 2 3\n2 4 5 6\n")
    with pytest.raises(DataError, match=r"nothing left after filtering \(k=5\)"):
        load_data(path)


def test_load_data_names_a_missing_source(tmp_path):
    with pytest.raises(DataError) as err:
        load_data(tmp_path / "nowhere.csv")
    assert str(tmp_path / "nowhere.csv") in str(err.value) and "beauty" in str(err.value)


# --- the real benchmark files --------------------------------------------------------------

@pytest.mark.parametrize("name, counts", [
    ("Beauty.txt", (22363, 12101, 198502)),
    ("Toys_and_Games.txt", (19412, 11924, 167597)),
])
def test_real_benchmarks_match_table_1(name, counts):
    path = shared_file(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already 5-core: nothing may be dropped
        data = load_data(path)
    stats = describe(data)
    assert (stats["users"], stats["items"], stats["actions"]) == counts
    # ids 1..n are kept, and each user's last item is the test target
    assert data.item_ids.tolist() == list(range(counts[1] + 1))
    first = [int(t) for t in path.read_text().split("\n", 1)[0].split()]
    row = int(np.flatnonzero(data.test.users == 0)[0])  # evaluation rows are sorted by length
    lo, hi = data.test.history_ptr[row], data.test.history_ptr[row + 1]
    assert data.user_ids[0] == first[0] and int(data.test.targets[row]) == first[-1]
    assert data.test.history_items[lo:hi].tolist() == first[1:-1]


def test_exact_duplicate_rows_are_counted_with_a_warning(tmp_path):
    path = tmp_path / "dup.csv"
    rows = [f"u{u},i{i},{t}" for u, seq in enumerate(synthetic_sequences(n_users=20)) for t, i in enumerate(seq)]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows + rows[:3]) + "\n")
    with pytest.warns(UserWarning, match="3 exact duplicate interaction row"):
        load_data(path, kcore=0)


def test_data_cut_to_a_shorter_max_len_is_the_data_prepared_at_it():
    """A search prepares its data once, at the longest max_len it samples; a trial's cut must be
    what preparing at its own max_len gives, tensor for tensor."""
    sequences = synthetic_sequences(n_users=40, n_items=30, length=12, seed=3)
    long = SequenceData.from_sequences(sequences, max_len=10)
    for max_len in (1, 4, 10):
        cut, made = long.shortened(max_len), SequenceData.from_sequences(sequences, max_len=max_len)
        assert cut.max_len == made.max_len == max_len
        for name in ("train_input", "train_target"):
            assert getattr(cut, name).equal(getattr(made, name))
        assert np.array_equal(cut.train_lengths, made.train_lengths)
        for split in ("valid", "test"):
            a, b = getattr(cut, split), getattr(made, split)
            assert a.inputs.equal(b.inputs) and a.targets.equal(b.targets) and a.history_items.equal(b.history_items)
            assert np.array_equal(a.history_ptr, b.history_ptr) and np.array_equal(a.users, b.users)
    assert long.shortened(None) is long  # no max_len of its own: the data as prepared
    for max_len in (0, 11):
        with pytest.raises(ValueError, match=rf"max_len={max_len}: must be 1-10 \(the data was prepared with "
                                             r"max_len=10: it can be cut, not lengthened\)"):
            long.shortened(max_len)
