"""From a search to a verdict: `finalize` retrains a search's best configurations and a SASRec
baseline with several seeds; `reproduce` trains the paper's configurations on its datasets.
Both plan a grid (`grid.Plan`), train it as one Ray Tune run (`grid.train_plan`), and write their tables
(`verdict`).

    finalize   DIR/final.md, final.parquet (per configuration), final_runs.parquet (per run),
               final_checkpoint/ (the best configuration's median seed: a model folder)
    reproduce  DIR/table.md, table.parquet (per dataset and configuration), runs.parquet
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from simdiffrec.config import SASREC, SIMDIFFREC_ONLY, Config, read_yaml
from simdiffrec.files import LOCK, in_use, locked, write_atomic

from . import grid, search, spaces, verdict
from .experiment import read, results_frame
from .jobs import default_experiment, parse_datasets
from .protocol import GRID_RECORD, METRIC, RECORD, SPACE_COPY

GRID_FLAGS = ("trials_per_gpu", "cpus_per_trial", "gpu", "max_concurrent", "max_failures")  # of SearchSettings
BASELINE = "baseline"
# finalize's patience unless --patience says otherwise (or the search's is longer): SimDiffRec's valid
# NDCG@10 plateaus for more than 10 epochs on Beauty before it climbs again (docs/tuning.md)
FINAL_PATIENCE = 20
DEFAULTS = "sasrec-defaults"  # SASRec-CE at the default settings: a starting point of every search
# reproduce's configurations: the two SASRec losses, SimDiffRec, the three ablations of Table 3
REPRODUCE = {"sasrec-bce": {"alpha": 0.0, "beta": 0.0, "sr_loss": "bce"},
             "sasrec-ce": SASREC,
             "simdiffrec": {},
             "no-k_noise": {"noise_type": "gaussian"},
             "no-c_aug": {"aug_positions": "random"},
             "no-k_sample": {"hard_negative": False}}


@dataclasses.dataclass
class RetrainRequest:
    """How to train the runs, besides what they are."""

    settings: dict[str, Any]  # GRID_FLAGS that were given
    max_epochs: int | None = None  # None: Config's
    patience: int | None = None  # None: the search's (finalize), Config's (reproduce)
    resume: bool = False
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray

    def __post_init__(self) -> None:
        given = {"max-epochs": self.max_epochs, "patience": self.patience}
        _at_least_one(**{flag: v for flag, v in given.items() if v is not None})

    def train(self, plan: grid.Plan, out: Path) -> pd.DataFrame:
        experiment = default_experiment(out, f"{out.resolve().parent.name}-{out.resolve().name}")
        settings = search.SearchSettings(experiment=experiment, **self.settings)
        with locked(out):  # one grid per OUT at a time; `status` tells a running grid from a stopped one
            return grid.train_plan(plan, out, settings, self.resume, self.ray_address)


def chosen_trials(experiment: str, top: int, numbers: Sequence[int] = ()) -> dict[str, dict[str, Any]]:
    """Name -> searched parameters: `top-1` ... `top-K`, the `top` trials by best valid NDCG@10
    (failed trials left out), then `trial-N` for each trial number N (as `status` numbers them)
    not among them: a configuration the search ranked lower, such as one still improving at its
    epoch cap."""
    run = read(experiment)
    frame = results_frame(run.trials)
    if METRIC not in frame.columns:
        raise ValueError(f"{experiment}: no trial has reported {METRIC} yet")
    frame = frame[(frame["status"] != "ERROR") & frame[METRIC].notna()]
    best = frame.groupby("trial_id", sort=False)[METRIC].max().sort_values(ascending=False, kind="stable")
    if best.empty:
        raise ValueError(f"{experiment}: no trial without errors has reported {METRIC}")
    if top > len(best):
        warnings.warn(f"--top {top}: {experiment} has {len(best)} trials without errors that reported "
                      f"{METRIC}; retraining those {len(best)}")
    by_id, by_number = {t.trial_id: t for t in run.trials}, {t.number: t for t in run.trials}
    chosen = {f"top-{i}": dict(by_id[trial_id].config) for i, trial_id in enumerate(best.index[:top], 1)}
    ranked = {by_id[trial_id].number for trial_id in best.index[:top]}
    for number in dict.fromkeys(numbers):
        if number not in by_number:
            raise ValueError(f"--trials {number}: {experiment} has no trial #{number} "
                             f"(its trials are #{min(by_number)}-#{max(by_number)})")
        if number not in ranked:
            chosen[f"trial-{number}"] = dict(by_number[number].config)
    return chosen


def baselines(configs: dict[str, dict[str, Any]], defaults: dict[str, Any] | None = None
              ) -> tuple[dict[str, dict[str, Any]], dict[str, str], str | None]:
    """SASRec-CE at each configuration's settings: ({baseline: its settings}, {configuration: its
    baseline}, the name of SASRec-CE at `defaults`, the settings a user starts from).

    The settings SASRec never reads are top-1's in every baseline, so configurations that differ
    only in those share one: `baseline` (top-1's), `sasrec-defaults` (at `defaults`) and
    `baseline-NAME` for the first configuration NAME whose other settings (encoder,
    optimisation) differ.  A configuration that is SASRec-CE itself (a sasrec-family trial) has
    no baseline and stands for any baseline of its settings."""
    unread = {k: configs["top-1"][k] for k in SIMDIFFREC_ONLY}

    def twin(config: dict[str, Any]) -> dict[str, Any]:
        return {**config, **unread, **SASREC}

    runs = {name: twin(c) for name, c in configs.items() if all(c[k] == v for k, v in SASREC.items())}
    settings: dict[str, dict[str, Any]] = {}

    def baseline_of(config: dict[str, Any], name: str) -> str:
        found = [b for b, c in {**runs, **settings}.items() if c == twin(config)]
        if not found:
            settings[name] = twin(config)
        return found[0] if found else name

    baseline_of(configs["top-1"], BASELINE)
    default_name = None if defaults is None else baseline_of(defaults, DEFAULTS)
    compared = {name: baseline_of(config, f"{BASELINE}-{name}") for name, config in configs.items() if name not in runs}
    return settings, compared, default_name


def starting_points(points: Sequence[dict[str, Any]], chosen: dict[str, dict[str, Any]]
                    ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The space's points to evaluate as configurations to retrain: `start-J` for the J-th point
    not among `chosen`, and the names in `chosen` that are one of them."""
    new, already = {}, []
    for j, point in enumerate(points, 1):
        same = [name for name, params in chosen.items() if params == dict(point)]
        if same:
            already += same
        else:
            new[f"start-{j}"] = dict(point)
    return new, already


def final_folder(experiment: str, out: Path | None) -> Path:
    """finalize's --out: as given, else the folder holding EXPERIMENT plus /final."""
    if out is not None:
        return out
    if "://" in experiment:
        raise ValueError(f"{experiment}: for an experiment at a URI, give --out (and the search's folder, --search)")
    return Path(experiment).parent / "final"


def finalize(experiment: str, out: Path, seeds: int, top: int, request: RetrainRequest,
             search_dir: Path | None = None, trials: Sequence[int] = ()) -> pd.DataFrame:
    """Retrain the search's top configurations, the `trials` named by number, its starting points
    and their baselines; write the final files into OUT; return final.parquet's table.  The data
    and the fixed settings are the search's (SEARCH_DIR's search.yaml and space.yaml; SEARCH_DIR
    defaults to the folder holding EXPERIMENT)."""
    search_dir = _search_folder(experiment, search_dir)
    _at_least_one(seeds=seeds, top=top)
    space = spaces.load(search_dir / SPACE_COPY)
    plan, params, compared, starts = final_plan(space, read_yaml(search_dir / RECORD),
                                                chosen_trials(experiment, top, trials), request, seeds)
    runs = request.train(plan, out).rename(columns={"run": "configuration"})
    if runs.empty:
        raise ValueError(f"{out}: no run finished; nothing to write (--resume retries them)")
    table = verdict.final_table(runs, params, compared, starts)
    chosen_run = verdict.median_seed(runs, table.loc[table["valid/NDCG@10_mean"].idxmax(), "configuration"])
    grid.save_final_model(read_yaml(out / GRID_RECORD)["experiment"], chosen_run["trial_id"],
                          out / "final_checkpoint")
    write_atomic(out / "final_runs.parquet", runs[verdict.RUN_COLUMNS].to_parquet(index=False))
    write_atomic(out / "final.parquet", table.to_parquet(index=False))
    top_1 = plan.runs["top-1"]["config"]
    about = {"experiment": experiment, "top": sum(name.startswith("top-") for name in params),
             "trials": [name.removeprefix("trial-") for name in params if name.startswith("trial-")], "seeds": seeds,
             "patience": top_1["patience"], "max_epochs": top_1["epochs"]}
    write_atomic(out / "final.md", verdict.final_markdown(table, runs, chosen_run, about).encode())
    return table


def final_plan(space: spaces.Space, record: dict[str, Any], chosen: dict[str, dict[str, Any]],
               request: RetrainRequest, seeds: int
               ) -> tuple[grid.Plan, dict[str, dict[str, Any]], dict[str, str], list[str]]:
    """What finalize trains: the chosen trials, the space's points not among them, SASRec-CE at
    the defaults and the baselines, on the search's data (its `record`); with each one's searched
    parameters, the baseline each configuration is compared with, and the starting points' names."""
    params = dict(chosen)
    starts, chosen_starts = starting_points(space.points, params)
    params.update(starts)

    def settings(point: dict[str, Any]) -> dict[str, Any]:
        """A run's settings, its max_len the one it trains at, so that two names for one run train once."""
        config = _settings(space.config(point).to_dict(), request, FINAL_PATIENCE)
        return {**config, "max_len": config["max_len"] or space.data_max_len()}

    configs = {name: settings(p) for name, p in params.items()}
    baseline_configs, compared, defaults = baselines(configs, settings({}))
    for baseline, config in baseline_configs.items():  # a baseline's searched parameters as it runs them
        params[baseline] = {k: "sasrec" if k == spaces.FAMILY else config[k] for k in params["top-1"]}
    fixed = Config.from_dict(space.fixed, source=space.source)
    plan = grid.Plan(datasets={"data": {"source": record["data"], "columns": record["columns"],
                                        "max_len": space.data_max_len(), "kcore": fixed.kcore}},
                     runs={name: {"dataset": "data", "config": c} for name, c in {**configs, **baseline_configs}.items()},
                     seeds=list(range(seeds)))
    return plan, params, compared, [*starts, *chosen_starts, defaults]


def _search_folder(experiment: str, search_dir: Path | None) -> Path:
    """The search's folder (search.yaml, space.yaml): given, or the one holding EXPERIMENT; one
    whose search still runs is refused."""
    if "://" in experiment and search_dir is None:
        raise ValueError(f"{experiment}: for an experiment at a URI, give the search's folder (--search)")
    search_dir = Path(search_dir or Path(experiment).parent)
    if not (search_dir / RECORD).is_file():
        raise FileNotFoundError(f"{search_dir / RECORD}: missing; --search names the folder of the search "
                                "(where tune wrote search.yaml and space.yaml)")
    if in_use(search_dir):  # its leaderboard is half-finished, and a second Ray would share its machines
        raise ValueError(f"{search_dir}: the search is still running (it holds {search_dir / LOCK}): "
                         f"finalize it once it has ended (simdiffrec status {search_dir} follows it)")
    return search_dir


def reproduce(datasets: str, out: Path, seeds: int, request: RetrainRequest) -> pd.DataFrame:
    """Train REPRODUCE's configurations on each dataset (`name` or `name=path`) at the paper's
    settings for it; write the table beside the paper's numbers; return table.parquet's table."""
    _at_least_one(seeds=seeds)
    paper = verdict.paper_results()
    plan_data, runs_plan, order, labels = {}, {}, {}, {}
    for name, source in parse_datasets(datasets).items():
        paper_settings = dict(paper["settings"].get(name, paper["settings"]["default"]))
        max_len = paper_settings.pop("max_len", None)
        plan_data[name] = {"source": source, "columns": {}, "max_len": max_len, "kcore": Config.kcore}
        order[name] = list(REPRODUCE)
        for configuration, changes in REPRODUCE.items():
            config = {**Config().to_dict(), **paper_settings, **changes, "max_len": max_len}
            run = f"{name}.{configuration}"
            runs_plan[run] = {"dataset": name, "config": _settings(config, request)}
            labels[run] = (name, configuration)
    plan = grid.Plan(datasets=plan_data, runs=runs_plan, seeds=list(range(seeds)))
    runs = request.train(plan, out)
    if runs.empty:
        raise ValueError(f"{out}: no run finished; nothing to write (--resume retries them)")
    runs.insert(0, "dataset", runs["run"].map(lambda r: labels[r][0]))
    runs.insert(1, "configuration", runs["run"].map(lambda r: labels[r][1]))
    table = verdict.reproduce_table(runs, order, paper)
    write_atomic(out / "runs.parquet", runs.drop(columns=["run"]).to_parquet(index=False))
    write_atomic(out / "table.parquet", table.to_parquet(index=False))
    about = {"seeds": seeds, "patience": next(iter(runs_plan.values()))["config"]["patience"],
             "max_epochs": next(iter(runs_plan.values()))["config"]["epochs"]}
    write_atomic(out / "table.md", verdict.reproduce_markdown(table, about).encode())
    return table


def _settings(config: dict[str, Any], request: RetrainRequest, patience: int = 1) -> dict[str, Any]:
    """A run's settings for the grid: every epoch evaluated, --max-epochs and --patience applied
    (without --patience, at least `patience`), the seed left to the grid."""
    epochs = Config.epochs if request.max_epochs is None else request.max_epochs
    config = {**config, "eval_every": 1, "device": "auto", "epochs": epochs}
    config.pop("seed")
    config["patience"] = max(config["patience"], patience) if request.patience is None else request.patience
    return config


def _at_least_one(**counts: int) -> None:
    for flag, value in counts.items():
        if value < 1:
            raise ValueError(f"--{flag} {value}: must be at least 1")
