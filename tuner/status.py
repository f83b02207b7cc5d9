"""A search's progress, read from its files: what became of each trial, the leaderboard, the cost.
`simdiffrec status` prints it; `tuner/report.py` draws it.  A grid of retrainings (finalize,
reproduce) reads the same way, each (run, seed) a trial.

It reads what `experiment.read` reads, so it works on a finished, interrupted or running search
without Ray.  Of each trial it needs its id, status and config, the rest comes from its reported
rows.  While a search runs, Ray's saved state lags the trial folders by seconds and lists running
trials as PENDING: a PENDING trial that has reported is counted as running, or as interrupted
when no process holds OUT's lock (the search or grid was stopped; `--resume` continues it).  A
trial's GPU share is what Ray gave it, as it reported (`gpu_share`; none from a search run before
it reported one).
"""

from __future__ import annotations

import datetime
import math
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from simdiffrec.config import Config, read_yaml
from simdiffrec.files import in_use

from . import spaces
from .experiment import Trial, read, results_frame
from .protocol import GPU_SHARE, GRID_RECORD, METRIC, RECORD, SPACE_COPY
from .spaces import FAMILY

OUTCOMES = ("finished", "early-stopped", "ASHA-stopped", "running", "interrupted", "pending", "failed")
TRIAL_COLUMNS = ("trial_id", "number", "outcome", "epochs", "best", "best_epoch", "HR@10", "hours", GPU_SHARE,
                 "start")
LIVE = ("running", "interrupted")  # trials that may still improve: `status` lists them beyond --top
WIDTH = 100  # of the terminal text


@dataclass
class Search:
    experiment: str
    out: Path | None  # the search's folder (search.yaml, space.yaml), when known
    trials: pd.DataFrame  # one row per trial, by creation order (see `trial_table`)
    results: pd.DataFrame  # every evaluation of every trial (experiment.results_frame)
    space: spaces.Space | None  # the search's space (OUT/space.yaml), when known
    max_epochs: int
    num_samples: int | None  # trials the search was started to run, when known

    @property
    def params(self) -> list[str]:
        """The searched parameters: the space's, in its order, else every trial's config keys."""
        if self.space is not None:
            return [p.name for p in self.space.params]
        return [c.removeprefix("param/") for c in self.trials.columns if c.startswith("param/")]

    def leaderboard(self, top: int | None = None) -> pd.DataFrame:
        """Trials that reported, best valid NDCG@10 first."""
        board = self.trials.dropna(subset=["best"]).sort_values(["best", "number"], ascending=[False, True])
        return board.head(top) if top else board


def locate(path: str) -> tuple[str, Path | None]:
    """(experiment, OUT) from the OUT folder of a search or of a grid (finalize, reproduce), or
    from its experiment folder or URI (whose parent is OUT in the default layout)."""
    if "://" in path:
        return path, None
    folder = Path(path)
    if (folder / RECORD).is_file():
        return read_yaml(folder / RECORD)["settings"]["experiment"], folder
    if (folder / GRID_RECORD).is_file():
        return read_yaml(folder / GRID_RECORD)["experiment"], folder
    return path, folder.parent if any((folder.parent / r).is_file() for r in (RECORD, GRID_RECORD)) else None


def load(path: str) -> Search:
    """Everything `status` and `report` show, from an OUT folder or an experiment."""
    experiment, out = locate(path)
    run = read(experiment)
    trials, results = run.trials, results_frame(run.trials)
    live = out is None or in_use(out)  # without OUT, whether it runs is not known: as if it did
    if out and (out / GRID_RECORD).is_file():  # each trial one (run, seed) of the plan, to early stopping
        plan = read_yaml(out / GRID_RECORD)["plan"]
        configs = {name: planned["config"] for name, planned in plan["runs"].items()}
        max_epochs = max(config["epochs"] for config in configs.values())
        table = trial_table(trials, results, max_epochs, lambda trial: configs.get(trial.config.get("run"), {}), live)
        return Search(experiment, out, table, results, None, max_epochs, len(configs) * len(plan["seeds"]))
    record = read_yaml(out / RECORD) if out else {}
    settings = record.get("settings", {})
    space = spaces.load(out / SPACE_COPY) if out and (out / SPACE_COPY).is_file() else None
    epochs = results["epoch"].max() if "epoch" in results else math.nan
    max_epochs = int(record.get("max_epochs") or (0 if pd.isna(epochs) else epochs))
    fixed = space.fixed if space else {}
    table = trial_table(trials, results, max_epochs, lambda trial: {**fixed, **trial.config}, live)
    return Search(experiment, out, table, results, space, max_epochs, settings.get("num_samples"))


