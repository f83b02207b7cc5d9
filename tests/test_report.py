"""`simdiffrec status` and `simdiffrec report` on a real Ray experiment of a cheap objective:
finished, caught mid-search (a half-written result.json, a trial not started), a single trial,
with and without finalize's table.  One small search serves the module; the other states are
edited copies of it."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from ray import tune

from simdiffrec.cli import main
from simdiffrec.files import locked
from tuner import report, search, spaces, verdict
from tuner.experiment import read
from tuner.protocol import BEST, GPU_SHARE, GRID_RECORD, METRIC, RECORD, SPACE_COPY
from tuner.status import Search, outcome

SPACE = {
    "parameters": {
        "alpha": {"type": "float", "low": 0.1, "high": 0.5},
        "k_noise": {"type": "categorical", "choices": [1, 5, 25]},
        "tau_schedule": {"type": "categorical", "choices": ["constant", "linear"]},
        "tau_end": {"type": "float", "low": 0.05, "high": 1.0, "log": True, "when": {"tau_schedule": ["linear"]}},
    },
    "fixed": {"patience": 1},
    "points_to_evaluate": [{"alpha": 0.3, "k_noise": 5, "tau_schedule": "constant"},
                           {"alpha": 0.2, "k_noise": 1, "tau_schedule": "linear", "tau_end": 0.1}],
    "asha": {"max_epochs": 3, "grace_period": 1, "reduction_factor": 2},
}
TRIALS = 6
FINAL_METRICS = [f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)]


def objective(config: dict) -> None:
    """Scores like training: best near alpha 0.3; a constant schedule improves every epoch, a
    linear one peaks at epoch 1, after which its patience of 1 epoch stops it."""
    peak, best, best_epoch = 0.2 - (config["alpha"] - 0.3) ** 2, 0.0, 0
    for epoch in (1, 2, 3):
        score = peak * (epoch if config["tau_schedule"] == "constant" else 1 / epoch) / 3
        if score > best:
            best, best_epoch = score, epoch
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "state.txt").write_text(str(epoch))
            tune.report({"epoch": epoch, METRIC: score, BEST: best, "best_epoch": best_epoch,
                         "valid/HR@10": 2 * score, GPU_SHARE: 0.0}, checkpoint=tune.Checkpoint.from_directory(folder))
        if epoch - best_epoch >= 1:
            return


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished search's OUT folder: experiment/, space.yaml and search.yaml as `tune` leaves them."""
    out = tmp_path_factory.mktemp("search")
    (out / SPACE_COPY).write_text(yaml.safe_dump(SPACE, sort_keys=False))
    space = spaces.load(out / SPACE_COPY)
    settings = search.SearchSettings(experiment=str(out / "experiment"), num_samples=TRIALS, max_concurrent=2,
                                     gpu="never")
    record = {"data": "none", "space": str(out / SPACE_COPY), "max_epochs": 3, "settings": dataclasses.asdict(settings)}
    (out / RECORD).write_text(yaml.safe_dump(record, sort_keys=False))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a "ray start" one
    try:
        search.run_search(objective, space, settings)
    finally:
        ray.shutdown()
    return out


def copy_search(source: Path, target: Path, keep=None, status=None) -> Path:
    """A copy of a search whose saved state keeps the trials `keep(i)` and sets `status(i)`."""
    shutil.copytree(source, target)
    record = yaml.safe_load((target / RECORD).read_text())
    record["settings"]["experiment"] = str(target / "experiment")
    (target / RECORD).write_text(yaml.safe_dump(record))
    state_file, = (target / "experiment").glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    trials = []
    for i, (trial, metadata) in enumerate(state["trial_data"]):
        if keep and not keep(i):
            continue
        trial = json.loads(trial)
        trial["status"] = (status and status(i)) or trial["status"]
        trials.append([json.dumps(trial), metadata])
    state["trial_data"] = trials
    state_file.write_text(json.dumps(state))
    return target


