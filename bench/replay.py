"""A search replayed in seconds on recorded learning curves (`bench/curves.py`'s sets).

    python bench/replay.py bench/curves/ml-100k                  # the policy table
    python bench/replay.py bench/curves/ml-100k --json           # the same rows as JSON lines
    python bench/replay.py bench/curves/ml-100k --searchers random,tpe,tpe-mv --orders 100
    python bench/replay.py bench/curves/ml-100k --caps 100,200 --patience 10,30   # in one table

A replayed search runs `--trials` trials on `--workers` parallel workers, each trial at its run's
recorded pace (the median seconds of its epochs: a SimDiffRec epoch at hidden 256 takes many
SASRec ones, and which trials reach a rung first is what asynchronous ASHA decides on), or with
`--pace epochs` all at one epoch per time unit.  The space's points come first, then the
searcher's choices: `random` (a random order of the set's other configurations), `tpe` (Optuna's
TPE at its defaults) or `tpe-mv` (multivariate + group + constant liar), both asking the space
as a search does and handed the nearest configuration of the set not yet tried (table lookup);
each trial is one recorded seed of its configuration, drawn at random.  A trial ends at the
policy's epoch cap, after the policy's patience of epochs without a better valid NDCG@10 (the
space's; a row named `pN` ends a trial after N, so one table compares the space's patience with
others'), or when the policy stops it:

    none                no stopping
    asha g,rf,b,m       Ray's ASHA (AsyncHyperBandScheduler) with grace period g, reduction factor
                        rf, b brackets (b > 1: asynchronous Hyperband) and the search's
                        `min_rung_results` m, on each epoch's valid NDCG@10
    hyperband rf        Ray's HyperBandScheduler (synchronous Hyperband) with reduction factor rf:
                        a trial pauses at its bracket's milestone, keeping its place among the
                        trials in flight (the search's concurrency limit counts it), until every
                        live trial of the bracket has reached it; then the best 1/rf go on
    median g            Ray's MedianStoppingRule (grace period g, 3 samples): stop a trial whose
                        best is below the median of the others' running means

The pick is the trial with the best valid NDCG@10 of any epoch, as the search's export takes it.
A configuration's worth is what retraining it to convergence gives: its best valid NDCG@10 over
the whole recorded curve and the test NDCG@10 at that epoch, averaged over its seeds.  Per
policy: epochs and trial-seconds spent (% of no stopping at the longest cap and patience; the
seconds at each run's recorded pace, what a search costs), P(best kept) (the best configuration
the search tried was not stopped by the policy), P(best picked), P(near best) (the pick's valid
worth within one seed's standard deviation of the best's: where the best few configurations lie
within seed noise of each other, which one is "the best" is noise, and this is the probability
that matters), and the regret of the pick (the set's best worth minus the pick's, valid and
test, mean and 90th percentile).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import statistics
import sys
import warnings
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simdiffrec.config import read_yaml
from tuner import spaces

METRIC = "valid/NDCG@10"
TEST = "test/NDCG@10"
PACES = {"seconds": "each run's recorded seconds per epoch", "epochs": "one epoch a time unit"}


@dataclass(frozen=True)
class Policy:
    kind: str  # none | asha | hyperband | median
    cap: int  # the search's epoch cap (asha.max_epochs)
    grace: int = 0
    rf: float = 0.0
    brackets: int = 1
    min_rung: int = 1
    patience: int | None = None  # a trial's own early stopping; None: the space's

    @property
    def name(self) -> str:
        own = f" p{self.patience}" if self.patience is not None else ""
        if self.kind == "asha":
            return f"asha g{self.grace} rf{self.rf:g} b{self.brackets} m{self.min_rung} cap{self.cap}{own}"
        if self.kind == "median":
            return f"median g{self.grace} cap{self.cap}{own}"
        if self.kind == "hyperband":
            return f"hyperband rf{self.rf:g} cap{self.cap}{own}"
        return f"none cap{self.cap}{own}"


@dataclass
class Curves:
    """The recorded set: per (configuration, seed) its valid and test NDCG@10 by epoch."""

    configs: pd.DataFrame  # one row per configuration: config, start, its parameters
    valid: dict[tuple[int, int], np.ndarray]
    test: dict[tuple[int, int], np.ndarray]
    worth_valid: dict[int, float]  # the configuration's converged valid NDCG@10, mean over seeds
    worth_test: dict[int, float]
    seeds: dict[int, list[int]]
    seed_std: float  # median over configurations of the std over seeds of the converged valid NDCG@10
    pace: dict[tuple[int, int], float]  # a run's median seconds per epoch (1.0 where the set recorded none)
    timed: bool  # the set recorded seconds
    _ends: dict = field(default_factory=dict)  # natural_end by (run, cap, patience)

    @cached_property
    def ids(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.configs["config"])

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """The space's points_to_evaluate among the configurations, in order."""
        return tuple(int(c) for c in self.configs.loc[self.configs["start"], "config"])

    def end(self, run: tuple[int, int], cap: int, patience: int) -> int:
        key = (run, cap, patience)
        if key not in self._ends:
            self._ends[key] = natural_end(self.valid[run], cap, patience)
        return self._ends[key]

    @classmethod
    def load(cls, folder: Path) -> "Curves":
        configs = pd.read_parquet(folder / "configs.parquet")
        curves = pd.read_parquet(folder / "curves.parquet").sort_values(["config", "seed", "epoch"])
        valid, test, seeds, pace = {}, {}, {}, {}
        for (config, seed), run in curves.groupby(["config", "seed"]):
            valid[config, seed] = run[METRIC].to_numpy()
            test[config, seed] = run[TEST].to_numpy()
            seeds.setdefault(config, []).append(seed)
            seconds = run["seconds"].median() if "seconds" in run else math.nan
            pace[config, seed] = float(seconds) if seconds > 0 else 1.0
        best_valid = {key: v.max() for key, v in valid.items()}
        best_test = {key: test[key][v.argmax()] for key, v in valid.items()}
        worth_valid = {c: float(np.mean([best_valid[c, s] for s in ss])) for c, ss in seeds.items()}
        worth_test = {c: float(np.mean([best_test[c, s] for s in ss])) for c, ss in seeds.items()}
        spread = [np.std([best_valid[c, s] for s in ss], ddof=1) for c, ss in seeds.items() if len(ss) > 1]
        configs = configs[configs["config"].isin(seeds)].reset_index(drop=True)
        return cls(configs, valid, test, worth_valid, worth_test, seeds,
                   float(np.median(spread)) if spread else math.nan, pace, "seconds" in curves)


