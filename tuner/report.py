"""A search as one HTML page to look at: learning curves with ASHA's stops, best-so-far against
trials and time, which parameters mattered (Optuna's importance evaluator on the finished trials)
and how the objective depends on each, the leaderboard, the cost, and `finalize`'s seeded
comparison when it has run.

`report.html` is self-contained (figures inlined as base64 PNG, no script, no external style),
so it can be mailed or opened offline; each figure is also written as a PNG next to it.  Figures
are drawn with matplotlib's object API (Agg canvas, no pyplot state), so any thread or headless
machine can draw them.  A figure that cannot be drawn yet (one trial, no variation, no space
file) is replaced by a sentence saying why.  The page opens with the decision (finalize's verdict
and where its model is, or before finalize the best trial and the command that decides) and
fits a 1400-pixel window: a reader should not have to scroll to learn which model won.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from simdiffrec.config import SELECT_BY, read_yaml
from simdiffrec.files import write_atomic

from . import spaces
from .protocol import GPU_SHARE, GRID_RECORD, METRIC
from .status import Search, clock, counts, families, load, missing, parameters, rising

FINAL_DIR = "final"  # where finalize writes, in the folder holding the experiment
CHECKPOINT = "final_checkpoint"  # finalize's model, in FINAL_DIR
FINAL_METRICS = ("HR@10", "NDCG@10")  # the bar chart's
TOP_CURVES = 5  # learning curves drawn in colour and named
MAX_COLUMNS = 10  # of a table: ten fit a 1400-pixel window
MIN_IMPORTANCE = 20  # ended trials: PED-ANOVA's top 10% then holds 2, the least Optuna's evaluator takes
# a trial's last point, by outcome ("finished" gets none)
MARKERS = {"ASHA-stopped": ("X", "black"), "early-stopped": ("o", "white"), "running": (">", "gold"),
           "interrupted": ("d", "white"), "failed": ("s", "tab:red")}


@dataclass
class Section:
    title: str
    text: str  # HTML: what it shows, or why it is missing
    png: bytes = b""  # the figure
    name: str = ""  # its file name
    table: str = ""  # HTML


def write_report(path: str, out: str | Path, final: str | Path | None = None, top: int = 10) -> Path:
    """Read the search at `path` (its OUT folder or experiment) and write `out`/report.html and the
    PNGs; finalize's table comes from `final`, else from final/ beside the experiment."""
    search = load(path)
    if search.out and (search.out / GRID_RECORD).is_file():
        raise ValueError(f"{path}: the runs of finalize or reproduce, not a search; report the search "
                         f"(its page includes finalize's table), follow the runs with simdiffrec status {path}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final_dir = Path(final) if final else _default_final(search)
    if final is not None and not (final_dir / "final.parquet").is_file():
        raise FileNotFoundError(f"--final {final}: no final.parquet there")
    sections = [decision(search, final_dir), cost(search), leaderboard(search, top), family_comparison(search),
                learning_curves(search), best_so_far(search), importance(search), slices(search)]
    sections = [section for section in sections if section is not None]
    if (final_dir / "final.parquet").is_file():
        sections.append(finalized(final_dir))
    for section in sections:
        if section.png:
            write_atomic(out / section.name, section.png)
    write_atomic(out / "report.html", page(search, sections).encode())
    return out / "report.html"


def _default_final(search: Search) -> Path:
    holder = search.out if search.out else Path(search.experiment).parent
    return holder / FINAL_DIR


# --- sections -------------------------------------------------------------------------------

def decision(search: Search, final_dir: Path) -> Section:
    """The page's first lines: finalize's verdict (final.md's headline) and what its model is; before
    finalize, what the search found and the command that decides."""
    lines = (final_dir / "final.md").read_text().splitlines() if (final_dir / "final.md").is_file() else []
    if not lines or not lines[0].startswith("**Winner:"):  # no finalize yet, or one from before its headline
        return best_found(search, final_dir)
    model = next(line for line in lines if line.startswith(f"`{CHECKPOINT}/`:"))
    final = read_final(final_dir)
    named = "; ".join(f"<b>{html.escape(name)}</b> {what}" for name, what in identities(final, search).items())
    text = (f"{_inline(lines[0])}</p><p><code>{html.escape(str(final_dir / CHECKPOINT))}/</code> holds "
            f"{_inline(model.split(':', 1)[1].strip())}</p><p>The configurations retrained: {named}.")  # 3 paragraphs
    return Section("Verdict", text)


def best_found(search: Search, final_dir: Path) -> Section:
    """Before finalize: the search's best trial (one seed, on validation) and the command that retrains
    it with seeds against its starting points and SASRec-CE."""
    title = "What the search found"
    board = search.leaderboard(1)
    if board.empty:
        return Section(title, "No trial has reported yet.")
    best = board.iloc[0]
    text = (f"Best so far: <b>trial #{best['number']}</b> ({html.escape(best['trial_id'])}, {best['outcome']}), "
            f"{METRIC} {best['best']:.4f} at epoch {best['best_epoch']} of {best['epochs']}; "
            f"{html.escape(parameters(best, search.params))}.")
    export = search.out / "best_checkpoint" if search.out else None
    if export is not None and export.exists():
        text += f" The search's export: <code>{html.escape(str(export))}/</code>."
    retrain = "When the search has ended, retrain" if counts(search)["running"] else "Retrain"
    text += (f" One seed, scored on validation: whether it beats the starting points and SASRec-CE is for "
             f"finalize to say (no verdict in {html.escape(str(final_dir))} yet). {retrain} the best with "
             f"several seeds and test them: <code>simdiffrec finalize {html.escape(search.experiment)} "
             "--seeds 5 --top 3</code>; its verdict then opens this page.")
    return Section(title, text)


def cost(search: Search) -> Section:
    trials, found = search.trials, counts(search)
    of = f" of {search.num_samples}" if search.num_samples else ""
    hours = trials["hours"].sum()
    rows = [("trials", f"{len(trials)}{of}"), *((name, str(n)) for name, n in found.items()),
            ("trial-hours", f"{hours:.2f}")]
    told = trials.dropna(subset=[GPU_SHARE])
    if len(told):
        shares = ", ".join(f"{s:g} ({1 / s:g} trials per GPU)" for s in sorted(set(told[GPU_SHARE]) - {0}))
        gpu_hours = (told["hours"] * told[GPU_SHARE]).sum()
        rows += [("GPU share per trial", shares or "none (CPU trials)"), ("GPU-hours", f"{gpu_hours:.2f}")]
    start, last = trials["start"].min(), search.results.get("timestamp", pd.Series(dtype=float)).max()
    if pd.notna(start) and pd.notna(last):
        rows.append(("wall-clock, first trial to last report", clock(last - start)))
    text = ("<b>finished</b>: ran max epochs; <b>early-stopped</b>: stopped by its own patience; "
            "<b>ASHA-stopped</b>: ASHA ended it at a rung; trial-hours: each trial's own time (Ray's "
            "time_total_s), summed; GPU share: what Ray gave each trial, as the trial reported it; "
            "GPU-hours: each trial's hours times its share.")
    return Section("Progress and cost", text, table=_table(pd.DataFrame(rows, columns=["", ""]), header=False))


def leaderboard(search: Search, top: int) -> Section:
    board = search.leaderboard(top)
    if board.empty:
        return Section("Leaderboard", "No trial has reported yet.")
    rank = {"rank": range(1, len(board) + 1), "#": board["number"]}
    scores = pd.DataFrame({**rank, "trial": board["trial_id"], "outcome": board["outcome"],
                           "epochs": [f"{e}/{search.max_epochs}" for e in board["epochs"]],
                           "best epoch": board["best_epoch"], SELECT_BY: board["best"], "HR@10": board["HR@10"]})
    params = pd.DataFrame({**rank, **{n: board[f"param/{n}"] for n in search.params if f"param/{n}" in board}})
    note = rising(search)
    text = (f"Trials by their best {METRIC}, with that epoch's HR@10, then their parameters (top {top}; # is the "
            "order the searcher proposed them in)." + ("" if note is None else f" {note[0].upper()}{note[1:]}."))
    return Section("Leaderboard", text, table=_table(scores) + _table(params, keys=2))


def family_comparison(search: Search) -> Section | None:
    """SASRec-CE against SimDiffRec in a search that samples both: best and cost per family."""
    table = families(search)
    if table is None:
        return None
    text = (f"Each family's trials, its best {METRIC} and that trial's number, and what it cost: the "
            "trial-hours of its trials and their hours per epoch trained.")
    by_name = table.set_index("family")
    if {"sasrec", "simdiffrec"} <= set(by_name.index) and by_name[["best", "hours_per_epoch"]].notna().all().all():
        gap = by_name.loc["simdiffrec", "best"] - by_name.loc["sasrec", "best"]
        ratio = by_name.loc["simdiffrec", "hours_per_epoch"] / by_name.loc["sasrec", "hours_per_epoch"]
        text += (f" SimDiffRec's best is {gap:+.4f} against SASRec-CE's, at {ratio:.1f}× its time per epoch "
                 "(one seed each: finalize's paired runs decide).")
    shown = table.assign(hours_per_epoch=3600 * table["hours_per_epoch"]).rename(
        columns={"best": f"best {SELECT_BY}", "hours": "trial-hours", "hours_per_epoch": "s/epoch"})
    return Section("SASRec-CE and SimDiffRec", text, table=_table(shown))


def learning_curves(search: Search) -> Section:
    """Every trial's valid NDCG@10 per epoch, the top 5 in colour; where each trial ended marked
    by why (ASHA, patience, still running, failed); ASHA's rungs as dotted lines."""
    results = search.results.dropna(subset=[METRIC]) if METRIC in search.results else pd.DataFrame()
    if results.empty:
        return Section("Learning curves", "No trial has reported yet.")
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.add_subplot()
    trials = search.trials.set_index("trial_id")
    top = list(search.leaderboard(TOP_CURVES)["trial_id"])
    for trial_id, rows in results.groupby("trial_id", sort=False):
        trial = trials.loc[trial_id]
        if trial_id in top:
            rank = top.index(trial_id)
            ax.plot(rows["epoch"], rows[METRIC], color=colormaps["tab10"](rank), lw=2, marker="o", ms=3,
                    zorder=10 - rank, label=f"{rank + 1}. #{trial['number']} {trial_id} ({trial['best']:.4f})")
        else:
            ax.plot(rows["epoch"], rows[METRIC], color="tab:gray", lw=1, alpha=0.45, zorder=2)
        if trial["outcome"] in MARKERS:
            marker, face = MARKERS[trial["outcome"]]
            ax.plot(rows["epoch"].iloc[-1], rows[METRIC].iloc[-1], marker=marker, ls="", ms=7, mfc=face,
                    mec="black", zorder=11)
    for rung in _rungs(search):
        ax.axvline(rung, color="grey", ls=":", lw=1, zorder=1)
    _curves_legend(ax, trials, len(top))
    ax.set(xlabel="epoch", ylabel=METRIC, xlim=(0.5, max(search.max_epochs, results["epoch"].max()) + 0.5))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    text = (f"Each line is a trial's {METRIC} after each epoch; the best {TOP_CURVES} in colour. A trial "
            "that ended before the last epoch has its last point marked: ✕ ASHA stopped it, ○ its own "
            "patience did, ▶ it is still running, ◇ it was interrupted (the search is stopped), ■ it failed. "
            "Dotted lines: ASHA's rungs, the epochs at which it compares trials.")
    return Section("Learning curves", text, _png(fig), "learning_curves.png")


def _curves_legend(ax: Any, trials: pd.DataFrame, shown: int) -> None:
    """The coloured trials by rank, one grey entry for the others, one per end marker drawn."""
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: int(labels[i].split(".")[0]))
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    if len(trials) > shown:
        handles.append(ax.plot([], [], color="tab:gray", lw=1, alpha=0.45)[0])
        labels.append(f"the other {len(trials) - shown} trials")
    for name, (marker, face) in MARKERS.items():
        if (trials["outcome"] == name).any():
            handles.append(ax.plot([], [], marker=marker, ls="", ms=7, mfc=face, mec="black")[0])
            labels.append(f"last epoch: {name}")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0,
              title="rank. #number trial (its best)", title_fontsize=8)