@pytest.fixture(scope="module")
def running(finished, tmp_path_factory) -> Path:
    """The search caught mid-way: trial 1 running (one epoch reported, no checkpoint yet; Ray's
    state lists it PENDING as it does a running trial), trial 2 created but not started, and the
    last trial's result.json with its last line half-written."""
    out = copy_search(finished, tmp_path_factory.mktemp("running") / "out",
                      status=lambda i: "PENDING" if i < 2 else None)
    experiment = out / "experiment"
    state_file, = experiment.glob("experiment_state-*.json")
    ids = [json.loads(trial)["trial_id"] for trial, _ in json.loads(state_file.read_text())["trial_data"]]
    first, second, last = (next(experiment.glob(f"*_{trial_id}_*")) for trial_id in (ids[0], ids[1], ids[-1]))
    (first / "result.json").write_text((first / "result.json").read_text().splitlines(keepends=True)[0])
    for checkpoint in [*first.glob("checkpoint_*"), *second.glob("checkpoint_*")]:
        shutil.rmtree(checkpoint)
    for name in ("result.json", "progress.csv"):
        (second / name).unlink()
    text = (last / "result.json").read_text()
    (last / "result.json").write_text(text[:len(text) - 40])
    return out


def results(out: Path) -> pd.DataFrame:
    rows = []
    for result in (out / "experiment").glob("*/result.json"):
        for line in result.read_text().splitlines():
            if line.endswith("}"):
                rows.append(json.loads(line))
    return pd.DataFrame(rows)


def check_page(report: Path, figures: set[str]) -> str:
    page = (report / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page), "the page loads something from outside"
    assert "<script" not in page
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert {p.name for p in report.glob("*.png")} == figures
    assert len(images) == len(figures)
    return page


def test_outcome_tells_asha_stops_from_patience_and_the_end():
    assert outcome("TERMINATED", 3, 2, max_epochs=3, patience=1) == "finished"
    assert outcome("TERMINATED", 2, 1, max_epochs=3, patience=1) == "early-stopped"
    assert outcome("TERMINATED", 2, 2, max_epochs=3, patience=1) == "ASHA-stopped"
    assert outcome("TERMINATED", 2, 1, max_epochs=3, patience=2) == "ASHA-stopped"
    assert outcome("ERROR", 1, 1, max_epochs=3, patience=1) == "failed"
    assert outcome("PENDING", 2, 1, max_epochs=3, patience=1) == "running"
    assert outcome("PENDING", 0, 0, max_epochs=3, patience=1) == "pending"


def test_status_of_a_finished_search_counts_trials_and_names_the_best(finished, capsys):
    assert main(["status", str(finished), "--top", "3"]) == 0
    text = capsys.readouterr().out
    reported = results(finished)
    best = reported.loc[reported[METRIC].idxmax()]
    last = reported.groupby("trial_id")["epoch"].max()
    stopped = reported.groupby("trial_id").apply(lambda r: r["epoch"].max() - r.loc[r[METRIC].idxmax(), "epoch"])
    early, full = int((stopped[last < 3] >= 1).sum()), int((last == 3).sum())
    assert f"trials: {TRIALS} of {TRIALS} | {full} finished, {early} early-stopped, " \
           f"{TRIALS - full - early} ASHA-stopped, 0 running, 0 pending, 0 failed" in text
    assert f"best: trial {best['trial_id']}" in text and f"{best[METRIC]:.4f}" in text
    assert max(map(len, text.splitlines())) <= 100
    assert sum(line[:4].strip().isdigit() for line in text.splitlines()) == 3  # --top 3 rows
    assert main(["status", str(finished / "experiment")]) == 0  # the experiment folder works too
    assert f"best: trial {best['trial_id']}" in capsys.readouterr().out
    for top in ("0", "-2"):  # never a silently empty or shortened leaderboard
        with pytest.raises(SystemExit) as stop:
            main(["status", str(finished), "--top", top])
        assert stop.value.code == 2 and f"--top: '{top}': must be an integer of at least 1" in capsys.readouterr().err


