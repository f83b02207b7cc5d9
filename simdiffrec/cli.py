"""`simdiffrec train | evaluate | recommend | tune | tune-all | export`.

Settings come from, in rising priority: the defaults (the paper's), `--config FILE.yaml`, then
one flag per setting (`--alpha 0.4 --k-noise 25 ...`).  Bad input ends with one line naming the
problem, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence

from .config import CHOICES, Config

DATA_ARGS = ("kcore", "user_col", "item_col", "time_col")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field (`k_noise` -> `--k-noise`), defaulting to 'not given'."""
    group = parser.add_argument_group("model and training settings (defaults: the paper's)")
    group.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default {default})")
        elif f.name in CHOICES:
            group.add_argument(flag, choices=CHOICES[f.name], default=None, help=f"(default {default})")
        else:
            kind = {"max_len": int, "tau_end": float}.get(f.name, type(default))
            group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=f"(default {default})")


def config_from_args(args: argparse.Namespace) -> Config:
    base = Config.load_yaml(args.config) if args.config else Config()
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    return Config.from_dict({**base.to_dict(), **given}, source="command line")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="a file (.txt, .inter, .csv, .parquet) or a dataset name (beauty, toys, sports, yelp, ml-1m)")
    parser.add_argument("--user-col", default="user_id", help="user column of a .csv/.parquet file")
    parser.add_argument("--item-col", default="item_id", help="item column of a .csv/.parquet file")
    parser.add_argument("--time-col", default="timestamp", help="time column of a .csv/.parquet file")


def load_for(cfg: Config, args: argparse.Namespace):
    """Load the data the settings ask for; an unset max_len takes the dataset's default."""
    from .data import describe, load_data

    data = load_data(args.data, max_len=cfg.max_len, kcore=cfg.kcore,
                     user_col=args.user_col, item_col=args.item_col, time_col=args.time_col)
    stats = describe(data)
    print(f"data {args.data}: {stats['users']:,} users, {stats['items']:,} items, {stats['actions']:,} actions, "
          f"avg length {stats['avg_length']:.1f}, max_len {data.max_len}", file=sys.stderr)
    return data, stats


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .export import save_model, write_atomic
    from .train import Evaluation, train

    cfg = config_from_args(args)
    data, stats = load_for(cfg, args)
    cfg = cfg.replace(max_len=data.max_len)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    resume = checkpoint if args.resume and checkpoint.is_file() else None
    if args.resume and resume is None:
        print(f"no checkpoint at {checkpoint}: starting from scratch", file=sys.stderr)
    write_atomic(out / "config.yaml", _yaml(cfg.to_dict()))

    def report(ev: Evaluation) -> None:
        tqdm.write(f"epoch {ev.epoch:4d}  " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in ev.losses.items())
                   + f"  valid HR@10 {ev.valid['HR@10']:.4f} NDCG@10 {ev.valid['NDCG@10']:.4f}"
                   + f"  best epoch {ev.best_epoch}  {ev.seconds_per_epoch:.1f} s/epoch")
        ev.save(checkpoint)

    result = train(cfg, data, report=report, resume=resume, progress=not args.quiet)
    metrics = {"valid": result.valid, "test": result.test, "best_epoch": result.best_epoch,
               "seconds_per_epoch": result.seconds_per_epoch, "eval_seconds": result.eval_seconds,
               "minutes": result.minutes, "data": {"source": str(args.data), **stats},
               "history": result.history}
    save_model(out / "best_checkpoint", result.model, data.item_ids,
               metrics={k: metrics[k] for k in ("valid", "test", "best_epoch")})
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    print(f"best epoch {result.best_epoch}: valid HR@10 {result.valid['HR@10']:.4f} NDCG@10 {result.valid['NDCG@10']:.4f}"
          f" | test HR@10 {result.test['HR@10']:.4f} NDCG@10 {result.test['NDCG@10']:.4f}  -> {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .data import load_data
    from .evaluate import evaluate
    from .export import load_model
    from .device import resolve_device
    from .evaluate import scorer

    device = resolve_device(args.device)
    loaded = load_model(args.model, device)
    data = load_data(args.data, max_len=loaded.max_len, kcore=loaded.config.kcore,
                     user_col=args.user_col, item_col=args.item_col, time_col=args.time_col)
    if data.n_items != loaded.model.n_items:
        raise ValueError(f"{args.data} has {data.n_items} items but the model in {args.model} was trained "
                         f"on {loaded.model.n_items}: not the same prepared data")
    score = scorer(loaded.config, loaded.model, device)  # as in training, so the numbers match the run's
    with torch.no_grad():
        metrics = {split: evaluate(score, getattr(data, split).to(device)) for split in args.split}
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from .export import load_model, recommend

    loaded = load_model(args.model)
    histories = [line.split() for line in args.history]
    if loaded.item_ids is not None and len(loaded.item_ids) > 1 and isinstance(loaded.item_ids[1], int):
        histories = [[int(x) for x in h] for h in histories]
    for history, items in zip(args.history, recommend(loaded, histories, args.k)):
        print(f"{history}\t{' '.join(map(str, items))}")
    return 0


def _yaml(values: dict[str, Any]) -> bytes:
    import yaml

    return yaml.safe_dump(values, sort_keys=False).encode()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("simdiffrec")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simdiffrec", description="Train, evaluate and tune SimDiffRec "
                                     "sequential recommenders (see README.md).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model and evaluate it (valid and test)")
    add_data_flags(p)
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json, config.yaml, best_checkpoint/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a saved model folder on a dataset")
    p.add_argument("model", type=Path, help="a model folder (best_checkpoint/)")
    add_data_flags(p)
    p.add_argument("--split", nargs="+", choices=("valid", "test"), default=["valid", "test"])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("recommend", help="top-k items for histories given in your item ids")
    p.add_argument("model", type=Path, help="a model folder (best_checkpoint/)")
    p.add_argument("--history", nargs="+", required=True, help='one quoted, space-separated history per user')
    p.add_argument("-k", type=int, default=10)
    p.set_defaults(run=cmd_recommend)

    try:
        from tuner.cli import add_commands
    except ImportError:  # the tuner's dependencies (ray, optuna) are missing
        pass
    else:
        add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"simdiffrec {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"simdiffrec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
