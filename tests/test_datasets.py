"""Named datasets: the shipped demo; raw files placed in a temporary cache or downloaded from a
local HTTP server, checked against their sha256, and their cache."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import importlib.util
import io
import json
import threading
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from simdiffrec import datasets
from simdiffrec.cli import main
from simdiffrec.data import load_data
from simdiffrec.readers import DataError

BEAUTY_URL = datasets.AMAZON_URL + "reviews_Beauty_5.json.gz"
URLOPEN = urllib.request.urlopen  # the real one, for the local server's tests
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache under tmp_path, and no network: any download attempt fails as offline."""
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setenv("SIMDIFFREC_DATA", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    (tmp_path / "raw").mkdir()
    return tmp_path


def amazon_reviews() -> list[dict]:
    """5 users x 5 items, every user reviewing every item (times shuffled, with ties), plus a
    user with two reviews and an item reviewed once: 5-core removes both."""
    reviews = [{"reviewerID": f"U{u}", "asin": f"B{(u + j) % 5}", "unixReviewTime": 100 + (j * 7 % 5) // 2}
               for u in range(5) for j in range(5)]
    reviews += [{"reviewerID": "lonely", "asin": "B0", "unixReviewTime": 1},
                {"reviewerID": "lonely", "asin": "B1", "unixReviewTime": 2},
                {"reviewerID": "U0", "asin": "rare", "unixReviewTime": 50}]
    return reviews


def amazon_bytes(reviews: list[dict]) -> bytes:
    # every other line in the old Python-dict style that some Amazon dumps use
    lines = [json.dumps(r) if i % 2 else repr(r) for i, r in enumerate(reviews)]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def expected_order(reviews: list[dict], user: str) -> list[str]:
    mine = [r for r in reviews if r["reviewerID"] == user and r["asin"] != "rare"]
    return [r["asin"] for r in sorted(mine, key=lambda r: r["unixReviewTime"])]  # stable


def test_amazon_is_sorted_filtered_and_cached(cache):
    reviews = amazon_reviews()
    raw = cache / "raw" / "reviews_Beauty_5.json.gz"
    raw.write_bytes(amazon_bytes(reviews))
    frame = datasets.prepare("beauty", download=False)
    assert len(frame) == 25 and set(frame["user"]) == {f"U{u}" for u in range(5)}
    assert "rare" not in set(frame["item"])
    for user in ("U0", "U3"):
        assert frame.loc[frame["user"] == user, "item"].tolist() == expected_order(reviews, user)
    cached = cache / "beauty.parquet"
    assert cached.is_file() and not list(cache.glob(".*tmp"))

    raw.unlink()  # the next call must not need the raw file
    pd.testing.assert_frame_equal(datasets.prepare("beauty", download=False), frame)
    data = load_data("Beauty", download=False)
    assert (data.n_users, data.n_items, data.max_len) == (5, 5, 50)

    cached.unlink()  # and without the cache it prepares again, here failing for want of the file
    with pytest.raises(DataError, match="not found"):
        datasets.prepare("beauty", download=False)


def test_download_goes_through_a_temporary_file(cache, monkeypatch):
    payload = amazon_bytes(amazon_reviews())

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(payload))
    with pytest.warns(UserWarning, match="no sha256 recorded"):
        assert len(datasets.prepare("beauty")) == 25
    assert (cache / "raw" / "reviews_Beauty_5.json.gz").read_bytes() == payload
    assert not list((cache / "raw").glob(".*"))


def test_a_download_cut_off_midway_leaves_no_file_behind(cache, monkeypatch):
    payload = amazon_bytes(amazon_reviews())

    class Cut(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}
        calls = 0

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 1:
                raise ConnectionResetError("connection reset by peer")
            return super().read(len(payload) // 2)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Cut(payload))
    with pytest.raises(DataError, match="could not download .*connection reset by peer"):
        datasets.prepare("beauty")
    raw = cache / "raw"
    assert not (raw / "reviews_Beauty_5.json.gz").exists() and not list(raw.glob(".*"))
    assert not (cache / "beauty.parquet").exists()


def test_offline_error_names_url_and_destination(cache):
    dest = cache / "raw" / "reviews_Toys_and_Games_5.json.gz"
    for download in (True, False):
        with pytest.raises(DataError) as err:
            datasets.prepare("toys", download=download)
        message = str(err.value)
        assert datasets.AMAZON_URL + dest.name in message and f"place it at {dest}" in message
    assert list((cache / "raw").iterdir()) == []  # no half-written file left behind


def ml1m_zip(path: Path, text: str) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ml-1m/ratings.dat", text)


def test_ml1m_reads_ratings_from_the_zip(cache):
    lines = [f"{u}::{(u + j) % 5 + 1}::3::{1000 - j}" for u in range(1, 7) for j in range(5)]
    ml1m_zip(cache / "raw" / "ml-1m.zip", "\n".join(lines) + "\n")
    frame = datasets.prepare("ml-1m", download=False)
    assert len(frame) == 30 and frame["user"].dtype.kind == "i"
    # user 1 rated 2, 3, 4, 5, 1 at falling times
    assert frame.loc[frame["user"] == 1, "item"].tolist() == [1, 5, 4, 3, 2]
    data = load_data("ml-1m", download=False)
    assert data.max_len == datasets.default_max_len("ml-1m") == 200
    assert data.item_ids.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("text, expected", [
    ("1::2::3::4\n1::2::3\n", "ml-1m/ratings.dat:2: expected integer"),
    ("1::2::3::4\n1::x::3::5\n", "ml-1m/ratings.dat:2: expected integer"),
])
def test_ml1m_errors_name_the_line(cache, text, expected):
    ml1m_zip(cache / "raw" / "ml-1m.zip", text)
    with pytest.raises(DataError, match=expected):
        datasets.prepare("ml-1m", download=False)


def test_ml1m_zip_without_ratings(cache):
    with zipfile.ZipFile(cache / "raw" / "ml-1m.zip", "w") as archive:
        archive.writestr("ml-1m/movies.dat", "")
    with pytest.raises(DataError, match="no ml-1m/ratings.dat inside"):
        datasets.prepare("ml-1m", download=False)


def test_yelp_keeps_the_2019_window_then_5_core(cache):
    rows = [{"user_id": f"u{u}", "business_id": f"b{(u + j) % 5}", "date": f"2019-0{j + 1}-15 10:00:00"}
            for u in range(5) for j in range(5)]
    rows += [{"user_id": "u0", "business_id": "b9", "date": "2018-12-31 23:59:59"},
             {"user_id": "u1", "business_id": "b9", "date": "2019-12-31 12:00:00"},  # after the end
             {"user_id": "u2", "business_id": "b0", "date": "2019-12-31 00:00:00"}]  # the last kept
    (cache / "raw" / "yelp_academic_dataset_review.json").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    frame = datasets.prepare("yelp", download=False)
    assert len(frame) == 26 and "b9" not in set(frame["item"])
    assert frame["time"].max() == pd.Timestamp("2019-12-31")
    assert frame.loc[frame["user"] == "u2", "item"].tolist()[-1] == "b0"


def test_yelp_missing_file_says_where_to_put_it(cache):
    with pytest.raises(DataError) as err:
        datasets.prepare("yelp")
    dest = cache / "raw" / "yelp_academic_dataset_review.json"
    assert "https://www.yelp.com/dataset" in str(err.value) and f"place it at {dest}" in str(err.value)


@pytest.mark.parametrize("lines, expected", [
    (['{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}', "{not json"], ":2: neither a JSON"),
    (['{"reviewerID": "a", "asin": "b"}'], ":1: no key 'unixReviewTime'"),
    (["[1, 2]"], ":1: expected an object"),
])
def test_bad_review_lines_name_file_and_line(cache, lines, expected):
    raw = cache / "raw" / "reviews_Sports_and_Outdoors_5.json.gz"
    raw.write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.raises(DataError, match=str(raw)) as err:
        datasets.prepare("sports", download=False)
    assert expected in str(err.value)


def test_unknown_names_list_the_known_ones(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'netflix'; known: demo, beauty, toys, sports, ml-1m, yelp"):
        datasets.prepare("netflix")
    with pytest.raises(DataError, match="netflix: no such file, and not a dataset name either .*ml-1m"):
        load_data("netflix")


def test_cache_dir_argument_overrides_the_environment(tmp_path):
    assert datasets.data_home() == tmp_path
    assert datasets.data_home(tmp_path / "other") == tmp_path / "other"


def test_the_demo_ships_with_the_package_is_what_its_generator_writes_and_is_never_cached(cache):
    """Should numpy's Generator ever draw otherwise (its streams may change between versions), the
    shipped file stays as it is and this test says the generator no longer writes it."""
    spec = importlib.util.spec_from_file_location("make_demo", ROOT / "bench" / "make_demo.py")
    make_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo)
    shipped = datasets.raw_file("demo", download=False)
    assert shipped.read_text() == make_demo.demo_text()
    data = load_data("demo", download=False)
    actions = int(data.test.history_ptr[-1]) + data.n_users
    assert (data.n_users, data.n_items, actions) == datasets.DATASETS["demo"].counts
    assert list(cache.iterdir()) == [cache / "raw"] and not list((cache / "raw").iterdir())


def test_the_datasets_command_lists_each_name_with_what_it_needs(cache, capsys):
    (cache / "toys.parquet").write_bytes(b"")  # prepared already
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "demo    nothing: ships with the package" in out
    assert f"beauty  a download of {BEAUTY_URL} (sha256 not recorded yet), cached in {cache / 'raw'}" in out
    assert f"toys    nothing: prepared in {cache / 'toys.parquet'}" in out
    assert "yelp    yelp_academic_dataset_review.json from https://www.yelp.com/dataset, placed by hand" in out
    assert "22,363 users, 12,101 items, 198,502 actions" in out
    assert all(name in out for name in datasets.NAMES)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server (127.0.0.1) of the files in tmp_path/served; `server.requests` lists
    the paths it was asked for.  The real urlopen, without a proxy in between."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(urllib.request, "urlopen", URLOPEN)
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    yield dataclasses.make_dataclass("Server", ["folder", "url", "requests"])(
        served, f"http://127.0.0.1:{httpd.server_address[1]}/", requests)
    httpd.shutdown()
    thread.join()
    httpd.server_close()


def serve_beauty(server, monkeypatch, payload: bytes, sha256: str | None) -> None:
    """Serve `payload` as Beauty's file, with `sha256` recorded as its hash."""
    (server.folder / "beauty.json.gz").write_bytes(payload)
    spec = dataclasses.replace(datasets.DATASETS["beauty"], url=server.url + "beauty.json.gz", sha256=sha256)
    monkeypatch.setitem(datasets.DATASETS, "beauty", spec)


def test_a_download_with_the_recorded_sha256_is_kept_and_reused(cache, server, monkeypatch):
    payload = amazon_bytes(amazon_reviews())
    serve_beauty(server, monkeypatch, payload, hashlib.sha256(payload).hexdigest())
    assert len(datasets.prepare("beauty")) == 25
    assert (cache / "raw" / "reviews_Beauty_5.json.gz").read_bytes() == payload
    assert server.requests == ["/beauty.json.gz"]
    (cache / "beauty.parquet").unlink()  # prepared again from the raw file, not downloaded again
    assert len(load_data("beauty").test.targets) == 5
    assert server.requests == ["/beauty.json.gz"]
    assert [p.name for p in (cache / "raw").iterdir()] == ["reviews_Beauty_5.json.gz"]  # no temporary left


def test_a_download_with_another_sha256_is_refused_in_one_line_and_removed(cache, server, monkeypatch, capsys):
    payload = amazon_bytes(amazon_reviews())
    expected = hashlib.sha256(payload).hexdigest()
    damaged = payload[:-1] + bytes([payload[-1] ^ 1])
    serve_beauty(server, monkeypatch, damaged, expected)
    assert main(["train", "--data", "beauty", "--out", str(cache / "run")]) == 2
    err = capsys.readouterr().err
    seen = hashlib.sha256(damaged).hexdigest()
    assert err == (f"simdiffrec train: error: reviews_Beauty_5.json.gz from {server.url}beauty.json.gz: "
                   f"sha256 {seen}, expected {expected}: refused, not kept (a damaged or changed file)\n")
    assert list((cache / "raw").iterdir()) == [] and not (cache / "beauty.parquet").exists()
    assert not (cache / "run").exists()


def test_a_download_without_a_recorded_sha256_warns_with_the_hash_it_saw(cache, server, monkeypatch):
    payload = amazon_bytes(amazon_reviews())
    serve_beauty(server, monkeypatch, payload, None)
    with pytest.warns(UserWarning, match=f"no sha256 recorded for beauty's .*{hashlib.sha256(payload).hexdigest()}"):
        datasets.prepare("beauty")
    (cache / "beauty.parquet").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the cached file is not downloaded again
        datasets.prepare("beauty")
    assert server.requests == ["/beauty.json.gz"]