def natural_end(valid: np.ndarray, cap: int, patience: int) -> int:
    """The epoch a trial ends at without a scheduler: its cap, the recorded curve's end, or
    `patience` epochs without a better valid NDCG@10."""
    best, best_epoch = -math.inf, 0
    for epoch, value in enumerate(valid[:cap], 1):
        if value > best:
            best, best_epoch = value, epoch
        elif epoch - best_epoch >= patience:
            return epoch
    return min(cap, len(valid))


class Asha:
    """Ray's ASHA bracket bookkeeping (async_hyperband._Bracket, Ray 2.60) and the search's
    `min_rung_results` rule (tuner.recovery.ResumableASHA)."""

    def __init__(self, policy: Policy, rng: np.random.Generator) -> None:
        self.policy, self.rng = policy, rng
        self.brackets = []
        for s in range(policy.brackets):
            rungs = int(np.log(policy.cap / policy.grace) / np.log(policy.rf) - s + 1)
            self.brackets.append([(policy.grace * policy.rf ** (k + s), {}) for k in reversed(range(rungs))])
        sizes = np.array([len(b) for b in self.brackets])
        probs = np.e ** (sizes - sizes.max())
        self.cdf = np.cumsum(probs / probs.sum())
        self.cdf /= self.cdf[-1]
        self.milestones = [sorted({math.ceil(m) for m, _ in b if m <= policy.cap}) for b in self.brackets]
        self.of: dict[int, list] = {}

    def add(self, trial: int) -> list[int]:
        """Assign the trial its bracket; return the epochs at which it will be judged."""
        # rng.choice(len(brackets), p=probs) as numpy draws it, without its checks (a replay's hot spot)
        chosen = int(self.cdf.searchsorted(self.rng.random(), side="right"))
        self.of[trial] = self.brackets[chosen]
        return self.milestones[chosen]

    def result(self, trial: int, epoch: int, value: float) -> bool:
        """Record the trial's result at `epoch`; True: stop it."""
        if epoch >= self.policy.cap:
            return True
        for milestone, recorded in self.of[trial]:
            if epoch < milestone or trial in recorded:
                continue
            earlier = list(recorded.values())
            recorded[trial] = value
            if not earlier:
                return False
            return value < percentile(earlier, 1 - 1 / self.policy.rf) and len(earlier) >= self.policy.min_rung
        return False


