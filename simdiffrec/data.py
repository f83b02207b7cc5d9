"""From interaction sequences to the tensors that training and evaluation read.

`SequenceData.from_sequences` takes one chronological item list per user (ids 1..n_items, 0 is
padding) and applies the leave-one-out split: the last item is the test target, the
second-to-last the validation target, the rest is training.  Everything is a tensor so the whole
dataset can live on the GPU and batches are cut by index, with no host work per step.

Getting there from a file or a dataset name is `load_data`: a reader (`readers.py`) or a named
dataset (`datasets.py`) gives a frame of (user, item, time) rows in chronological order per user
(ties keep the file's order), `kcore` filters it, `to_sequences` renumbers the ids and
`SequenceData.from_sequences` splits.  Every problem with the input is a `DataError` that names
the file and line, so a bad file never ends in a pandas traceback.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from . import datasets
from .readers import COLUMNS, DataError, kcore, read_file, refuse_unread_columns

MIN_LENGTH = 3  # one training item, one validation target, one test target


def left_pad(sequences: Sequence[np.ndarray], width: int) -> np.ndarray:
    """Keep the last `width` items of each sequence, right-aligned, zeros on the left."""
    out = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-width:]
        if len(tail):
            out[row, width - len(tail):] = tail
    return out


def _flat(sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(len(sequences) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(s) for s in sequences])
    items = np.concatenate(sequences) if len(sequences) else np.zeros(0, dtype=np.int64)
    return items.astype(np.int64), ptr


@dataclass
class EvalSplit:
    """Inputs, targets and the full history to mask, for one evaluation split.

    Rows are ordered by history length (`users` maps a row back to its user), so that a block
    of rows has similar lengths and evaluation trims most of the padding away.  `history_ptr`
    stays on the CPU: it gives the slice of `history_items` for a block of rows without asking
    the device anything.
    """

    inputs: torch.Tensor  # (U, max_len) left-padded
    targets: torch.Tensor  # (U,)
    history_items: torch.Tensor  # (sum of history lengths,)
    history_ptr: np.ndarray  # (U + 1,) on the host
    users: np.ndarray | None = None  # row -> user row of SequenceData (None: the same order)

    def to(self, device: torch.device | str) -> "EvalSplit":
        return replace(self, inputs=self.inputs.to(device), targets=self.targets.to(device),
                       history_items=self.history_items.to(device))


@dataclass
class SequenceData:
    """A leave-one-out split of user sequences, as tensors (see module docstring)."""

    n_items: int
    max_len: int
    train_input: torch.Tensor  # (U_train, max_len): items[:-3], left-padded
    train_target: torch.Tensor  # (U_train, max_len): items[1:-2], 0 where there is no target
    train_lengths: np.ndarray  # (U_train,) real positions per training row, on the host
    valid: EvalSplit
    test: EvalSplit
    item_ids: np.ndarray | None = None  # index i -> the user's original item id (0 = padding)
    user_ids: np.ndarray | None = None  # row u -> the user's original user id

    @property
    def n_users(self) -> int:
        return int(self.valid.targets.shape[0])

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], n_items: int | None = None,
                       max_len: int = 50, item_ids: np.ndarray | None = None,
                       user_ids: np.ndarray | None = None) -> "SequenceData":
        """Leave-one-out split of chronological sequences with ids in 1..n_items.

        Users with fewer than three items cannot be split and must be removed beforehand
        (k-core filtering with k >= 3 does it); they are rejected here rather than dropped, so
        no data disappears silently.
        """
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
        if not seqs:
            raise ValueError("no user sequences: nothing to train on")
        short = [u for u, s in enumerate(seqs) if len(s) < MIN_LENGTH]
        if short:
            raise ValueError(f"{len(short)} user(s) have fewer than {MIN_LENGTH} interactions "
                             f"(first: row {short[0]}); leave-one-out needs at least {MIN_LENGTH}")
        top = max(int(s.max()) for s in seqs)
        low = min(int(s.min()) for s in seqs)
        if low < 1:
            raise ValueError(f"item ids must be >= 1 (0 is padding), found {low}")
        n_items = top if n_items is None else n_items
        if top > n_items:
            raise ValueError(f"item id {top} exceeds n_items={n_items}")

        train = [s[:-2] for s in seqs]
        trainable = [u for u, t in enumerate(train) if len(t) >= 2]  # users with a training target
        train_input = left_pad([train[u][:-1] for u in trainable], max_len)
        train_target = left_pad([train[u][1:] for u in trainable], max_len)

        order = np.argsort([len(s) for s in seqs], kind="stable")

        def split(target_from_end: int) -> EvalSplit:
            """The split whose target is each user's `target_from_end`-th item from the end."""
            histories = [seqs[u][:len(seqs[u]) - target_from_end] for u in order]
            items, ptr = _flat(histories)
            return EvalSplit(inputs=torch.from_numpy(left_pad(histories, max_len)),
                             targets=torch.from_numpy(np.array([seqs[u][-target_from_end] for u in order])),
                             history_items=torch.from_numpy(items), history_ptr=ptr, users=order)

        return cls(n_items=n_items, max_len=max_len,
                   train_input=torch.from_numpy(train_input),
                   train_target=torch.from_numpy(train_target),
                   train_lengths=np.minimum([len(train[u]) - 1 for u in trainable], max_len).astype(np.int64),
                   valid=split(2), test=split(1), item_ids=item_ids, user_ids=user_ids)

    def shortened(self, max_len: int | None) -> "SequenceData":
        """The same split as if prepared with a shorter `max_len`: each row's last `max_len`
        positions (rows are right-aligned), the masked histories whole; None: as prepared.  A
        search prepares its data once, at the longest max_len it samples, and each trial cuts its
        own from it."""
        if max_len is None:
            return self
        if not 1 <= max_len <= self.max_len:
            raise ValueError(f"max_len={max_len}: must be 1-{self.max_len} (the data was prepared with "
                             f"max_len={self.max_len}: it can be cut, not lengthened)")
        return replace(self, max_len=max_len, train_input=self.train_input[:, -max_len:],
                       train_target=self.train_target[:, -max_len:],
                       train_lengths=np.minimum(self.train_lengths, max_len),
                       valid=replace(self.valid, inputs=self.valid.inputs[:, -max_len:]),
                       test=replace(self.test, inputs=self.test.inputs[:, -max_len:]))

    def to(self, device: torch.device | str) -> "SequenceData":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved.update(train_input=self.train_input.to(device), train_target=self.train_target.to(device),
                     valid=self.valid.to(device), test=self.test.to(device))
        return SequenceData(**moved)