def trial_table(trials: list[Trial], results: pd.DataFrame, max_epochs: int,
                settings_of: Callable[[Trial], dict[str, Any]], live: bool = True) -> pd.DataFrame:
    """One row per trial: its outcome, epochs run, best valid NDCG@10 and that epoch's HR@10,
    hours (Ray's time_total_s), GPU share (NaN: not reported), start time and parameters
    (`param/NAME`).  `settings_of(trial)` gives the settings that decide its outcome (patience,
    eval_every; epochs if not max_epochs); `live`: whether the search or grid is running."""
    rows, by_trial = [], dict(tuple(results.groupby("trial_id"))) if len(results) else {}
    for trial in trials:
        reported = by_trial[trial.trial_id]  # results_frame gives every trial a row, reported or not
        own = reported.dropna(subset=[METRIC, "epoch"]) if {METRIC, "epoch"} <= set(reported) else reported.iloc[:0]
        epochs, best, best_epoch, hr, seconds, start = 0, math.nan, 0, math.nan, 0.0, math.nan
        if len(own):
            top = own.loc[own[METRIC].idxmax()]
            epochs, best, best_epoch, hr = own["epoch"].max(), top[METRIC], top["epoch"], top.get("valid/HR@10")
        timed = reported.dropna(subset=["time_total_s"]) if "time_total_s" in reported else own
        if len(timed):
            seconds = timed["time_total_s"].max()
            start = timed["timestamp"].iloc[0] - timed["time_total_s"].iloc[0]  # its first report, less its time
        shares = reported[GPU_SHARE].dropna() if GPU_SHARE in reported else ()
        settings = settings_of(trial)
        patience = settings.get("patience", Config.patience) * settings.get("eval_every", Config.eval_every)
        cap = settings.get("epochs", max_epochs)
        rows.append({
            "trial_id": trial.trial_id, "number": int(reported["number"].iloc[0]),
            "outcome": outcome(trial.status, int(epochs), int(best_epoch), cap, patience, live),
            "epochs": int(epochs), "best": best, "best_epoch": int(best_epoch), "HR@10": hr,
            "hours": seconds / 3600, GPU_SHARE: shares.iloc[-1] if len(shares) else math.nan, "start": start,
            **{f"param/{k}": v for k, v in trial.config.items()}})
    table = pd.DataFrame(rows) if rows else pd.DataFrame(columns=TRIAL_COLUMNS)
    return table.sort_values("number", ignore_index=True)


def outcome(status: str, epochs: int, best_epoch: int, max_epochs: int, patience: int, live: bool = True) -> str:
    """A finished trial ran max_epochs or stopped on `patience` epochs without a better valid
    NDCG@10; one that ended before either was stopped by ASHA.  An unfinished trial that has
    reported is running while its search is `live`, else interrupted."""
    if status == "ERROR":
        return "failed"
    if status != "TERMINATED":
        return ("running" if live else "interrupted") if epochs else "pending"
    if epochs >= max_epochs:
        return "finished"
    return "early-stopped" if epochs - best_epoch >= patience else "ASHA-stopped"


def rising(search: Search) -> str | None:
    """One line naming the trials still rising at the epoch cap (they ran to it and their best
    epoch lies in its last tenth: a longer run would likely have scored higher), and the flags
    that give them room; None when there are none."""
    cap = search.max_epochs
    late = search.trials[(search.trials["epochs"] >= cap) & (search.trials["best_epoch"] > 0.9 * cap)]
    if late.empty:
        return None
    named = ", ".join(f"#{n} (best at epoch {b})" for n, b in zip(late["number"], late["best_epoch"]))
    if search.out is not None and (search.out / GRID_RECORD).is_file():
        return f"still rising at the cap of {cap} epochs: {named}; run them again with a higher --max-epochs"
    numbers = ",".join(str(n) for n in late["number"])
    return (f"still rising at the cap of {cap} epochs: {named}; retrain them to convergence with "
            f"finalize --trials {numbers}, or give the next search a higher --max-epochs")


def families(search: Search) -> pd.DataFrame | None:
    """Per model family of a search that samples one (`spaces.FAMILY`): its trials, its best
    trial and score, its trial-hours and hours per epoch; None for a search without families."""
    column = f"param/{FAMILY}"
    if column not in search.trials:
        return None
    rows = []
    for family, trials in search.trials.groupby(column, sort=True):
        reported = trials.dropna(subset=["best"])
        top = reported.loc[reported["best"].idxmax()] if len(reported) else None
        epochs = trials["epochs"].sum()
        rows.append({"family": family, "trials": len(trials),
                     "best": math.nan if top is None else top["best"],
                     "trial": math.nan if top is None else int(top["number"]),
                     "hours": trials["hours"].sum(),
                     "hours_per_epoch": trials["hours"].sum() / epochs if epochs else math.nan})
    return pd.DataFrame(rows)


