"""Named benchmark datasets: fetch the raw file, preprocess it as S3-Rec did, cache the result.

Preprocessing follows S3-Rec's `data_process.py`, which ICLRec, CaDiRec and SimDiffRec reuse:
every review or rating is one interaction; a user's interactions are ordered by time, ties in
file order (stable sort); then users and items with fewer than five interactions are removed
until none is left (5-core).  Yelp first keeps only reviews dated inside `YELP_DATES`.

Files live under `data_home()`: `$SIMDIFFREC_DATA`, else `~/.cache/simdiffrec`.  Raw files go
to `raw/`, the prepared (user, item, time) frame to `<name>.parquet`, which later calls reuse;
delete it to prepare again.  Both are written to a temporary file first, so an interrupted
run never leaves half a file behind.
"""

from __future__ import annotations

import ast
import gzip
import http.client
import json
import os
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm import tqdm

from .files import atomic_path
from .readers import COLUMNS, DataError, kcore

KCORE = 5
DEFAULT_MAX_LEN = 50  # the paper's maximum sequence length (200 for ml-1m)
AMAZON_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
# S3-Rec's window, compared as text with Yelp's "YYYY-MM-DD HH:MM:SS" dates, both ends
# included: so of 31 December only reviews stamped exactly midnight are kept.
YELP_DATES = ("2019-01-01 00:00:00", "2019-12-31 00:00:00")
YELP_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def _record(line: str, where: str) -> dict:
    """One JSON object, or the Python dict literal that older Amazon dumps hold instead."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: neither a JSON object nor a Python dict") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, found {type(record).__name__}")
    return record


def _read_json_lines(path: Path, keys: tuple[str, str, str],
                     keep: Callable[[tuple], bool] | None = None) -> pd.DataFrame:
    """(user, item, time) from the three `keys` of every line (gzip when the name ends in .gz);
    `keep` filters rows while reading, so a large file is never held whole."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                record = _record(line, f"{path}:{lineno}")
                missing = [key for key in keys if key not in record]
                if missing:
                    raise DataError(f"{path}:{lineno}: no key {', '.join(map(repr, missing))}")
                row = tuple(record[key] for key in keys)
                if keep is None or keep(row):
                    rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    return pd.DataFrame(rows, columns=COLUMNS)


def _in_yelp_window(row: tuple) -> bool:
    return YELP_DATES[0] <= str(row[2]) <= YELP_DATES[1]


def _read_yelp(path: Path) -> pd.DataFrame:
    frame = _read_json_lines(path, ("user_id", "business_id", "date"), keep=_in_yelp_window)
    dates = pd.to_datetime(frame["time"], format=YELP_DATE_FORMAT, errors="coerce")
    if dates.isna().any():
        raise DataError(f"{path}: date {frame['time'][dates.isna()].iloc[0]!r} is not "
                        f"'YYYY-MM-DD HH:MM:SS'")
    return frame.assign(time=dates)


def _read_ml1m(path: Path) -> pd.DataFrame:
    """`ml-1m/ratings.dat` inside the GroupLens zip: UserID::MovieID::Rating::Timestamp."""
    member = "ml-1m/ratings.dat"
    try:
        with zipfile.ZipFile(path) as archive:
            text = archive.read(member).decode("latin-1")
    except KeyError:
        raise DataError(f"{path}: no {member} inside the archive") from None
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("::")
        try:
            if len(fields) != 4:
                raise ValueError
            rows.append((int(fields[0]), int(fields[1]), int(fields[3])))
        except ValueError:
            raise DataError(f"{path}:{member}:{lineno}: expected integer "
                            f"UserID::MovieID::Rating::Timestamp, found {line!r}") from None
    return pd.DataFrame(rows, columns=COLUMNS)


@dataclass(frozen=True)
class Dataset:
    filename: str  # the raw file, under <cache>/raw/
    url: str  # where it comes from: the file itself, or the page to fetch it by hand
    read: Callable[[Path], pd.DataFrame]  # raw file -> (user, item, time) rows
    downloadable: bool = True
    max_len: int = DEFAULT_MAX_LEN  # the paper's maximum sequence length


def _amazon(category: str) -> Dataset:
    filename = f"reviews_{category}_5.json.gz"
    return Dataset(filename, AMAZON_URL + filename,
                   partial(_read_json_lines, keys=("reviewerID", "asin", "unixReviewTime")))


DATASETS: dict[str, Dataset] = {
    "beauty": _amazon("Beauty"),
    "toys": _amazon("Toys_and_Games"),
    "sports": _amazon("Sports_and_Outdoors"),
    "ml-1m": Dataset("ml-1m.zip", "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
                     _read_ml1m, max_len=200),
    "yelp": Dataset("yelp_academic_dataset_review.json", "https://www.yelp.com/dataset",
                    _read_yelp, downloadable=False),
}
NAMES = tuple(DATASETS)


def _spec(name: str) -> Dataset:
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}") from None


def default_max_len(name: str) -> int:
    return _spec(name).max_len


def data_home(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$SIMDIFFREC_DATA`, else `~/.cache/simdiffrec`."""
    home = cache_dir or os.environ.get("SIMDIFFREC_DATA") or Path.home() / ".cache" / "simdiffrec"
    return Path(home).expanduser()


def _download(url: str, dest: Path) -> None:
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))


def raw_file(name: str, cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """The raw file of a named dataset, downloaded first when missing and allowed."""
    spec = _spec(name)
    dest = data_home(cache_dir) / "raw" / spec.filename
    if dest.is_file():
        return dest
    if not spec.downloadable:
        raise DataError(f"{dest} not found: {name} cannot be downloaded automatically; get "
                        f"{spec.filename} from {spec.url} and place it at {dest}")
    if not download:
        raise DataError(f"{dest} not found and download=False: download {spec.url} "
                        f"and place it at {dest}")
    try:
        _download(spec.url, dest)
    except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        raise DataError(f"could not download {spec.url} ({err}); download it by hand "
                        f"and place it at {dest}") from err
    return dest


def prepare(name: str, cache_dir: str | Path | None = None, download: bool = True) -> pd.DataFrame:
    """The time-ordered, 5-core (user, item, time) interactions of a named dataset, from
    `<cache>/<name>.parquet` when it exists."""
    spec = _spec(name)
    cached = data_home(cache_dir) / f"{name.lower()}.parquet"
    if cached.is_file():
        try:
            return pd.read_parquet(cached)
        except (OSError, ValueError) as err:
            raise DataError(f"{cached}: cannot read the prepared data ({err}); "
                            "delete it to prepare again") from err
    raw = spec.read(raw_file(name, cache_dir, download))
    frame = kcore(raw.sort_values("time", kind="stable"), KCORE).reset_index(drop=True)
    with atomic_path(cached) as tmp:
        frame.to_parquet(tmp, index=False)
    return frame
