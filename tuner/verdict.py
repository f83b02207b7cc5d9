"""Verdicts from repeated runs: mean ± std over seeds, paired differences to a baseline, and the
tables `finalize` and `reproduce` write.  Plain pandas and scipy on a frame of finished runs
(one row per configuration and seed): nothing here starts Ray or trains anything.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any, Sequence

import pandas as pd
import yaml
from scipy import stats

from .experiment import markdown

SPLITS = ("valid", "test")
METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")
PAPER_METRICS = ("HR@5", "HR@10", "NDCG@5", "NDCG@10")  # what the paper's tables report
RUN_COLUMNS = ["configuration", "seed", *(f"{s}/{m}" for s in SPLITS for m in METRICS),
               "best_epoch", "epochs", "minutes"]
TEST_NAME = ("paired t-test over seeds (scipy.stats.ttest_rel, two-sided): seed s of a configuration "
             "against seed s of the baseline")


def paired(values: pd.Series, baseline: pd.Series) -> tuple[float, float]:
    """(mean paired difference, two-sided paired t-test p-value) of two per-seed series indexed
    by seed; only seeds both have are paired.  p is NaN with fewer than two pairs, or when the
    differences do not vary (the t statistic is undefined)."""
    a, b = values.align(baseline, join="inner")
    if a.empty:
        return math.nan, math.nan
    diff = a - b
    if len(diff) < 2 or diff.std(ddof=1) < 1e-12:  # constant up to rounding: t would be 0/0 or x/0
        return float(diff.mean()), math.nan
    return float(diff.mean()), float(stats.ttest_rel(a, b).pvalue)


def summarize(runs: pd.DataFrame, columns: Sequence[str], order: Sequence[str],
              baselines: dict[str, str] | None = None, compared: Sequence[str] = ()) -> pd.DataFrame:
    """One row per configuration of `order` (a configuration without finished runs too):
    `seeds`, then `{c}_mean` and `{c}_std` (sample std; NaN for one seed) of each column, and
    `{c}_diff` and `{c}_p` (`paired`) of each compared column against the configuration's baseline
    in `baselines` (0 and NaN for a configuration without one, such as a baseline)."""
    rows = []
    for name in order:
        group = runs[runs["configuration"] == name]
        row: dict[str, Any] = {"configuration": name, "seeds": len(group)}
        for c in columns:
            row[f"{c}_mean"], row[f"{c}_std"] = group[c].mean(), group[c].std(ddof=1)
        baseline = (baselines or {}).get(name)
        base = runs[runs["configuration"] == baseline].set_index("seed")
        for c in compared:
            if baseline is None:
                row[f"{c}_diff"], row[f"{c}_p"] = 0.0, math.nan
            else:
                row[f"{c}_diff"], row[f"{c}_p"] = paired(group.set_index("seed")[c], base[c])
        rows.append(row)
    return pd.DataFrame(rows)


def median_seed(runs: pd.DataFrame, configuration: str, by: str = "valid/NDCG@10") -> pd.Series:
    """The run of `configuration` whose `by` is the median of its seeds (the lower one of an even count)."""
    group = runs[runs["configuration"] == configuration].sort_values([by, "seed"], ignore_index=True)
    return group.iloc[(len(group) - 1) // 2]


# --- finalize ------------------------------------------------------------------------------

def final_table(runs: pd.DataFrame, params: dict[str, dict[str, Any]], baselines: dict[str, str],
                starts: Sequence[str] = ()) -> pd.DataFrame:
    """final.parquet: one row per configuration of `params` (configuration -> its searched
    parameters), each compared with its baseline in `baselines` (the baselines: the configurations
    not in it), `runs` holding RUN_COLUMNS and `gpu` (1 for a run on a GPU); `start` marks the
    configurations the search started from (`starts`)."""
    table = summarize(runs, [f"{s}/{m}" for s in SPLITS for m in METRICS], list(params), baselines,
                      [f"test/{m}" for m in METRICS])
    table.insert(1, "is_baseline", ~table["configuration"].isin(list(baselines)))
    table.insert(2, "baseline", [baselines.get(c, "") for c in table["configuration"]])
    table.insert(3, "start", table["configuration"].isin(list(starts)))
    grouped = runs.groupby("configuration")
    table["epochs_mean"] = table["configuration"].map(grouped["epochs"].mean())
    table["minutes_total"] = table["configuration"].map(grouped["minutes"].sum()).fillna(0.0)
    table["device"] = table["configuration"].map(grouped["gpu"].max()).map({1: "gpu", 0: "cpu"})
    for name in dict.fromkeys(k for p in params.values() for k in p):
        table[f"param/{name}"] = [params[c].get(name) for c in table["configuration"]]
    return table


def _named(about: dict[str, Any]) -> str:
    """`, trial #1 (trial-1)` for each trial finalize was asked for by number."""
    return "".join(f", trial #{n} (trial-{n})" for n in about.get("trials") or [])


def headline(table: pd.DataFrame, runs: pd.DataFrame) -> str:
    """final.md's first line: the winner (best mean valid NDCG@10 of every configuration retrained),
    its test metrics, its paired difference to the best starting point and to its SASRec, and
    whether SimDiffRec's own parts helped."""
    row = table.loc[table["valid/NDCG@10_mean"].idxmax()]
    name = row["configuration"]
    text = (f"**Winner: {name}**, test HR@10 {_mean_std(row['test/HR@10_mean'], row['test/HR@10_std'])}, "
            f"NDCG@10 {_mean_std(row['test/NDCG@10_mean'], row['test/NDCG@10_std'])} over {int(row['seeds'])} seeds "
            f"(the best mean valid NDCG@10 of {len(table)} configurations).")
    starts = table[table["start"]] if "start" in table else table.iloc[:0]
    if row.get("start", False):
        text += " It is one of the search's starting points: the search found nothing better on validation."
    elif len(starts):
        best_start = starts.loc[starts["valid/NDCG@10_mean"].idxmax(), "configuration"]
        text += f" Against the best starting point ({best_start}): {_against(runs, name, best_start)}."
    if row["is_baseline"]:
        return text + " SASRec-CE (alpha = beta = 0) won: SimDiffRec's own parts did not help on this data."
    diff, p = row["test/HR@10_diff"], row["test/HR@10_p"]
    verdict = ("helped" if diff > 0 else "hurt") if p < 0.05 else "made no significant difference"
    return text + (f" Against SASRec-CE at its settings ({row['baseline']}): "
                   f"{_against(runs, name, row['baseline'])}: SimDiffRec's own parts {verdict}.")


