"""The statistics and tables of finalize and reproduce, on runs with known values (no Ray)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from tuner import verdict
from tuner.retrain import REPRODUCE

BASE = [0.040, 0.042, 0.041, 0.043, 0.039]
GAIN = [0.004, 0.002, 0.005, 0.003, 0.006]  # top-1 = baseline + GAIN, seed by seed


def runs_frame() -> pd.DataFrame:
    rows = []
    for name, values in (("top-1", [b + g for b, g in zip(BASE, GAIN)]), ("baseline", BASE)):
        for seed, v in enumerate(values):
            rows.append({"configuration": name, "seed": seed, "best_epoch": 10 + seed, "epochs": 20 + seed,
                         "minutes": 1.5, "gpu": 0,
                         **{f"{s}/{m}": v for s in verdict.SPLITS for m in verdict.METRICS}})
    return pd.DataFrame(rows)


def test_mean_std_paired_difference_and_p_value_match_hand_and_scipy():
    table = verdict.final_table(runs_frame(), {"top-1": {"alpha": 0.2}, "baseline": {"alpha": 0.0}},
                                {"top-1": "baseline"})
    top, base = table.iloc[0], table.iloc[1]
    improved = [b + g for b, g in zip(BASE, GAIN)]
    assert top["configuration"] == "top-1" and top["seeds"] == 5 and not top["is_baseline"]
    assert top["test/NDCG@10_mean"] == pytest.approx(sum(improved) / 5)
    assert top["valid/HR@20_std"] == pytest.approx(pd.Series(improved).std(ddof=1))  # sample std
    assert top["test/HR@5_diff"] == pytest.approx(0.004)  # mean of GAIN
    # the paired t statistic by hand: mean(d) / (sd(d) / sqrt(n))
    d = pd.Series(GAIN)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    assert top["test/NDCG@10_p"] == pytest.approx(2 * stats.t.sf(t, df=4))
    assert top["test/NDCG@10_p"] == pytest.approx(stats.ttest_rel(improved, BASE).pvalue)
    assert base["is_baseline"] and base["test/NDCG@10_diff"] == 0 and math.isnan(base["test/NDCG@10_p"])
    assert top["epochs_mean"] == 22 and top["minutes_total"] == pytest.approx(7.5) and top["device"] == "cpu"
    assert (top["param/alpha"], base["param/alpha"]) == (0.2, 0.0)


def test_each_configuration_is_compared_with_its_own_baseline():
    runs = runs_frame()
    other = runs[runs["configuration"] == "baseline"].assign(configuration="baseline-top-2")
    other[[f"test/{m}" for m in verdict.METRICS]] -= 0.01  # SASRec at top-2's settings: 0.01 lower
    top2 = runs[runs["configuration"] == "baseline"].assign(configuration="top-2")  # equal to `baseline`
    table = verdict.final_table(pd.concat([runs, top2, other]), {n: {} for n in ["top-1", "top-2", "baseline",
                                                                                "baseline-top-2"]},
                                {"top-1": "baseline", "top-2": "baseline-top-2"}).set_index("configuration")
    assert table["is_baseline"].tolist() == [False, False, True, True]
    assert table["baseline"].tolist() == ["baseline", "baseline-top-2", "", ""]
    assert table.loc["top-1", "test/HR@10_diff"] == pytest.approx(0.004)  # mean of GAIN
    assert table.loc["top-2", "test/HR@10_diff"] == pytest.approx(0.01)  # not 0: against its own
    assert table.loc["baseline-top-2", "test/HR@10_diff"] == 0


def test_pairs_are_matched_by_seed_not_by_order():
    a = pd.Series([0.5, 0.1, 0.3], index=[2, 0, 1])
    b = pd.Series([0.0, 0.2, 0.05, 0.9], index=[0, 1, 2, 3])  # seed 3 has no partner
    diff, p = verdict.paired(a, b)
    assert diff == pytest.approx(((0.1 - 0.0) + (0.3 - 0.2) + (0.5 - 0.05)) / 3)
    assert p == pytest.approx(stats.ttest_rel([0.1, 0.3, 0.5], [0.0, 0.2, 0.05]).pvalue)


def test_one_seed_or_constant_differences_give_no_p_value():
    assert math.isnan(verdict.paired(pd.Series([0.3]), pd.Series([0.2]))[1])
    diff, p = verdict.paired(pd.Series([0.3, 0.4]), pd.Series([0.2, 0.3]))
    assert diff == pytest.approx(0.1) and math.isnan(p)


def test_the_median_seed_is_chosen_for_the_final_model():
    runs = runs_frame()
    assert verdict.median_seed(runs, "baseline")["seed"] == 2  # 0.041 is the median of BASE
    even = runs[runs["seed"] < 4]  # BASE[:4] = .040 .042 .041 .043: the lower middle, .041
    assert verdict.median_seed(even, "baseline")["seed"] == 2


def test_final_markdown_names_the_test_and_shows_the_differences():
    runs = runs_frame()
    table = verdict.final_table(runs, {"top-1": {}, "baseline": {}}, {"top-1": "baseline"})
    text = verdict.final_markdown(table, runs, verdict.median_seed(runs, "top-1"),
                                  {"experiment": "runs/x/experiment", "top": 1, "seeds": 5, "patience": 10,
                                   "max_epochs": 200})
    assert "paired t-test" in text and "ttest_rel" in text
    assert text.startswith("**Winner: top-1**, test HR@10 0.0450 ± 0.0010")
    assert "| top-1 | 5 | baseline | 0.0450 ± 0.0010 (+0.0040, p=" in text


def test_the_reproduce_table_puts_the_papers_value_and_the_gap_beside_each_mean():
    paper = verdict.paper_results()
    rows = [{"dataset": "beauty", "configuration": c, "seed": s,
             **{f"test/{m}": 0.05 + s / 100 for m in verdict.PAPER_METRICS},
             **{f"test_unmasked/{m}": 0.04 + s / 100 for m in verdict.PAPER_METRICS}}
            for c in REPRODUCE for s in (0, 1)]
    rows += [{**r, "dataset": "mine"} for r in rows if r["configuration"] == "simdiffrec"]
    table = verdict.reproduce_table(pd.DataFrame(rows), {"beauty": list(REPRODUCE), "mine": ["simdiffrec"]}, paper)
    simdiffrec = table[(table["dataset"] == "beauty") & (table["configuration"] == "simdiffrec")].iloc[0]
    assert simdiffrec["paper/HR@10"] == 0.0932  # Table 2, Beauty, Ours
    assert simdiffrec["test_unmasked/HR@10_mean"] == pytest.approx(0.045)
    assert simdiffrec["gap/HR@10"] == pytest.approx(0.045 - 0.0932)
    by_name = table[table["dataset"] == "beauty"].set_index("configuration")
    assert by_name.loc["no-c_aug", "paper/NDCG@5"] == 0.0295  # Table 3, Beauty, w/o c_aug
    assert by_name.loc["sasrec-bce", "paper/NDCG@10"] == by_name.loc["sasrec-ce", "paper/NDCG@10"] == 0.0245
    assert math.isnan(table[table["dataset"] == "mine"].iloc[0]["paper/HR@5"])  # no paper value, no gap
    text = verdict.reproduce_markdown(table, {"seeds": 2, "patience": 10, "max_epochs": 200})
    assert "| simdiffrec | HR@10 | 2 | 0.0450 ± 0.0071 | 0.0550 ± 0.0071 | 0.0932 | -0.0482 (-51.7%) |" in text
    assert "## mine" in text and "RecBole" in text


def test_the_paper_settings_follow_section_5_4():
    settings = verdict.paper_results()["settings"]
    assert settings["beauty"] == {"alpha": 0.4, "beta": 0.4}
    assert settings["toys"] == settings["sports"] == {"alpha": 0.1, "beta": 0.1}
    assert settings["ml-1m"]["max_len"] == 200


def _headline(values: dict[str, list[float]], baselines: dict[str, str], starts: list[str]) -> str:
    rows = [{"configuration": name, "seed": seed, "best_epoch": 1, "epochs": 2, "minutes": 1.0, "gpu": 0,
             **{f"{s}/{m}": v for s in verdict.SPLITS for m in verdict.METRICS}}
            for name, per_seed in values.items() for seed, v in enumerate(per_seed)]
    runs = pd.DataFrame(rows)
    table = verdict.final_table(runs, {name: {} for name in values}, baselines, starts)
    return verdict.headline(table, runs)


def test_the_headline_names_a_starting_point_that_beats_the_search():
    line = _headline({"top-1": [0.040, 0.041, 0.042], "start-1": [0.050, 0.052, 0.051],
                      "baseline": [0.030, 0.031, 0.030], "sasrec-defaults": [0.045, 0.044, 0.046]},
                     {"top-1": "baseline", "start-1": "sasrec-defaults"}, ["start-1", "sasrec-defaults"])
    assert line.startswith("**Winner: start-1**, test HR@10 0.0510 ± 0.0010")
    assert "one of the search's starting points: the search found nothing better" in line
    assert "Against SASRec-CE at its settings (sasrec-defaults): HR@10 +0.0060" in line
    assert "SimDiffRec's own parts helped" in line  # +0.006 on every seed: p < 0.05


def test_the_headline_compares_a_searched_winner_with_the_best_start_and_says_when_sasrec_wins():
    line = _headline({"top-1": [0.060, 0.058, 0.062], "start-1": [0.050, 0.052, 0.051],
                      "baseline": [0.061, 0.057, 0.060], "sasrec-defaults": [0.045, 0.044, 0.046]},
                     {"top-1": "baseline", "start-1": "sasrec-defaults"}, ["start-1", "sasrec-defaults"])
    assert line.startswith("**Winner: top-1**")
    assert "Against the best starting point (start-1): HR@10 +0.0090" in line
    assert "(baseline): HR@10 +0.0007" in line and "made no significant difference" in line
    line = _headline({"top-1": [0.040, 0.041, 0.042], "baseline": [0.050, 0.052, 0.051]},
                     {"top-1": "baseline"}, [])
    assert line.startswith("**Winner: baseline**") and "SASRec-CE (alpha = beta = 0) won" in line