@dataclass
class Bracket:
    """One bracket of Ray's synchronous Hyperband (hyperband._Bracket, Ray 2.60)."""

    n: int  # live trials it holds before it is filled; shrinks by rf at each halving
    r: int  # the milestone: the epoch every live trial must reach before the next halving
    halves: int  # halvings left
    live: dict[int, tuple[int, float]] = field(default_factory=dict)  # trial -> its last (epoch, valid NDCG@10)

    def reached(self) -> bool:
        return all(epoch >= self.r for epoch, _ in self.live.values())

    def process(self, rf: float, cap: int) -> tuple[list[int], list[int]]:
        """Once every live trial has reached the milestone: (the trials to stop, those to go on)."""
        if not self.reached():
            return [], []
        if self.halves == 0:  # the bracket is finished: every trial still in it stops
            stop = list(self.live)
            self.live.clear()
            return stop, []
        self.halves -= 1
        self.n = math.ceil(self.n / rf)
        self.r = int(min(self.r * rf, cap))
        ranked = sorted(self.live, key=lambda t: self.live[t][1])
        good, bad = ranked[-self.n:], ranked[:-self.n]
        for trial in bad:
            del self.live[trial]
        return bad, good


class HyperBand:
    """Ray's HyperBandScheduler (Ray 2.60): each new trial joins the current bracket until it holds
    its n live trials, then a new one opens, the s-th of a band (s = 0, 1, ...: n0 = ceil(s_max / (s + 1)
    * rf^s) trials from epoch r0 = cap / rf^s; s = 0 runs every trial to the cap).  Ray stops processing
    a bracket on a trial's removal after its first halving (its `is_being_processed` is never reset,
    which can leave paused trials waiting); here every removal processes it."""

    def __init__(self, policy: Policy) -> None:
        self.rf, self.cap = policy.rf, policy.cap
        self.s_max = int(np.round(np.log(policy.cap) / np.log(policy.rf))) + 1
        self.band: list[Bracket | None] = []
        self.current: Bracket | None = None
        self.of: dict[int, Bracket] = {}

    def add(self, trial: int) -> None:
        if self.current is None or len(self.current.live) == self.current.n:
            self.current = None
            while self.current is None:
                if len(self.band) == self.s_max:
                    self.band = []
                s = len(self.band)
                r0 = int(self.cap * self.rf ** -s)
                self.current = Bracket(math.ceil(self.s_max / (s + 1) * self.rf ** s), r0, s) if r0 else None
                self.band.append(self.current)
        self.current.live[trial] = (0, math.nan)
        self.of[trial] = self.current

    def milestone(self, trial: int) -> int:
        return self.of[trial].r

    def result(self, trial: int, epoch: int, value: float) -> tuple[list[int], list[int]]:
        """The trial reports at its milestone (and pauses): the trials to stop and those to go on."""
        bracket = self.of[trial]
        bracket.live[trial] = (epoch, value)
        return bracket.process(self.rf, self.cap)

    def remove(self, trial: int) -> tuple[list[int], list[int]]:
        """The trial ended on its own (its cap or patience): the same, for the others of its bracket."""
        bracket = self.of[trial]
        bracket.live.pop(trial, None)
        return bracket.process(self.rf, self.cap) if bracket.live else ([], [])


