"""One policy table over several calibration sets: a setting the spaces ship for every dataset
must hold on each of them, so each policy is ranked by its worst set.

    python bench/replay_sets.py bench/curves/toys-8k bench/curves/ml-100k --caps 100,200 --patience 10,30
    python bench/replay_sets.py bench/curves/toys-8k bench/curves/ml-100k --trials 24 --searchers tpe-mv

Each set is replayed as `bench/replay.py` replays it (the same flags); per set the table shows a
policy's epochs and trial-seconds (% of no stopping there), P(near best), P(best kept) and the
90th percentile of its valid regret, then the worst of each over the sets.  Rows are ranked by the worst P(near
best) (a set whose configurations have one seed each has none: NaN ranks last), then the worst
P(best kept), the worst regret and the most epochs.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from replay import calibration_set, flags, prepare

SHOWN = {"epochs_pct": "epochs", "time_pct": "time", "p_near_best": "near", "p_best_kept": "kept",
         "regret_valid_p90": "regret p90"}
WORST = {"p_near_best": "min", "p_best_kept": "min", "regret_valid_p90": "max", "epochs_pct": "max", "time_pct": "max"}


def across(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (searcher, policy) replayed on every set: each set's figures, then the worst."""
    keys = ["searcher", "policy"]
    shipped = set.intersection(*(set(frame.loc[frame["shipped"], "policy"]) for frame in frames.values()))
    wide = None
    for name, frame in frames.items():
        part = frame[keys + list(SHOWN)].rename(columns={c: f"{name} {label}" for c, label in SHOWN.items()})
        wide = part if wide is None else wide.merge(part, on=keys)
    for column, how in WORST.items():
        values = wide[[f"{name} {SHOWN[column]}" for name in frames]]
        wide[f"worst {SHOWN[column]}"] = values.min(axis=1, skipna=False) if how == "min" else values.max(axis=1)
    ranked = wide.assign(_near=wide["worst near"].fillna(-1.0))
    ranked = ranked.sort_values(["_near", "worst kept", "worst regret p90", "worst epochs"],
                                ascending=[False, False, True, True])
    ranked["policy"] = [f"{name} (shipped)" if name in shipped else name for name in ranked["policy"]]
    return ranked.drop(columns="_near").reset_index(drop=True)


def markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.to_dict("records"):
        cells = []
        for column, value in row.items():
            if column.endswith(("epochs", "time")):
                cells.append(f"{value:.0f}%")
            elif column.endswith("regret p90"):
                cells.append(f"{value:.4f}")
            elif isinstance(value, float):
                cells.append(f"{value:.2f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", type=calibration_set, nargs="+", help="folders of bench/curves.py")
    flags(p)
    args = p.parse_args(argv)
    names = [folder.name for folder in args.sets]
    if len(set(names)) < len(names):
        p.error(f"two sets share a folder name: {' '.join(map(str, args.sets))}")
    try:  # every set checked before any is replayed
        planned = {folder: prepare(folder, args) for folder in args.sets}
    except ValueError as err:
        p.error(str(err))
    frames = {}
    for folder, one in planned.items():
        frames[folder.name] = one.frame()
        print(f"{folder}: {len(one.curves.configs)} configurations, {len(one.curves.valid)} runs, {one.trials} "
              f"trials per search at {one.pace}, one seed's std {one.curves.seed_std:.4f}")
    print(f"{args.workers} workers, {args.orders} orders per policy; a row's pN: patience N (none: the space's)")
    print(markdown(across(frames)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