def _against(runs: pd.DataFrame, name: str, other: str) -> str:
    """`HR@10 +0.0012 (p=0.04), NDCG@10 +0.0003 (p=0.41)`: paired test differences of two configurations."""
    def per_seed(config: str, metric: str) -> pd.Series:
        return runs[runs["configuration"] == config].set_index("seed")[metric]

    cells = []
    for metric in ("HR@10", "NDCG@10"):
        diff, p = paired(per_seed(name, f"test/{metric}"), per_seed(other, f"test/{metric}"))
        cells.append(f"{metric} {diff:+.4f} (p={_p(p)})")
    return ", ".join(cells)


def final_markdown(table: pd.DataFrame, runs: pd.DataFrame, chosen: pd.Series, about: dict[str, Any]) -> str:
    """final.md: the winner in one line, then test and valid metrics with the differences to each
    configuration's baseline, cost, parameters."""
    test, valid, cost = _final_tables(table)
    return "\n".join([
        headline(table, runs), "", f"# Final runs of {about['experiment']}", "",
        f"The top {about['top']} configuration{'s' if about['top'] != 1 else ''} of the search by best valid NDCG@10{_named(about)}, "
        "the space's points to evaluate not among them (`start-J`: the J-th point), SASRec-CE at the default "
        "settings (`sasrec-defaults`, or the baseline with the same settings) and "
        "their baselines (SASRec: a configuration's settings with alpha = beta = 0, sr_loss ce; `baseline` "
        "at the best configuration's, `baseline-NAME` at NAME's where its encoder or optimisation settings "
        "differ), each trained with "
        f"{about['seeds']} seeds (0 to {about['seeds'] - 1}) until valid NDCG@10 had not improved for "
        f"{about['patience']} epochs (at most {about['max_epochs']}), then evaluated on test at its best "
        "epoch (full ranking, the user's history masked).  Cells: mean ± standard deviation over seeds "
        f"(sample std).  In brackets: the mean paired difference to the baseline named under `against` and the "
        f"p-value of a {TEST_NAME}.",
        "", "## Test", "", markdown(test), "## Valid", "", markdown(valid),
        "## Cost and parameters", "",
        "Minutes: training and validation time of every seed's run, summed; a run on a GPU held the "
        "GPU share it asked for (--trials-per-gpu) for that time.", "", markdown(cost),
        "## Model", "",
        f"`final_checkpoint/`: {chosen['configuration']} (the best mean valid NDCG@10), seed "
        f"{int(chosen['seed'])} (the median valid NDCG@10 of its seeds: {chosen['valid/NDCG@10']:.4f}; "
        f"test NDCG@10 {chosen['test/NDCG@10']:.4f}).", ""])