class Median:
    """Ray's MedianStoppingRule (Ray 2.60, hard stop, min_samples_required 3), on epochs."""

    def __init__(self, policy: Policy) -> None:
        self.grace = policy.grace
        self.sums: dict[int, list[float]] = {}  # per trial: the sums of its first 0, 1, ... results
        self.best: dict[int, float] = {}

    def add(self, trial: int) -> None:
        self.sums[trial], self.best[trial] = [0.0], -math.inf

    def result(self, trial: int, epoch: int, value: float) -> bool:
        self.sums[trial].append(self.sums[trial][-1] + value)
        self.best[trial] = max(self.best[trial], value)
        if epoch < self.grace:
            return False
        start, count = self.grace - 1, epoch - self.grace + 1
        means = [(s[epoch] - s[start]) / count for t, s in self.sums.items() if t != trial and len(s) > epoch]
        return len(means) >= 3 and self.best[trial] < statistics.median(means)


def percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, `q` in [0, 1], NaN left out as nanpercentile does."""
    ordered = sorted(v for v in values if v == v)
    if not ordered:
        return math.nan
    at = (len(ordered) - 1) * q
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


class Searcher:
    """The order of configurations: the set's starting points, then random or TPE by lookup."""

    def __init__(self, kind: str, curves: Curves, space: spaces.Space, rng: np.random.Generator, seed: int) -> None:
        self.kind, self.space = kind, space
        self.left, self.starts = list(curves.ids), list(curves.starts)
        self.pending: dict[int, Any] = {}
        if kind == "random":
            rest = [c for c in self.left if c not in self.starts]
            self.queue = self.starts + list(rng.permutation(rest))
            return
        self.rows = curves.configs.set_index("config")  # each configuration's parameters, looked up per proposal
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # group: once per search
        sampler = (optuna.samplers.TPESampler(seed=seed) if kind == "tpe" else
                   optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True))
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        for start in self.starts:
            self.study.enqueue_trial(self._values(start))

    def _values(self, config: int) -> dict[str, Any]:
        row = self.rows.loc[config]
        return {p.name: _plain(row[p.name]) for p in self.space.params if not _missing(row[p.name])}

    def next(self, trial: int) -> int | None:
        if self.kind == "random":
            return int(self.queue[trial]) if trial < len(self.queue) else None
        if not self.left:
            return None
        asked = self.study.ask()
        self.space(asked)
        config = self._nearest(asked.params)
        self.left.remove(config)
        self.pending[trial] = asked
        return config

    def told(self, trial: int, value: float) -> None:
        if self.kind != "random":
            self.study.tell(self.pending.pop(trial), value)

    def _nearest(self, params: dict[str, Any]) -> int:
        """The configuration not yet tried closest to `params` (each parameter scaled to [0, 1],
        log ones on a log scale; a categorical or an inactive one counts 1 where it differs)."""
        rows = self.rows.loc[self.left]
        distance = np.zeros(len(rows))
        for p in self.space.params:
            theirs = rows[p.name].to_numpy() if p.name in rows else np.full(len(rows), None)
            mine = params.get(p.name)
            for i, value in enumerate(theirs):
                distance[i] += _distance(p, mine, None if _missing(value) else _plain(value))
        return int(rows.index[int(np.argmin(distance))])


