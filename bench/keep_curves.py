"""Keep a search's or a finalize's per-epoch rows in the repository, where BENCHMARKS.md cites them.

    python bench/keep_curves.py runs/toys-search toys-search-2026-12 --command "simdiffrec tune --data toys ..."
    python bench/keep_curves.py runs/toys-search/final toys-finalize-2026-12 --command "simdiffrec finalize ..."

Writes bench/curves/NAME/rows.parquet (one row per trial and epoch: the trial's number and
status, its parameters, the epoch's valid metrics, test metrics where the run reported them, its
seconds) and bench/curves/NAME/about.yaml (the command that made the runs, the folder read).
Reads files only: the search may still be running (what it has so far is kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simdiffrec.config import write_yaml
from simdiffrec.files import write_atomic
from tuner.status import load

HERE = Path(__file__).resolve().parent
KEPT = ("valid/", "test/", "test_unmasked/")  # metric columns kept, by prefix


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a search's OUT, a finalize's or reproduce's DIR, or an experiment")
    p.add_argument("name", help="bench/curves/NAME/")
    p.add_argument("--command", required=True, help="the command that made the runs, as BENCHMARKS.md cites it")
    p.add_argument("--out", type=Path, default=None, help="the folder to write (default bench/curves/NAME)")
    args = p.parse_args(argv)
    search = load(args.folder)
    rows = search.results.dropna(subset=["epoch"]) if "epoch" in search.results else search.results.iloc[:0]
    if rows.empty:
        raise SystemExit(f"{args.folder}: no trial has reported an epoch yet; nothing to keep")
    params = [f"param/{c}" for c in search.params]
    frame = rows.rename(columns={c.removeprefix("param/"): c for c in params})
    metrics = [c for c in frame.columns if c.startswith(KEPT)]
    seconds = ["time_this_iter_s"] if "time_this_iter_s" in frame else []
    frame = frame[["trial_id", "number", "status", "epoch", *[c for c in params if c in frame], *metrics, *seconds]]
    out = args.out or HERE / "curves" / args.name
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "rows.parquet", frame.to_parquet(index=False))
    write_yaml(out / "about.yaml", {"command": args.command, "read_from": str(args.folder),
                                    "trials": int(frame["trial_id"].nunique()), "rows": len(frame)})
    print(f"{out}: {len(frame)} rows of {frame['trial_id'].nunique()} trials", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