# --- filtering and renumbering ------------------------------------------------------------------

def _encode(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Codes 0..n-1 in the order of the distinct ids (numeric when all are integers, else as
    strings), and those ids."""
    if pd.api.types.infer_dtype(values) != "integer":
        values = values.astype(str)
    codes, uniques = pd.factorize(values, sort=True)
    return codes, np.asarray(uniques)


def to_sequences(df: pd.DataFrame) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Renumber items to 1..n (0 is padding) and users to rows 0..U-1, both in the order of the
    original ids, so data that is already numbered 1..n keeps its numbers.

    Returns (one item array per user, ordered by time with ties in row order; item_ids where
    item_ids[i] is the original id of item i and item_ids[0] a placeholder, 0 or None;
    user_ids where user_ids[row] is the original id of that row's user)."""
    user_codes, user_ids = _encode(df["user"])
    item_codes, item_ids = _encode(df["item"])
    by_time = np.argsort(df["time"].to_numpy(), kind="stable")
    order = by_time[np.argsort(user_codes[by_time], kind="stable")]
    items = item_codes[order].astype(np.int64) + 1
    ptr = np.concatenate([[0], np.cumsum(np.bincount(user_codes, minlength=len(user_ids)))])
    pad = np.array([0 if item_ids.dtype.kind in "iu" else None], dtype=item_ids.dtype)
    return ([items[a:b] for a, b in zip(ptr[:-1], ptr[1:])],
            np.concatenate([pad, item_ids]), user_ids)


def _drop_short(df: pd.DataFrame, k: int, source: object) -> pd.DataFrame:
    """k-core, then drop users too short for leave-one-out, with a warning.  Repeats, since with
    k < MIN_LENGTH dropping a user can take an item below k again."""
    dropped = 0
    while True:
        df = kcore(df, k)
        short = df["user"].map(df["user"].value_counts()) < MIN_LENGTH
        if not short.any():
            break
        dropped += df.loc[short, "user"].nunique()
        df = df[~short]
    if dropped:
        warnings.warn(f"{source}: dropped {dropped} user(s) with fewer than {MIN_LENGTH} "
                      f"interactions (leave-one-out needs {MIN_LENGTH})", stacklevel=3)
    if df.empty:
        raise DataError(f"{source}: nothing left after filtering (k={k})")
    return df


def load_data(source: str | Path, max_len: int | None = None, kcore: int = 5,
              user_col: str = "user_id", item_col: str = "item_id", time_col: str = "timestamp",
              cache_dir: str | Path | None = None, download: bool = True) -> SequenceData:
    """A file (see `read_file`) or a dataset name (see `simdiffrec.datasets`) as leave-one-out
    tensors: read, k-core filter, drop users with fewer than 3 interactions, renumber, split.

    `max_len=None` is the dataset's default (50; 200 for ml-1m).  Named datasets arrive 5-core
    filtered already, so `kcore` only matters there when it is larger than 5."""
    refuse_unread_columns(source, user_col=user_col, item_col=item_col, time_col=time_col)
    name = str(source).lower()
    if Path(source).is_file():
        frame = read_file(source, user_col, item_col, time_col)
        default_len = datasets.DEFAULT_MAX_LEN
    elif name in datasets.NAMES:
        frame = datasets.prepare(name, cache_dir, download)
        default_len = datasets.default_max_len(name)
    else:
        raise DataError(f"{source}: no such file, and not a dataset name either "
                        f"(known: {', '.join(datasets.NAMES)})")
    return frame_to_data(frame, default_len if max_len is None else max_len, kcore, source)


def frame_to_data(frame: pd.DataFrame, max_len: int, kcore: int, source: object) -> SequenceData:
    """(user, item, time) rows as leave-one-out tensors: k-core filter, drop users with fewer
    than 3 interactions, renumber, split (`load_data`'s work after reading; a benchmark's
    user subsample goes through it too)."""
    duplicates = int(frame.duplicated(COLUMNS).sum())
    if duplicates:  # kept (they may be real repeats), but never counted without a word
        warnings.warn(f"{source}: {duplicates:,} exact duplicate interaction row(s) (same user, item and "
                      "time), kept as repeated interactions", stacklevel=3)
    sequences, item_ids, user_ids = to_sequences(_drop_short(frame, kcore, source))
    return SequenceData.from_sequences(sequences, n_items=len(item_ids) - 1, max_len=max_len,
                                       item_ids=item_ids, user_ids=user_ids)


def load_and_describe(source: str | Path, max_len: int | None, kcore: int,
                      **columns: str) -> tuple[SequenceData, dict[str, float]]:
    """`load_data`, then one line of the data's statistics on stderr (what a command shows)."""
    data = load_data(source, max_len=max_len, kcore=kcore, **columns)
    stats = describe(data)
    print(f"data {source}: {stats['users']:,} users, {stats['items']:,} items, {stats['actions']:,} actions, "
          f"avg length {stats['avg_length']:.1f}, max_len {data.max_len}", file=sys.stderr)
    return data, stats


def describe(data: SequenceData) -> dict[str, float]:
    """The paper's Table 1 statistics; actions count every interaction, held-out ones too."""
    users, items = data.n_users, data.n_items
    actions = int(data.test.history_ptr[-1]) + users  # full histories plus the test targets
    return {"users": users, "items": items, "actions": actions,
            "avg_length": actions / users, "sparsity": 1 - actions / (users * items)}


def fingerprint(data: SequenceData) -> dict[str, int | str]:
    """What identifies prepared data: its users, items and actions and a sha256 of every user's
    items in order and of both id maps.  A search records it, so that `--resume` on a file that
    changed since (even to the same counts) is caught."""
    digest = hashlib.sha256()
    test = data.test
    for part in (test.history_items.cpu(), test.targets.cpu(), test.history_ptr, test.users):
        if part is not None:
            digest.update(np.ascontiguousarray(np.asarray(part), dtype=np.int64).tobytes())
    for ids in (data.item_ids, data.user_ids):
        if ids is not None:
            digest.update("\n".join(map(str, ids.tolist())).encode() + b"\0")
    stats = describe(data)
    return {"users": stats["users"], "items": stats["items"], "actions": stats["actions"],
            "sha256": digest.hexdigest()}