def best_so_far(search: Search) -> Section:
    trials = search.trials.dropna(subset=["best"])
    title = "Best so far"
    if len(trials) < 2:
        return Section(title, f"Needs at least 2 trials that reported; this search has {len(trials)}.")
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    left.scatter(trials["number"], trials["best"], s=14, color="tab:blue", alpha=0.5, label="trial's best",
                 zorder=3)
    left.step(trials["number"], trials["best"].cummax(), where="post", color="tab:red", label="best so far")
    left.set(xlabel="trial (in the order the searcher proposed it)", ylabel=METRIC)
    left.xaxis.get_major_locator().set_params(integer=True)
    results = search.results.dropna(subset=[METRIC, "timestamp"]).sort_values("timestamp")
    seconds = results["timestamp"] - trials["start"].min()
    unit, size = ("hours", 3600) if seconds.max() > 2 * 3600 else ("minutes", 60)
    right.scatter(seconds / size, results[METRIC], s=6, color="grey", alpha=0.3, label="an evaluation",
                  zorder=3)  # above the line: an evaluation on it is still seen
    right.step(seconds / size, results[METRIC].cummax(), where="post", color="tab:red", label="best so far")
    right.set(xlabel=f"{unit} since the first trial started")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    text = ("Left: each trial's best and the best so far, in the order the searcher proposed trials. Right: "
            "every evaluation against wall-clock time. A flat red line means more trials stopped paying off.")
    return Section(title, text, _png(fig), "best_so_far.png")