def test_status_and_report_name_the_trials_still_rising_at_the_cap(finished, tmp_path, capsys):
    """A constant schedule improves every epoch up to the cap of 3: status, the report and tune's
    closing lines (the same `status.rising`) name those trials and the flags that give them room."""
    numbers = {t.trial_id: t.number for t in read(str(finished / "experiment")).trials}
    at_cap = sorted(numbers[t] for t, rows in results(finished).groupby("trial_id")
                    if rows["epoch"].max() == 3 and rows.loc[rows[METRIC].idxmax(), "epoch"] == 3)
    assert at_cap
    assert main(["status", str(finished)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"still rising at the cap of 3 epochs: #{at_cap[0]} (best at epoch 3)" in text
    assert f"finalize --trials {','.join(map(str, at_cap))}, or give the next search a higher --max-epochs" in text
    assert main(["report", str(finished), "--out", str(tmp_path)]) == 0
    assert f"Still rising at the cap of 3 epochs: #{at_cap[0]}" in (tmp_path / "report.html").read_text()


def test_status_mid_search_counts_running_and_waiting_trials(running, capsys):
    with locked(running):  # as the search's driver holds it
        assert main(["status", str(running)]) == 0
    text = capsys.readouterr().out
    assert "1 running, 1 pending, 0 failed" in text and "best: trial" in text
    assert main(["status", str(running)]) == 0  # no process holds the lock: the search was stopped
    text = capsys.readouterr().out
    assert "0 running, 1 interrupted, 1 pending, 0 failed" in text


def test_status_lists_a_running_trial_wherever_it_ranks(finished, tmp_path, capsys):
    best = results(finished).groupby("trial_id")[METRIC].max().sort_values(ascending=False)
    state_file, = (finished / "experiment").glob("experiment_state-*.json")
    ids = [json.loads(trial)["trial_id"] for trial, _ in json.loads(state_file.read_text())["trial_data"]]
    last = ids.index(best.index[-1])
    out = copy_search(finished, tmp_path / "out", status=lambda i: "PENDING" if i == last else None)
    with locked(out):  # the worst trial is still running
        assert main(["status", str(out), "--top", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line[:4].strip().isdigit()]
    assert [(row[0], row[1]) for row in rows] == [("1", best.index[0]), (str(TRIALS), best.index[-1])]
    assert rows[1][3] == "running"
    at = next(i for i, line in enumerate(lines) if line.split()[1:2] == [best.index[-1]])
    assert lines[at - 1].strip() == "..."  # the ranks between them left out, and said so


def test_report_of_a_finished_search_has_every_figure_and_the_leaderboard(finished, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "MIN_IMPORTANCE", 2)  # the importance drawn from the few trials of this search
    assert main(["report", str(finished), "--out", str(tmp_path)]) == 0
    page = check_page(tmp_path, {"learning_curves.png", "best_so_far.png", "importance.png", "slices.png"})
    reported = results(finished)
    best = reported.loc[reported[METRIC].idxmax(), "trial_id"]
    assert "<h2>Leaderboard</h2>" in page and f"<td>{best}</td>" in page
    assert page.index(f"<td>{best}</td>") < min(page.index(f"<td>{t}</td>") for t in set(reported["trial_id"]) - {best})
    assert "Final comparison" not in page
    assert f"<td>trials</td><td>{TRIALS} of {TRIALS}</td>" in page
    assert "<td>GPU share per trial</td><td>none (CPU trials)</td>" in page
    assert "Left out, as not every trial sampled them: tau_end" in page


def test_report_mid_search_reads_what_is_there(running, tmp_path):
    with locked(running):
        assert main(["report", str(running / "experiment"), "--out", str(tmp_path)]) == 0
    page = check_page(tmp_path, {"learning_curves.png", "best_so_far.png", "slices.png"})
    assert re.search(r"<td>running</td><td>1</td>", page) and re.search(r"<td>pending</td><td>1</td>", page)
    top = page[page.index("<h2>What the search found</h2>"):page.index("<h2>Progress and cost</h2>")]
    assert "When the search has ended, retrain the best" in top


def test_report_before_finalize_opens_with_the_best_trial_and_the_command_that_decides(finished, tmp_path):
    assert main(["report", str(finished), "--out", str(tmp_path)]) == 0
    page = check_page(tmp_path, {"learning_curves.png", "best_so_far.png", "slices.png"})
    reported = results(finished)
    best = reported.loc[reported[METRIC].idxmax()]
    number = {t.trial_id: t.number for t in read(str(finished / "experiment")).trials}[best["trial_id"]]
    top = page[page.index("<h2>What the search found</h2>"):page.index("<h2>Progress and cost</h2>")]
    assert page.index("<h2>") == page.index("<h2>What the search found</h2>")  # the page's first lines
    assert f"<b>trial #{number}</b> ({best['trial_id']}" in top and f"{best[METRIC]:.4f}" in top
    assert f"<code>simdiffrec finalize {finished / 'experiment'} --seeds 5 --top 3</code>" in top
    assert "Needs at least 20 ended trials" in page and "this search has" in page  # no importance from 6 trials


def test_report_of_a_single_trial_says_what_it_cannot_draw_yet(finished, tmp_path):
    out = copy_search(finished, tmp_path / "one", keep=lambda i: i == 0)
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    page = check_page(tmp_path / "report", {"learning_curves.png"})
    assert page.count("Needs at least 2 trials") == 2  # best so far, slices
    assert "Needs at least 20 ended trials" in page


def final_table() -> pd.DataFrame:
    """finalize's final.parquet, by its contract: one row per configuration."""
    rows = []
    for i, name in enumerate(["top-1", "top-2", "baseline"]):
        row = {"configuration": name, "is_baseline": name == "baseline", "baseline": "" if i == 2 else "baseline",
               "seeds": 3, "epochs_mean": 40.0,
               "minutes_total": 12.5, "device": "cpu", "param/alpha": [0.3, 0.25, 0.4][i]}
        for split in ("valid", "test"):
            for metric in FINAL_METRICS:
                row[f"{split}/{metric}_mean"], row[f"{split}/{metric}_std"] = 0.1 - 0.01 * i, 0.004
        for metric in FINAL_METRICS:
            row[f"test/{metric}_diff"] = 0.02 - 0.01 * i if name != "baseline" else 0.0
            row[f"test/{metric}_p"] = np.nan if name == "baseline" else [0.0123, 0.2][i]
        rows.append(row)
    return pd.DataFrame(rows)


def test_report_shows_finalize_table_from_its_default_folder_or_final(finished, tmp_path, capsys):
    out = copy_search(finished, tmp_path / "search")
    (out / "final").mkdir()
    final_table().to_parquet(out / "final" / "final.parquet")
    assert main(["report", str(out / "experiment"), "--out", str(tmp_path / "report")]) == 0
    page = check_page(tmp_path / "report", {"learning_curves.png", "best_so_far.png", "slices.png", "final.png"})
    section = page[page.index("Final comparison"):]
    assert "<td>baseline</td>" in section and "+0.0200 (p 0.0123)" in section and "0.1000 ± 0.0040" in section
    assert "+0.0000" not in section  # the baseline is not compared with itself

    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / "final", elsewhere)
    final_table().drop(columns="baseline").to_parquet(elsewhere / "final.parquet")  # written before `baseline`
    assert main(["report", str(out), "--out", str(tmp_path / "again"), "--final", str(elsewhere)]) == 0
    section = (tmp_path / "again" / "report.html").read_text()
    section = section[section.index("Final comparison"):]
    section = section[:section.index("</table>")]  # the scores; the cost and parameters follow
    assert section.count("<td>baseline</td>") == 3 and "+0.0200 (p 0.0123)" in section  # it, and top-1, top-2 against it
    assert main(["report", str(out), "--out", str(tmp_path / "bad"), "--final", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--final {tmp_path}: no final.parquet" in err


def finalized(search: Path) -> Path:
    """`search` with finalize's files in search/final as finalize writes them: top-1 is the search's
    best trial, top-2 a linear schedule; the baseline's row lists top-1's parameters, so it leaves
    tau_end blank, which grid.yaml's plan says its runs were trained at (0.5)."""
    best = results(search).groupby("trial_id")[METRIC].max().idxmax()
    config = next(t.config for t in read(str(search / "experiment")).trials if t.trial_id == best)
    table = final_table().drop(columns="param/alpha").assign(start=False)
    for name in ("alpha", "k_noise", "tau_schedule", "tau_end"):
        table[f"param/{name}"] = [config.get(name), 0.25 if name == "alpha" else
                                  {"k_noise": 5, "tau_schedule": "linear", "tau_end": 0.2}[name], None]
    runs = pd.DataFrame([{"configuration": name, "seed": seed, "test/HR@10": 0.2 - 0.01 * i + 0.001 * seed,
                          "test/NDCG@10": 0.1 - 0.01 * i + 0.002 * seed, "valid/NDCG@10": 0.1 - 0.01 * i + 0.001 * seed}
                         for i, name in enumerate(table["configuration"]) for seed in range(3)])
    final = search / "final"
    final.mkdir()
    table.to_parquet(final / "final.parquet")
    runs.to_parquet(final / "final_runs.parquet")
    about = {"experiment": str(search / "experiment"), "top": 2, "trials": [], "seeds": 3, "patience": 1, "max_epochs": 3}
    chosen = verdict.median_seed(runs, "top-1")
    (final / "final.md").write_text(verdict.final_markdown(table, runs, chosen, about))
    plan = {name: {"config": {"alpha": 0.0 if name == "baseline" else 0.3, "tau_end": 0.5 if name == "baseline" else None}}
            for name in table["configuration"]}
    (final / GRID_RECORD).write_text(yaml.safe_dump({"plan": {"runs": plan}, "experiment": str(final / "experiment")}))
    return search


def test_report_after_finalize_opens_with_its_verdict_and_what_its_model_is(finished, tmp_path):
    out = finalized(copy_search(finished, tmp_path / "search"))
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.index("<h2>") == page.index("<h2>Verdict</h2>")
    top = page[page.index("<h2>Verdict</h2>"):page.index("<h2>Progress and cost</h2>")]
    headline = (out / "final" / "final.md").read_text().splitlines()[0]
    assert headline.startswith("**Winner: top-1**") and "Against SASRec-CE at its settings (baseline): HR@10 +" in headline
    assert top.startswith(f"<h2>Verdict</h2><p><b>Winner: top-1</b>{headline.removeprefix('**Winner: top-1**')}")
    seed = verdict.median_seed(pd.read_parquet(out / "final" / "final_runs.parquet"), "top-1")["seed"]
    assert f"<code>{out / 'final' / 'final_checkpoint'}/</code> holds top-1 (the best mean valid NDCG@10), seed {seed}" in top
    best = results(out).groupby("trial_id")[METRIC].max().idxmax()
    number = {t.trial_id: t.number for t in read(str(out / "experiment")).trials}[best]
    assert f"<b>top-1</b> is search trial #{number} ({best})" in top
    assert "<b>baseline</b> is SASRec-CE at the settings of top-1, top-2" in top


def test_report_shows_the_parameters_a_baseline_was_trained_with(finished, tmp_path):
    out = finalized(copy_search(finished, tmp_path / "search"))
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    baseline = re.findall(r"<tr><td>baseline</td>(.*?)</tr>", page[page.index("Final comparison"):])[-1]
    assert baseline.endswith("<td>0.5</td>")  # tau_end, the last parameter: its runs' value, not a blank


def columns(table: str) -> int:
    return len(re.findall(r"<t[hd]>", table.split("</tr>")[0]))


def test_the_page_fits_a_window_tables_at_most_ten_columns_and_nothing_unbreakable(finished, tmp_path):
    out = finalized(copy_search(finished, tmp_path / "search"))
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    tables = re.findall(r"<table>.*?</table>", page)
    assert len(tables) >= 5 and max(map(columns, tables)) <= report.MAX_COLUMNS == 10
    style = page[page.index("<style>"):page.index("</style>")]
    assert "nowrap" not in style and "overflow" not in style.replace("overflow-wrap: anywhere", "")
    assert "tau_<wbr>schedule" in page  # a long column name may break
    wide = report._table(pd.DataFrame({f"c{i}": [i] for i in range(25)}), keys=2)
    assert [columns(t) for t in re.findall(r"<table>.*?</table>", wide)] == [10, 10, 9]  # even parts, keys in each


def test_report_and_status_of_a_folder_without_an_experiment_fail_in_one_line(tmp_path, capsys):
    for args in (["status", str(tmp_path)], ["report", str(tmp_path), "--out", str(tmp_path / "r")]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{tmp_path}: no Ray Tune experiment there" in err


def family_objective(config: dict) -> None:
    """SimDiffRec scores by alpha, SASRec-CE 0.05; three epochs."""
    score = config["alpha"] if config["family"] == "simdiffrec" else 0.05
    for epoch in (1, 2, 3):
        tune.report({"epoch": epoch, METRIC: score, BEST: score, "best_epoch": epoch, GPU_SHARE: 0.0})


def test_status_and_report_compare_the_families_of_a_search_that_samples_both(tmp_path, capsys):
    space = {"parameters": {"family": {"type": "categorical", "choices": ["simdiffrec", "sasrec"]},
                            "alpha": {"type": "float", "low": 0.1, "high": 0.5, "when": {"family": ["simdiffrec"]}}},
             "points_to_evaluate": [{"family": "sasrec"}, {"family": "simdiffrec", "alpha": 0.3}],
             "asha": {"max_epochs": 3, "grace_period": 3, "reduction_factor": 2}}
    out = tmp_path / "search"
    out.mkdir()
    (out / SPACE_COPY).write_text(yaml.safe_dump(space, sort_keys=False))
    settings = search.SearchSettings(experiment=str(out / "experiment"), num_samples=4, gpu="never")
    (out / RECORD).write_text(yaml.safe_dump({"data": "none", "space": str(out / SPACE_COPY), "max_epochs": 3,
                                              "settings": dataclasses.asdict(settings)}, sort_keys=False))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        search.run_search(family_objective, spaces.load(out / SPACE_COPY), settings)
    finally:
        ray.shutdown()
    trials = {t.number: t.config for t in read(settings.experiment).trials}
    best = max((c["alpha"], n) for n, c in trials.items() if c["family"] == "simdiffrec")
    sasrec = sum(c["family"] == "sasrec" for c in trials.values())
    assert main(["status", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"families: sasrec {sasrec} trials, best 0.05 (#{min(n for n, c in trials.items() if c['family'] == 'sasrec')})" in text
    assert f"simdiffrec {4 - sasrec} trials, best {best[0]:.4g} (#{best[1]})" in text
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>SASRec-CE and SimDiffRec</h2>" in page and f"SimDiffRec's best is {best[0] - 0.05:+.4f}" in page


def test_keep_curves_writes_every_reported_epoch_with_its_trial_and_parameters(finished, tmp_path):
    script = Path(__file__).parents[1] / "bench" / "keep_curves.py"
    subprocess.run([sys.executable, str(script), str(finished), "tiny", "--command", "simdiffrec tune ...",
                    "--out", str(tmp_path / "kept")], check=True, capture_output=True)
    kept = pd.read_parquet(tmp_path / "kept" / "rows.parquet")
    reported = results(finished)
    assert len(kept) == len(reported) and set(kept["trial_id"]) == set(reported["trial_id"])
    assert {"number", "epoch", "param/alpha", "param/k_noise", METRIC} <= set(kept.columns)
    assert yaml.safe_load((tmp_path / "kept" / "about.yaml").read_text())["command"] == "simdiffrec tune ..."


# --- the page's defects, on figures drawn from a synthetic search (no Ray) -----------------------

def synthetic(trials: int, best_value: str = "cosine") -> Search:
    """A search over the default space's family and SimDiffRec parameters (log ranges over
    several decades, a conditional categorical): trial 2 is the best, with tau_schedule
    `best_value`, and no trial sampled "constant"."""
    space = spaces.load("default")
    rows, evaluations = [], []
    for number in range(1, trials + 1):
        score = 0.09 if number == 2 else 0.02 + 0.002 * number
        params = {"family": "simdiffrec", "alpha": 10 ** (-3 + 2.6 * number / trials), "beta": 0.2,
                  "tau": 0.05 + 0.9 * number / trials, "lr": 3e-4 * 10 ** (number / trials),
                  "tau_schedule": best_value if number == 2 else "linear", "tau_end": 0.1, "k_noise": 25}
        rows.append({"trial_id": f"t{number}", "number": number, "outcome": "finished", "epochs": 3,
                     "best": score, "best_epoch": 3, "HR@10": 2 * score, "hours": 0.01, GPU_SHARE: 0.0,
                     "start": 100.0 * number, **{f"param/{k}": v for k, v in params.items()}})
        evaluations += [{"trial_id": f"t{number}", "epoch": e, METRIC: score * e / 3,
                         "timestamp": 100.0 * number + 30 * e} for e in (1, 2, 3)]
    return Search("exp", None, pd.DataFrame(rows), pd.DataFrame(evaluations), space, 3, trials)


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the report draws, as matplotlib objects, in the order drawn."""
    figures = []
    monkeypatch.setattr(report, "_png", lambda figure: figures.append(figure) or b"png")
    return figures


def visible_labels(ax) -> list:
    """The x tick labels drawn inside the axis' limits, drawn."""
    FigureCanvasAgg(ax.figure).draw()
    low, high = sorted(ax.get_xlim())
    return [t for t in ax.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high]


def panels(figure) -> dict:
    return {ax.get_title().split(" (")[0]: ax for ax in figure.axes if ax.get_title()}


def test_log_axes_of_the_slices_have_labels_that_do_not_touch(drawn):
    report.slices(synthetic(12))
    figure, = drawn
    for name in ("alpha", "tau", "lr"):
        boxes = sorted((t.get_window_extent() for t in visible_labels(panels(figure)[name])), key=lambda b: b.x0)
        assert len(boxes) >= 2, name
        assert all(left.x1 + 2 < right.x0 for left, right in zip(boxes, boxes[1:])), name


def test_the_trial_colour_bar_has_whole_trial_numbers(drawn):
    report.slices(synthetic(3))
    bar, = (ax for ax in drawn[0].axes if ax.get_label() == "<colorbar>")
    low, high = sorted(bar.get_ylim())
    ticks = [t for t in bar.get_yticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_a_categorical_slice_labels_every_choice_and_rings_the_best_trial(drawn):
    report.slices(synthetic(6))
    ax = panels(drawn[0])["tau_schedule"]
    assert [t.get_text() for t in visible_labels(ax)] == ["constant", "linear", "cosine"]
    ring, = (c for c in ax.collections if c.get_label() == "the best trial")
    (x, y), = ring.get_offsets()
    assert abs(x - 2) < 0.5 and y == 0.09  # at "cosine", the best trial's value


def test_evaluation_dots_are_drawn_above_the_best_so_far_line(drawn):
    report.best_so_far(synthetic(6))
    for ax in drawn[0].axes:
        assert min(c.get_zorder() for c in ax.collections) > max(line.get_zorder() for line in ax.get_lines())


def test_importance_needs_enough_ended_trials_and_says_so(drawn):
    section = report.importance(synthetic(report.MIN_IMPORTANCE - 1))
    assert not drawn and not section.png
    assert f"at least {report.MIN_IMPORTANCE} ended trials" in section.text and f"has {report.MIN_IMPORTANCE - 1}" in section.text
    assert report.importance(synthetic(report.MIN_IMPORTANCE)).png