def _distance(p: spaces.Param, a: Any, b: Any) -> float:
    if a is None or b is None:
        return float(a is not b)
    if p.type == "categorical":
        return float(a != b)
    lo, hi = p.low, p.high
    if p.log:
        lo, hi, a, b = (math.log(x) for x in (lo, hi, a, b))
    return abs(a - b) / (hi - lo)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def simulate(curves: Curves, space: spaces.Space, policy: Policy, searcher_kind: str, trials: int, workers: int,
             patience: int, seed: int, paced: bool = True) -> dict[str, Any]:
    """One replayed search; its epochs and trial-seconds, the best configuration it tried and
    whether the policy stopped it, and its pick.  `patience`: the space's, where the policy has
    none of its own; `paced`: trials advance at their runs' recorded pace (else one epoch a unit)."""
    patience = policy.patience or patience
    rng = np.random.default_rng(seed)
    searcher = Searcher(searcher_kind, curves, space, rng, seed)
    scheduler = {"asha": lambda: Asha(policy, rng), "median": lambda: Median(policy),
                 "hyperband": lambda: HyperBand(policy), "none": lambda: None}[policy.kind]()
    events: list[tuple[float, int, int, int]] = []  # (time, tie-break, trial, epoch): the trial reports that epoch then
    state: dict[int, dict[str, Any]] = {}
    started, epochs, seconds, order = 0, 0, 0.0, itertools.count()

    def start(now: float) -> None:
        nonlocal started
        if started >= trials:
            return
        config = searcher.next(started)
        if config is None:
            return
        seeds = curves.seeds[config]
        run = (config, int(seeds[rng.integers(0, len(seeds))]))  # rng.choice(seeds), as numpy draws it
        state[started] = {"run": run, "end": curves.end(run, policy.cap, patience), "best": -math.inf,
                          "stopped": False, "epoch": 0}
        end = state[started]["end"]
        if isinstance(scheduler, Asha):
            reports = {epoch for epoch in scheduler.add(started) if epoch < end} | {end}
        elif isinstance(scheduler, Median):
            scheduler.add(started)
            reports = set(range(1, end + 1))
        elif isinstance(scheduler, HyperBand):
            scheduler.add(started)
            reports = {min(end, scheduler.milestone(started))}  # then paused; `go_on` reschedules it
        else:
            reports = {end}
        state[started]["unit"] = curves.pace[run] if paced else 1.0
        for epoch in sorted(reports):
            heapq.heappush(events, (now + epoch * state[started]["unit"], next(order), started, epoch))
        started += 1

    def finish(trial: int, epoch: int, now: float) -> None:
        nonlocal epochs, seconds
        info = state[trial]
        info["done"], info["stopped"] = True, epoch < info["end"]
        info["best"] = float(curves.valid[info["run"]][:epoch].max())
        epochs += epoch
        seconds += epoch * curves.pace[info["run"]]
        searcher.told(trial, info["best"])
        start(now)

    def go_on(trial: int, now: float) -> None:
        """A paused Hyperband trial resumes from its epoch towards its bracket's next milestone."""
        info = state[trial]
        target = min(info["end"], scheduler.milestone(trial))
        heapq.heappush(events, (now + (target - info["epoch"]) * info["unit"], next(order), trial, target))

    for _ in range(workers):
        start(0)
    while events:
        now, _, trial, epoch = heapq.heappop(events)
        info = state[trial]
        if info.get("done"):
            continue
        values = curves.valid[info["run"]]
        if isinstance(scheduler, HyperBand):
            info["epoch"] = epoch
            if epoch >= info["end"]:  # as Ray: the bracket is processed before a new trial joins
                stop, good = scheduler.remove(trial)
                finish(trial, epoch, now)
            else:
                stop, good = scheduler.result(trial, epoch, values[epoch - 1])
            for other in stop:
                finish(other, state[other]["epoch"], now)
            for other in good:
                go_on(other, now)
            continue
        judged = scheduler is not None and scheduler.result(trial, epoch, values[epoch - 1])  # records it too
        if judged or epoch >= info["end"]:
            finish(trial, epoch, now)
    tried = {info["run"][0] for info in state.values()}
    best_tried = max(tried, key=lambda c: curves.worth_valid[c])
    picked = max(state.values(), key=lambda info: info["best"])["run"][0]
    return {"epochs": epochs, "seconds": seconds,
            "best_kept": not any(info["stopped"] for info in state.values() if info["run"][0] == best_tried),
            "best_picked": picked == best_tried, "pick": picked}


def policies(space: spaces.Space, caps: list[int], patiences: list[int | None]) -> list[Policy]:
    """The policies to compare: no stopping, a grid of ASHA settings, median stopping, synchronous
    Hyperband, at each cap and patience (None: the space's)."""
    found = []
    for cap, patience in itertools.product(caps, patiences):
        found.append(Policy("none", cap, patience=patience))
        for grace, rf, brackets, m in itertools.product((3, 5, 10, 15, 20), (2, 3, 4), (1, 3), (1, 3)):
            if grace * rf <= cap:
                found.append(Policy("asha", cap, grace, float(rf), brackets, m, patience))
        for grace in (5, 10, 20):
            found.append(Policy("median", cap, grace, patience=patience))
        for rf in (2, 3, 4):
            found.append(Policy("hyperband", cap, rf=float(rf), patience=patience))
    return found


