"""Named datasets: the demo that ships with the package, and benchmarks fetched, checked,
preprocessed as S3-Rec did and cached.

Preprocessing follows S3-Rec's `data_process.py`, which ICLRec, CaDiRec and SimDiffRec reuse:
every review or rating is one interaction; a user's interactions are ordered by time, ties in
file order (stable sort); then users and items with fewer than five interactions are removed
until none is left (5-core).  Yelp first keeps only reviews dated inside `YELP_DATES`.

`demo` is a file inside the package (`shipped/demo.txt`, written by `bench/make_demo.py`): it is
read in place and never cached, so a new version of the package brings its own.  The others live
under `data_home()`: `$SIMDIFFREC_DATA`, else `~/.cache/simdiffrec`.  Raw files go to `raw/`, the
prepared (user, item, time) frame to `<name>.parquet`, which later calls reuse; delete it to
prepare again.  Both are written to a temporary file first, so an interrupted run never leaves
half a file behind, and a download becomes the raw file only when its sha256 is the recorded one.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import http.client
import json
import os
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm import tqdm

from .files import atomic_stream, write_atomic
from .readers import COLUMNS, DataError, kcore, read_sequence_file

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


AMAZON_LICENCE = "no licence stated by its authors (McAuley et al., UCSD); research use, cite them"


@dataclass(frozen=True)
class Dataset:
    filename: str  # the raw file: under <cache>/raw/, or in the package's shipped/ folder
    url: str  # where it comes from: the file itself, the page to fetch it by hand, or what wrote it
    read: Callable[[Path], pd.DataFrame]  # raw file -> (user, item, time) rows
    licence: str
    counts: tuple[int, int, int]  # users, items, actions after 5-core (a benchmark's: the paper's Table 1)
    # The downloaded file's; None: not recorded yet (a download warns with the hash it saw).
    sha256: str | None = None
    fetch: str = "download"  # download | by hand | shipped (inside the package: nothing to fetch)
    max_len: int = DEFAULT_MAX_LEN  # the paper's maximum sequence length


def _amazon(category: str, counts: tuple[int, int, int]) -> Dataset:
    filename = f"reviews_{category}_5.json.gz"
    return Dataset(filename, AMAZON_URL + filename,
                   partial(_read_json_lines, keys=("reviewerID", "asin", "unixReviewTime")),
                   AMAZON_LICENCE, counts)


# The sha256 of each downloaded file is not recorded yet: this project's machines have had no
# copy of the original files.  Record the hash the first download warns with.
DATASETS: dict[str, Dataset] = {
    "demo": Dataset("demo.txt", "bench/make_demo.py (generated, with a planted sequential pattern)",
                    read_sequence_file, "generated by this project; ships with it", (1500, 400, 25899),
                    fetch="shipped"),
    "beauty": _amazon("Beauty", (22363, 12101, 198502)),
    "toys": _amazon("Toys_and_Games", (19412, 11924, 167597)),
    "sports": _amazon("Sports_and_Outdoors", (35598, 18357, 296337)),
    "ml-1m": Dataset("ml-1m.zip", "https://files.grouplens.org/datasets/movielens/ml-1m.zip", _read_ml1m,
                     "GroupLens' MovieLens terms: research use, no redistribution", (6040, 3416, 999611),
                     max_len=200),
    "yelp": Dataset("yelp_academic_dataset_review.json", "https://www.yelp.com/dataset", _read_yelp,
                    "Yelp Dataset terms of use: non-commercial, academic use", (30431, 20033, 316354),
                    fetch="by hand"),
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


def _download(url: str, dest: Path, sha256: str | None) -> str:
    """`url` to `dest` through a temporary file that becomes `dest` only when it is complete and
    has the recorded `sha256` (when there is one): a refused or cut-off download leaves nothing.
    Returns the file's sha256."""
    digest = hashlib.sha256()
    with atomic_stream(dest) as out:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=dest.name, disable=None) as bar:  # a bar on a terminal only
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        seen = digest.hexdigest()
        if sha256 is not None and seen != sha256:
            raise DataError(f"{dest.name} from {url}: sha256 {seen}, expected {sha256}: "
                            "refused, not kept (a damaged or changed file)")
    return seen


def raw_file(name: str, cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """The raw file of a named dataset, downloaded first when missing and allowed."""
    spec = _spec(name)
    if spec.fetch == "shipped":
        return Path(str(resources.files(__package__) / "shipped" / spec.filename))
    dest = data_home(cache_dir) / "raw" / spec.filename
    if dest.is_file():
        return dest
    if spec.fetch == "by hand":
        raise DataError(f"{dest} not found: {name} cannot be downloaded automatically; get "
                        f"{spec.filename} from {spec.url} and place it at {dest}")
    if not download:
        raise DataError(f"{dest} not found and download=False: download {spec.url} "
                        f"and place it at {dest}")
    try:
        seen = _download(spec.url, dest, spec.sha256)
    except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        raise DataError(f"could not download {spec.url} ({err}); download it by hand "
                        f"and place it at {dest}") from err
    if spec.sha256 is None:
        warnings.warn(f"{dest}: no sha256 recorded for {name}'s {spec.filename} yet, so it is unchecked; "
                      f"this download's is {seen}", stacklevel=2)
    return dest


def prepare(name: str, cache_dir: str | Path | None = None, download: bool = True) -> pd.DataFrame:
    """The time-ordered, 5-core (user, item, time) interactions of a named dataset, from
    `<cache>/<name>.parquet` when it exists (a shipped dataset is read in place, uncached)."""
    spec = _spec(name)
    cached = data_home(cache_dir) / f"{name.lower()}.parquet"
    if cached.is_file() and spec.fetch != "shipped":
        try:
            return pd.read_parquet(cached)
        except (OSError, ValueError) as err:
            raise DataError(f"{cached}: cannot read the prepared data ({err}); "
                            "delete it to prepare again") from err
    raw = spec.read(raw_file(name, cache_dir, download))
    frame = kcore(raw.sort_values("time", kind="stable"), KCORE).reset_index(drop=True)
    if spec.fetch != "shipped":
        write_atomic(cached, frame.to_parquet(index=False))
    return frame


def listing(cache_dir: str | Path | None = None) -> str:
    """The named datasets, what each needs before its first use and its terms (`simdiffrec datasets`)."""
    home = data_home(cache_dir)
    lines = []
    for name, spec in DATASETS.items():
        if spec.fetch == "shipped":
            needs = "nothing: ships with the package"
        elif (home / f"{name}.parquet").is_file():
            needs = f"nothing: prepared in {home / f'{name}.parquet'}"
        elif spec.fetch == "download":
            check = "checked" if spec.sha256 else "not recorded yet"
            needs = f"a download of {spec.url} (sha256 {check}), cached in {home / 'raw'}"
        else:
            needs = f"{spec.filename} from {spec.url}, placed by hand in {home / 'raw'}"
        users, items, actions = spec.counts
        lines += [f"{name:<7} {needs}",
                  f"{'':<7} {users:,} users, {items:,} items, {actions:,} actions; max_len {spec.max_len}; "
                  f"{spec.licence}"]
    return "\n".join(lines) + "\n"