def _final_tables(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """final.md's test table (with each paired difference to its baseline), valid table, and cost
    and parameters table."""
    def cells(split: str, row: pd.Series, with_diff: bool) -> list[str]:
        out = []
        for m in METRICS:
            cell = _mean_std(row[f"{split}/{m}_mean"], row[f"{split}/{m}_std"])
            if with_diff and not row["is_baseline"]:
                cell += f" ({row[f'test/{m}_diff']:+.4f}, p={_p(row[f'test/{m}_p'])})"
            out.append(cell)
        return out

    test = pd.DataFrame([[r["configuration"] + (" (start)" if r["start"] else ""), int(r["seeds"]), r["baseline"],
                          *cells("test", r, True)]
                         for _, r in table.iterrows()], columns=["configuration", "seeds", "against", *METRICS])
    valid = pd.DataFrame([[r["configuration"], *cells("valid", r, False)] for _, r in table.iterrows()],
                         columns=["configuration", *METRICS])
    params = [c for c in table.columns if c.startswith("param/")]
    cost = table[["configuration", "epochs_mean", "minutes_total", "device", *params]].rename(
        columns={"epochs_mean": "epochs (mean)", "minutes_total": "minutes (all seeds)",
                 **{c: c[len("param/"):] for c in params}})
    return test, valid, cost


# --- reproduce ------------------------------------------------------------------------------

def paper_results() -> dict[str, Any]:
    """tuner/paper_results.yaml: the paper's per-dataset settings and its reported test metrics."""
    return yaml.safe_load(resources.files("tuner").joinpath("paper_results.yaml").read_text())


def paper_value(paper: dict[str, Any], dataset: str, configuration: str, metric: str) -> float:
    """The paper's value for a reproduce run (both SASRec losses stand beside its one SASRec)."""
    name = "sasrec" if configuration.startswith("sasrec") else configuration
    return paper["results"].get(dataset, {}).get(name, {}).get(metric, math.nan)


def reproduce_table(runs: pd.DataFrame, order: dict[str, list[str]], paper: dict[str, Any]) -> pd.DataFrame:
    """table.parquet: one row per dataset and configuration (`order`: dataset -> configurations);
    test metrics with and without history masking, the paper's value and the gap (unmasked mean
    minus the paper's: the paper's numbers come from RecBole, which does not mask)."""
    columns = [f"{split}/{m}" for split in ("test", "test_unmasked") for m in PAPER_METRICS]
    frames = []
    for dataset, configurations in order.items():
        table = summarize(runs[runs["dataset"] == dataset], columns, configurations)
        table.insert(0, "dataset", dataset)
        for m in PAPER_METRICS:
            table[f"paper/{m}"] = [paper_value(paper, dataset, c, m) for c in table["configuration"]]
            table[f"gap/{m}"] = table[f"test_unmasked/{m}_mean"] - table[f"paper/{m}"]
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def reproduce_markdown(table: pd.DataFrame, about: dict[str, Any]) -> str:
    """table.md: per dataset, one row per configuration and metric."""
    parts = [
        "# SimDiffRec against the paper", "",
        f"Each configuration trained with {about['seeds']} seed{'s' if about['seeds'] != 1 else ''} until "
        "valid NDCG@10 had not improved for "
        f"{about['patience']} epochs (at most {about['max_epochs']}); test metrics of the best epoch, mean ± "
        "standard deviation over seeds.  Unmasked: the user's history stays among the candidates, as in "
        "RecBole, on which the paper's numbers were computed (its authors' code is a RecBole fork, whose "
        "sequential full-ranking evaluation does not mask history) — so the gap is unmasked minus paper.  "
        "Masked: this project's protocol (history removed, the target kept).  Paper: Table 2 (SASRec, "
        "SimDiffRec) and Table 3 (ablations), mean of ten runs; the one SASRec of the paper stands beside "
        "both losses.  no-k_noise: Gaussian noise; no-c_aug: random positions; no-k_sample: no hard negative.", ""]
    for dataset, rows in table.groupby("dataset", sort=False):
        lines = []
        for _, r in rows.iterrows():
            for m in PAPER_METRICS:
                paper, gap = r[f"paper/{m}"], r[f"gap/{m}"]
                lines.append([r["configuration"], m, int(r["seeds"]),
                              _mean_std(r[f"test_unmasked/{m}_mean"], r[f"test_unmasked/{m}_std"]),
                              _mean_std(r[f"test/{m}_mean"], r[f"test/{m}_std"]),
                              "" if math.isnan(paper) else f"{paper:.4f}",
                              "" if math.isnan(gap) else f"{gap:+.4f} ({gap / paper:+.1%})"])
        parts += [f"## {dataset}", "", markdown(pd.DataFrame(lines, columns=[
            "configuration", "metric", "seeds", "unmasked", "masked", "paper", "gap"]))]
    return "\n".join(parts)


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _p(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.2g}"
