"""Learning curves to calibrate a search on: configurations drawn from a space, each trained with
every seed to a fixed epoch cap without early stopping, every epoch's valid and test metrics kept.

    python bench/curves.py --data ../shared/data/ml-100k.inter --name ml-100k --configs 48 --epochs 150
    python bench/curves.py --data ../shared/data/Toys_and_Games.txt --name toys-8k --users 8000 --epochs 150 --patience 30

The set's configurations are the space's `points_to_evaluate` (what a search tries first) and
then draws of Optuna's seeded random sampler, so `bench/replay.py` can replay a search of that
space: its scheduler on the recorded curves, its searcher by table lookup.  Runs go seed by seed
(every configuration with the first seed, then the second), so an unfinished set is already
usable.  A user sample (`--users`) shrinks every batch by the share of training rows it
keeps, so that an epoch takes as many optimizer steps as on the whole data and a grace period
in epochs means the same on both.  Resumable: each (configuration, seed) trains in WORK/c<NN>-s<SEED>/ with a checkpoint
after every epoch; the same command continues where it stopped.  The same command in several
processes shares the runs: each takes the next run that none of the others holds (a lock that
ends with its process), a seed's runs longest first by the earlier seeds' seconds, so they
finish together; `--lane i/n` splits the runs statically.  A
space that searches max_len gets data prepared at its largest, each run cutting its own.  After
each finished run the set is rewritten in bench/curves/NAME/ (one process at a time):
`configs.parquet` (one row per configuration), `curves.parquet` (one row per run and epoch) and
`set.yaml` (the command, data, space, machine and how many runs are done).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import optuna
import pandas as pd
import torch
import yaml

from simdiffrec.config import Config, read_yaml, write_yaml
from simdiffrec.data import SequenceData, frame_to_data
from simdiffrec.datasets import DEFAULT_MAX_LEN
from simdiffrec.evaluate import evaluate, scorer
from simdiffrec.files import locked, read_torch, write_atomic
from simdiffrec.readers import read_file
from simdiffrec.train import Evaluation, train
from tuner import spaces

HERE = Path(__file__).resolve().parent
# what makes a set: resuming with any of these changed is refused
IDENTITY = ("data", "sampled_users", "space", "fixed", "epochs", "patience", "seeds", "configs", "draw_seed")
KEEP = ("HR@10", "NDCG@10")  # the metrics kept per epoch, valid and test


def draw(space: spaces.Space, count: int, seed: int) -> list[dict[str, Any]]:
    """The space's points first, then seeded random draws, `count` in all."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = [dict(p) for p in space.points[:count]]
    while len(points) < count:
        trial = study.ask()
        space(trial)
        points.append(dict(trial.params))
    return points


def load(source: str, users: int | None, seed: int, max_len: int | None, kcore: int) -> tuple[SequenceData, float]:
    """The data, or a seeded sample of `users` of its users (then k-core filtered as a whole),
    and the share of the data's training rows the sample keeps."""
    frame = read_file(source)
    data = frame_to_data(frame, max_len or DEFAULT_MAX_LEN, kcore, source)
    if users is None:
        return data, 1.0
    chosen = np.random.default_rng(seed).permutation(frame["user"].unique())[:users]
    sample = frame_to_data(frame[frame["user"].isin(chosen)], max_len or DEFAULT_MAX_LEN, kcore, source)
    return sample, len(sample.train_lengths) / len(data.train_lengths)