def importance(search: Search) -> Section:
    """Optuna's importance evaluator on an in-memory study of the trials that ended, with the
    space file's distributions; their objective is their best valid NDCG@10, what TPE learnt from."""
    title = "Parameter importance"
    reason, study = _study(search)
    if study is None:
        return Section(title, reason)
    everywhere = [n for n in search.params if all(n in t.params for t in study.trials)]
    found = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), params=everywhere)
    fig = Figure(figsize=(7, 0.45 * len(found) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    names = list(found)[::-1]
    ax.barh(names, [found[n] for n in names], color="tab:blue")
    for y, name in enumerate(names):
        ax.annotate(f"{found[name]:.2f}", (found[name], y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set(xlabel="importance (sums to 1)", xlim=(0, max(found.values(), default=1) * 1.15 or 1))
    ax.grid(axis="x", alpha=0.3)
    left_out = [n for n in search.params if n not in everywhere]
    text = (f"How much of the variation in the trials' best {METRIC} each parameter explains: Optuna's "
            f"PED-ANOVA evaluator over the {len(study.trials)} trials that ended. With few trials, "
            "read it as a hint." + (f" Left out, as not every trial sampled them: {', '.join(left_out)} "
                                   "(see the next figure)." if left_out else ""))
    return Section(title, text, _png(fig), "importance.png")


def slices(search: Search) -> Section:
    """The objective against each parameter (Optuna's slice plot), coloured by trial order, the
    best trial ringed so that its value stands out in every panel."""
    title = "The objective against each parameter"
    trials = search.trials.dropna(subset=["best"])
    if len(trials) < 2:
        return Section(title, f"Needs at least 2 trials that reported; this search has {len(trials)}.")
    names = [n for n in search.params if f"param/{n}" in trials]
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4 * ncols, 3 * nrows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    by_name = {p.name: p for p in search.space.params} if search.space else {}
    best = search.leaderboard(1).index[0]
    for ax, name in zip(axes, names):
        points = _slice(ax, trials, name, by_name.get(name), best)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(f"trial's best {METRIC}")
    fig.colorbar(points, ax=axes.tolist(), label="trial #", shrink=0.8, ticks=MaxNLocator(integer=True))
    text = ("One dot per trial: its best score against the value it was given, darker for earlier trials; "
            "the best trial ringed in red. A conditional parameter (such as tau_end) shows only the trials "
            "that sampled it.")
    return Section(title, text, _png(fig), "slices.png")


def _slice(ax: Any, trials: pd.DataFrame, name: str, param: spaces.Param | None, best: int) -> Any:
    """One panel: each trial's best against its value of `name`, the `best` trial (an index of
    `trials`) ringed; returns the dots, for the colour bar."""
    values = trials[f"param/{name}"]
    kept = values.notna()
    x = _positions(ax, values[kept], param)
    y = trials["best"][kept]
    points = ax.scatter(x, y, c=trials["number"][kept], cmap="viridis", s=22, vmin=trials["number"].min(),
                        vmax=trials["number"].max(), edgecolors="none")
    if best in x.index:
        ax.scatter([x[best]], [y[best]], s=90, facecolors="none", edgecolors="tab:red", linewidths=1.5,
                   label="the best trial")
    ax.set_title(name if kept.all() else f"{name} ({kept.sum()} trials)", fontsize=10)
    ax.grid(alpha=0.3)
    return points


def _positions(ax: Any, values: pd.Series, param: spaces.Param | None) -> pd.Series:
    """Where each value goes on the x axis, the axis set to match: every choice of a categorical
    labelled (so a value only a few trials had is not cut off by the autoscaled limits); a log
    range over the space's whole range, ticked so that labels never touch."""
    if (param and param.type == "categorical") or values.dtype == object:
        choices = list(param.choices) if param else sorted(values.unique(), key=str)
        ax.set_xticks(range(len(choices)), [str(c) for c in choices])
        ax.set_xlim(-0.5, len(choices) - 0.5)
        return values.map({c: i for i, c in enumerate(choices)}) + _jitter(len(values))
    if param and param.log:
        low, high = min(param.low, values.min()), max(param.high, values.max())
        ax.set_xscale("log")
        ax.set_xlim(low / 1.25, high * 1.25)
        # 1, 2, 5 per decade fit a range of a decade or so; over wider ones they collide ("0.0010.002")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5) if high / low <= 30 else (1,)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    return values


def finalized(folder: Path) -> Section:
    """finalize's table: each configuration retrained over seeds, tested, against its baseline."""
    final = read_final(folder)
    fig = Figure(figsize=(max(6, 1.3 * len(final) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(FINAL_METRICS)
    at = np.arange(len(final))
    for i, metric in enumerate(FINAL_METRICS):
        means, stds = final[f"test/{metric}_mean"], final[f"test/{metric}_std"]
        bars = ax.bar(at + (i - (len(FINAL_METRICS) - 1) / 2) * width, means, width, yerr=stds, capsize=4,
                      label=f"test {metric}")
        ax.bar_label(bars, [f"{m:.4f}" for m in means], label_type="center", color="white", fontsize=8)
    ax.set_xticks(at, final["configuration"])
    ax.set(ylabel="mean ± std over seeds")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    text = (f"The top configurations and their baselines retrained with several seeds and evaluated on the test "
            f"split ({html.escape(str(folder))}): mean ± standard deviation over seeds; Δ: the mean paired "
            "difference to the baseline named under against (SASRec at the configuration's settings), with its "
            "p-value. Then each one's cost and parameters, as its runs were trained.")
    return Section("Final comparison on test", text, _png(fig), "final.png", _final_tables(ran_with(final, folder)))


def read_final(folder: Path) -> pd.DataFrame:
    """final.parquet as finalize writes it now, whenever it was written."""
    final = pd.read_parquet(folder / "final.parquet")
    if "baseline" not in final:  # written before each configuration had its own: all against `baseline`
        final.insert(2, "baseline", np.where(final["is_baseline"], "", "baseline"))
    return final


def _final_tables(final: pd.DataFrame) -> str:
    """The scores with their paired differences, then the cost and parameters (as final.md splits them)."""
    shown = {"configuration": final["configuration"], "seeds": final["seeds"], "against": final["baseline"]}
    for metric in FINAL_METRICS:
        shown[f"test {metric}"] = _spread(final, f"test/{metric}")
        shown[f"Δ {metric} (p)"] = [
            "" if baseline else f"{d:+.4f} (p {p:.3g})" for baseline, d, p in
            zip(final["is_baseline"], final[f"test/{metric}_diff"], final[f"test/{metric}_p"])]
    shown[f"valid {SELECT_BY}"] = _spread(final, f"valid/{SELECT_BY}")
    cost = {"configuration": final["configuration"], "epochs": final["epochs_mean"],
            "minutes": final["minutes_total"], "device": final["device"],
            **{c.removeprefix("param/"): final[c] for c in final.columns if c.startswith("param/")}}
    return _table(pd.DataFrame(shown)) + _table(pd.DataFrame(cost))


def ran_with(final: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """`final` with each parameter it leaves blank for a configuration (a baseline lists top-1's
    parameters only) filled in from the settings its runs were trained with (grid.yaml's plan)."""
    if not (folder / GRID_RECORD).is_file():
        return final
    planned = read_yaml(folder / GRID_RECORD)["plan"]["runs"]
    configs = [planned.get(name, {}).get("config", {}) for name in final["configuration"]]
    filled = final.copy()
    for column in [c for c in final.columns if c.startswith("param/")]:
        trained = pd.Series([config.get(column.removeprefix("param/")) for config in configs], index=final.index)
        filled[column] = final[column].where(final[column].notna(), trained)
    return filled


def identities(final: pd.DataFrame, search: Search) -> dict[str, str]:
    """What each configuration finalize retrained is, since its name alone (top-1, baseline) does not
    say: a search trial (top-K and trial-N hold one's parameters), one of the space's starting
    points, or SASRec-CE at the settings of the configurations it is the baseline of (at the
    defaults when it is itself a starting point)."""
    out = {}
    for _, row in final.iterrows():
        name = row["configuration"]
        of = ", ".join(c for c, baseline in zip(final["configuration"], final["baseline"]) if baseline == name)
        if name.startswith("start-"):
            what = f"is the space's starting point {name.removeprefix('start-')}"
        elif name.startswith(("top-", "trial-")):
            trial = _trial(row, search)
            what = ("is a trial of the search" if trial is None
                    else f"is search trial #{trial['number']} ({trial['trial_id']})")
        elif row.get("start", False):
            what = "is SASRec-CE at the default settings"
        else:
            what, of = f"is SASRec-CE at the settings of {of}" if of else "is SASRec-CE", ""
        out[name] = what + (f", the baseline of {of}" if of else "")
    return out


def _trial(row: pd.Series, search: Search) -> pd.Series | None:
    """The best-ranked search trial sampled with `row`'s parameters: finalize's top-K and trial-N
    configurations hold exactly a trial's sampled values."""
    sampled = {c: v for c, v in row.items() if c.startswith("param/") and not missing(v)}
    for _, trial in search.leaderboard().iterrows():
        if all(c in trial and trial[c] == v for c, v in sampled.items()):
            return trial
    return None


# --- helpers --------------------------------------------------------------------------------

def _study(search: Search) -> tuple[str, optuna.Study | None]:
    """(why not, None) or ('', an Optuna study of the trials that ended, one per trial)."""
    if search.space is None:
        return "Needs the search's space file: give the search's folder (the one holding space.yaml).", None
    ended = search.trials[search.trials["outcome"].isin(("finished", "early-stopped", "ASHA-stopped"))]
    ended = ended.dropna(subset=["best"])
    if len(ended) < MIN_IMPORTANCE:
        return (f"Needs at least {MIN_IMPORTANCE} ended trials: PED-ANOVA tells the top 10% of trials from "
                f"the rest, and below that its top holds one or two; this search has {len(ended)}.", None)
    if ended["best"].nunique() < 2:
        return f"Needs trials that ended with different scores; all {len(ended)} ended trials have the same.", None
    distributions = {p.name: _distribution(p) for p in search.space.params}
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line for a study in memory
    study = optuna.create_study(direction="maximize")
    for _, row in ended.iterrows():
        params = {n: row[f"param/{n}"] for n in distributions if not missing(row.get(f"param/{n}"))}
        try:
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions={n: distributions[n] for n in params}, value=row["best"]))
        except ValueError as err:  # a value outside space.yaml's distribution: the file was edited
            why = f"Trial #{row['number']} does not fit {search.space.source}: {err}"
            return html.escape(why), None
    return "", study


def _distribution(param: spaces.Param) -> BaseDistribution:
    """The Optuna distribution a space file's parameter samples from (what Param.suggest asks)."""
    if param.type == "categorical":
        return CategoricalDistribution(list(param.choices))
    if param.type == "int":
        return IntDistribution(int(param.low), int(param.high), log=param.log, step=int(param.step or 1))
    return FloatDistribution(param.low, param.high, log=param.log, step=param.step)


def _rungs(search: Search) -> list[int]:
    """The epochs at which ASHA compares trials: grace_period · reduction_factor^k below max."""
    if search.space is None:
        return []
    asha, rungs, epoch = search.space.asha, [], float(search.space.asha.grace_period)
    while epoch < search.max_epochs:
        rungs.append(epoch)
        epoch *= asha.reduction_factor
    return rungs


def _spread(final: pd.DataFrame, metric: str) -> list[str]:
    return [f"{m:.4f} ± {s:.4f}" for m, s in zip(final[f"{metric}_mean"], final[f"{metric}_std"])]


def _jitter(n: int) -> np.ndarray:
    """Spread the dots of one category sideways so that equal values stay visible (seeded)."""
    return np.random.default_rng(0).uniform(-0.15, 0.15, n)


def _inline(markdown: str) -> str:
    """One line of final.md as HTML: its **bold** and `code`."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(markdown, quote=False))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _table(frame: pd.DataFrame, header: bool = True, keys: int = 1) -> str:
    """HTML tables of at most MAX_COLUMNS columns each, so that a page fits a window without scrolling
    sideways: a wider frame is split, each part led by its first `keys` columns (what names a row)."""
    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            return "" if math.isnan(value) else f"{value:.4g}"
        return html.escape(str(value))

    def name(column: Any) -> str:  # a long name may break after _ or /
        return re.sub(r"([_/])", r"\1<wbr>", html.escape(str(column)))

    rest = frame.shape[1] - keys
    size = max(1, math.ceil(rest / max(1, math.ceil(rest / (MAX_COLUMNS - keys)))))  # parts of even width
    tables = []
    for part in [frame.iloc[:, [*range(keys), *range(i, min(i + size, frame.shape[1]))]]
                 for i in range(keys, frame.shape[1], size)] or [frame]:
        head = "<tr>" + "".join(f"<th>{name(c)}</th>" for c in part.columns) + "</tr>" if header else ""
        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                       for row in part.itertuples(index=False))
        tables.append(f"<table>{head}{body}</table>")
    return "".join(tables)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: 0.9em; } p { max-width: 60em; }
img { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 3px 6px; text-align: right; } th { overflow-wrap: anywhere; }
th { background: #f4f4f4; } td:first-child { text-align: left; }
"""


def page(search: Search, sections: list[Section]) -> str:
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Search report: "
             f"{html.escape(search.experiment)}</title><style>{STYLE}</style></head><body>",
             f"<h1>Search report</h1><p class='meta'>{html.escape(search.experiment)}<br>written {made}; "
             f"a snapshot: run <code>simdiffrec report</code> again while the search runs.</p>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2><p>{section.text}</p>")
        if section.png:
            data = base64.b64encode(section.png).decode()
            parts.append(f"<img alt='{html.escape(section.title)}' src='data:image/png;base64,{data}'>")
        if section.table:
            parts.append(section.table)
    parts.append("</body></html>")
    return "\n".join(parts)