def counts(search: Search) -> dict[str, int]:
    found = search.trials["outcome"].value_counts()
    return {name: int(found.get(name, 0)) for name in OUTCOMES}


def parameters(row: pd.Series, names: list[str]) -> str:
    """`alpha=0.4 beta=0.1 ...` for one trial; parameters it did not sample are left out."""
    values = [(n, row.get(f"param/{n}")) for n in names]
    return " ".join(f"{n}={number(v)}" for n, v in values if not missing(v))


def number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def format_status(search: Search, top: int = 10, now: float | None = None) -> str:
    """The terminal status: progress, time, the best trial and the leaderboard's `top` rows, in
    WIDTH columns; running and interrupted trials below them follow at their ranks; then each
    family's best and cost, and the trials still rising at the cap."""
    now = time.time() if now is None else now
    n, found = len(search.trials), counts(search)
    lines = [search.experiment if len(search.experiment) <= WIDTH else "..." + search.experiment[-WIDTH + 3:]]
    of = f" of {search.num_samples}" if search.num_samples else ""
    shown = {name: count for name, count in found.items() if count or name != "interrupted"}  # rare: only if so
    lines.append(f"trials: {n}{of} | " + ", ".join(f"{count} {name}" for name, count in shown.items()))
    start = search.trials["start"].dropna().min() if n else math.nan
    if not missing(start):
        last = search.results["timestamp"].max() if "timestamp" in search.results else math.nan
        began = datetime.datetime.fromtimestamp(start, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        since = "" if missing(last) else f"; last report {clock(now - last)} ago, {clock(last - start)} in"
        lines.append(f"began {began}, {clock(now - start)} ago{since}; "
                     f"{search.trials['hours'].sum():.2f} trial-hours")
    board = search.leaderboard()
    if board.empty:
        return "\n".join(lines + ["no trial has reported yet"]) + "\n"
    lines += board_lines(search, board, top)
    by_family = families(search)
    if by_family is not None:
        lines += ["", "families: " + "; ".join(
            f"{r['family']} {r['trials']} trials, best {number(r['best'])} (#{number(r['trial'])}), "
            f"{r['hours']:.2f} h, {3600 * r['hours_per_epoch']:.0f} s/epoch" for _, r in by_family.iterrows())]
    note = rising(search)
    return "\n".join(lines + ([] if note is None else ["", *textwrap.wrap(note, WIDTH)])) + "\n"


def board_lines(search: Search, board: pd.DataFrame, top: int) -> list[str]:
    """The best trial with its parameters, then the leaderboard's `top` rows and every running or
    interrupted trial below them at its rank (`...` marks the ranks left out)."""
    best = board.iloc[0]
    id_width = max(8, *board["trial_id"].str.len())  # a search's ids have 8 characters, a grid's 11
    lines = [f"best: trial {best['trial_id']} (#{best['number']}, {best['outcome']}) {METRIC} "
             f"{best['best']:.4f} at epoch {best['best_epoch']} of {best['epochs']}",
             *textwrap.wrap(parameters(best, search.params), WIDTH, initial_indent="      ",
                            subsequent_indent="      "),
             "",
             f"{'rank':>4}  {'trial':<{id_width}} {'#':>4}  {'outcome':<13} {'epochs':>7} {'best ep':>7} "
             f"{'NDCG@10':>8} {'HR@10':>7}"]
    skipped = False
    for rank, (_, row) in enumerate(board.iterrows(), 1):
        if rank > top and row["outcome"] not in LIVE:  # a running trial is shown wherever it ranks
            skipped = True
            continue
        if skipped:
            lines.append(f"{'...':>4}")
            skipped = False
        lines.append(f"{rank:>4}  {row['trial_id']:<{id_width}} {row['number']:>4}  {row['outcome']:<13} "
                     f"{row['epochs']:>3}/{search.max_epochs:<3} {row['best_epoch']:>7} "
                     f"{row['best']:>8.4f} {'' if missing(row['HR@10']) else format(row['HR@10'], '.4f'):>7}")
        lines += textwrap.wrap(parameters(row, search.params), WIDTH, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return lines


def missing(value: Any) -> bool:
    """None or NaN: a value a trial did not report, or a parameter it did not sample."""
    return value is None or (isinstance(value, float) and math.isnan(value))