def train_run(cfg: Config, data: SequenceData, work: Path, progress: str) -> pd.DataFrame:
    """Train one (configuration, seed) to cfg.epochs, resuming from WORK; its rows per epoch."""
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, rows_file = work / "checkpoint.pt", work / "rows.json"
    rows: list[dict[str, Any]] = []
    resume = None
    if checkpoint.is_file():
        done = read_torch(checkpoint, ("state",))["state"]["epoch"]
        rows = [r for r in json.loads(rows_file.read_text()) if r["epoch"] <= done]
        resume = checkpoint
    test = data.test

    def report(ev: Evaluation) -> None:
        ev.model.eval()
        with torch.no_grad():
            test_metrics = evaluate(scorer(cfg, ev.model, torch.device("cpu")), test)
        ev.model.train()
        spent = sum(r["seconds"] for r in rows)
        rows.append({"epoch": ev.epoch, "seconds": ev.seconds_per_epoch * ev.epoch - spent,
                     **{f"valid/{k}": ev.valid[k] for k in KEEP}, **{f"test/{k}": test_metrics[k] for k in KEEP},
                     "loss": sum(v for k, v in ev.losses.items() if k.startswith("loss_"))})
        # rows first: a kill between the two leaves rows ahead of the checkpoint, cut on resume
        write_atomic(rows_file, json.dumps(rows).encode())
        ev.save(checkpoint)
        print(f"{progress} epoch {ev.epoch:3d}  valid NDCG@10 {ev.valid['NDCG@10']:.4f}  "
              f"test {test_metrics['NDCG@10']:.4f}  {rows[-1]['seconds']:.1f}s", flush=True)

    train(cfg, data, report=report, resume=resume, test=False)
    return pd.DataFrame(rows)


def write_set(out: Path, configs: pd.DataFrame, curves: pd.DataFrame, about: dict[str, Any]) -> None:
    write_atomic(out / "configs.parquet", configs.to_parquet(index=False))
    write_atomic(out / "curves.parquet", curves.to_parquet(index=False))
    runs = curves.groupby(["config", "seed"]).size() if len(curves) else []
    write_yaml(out / "set.yaml", {**about, "runs_done": len(runs)})


def runs_in(curves: pd.DataFrame) -> set[tuple[int, int]]:
    """The (configuration, seed) runs a set holds."""
    return set(curves.groupby(["config", "seed"]).groups) if len(curves) else set()


def longest_first(plan: list[tuple[int, int]], curves: pd.DataFrame) -> list[tuple[int, tuple[int, int]]]:
    """The plan's runs, numbered as planned, each seed's configurations longest first by the
    seconds their earlier runs took (unknown: first, in the planned order), so that processes
    sharing the runs do not end with one long run alone on one core."""
    took = curves.groupby("config")["seconds"].sum() / curves.groupby("config")["seed"].nunique() if len(curves) else {}
    numbered = list(enumerate(plan))
    return sorted(numbered, key=lambda item: (item[1][0], -took.get(item[1][1], math.inf)))