def shipped(space: spaces.Space) -> Policy:
    a = space.asha
    return Policy("asha", a.max_epochs, a.grace_period, float(a.reduction_factor), 1, a.min_rung_results)


def table(curves: Curves, space: spaces.Space, candidates: list[Policy], searchers: list[str], trials: int,
          workers: int, patience: int, orders: int, paced: bool = True) -> pd.DataFrame:
    best = max(curves.worth_valid, key=curves.worth_valid.get)
    rows = []
    for searcher in searchers:
        longest = Policy("none", max(p.cap for p in candidates),
                         patience=max(p.patience or patience for p in candidates))
        reference = [simulate(curves, space, longest, searcher, trials, workers, patience, seed, paced)
                     for seed in range(orders)]
        reference_epochs = np.mean([r["epochs"] for r in reference])
        reference_seconds = np.mean([r["seconds"] for r in reference])
        for policy in candidates:
            runs = [simulate(curves, space, policy, searcher, trials, workers, patience, seed, paced)
                    for seed in range(orders)]
            epochs = np.mean([r["epochs"] for r in runs])
            regret_valid = np.array([curves.worth_valid[best] - curves.worth_valid[r["pick"]] for r in runs])
            regret_test = np.array([curves.worth_test[best] - curves.worth_test[r["pick"]] for r in runs])
            # within one seed's std of the best (no std where every configuration has one seed)
            near = math.nan if math.isnan(curves.seed_std) else np.mean(regret_valid <= curves.seed_std)
            rows.append({"searcher": searcher, "policy": policy.name, **asdict(policy), "epochs": epochs,
                         "epochs_pct": 100 * epochs / reference_epochs,
                         "time_pct": 100 * np.mean([r["seconds"] for r in runs]) / reference_seconds,
                         "p_best_kept": np.mean([r["best_kept"] for r in runs]),
                         "p_best_picked": np.mean([r["best_picked"] for r in runs]),
                         "p_near_best": near,
                         "regret_valid": regret_valid.mean(), "regret_valid_p90": np.quantile(regret_valid, 0.9),
                         "regret_test": regret_test.mean(), "regret_test_p90": np.quantile(regret_test, 0.9),
                         "shipped": policy == shipped(space)})
    return pd.DataFrame(rows)


def epochs_list(text: str) -> list[int]:
    """A flag's comma-separated epochs: '100,200' -> [100, 200] (argparse names the flag otherwise)."""
    values = [int(part) for part in text.split(",")]
    if min(values) < 1:
        raise ValueError(text)
    return values


