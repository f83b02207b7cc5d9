"""Interaction files as (user, item, time) rows, chronological within each user, and k-core.

Every reader returns a frame with the columns `COLUMNS`; every problem with a file is a
`DataError` that names the file and line, so a bad file never ends in a pandas traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

COLUMNS = ["user", "item", "time"]
TABLE_COLUMNS = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp"}  # a table's, by default
# An id written as a plain integer that fits in int64.  Leading zeros do not count, so "007"
# stays text and can never merge with "7".
_INTEGER = r"-?(?:0|[1-9][0-9]{0,17})"


class DataError(ValueError):
    """Bad input data; the message names the file, the line where one applies, and the fault."""


# --- readers: file -> (user, item, time) rows, chronological within each user ----------------

def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from err


def _parse_int(token: str, where: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DataError(f"{where}: {token!r} is not an integer id") from None


def read_sequence_file(path: str | Path) -> pd.DataFrame:
    """Read `user_id item item ...` lines, already chronological; `time` is the 0-based position
    of the item in its line.  Blank lines are skipped."""
    path = Path(path)
    users: list[int] = []
    items: list[int] = []
    times: list[int] = []
    first_line: dict[int, int] = {}
    for lineno, line in enumerate(_read_lines(path), 1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path}:{lineno}"
        user, *seq = [_parse_int(token, where) for token in tokens]
        if not seq:
            raise DataError(f"{where}: user {user} has no items")
        if user in first_line:
            raise DataError(f"{where}: user {user} already has a line (line {first_line[user]})")
        first_line[user] = lineno
        users.extend([user] * len(seq))
        items.extend(seq)
        times.extend(range(len(seq)))
    if not users:
        raise DataError(f"{path}: empty file, expected lines of 'user_id item item ...'")
    return pd.DataFrame({"user": users, "item": items, "time": times})


def _as_ids(values: pd.Series) -> pd.Series:
    """Integers when every id is written as a plain integer, else the text as read."""
    if pd.api.types.infer_dtype(values) == "string" and values.str.fullmatch(_INTEGER).all():
        return values.astype(np.int64)
    return values


def _parse_time(values: pd.Series, where: Callable[[int], str], dates: bool) -> pd.Series:
    """Numbers as numbers; with `dates`, a column where no value is a number as dates.  Names
    the first value that does not fit."""
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_any_dtype(values):
        return values
    parsed, expected = pd.to_numeric(values, errors="coerce"), "a number"
    if dates and parsed.isna().all():
        parsed, expected = pd.to_datetime(values, errors="coerce"), "a date"
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if bad.size:
        raise DataError(f"{where(int(bad[0]))}: time {values.iloc[bad[0]]!r} is not {expected}")
    return parsed


def _tidy(frame: pd.DataFrame, names: Sequence[str], where: Callable[[int], str],
          dates: bool) -> pd.DataFrame:
    """Reject gaps, type ids and times, sort by time.  `frame` has COLUMNS, which the file
    calls `names`; `where(row)` locates a row in the file for error messages.

    A stable sort keeps the file's order among equal times, as S3-Rec's preprocessing does."""
    gaps = frame[COLUMNS].isna().to_numpy()
    if gaps.any():
        row = int(np.flatnonzero(gaps.any(axis=1))[0])
        missing = [name for name, gap in zip(names, gaps[row]) if gap]
        raise DataError(f"{where(row)}: no value for {', '.join(missing)}")
    frame = frame.assign(user=_as_ids(frame["user"]), item=_as_ids(frame["item"]),
                         time=_parse_time(frame["time"], where, dates))
    return frame.sort_values("time", kind="stable", ignore_index=True)


def read_inter(path: str | Path) -> pd.DataFrame:
    """Read a RecBole atomic `.inter` file: tab-separated, header fields `name:type`; the
    `user_id`, `item_id` and `timestamp` columns are used, rows sorted by timestamp."""
    path = Path(path)
    lines = _read_lines(path)
    if not lines[0].strip():
        raise DataError(f"{path}: empty file, expected a header such as "
                        "'user_id:token<TAB>item_id:token<TAB>timestamp:float'")
    header = lines[0].split("\t")
    names = [field.split(":")[0] for field in header]
    wanted = ("user_id", "item_id", "timestamp")
    for name in wanted:
        if name not in names:
            raise DataError(f"{path}: no {name} column in header {lines[0]!r}")
    picks = [names.index(name) for name in wanted]
    rows: list[list[str]] = []
    line_numbers: list[int] = []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{lineno}: expected {len(header)} tab-separated fields "
                            f"as in the header, found {len(fields)}")
        rows.append([fields[i] for i in picks])
        line_numbers.append(lineno)
    if not rows:
        raise DataError(f"{path}: no interactions after the header")
    frame = pd.DataFrame(rows, columns=COLUMNS).replace("", np.nan)
    return _tidy(frame, wanted, lambda row: f"{path}:{line_numbers[row]}", dates=False)


def read_table(path: str | Path, user_col: str = "user_id", item_col: str = "item_id",
               time_col: str = "timestamp") -> pd.DataFrame:
    """Read a `.csv` or `.parquet` table of interactions, rows sorted by time, which may be
    numbers or date strings.  CSV ids are read as text, then typed by the `.inter` rule."""
    path = Path(path)
    names = [user_col, item_col, time_col]
    csv = path.suffix.lower() == ".csv"
    try:
        table = pd.read_csv(path, dtype={user_col: str, item_col: str}) if csv else pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    missing = [name for name in names if name not in table.columns]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; "
                        f"available: {', '.join(map(repr, table.columns))}")
    if table.empty:
        raise DataError(f"{path}: no interactions")
    frame = table[names].set_axis(COLUMNS, axis=1)
    if csv:
        return _tidy(frame, names, lambda row: f"{path}:{row + 2}", dates=True)
    return _tidy(frame, names, lambda row: f"{path}: row {row} (from 0)", dates=True)


def read_file(path: str | Path, user_col: str = "user_id", item_col: str = "item_id",
              time_col: str = "timestamp") -> pd.DataFrame:
    """Pick the reader by suffix: `.txt` sequence file, `.inter`, `.csv` or `.parquet`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_sequence_file(path)
    if suffix == ".inter":
        return read_inter(path)
    if suffix in (".csv", ".parquet"):
        return read_table(path, user_col, item_col, time_col)
    raise DataError(f"{path}: unknown file type {suffix!r}; expected .txt (one line per user: "
                    "user_id item item ...), .inter, .csv or .parquet")


def refuse_unread_columns(source: str | Path, **columns: str) -> None:
    """Column names other than the defaults apply to a .csv or .parquet file only: refuse them for
    any other data rather than record settings that were never read."""
    given = [f"--{k.replace('_', '-')} {v}" for k, v in columns.items() if v != TABLE_COLUMNS[k]]
    if given and not (Path(source).suffix.lower() in (".csv", ".parquet") and Path(source).is_file()):
        raise DataError(f"{source}: {', '.join(given)}: only a .csv or .parquet file has columns to name")


def kcore(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Drop users and items with fewer than `k` rows until every one left has `k` (k <= 0: off).

    It repeats because one pass is not enough: dropping an item can take a user below `k`.
    The result does not depend on the removal order (it is the graph's unique k-core)."""
    if k <= 0:
        return df
    while True:
        keep = ((df["user"].map(df["user"].value_counts()) >= k)
                & (df["item"].map(df["item"].value_counts()) >= k))
        if keep.all():
            return df
        df = df[keep]
