"""Which settings matter, read off a calibration set (`bench/curves.py`): its best configurations
and, per searched setting, how the configurations that share a value fared.

    python bench/settings_effect.py bench/curves/toys-8k            # markdown tables
    python bench/settings_effect.py bench/curves/toys-8k --top 15

A configuration's worth is `bench/replay.py`'s: its best valid NDCG@10 over the whole recorded
curve and the test NDCG@10 at that epoch, averaged over its seeds (what retraining it to
convergence gives).  Per setting value: how many configurations, their median and best worth and
the median epoch of their best.  The configurations are random draws, so a value's row mixes
every other setting: a median says where a value usually lands, the best what it allows.
Numeric settings with more than six values are cut into three bins of about equal count;
"(not sampled)": the configurations without the setting (SASRec-CE ones, for SimDiffRec's own).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from replay import METRIC, Curves

META = {"config", "start"}


def worth(curves: Curves) -> pd.DataFrame:
    """One row per configuration: its parameters, worth (valid, test) and the mean epoch of its best."""
    best_epoch = {c: float(np.mean([curves.valid[c, s].argmax() + 1 for s in seeds])) for c, seeds in curves.seeds.items()}
    frame = curves.configs.copy()
    frame["valid"] = frame["config"].map(curves.worth_valid)
    frame["test"] = frame["config"].map(curves.worth_test)
    frame["best_epoch"] = frame["config"].map(best_epoch)
    frame["seeds"] = frame["config"].map(lambda c: len(curves.seeds[c]))
    return frame.sort_values("valid", ascending=False)


def by_value(frame: pd.DataFrame, setting: str) -> pd.DataFrame:
    """The configurations grouped by their value of `setting` (binned when numeric and varied)."""
    values = frame[setting]
    if pd.api.types.is_numeric_dtype(values) and values.nunique() > 6:
        edges = np.unique(np.nanquantile(values, [0, 1 / 3, 2 / 3, 1]))
        bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
        values = pd.Series([f"{edges[b]:.3g} to {edges[b + 1]:.3g}" for b in bins], index=values.index).where(values.notna())
    labels = values.map(lambda v: f"{v:g}" if isinstance(v, float) else str(v)).where(values.notna(), "(not sampled)")
    order = pd.to_numeric(frame[setting], errors="coerce")  # numbers and bins in order, then the rest
    grouped = frame.assign(value=labels, order=order).sort_values("order", kind="stable").groupby("value", sort=False)
    return grouped.agg(configs=("valid", "size"), median_valid=("valid", "median"), best_valid=("valid", "max"),
                       median_test=("test", "median"), median_best_epoch=("best_epoch", "median")).reset_index()


def markdown(frame: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("set", type=Path, help="a folder of bench/curves.py (configs.parquet, curves.parquet)")
    p.add_argument("--top", type=int, default=10, help="configurations listed (default 10)")
    args = p.parse_args(argv)
    curves = Curves.load(args.set)
    frame = worth(curves)
    settings = [c for c in curves.configs.columns if c not in META and curves.configs[c].nunique() > 1]
    print(f"{args.set}: {len(frame)} configurations, {len(curves.valid)} runs; worth = best {METRIC} "
          f"(mean over seeds); one seed's std {curves.seed_std:.4f}\n")
    print(markdown(frame[["config", "valid", "test", "best_epoch", "seeds", *settings]].head(args.top)))
    for setting in settings:
        print(f"\n{setting}\n")
        print(markdown(by_value(frame, setting)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