def calibration_set(text: str) -> Path:
    """A folder of bench/curves.py, else argparse's one line naming it."""
    folder = Path(text)
    missing = [name for name in ("set.yaml", "configs.parquet", "curves.parquet") if not (folder / name).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(
            f"{text} is not a calibration set of bench/curves.py (no {', '.join(missing)})")
    return folder


def flags(p: argparse.ArgumentParser) -> None:
    """The flags of a replay (bench/replay_sets.py takes them too)."""
    p.add_argument("--space", default=None, help="the space the shipped policy is read from (default: the set's)")
    p.add_argument("--trials", type=int, default=None, help="trials per search (default: every configuration)")
    p.add_argument("--workers", type=int, default=4, help="trials in flight at once")
    p.add_argument("--patience", type=epochs_list, default=None,
                   help="a trial's own early stopping, epochs; several comma-separated are compared "
                        "(default: the space's)")
    p.add_argument("--caps", type=epochs_list, default=None,
                   help="epoch caps to compare, comma-separated (default: 50 and the space's)")
    p.add_argument("--orders", type=int, default=200, help="replayed searches per policy (random trial orders)")
    p.add_argument("--searchers", default="random", help="random, tpe, tpe-mv (comma-separated)")
    p.add_argument("--policies", default=None,
                   help="only these policies, by name as the table prints them, ';'-separated (default: the grid)")
    p.add_argument("--pace", choices=["seconds", "epochs"], default="seconds",
                   help="trials advance at their runs' recorded seconds per epoch (default), or one epoch a unit")


@dataclass
class Replay:
    """One set's replay under the flags, checked before anything runs; `frame()` runs it."""

    curves: Curves
    space: spaces.Space
    candidates: list[Policy]
    trials: int
    patience: int  # the space's
    args: argparse.Namespace

    @property
    def pace(self) -> str:
        """How the trials advance, as the header says it."""
        if self.args.pace == "seconds" and not self.curves.timed:
            return PACES["epochs"] + " (the set recorded no seconds)"
        return PACES[self.args.pace]

    def frame(self) -> pd.DataFrame:
        a = self.args
        return table(self.curves, self.space, self.candidates, a.searchers.split(","), self.trials, a.workers,
                     self.patience, a.orders, a.pace == "seconds")


def prepare(folder: Path, args: argparse.Namespace) -> Replay:
    """ValueError: a patience longer than the set's runs had (their curves end sooner than such a
    trial), or a policy named that is not among the compared ones."""
    about = read_yaml(folder / "set.yaml")
    recorded = Path(about["space"])  # a shipped space is recorded by its file's name
    space = spaces.load(args.space or (recorded if recorded.is_file() else recorded.stem))
    curves = Curves.load(folder)
    patience = space.fixed.get("patience", 10)
    caps = args.caps or sorted({50, space.asha.max_epochs})
    own = args.patience or [patience]
    if max(own) > about.get("patience", math.inf):
        raise ValueError(f"{folder}: its runs ended after {about['patience']} epochs without progress; "
                         f"a replay's patience cannot be longer (--patience {max(own)})")
    candidates = policies(space, caps, [None if n == patience else n for n in own])
    if shipped(space) not in candidates:
        candidates.append(shipped(space))
    if args.policies:
        wanted = [name.strip() for name in args.policies.split(";")]
        known = {c.name for c in candidates}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise ValueError(f"--policies: no such policy at these caps and patiences: {'; '.join(unknown)} "
                             f"(names as the table prints them, e.g. {candidates[0].name!r})")
        candidates = [c for c in candidates if c.name in wanted]
    return Replay(curves, space, candidates, args.trials or len(curves.configs), patience, args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("set", type=calibration_set, help="a folder of bench/curves.py (configs.parquet, curves.parquet)")
    flags(p)
    p.add_argument("--json", action="store_true", help="JSON lines, one per policy, instead of the table")
    args = p.parse_args(argv)
    try:
        planned = prepare(args.set, args)
    except ValueError as err:
        p.error(str(err))
    frame = planned.frame()
    if args.json:
        for row in frame.to_dict("records"):
            print(json.dumps({k: _plain(v) for k, v in row.items()}))
        return 0
    curves = planned.curves
    print(f"{args.set}: {len(curves.configs)} configurations, {len(curves.valid)} runs; {planned.trials} trials per "
          f"search on {args.workers} workers at {planned.pace}, patience {planned.patience} (the space's; a "
          f"row's pN: N), {args.orders} orders per policy; one seed's std of converged valid NDCG@10: "
          f"{curves.seed_std:.4f}")
    print(markdown(frame))
    return 0


def markdown(frame: pd.DataFrame) -> str:
    cols = ["searcher", "policy", "epochs_pct", "time_pct", "p_best_kept", "p_best_picked", "p_near_best",
            "regret_valid", "regret_valid_p90", "regret_test", "regret_test_p90"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.sort_values(["searcher", "epochs_pct"]).to_dict("records"):
        mark = " (shipped)" if row["shipped"] else ""
        cells = [row["searcher"], row["policy"] + mark, f"{row['epochs_pct']:.0f}%", f"{row['time_pct']:.0f}%"]
        cells += [f"{row[c]:.2f}" for c in cols[4:7]] + [f"{row[c]:.4f}" for c in cols[7:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