@contextlib.contextmanager
def one_at_a_time(path: Path) -> Iterator[None]:
    """Wait for, then hold, `path`'s lock: two processes merging their runs into the set at once
    would each write what it read, and the second would drop the first's run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes or the process ends
        yield


def earlier(out: Path, configs: pd.DataFrame, about: dict[str, Any]) -> pd.DataFrame:
    """The curves an earlier session of this set recorded; refuse a set made otherwise."""
    if not (out / "set.yaml").is_file():
        return pd.DataFrame()
    old = read_yaml(out / "set.yaml")
    changed = [k for k in IDENTITY if old.get(k) != about[k]]
    if changed or not pd.read_parquet(out / "configs.parquet").equals(configs):
        what = ", ".join(f"{k}: {old.get(k)!r} -> {about[k]!r}" for k in changed) or "its configurations"
        raise SystemExit(f"{out}: a set made with other settings ({what}); give another --name")
    return pd.read_parquet(out / "curves.parquet")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a sequence or interaction file")
    p.add_argument("--name", required=True, help="the set's name: bench/curves/NAME/")
    p.add_argument("--space", default="default", help="a space file or a shipped space's name")
    p.add_argument("--configs", type=int, default=48, help="configurations in the set (the space's points first)")
    p.add_argument("--seeds", default="0,1", help="training seeds, comma-separated")
    p.add_argument("--epochs", type=int, required=True, help="every run trains this many epochs")
    p.add_argument("--patience", type=int, default=None,
                   help="end a run after this many epochs without a better valid NDCG@10 (default: never); "
                        "curves stay complete for replaying any search whose patience is at most this")
    p.add_argument("--users", type=int, default=None, help="a seeded sample of this many users")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every run (YAML value), over the space's fixed ones")
    p.add_argument("--draw-seed", type=int, default=0, help="seed of the configuration draws and the user sample")
    p.add_argument("--work", type=Path, default=None, help="checkpoints (default runs/curves-NAME)")
    p.add_argument("--out", type=Path, default=None, help="the set's folder (default bench/curves/NAME)")
    p.add_argument("--lane", default="0/1", help="i/n: train every n-th run, starting at the i-th")
    args = p.parse_args(argv)
    lane, lanes = (int(x) for x in args.lane.split("/"))
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work or Path("runs") / f"curves-{args.name}"
    out = args.out or HERE / "curves" / args.name
    space = spaces.load(args.space)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    fixed = {**space.fixed, **overrides}
    points = draw(space, args.configs, args.draw_seed)
    base = Config.from_dict(fixed, source="--set")
    longest = max((n for n in (space.data_max_len(), base.max_len) if n), default=None)  # runs cut theirs from it
    data, share = load(args.data, args.users, args.draw_seed, longest, base.kcore)
    given = sys.argv[1:] if argv is None else argv
    command = [a for i, a in enumerate(given) if a != "--lane" and given[i - 1:i] != ["--lane"]]
    about = {"command": "python bench/curves.py " + shlex.join(command),
             "data": args.data, "users": data.n_users, "items": data.n_items, "sampled_users": args.users,
             "space": str(Path(space.source).name), "fixed": fixed, "epochs": args.epochs, "seeds": seeds,
             "configs": len(points), "draw_seed": args.draw_seed, "starts": min(len(space.points), len(points)),
             "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}",
             "patience": args.patience, "batch_scale": share}
    configs = pd.DataFrame(points)
    configs.insert(0, "config", range(len(points)))
    configs.insert(1, "start", configs["config"] < about["starts"])  # one of the space's points_to_evaluate
    curves = earlier(out, configs, about)
    done = runs_in(curves)
    plan = [(seed, c) for seed in seeds for c in range(len(points))]
    print(f"{args.name}: {data.n_users} users, {data.n_items} items; {len(points)} configurations × "
          f"{len(seeds)} seeds, at most {args.epochs} epochs each; {len(done)} of {len(plan)} runs done",
          file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    for i, (seed, c) in longest_first(plan, curves):
        if i % lanes != lane or (c, seed) in done:
            continue
        run = contextlib.ExitStack()
        try:
            run.enter_context(locked(work / f"c{c:02d}-s{seed}"))
        except ValueError:  # another process of this set trains it
            continue
        with run:
            if (c, seed) in runs_in(earlier(out, configs, about)):
                continue  # another process finished it since this one started
            cfg = space.config({**fixed, **points[c]}, args.epochs)
            # a sample's epoch takes as many steps as the whole data's: its batches shrink with it
            cfg = cfg.replace(patience=args.patience or args.epochs, eval_every=1, seed=seed, device="cpu",
                              batch_size=max(1, round(cfg.batch_size * share)))
            rows = train_run(cfg, data.shortened(cfg.max_len), work / f"c{c:02d}-s{seed}",
                             f"[{i + 1}/{len(plan)} c{c:02d} s{seed}]")
            with one_at_a_time(work / "set.lock"):  # merge with what the others added meanwhile
                curves = pd.concat([earlier(out, configs, about), rows.assign(config=c, seed=seed)], ignore_index=True)
                curves = curves[["config", "seed"] + [k for k in curves.columns if k not in ("config", "seed")]]
                write_set(out, configs, curves, about)
        print(f"{args.name}: run c{c:02d} s{seed} added to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
