"""`simdiffrec train | evaluate | recommend | datasets | tune | tune-all | export | status | report |
finalize | reproduce`: the one face over the core (`simdiffrec`) and the search and retraining (`tuner`).

Nothing imports this module; it parses flags and calls one function of the core or the tuner per
command.  Heavy imports (torch, Ray, Optuna) happen inside the commands, so `--help` is fast and a
missing optional package is one line.  Settings come from, in rising priority: the defaults (the
paper's), `--config FILE.yaml`, then one flag per setting (`--alpha 0.4 --k-noise 25 ...`).  Bad
input ends with one line naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .config import Config, setting_type

if TYPE_CHECKING:
    from tuner.jobs import SearchRequest
    from tuner.retrain import RetrainRequest

COLUMNS = ("user_col", "item_col", "time_col")  # of a .csv/.parquet file
STORAGE_ENV = "SIMDIFFREC_STORAGE"  # tuner.jobs.STORAGE_ENV, named here without importing the tuner
def add_config_flags(parser: argparse.ArgumentParser, cls: type[Config] = Config) -> None:
    """One flag per Config field (`k_noise` -> `--k-noise`), defaulting to 'not given'; its help,
    choices and type come from the field (`config.setting`)."""
    group = parser.add_argument_group("model and training settings (defaults: the paper's)")
    group.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} (default {f.metadata['shown'] or f.default})"
        if setting_type(f) is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.metadata["choices"]:
            group.add_argument(flag, choices=f.metadata["choices"], default=None, help=text)
        else:
            kind = setting_type(f)
            group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=text)


def config_from_args(args: argparse.Namespace, cls: type[Config] = Config) -> Config:
    base = cls.load_yaml(args.config) if args.config else cls()
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None}
    return cls.from_dict({**base.to_dict(), **given}, source="command line")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="a file (.txt, .inter, .csv, .parquet) or a dataset name: demo (ships with the "
                             "package), beauty, toys, sports, ml-1m, yelp (`simdiffrec datasets` says what each needs)")
    parser.add_argument("--user-col", default="user_id", help="user column of a .csv/.parquet file")
    parser.add_argument("--item-col", default="item_id", help="item column of a .csv/.parquet file")
    parser.add_argument("--time-col", default="timestamp", help="time column of a .csv/.parquet file")


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: the $OMP_NUM_THREADS if set, else 1 on a busy "
                             "machine, else up to 4 cores; BENCHMARKS.md: on shared cores more threads "
                             "are slower)")


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer of at least 1")
    return int(text)


def numbers(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers of at least 1 (`3,7`)."""
    return tuple(positive(part.strip()) for part in text.split(","))


def columns(args: argparse.Namespace) -> dict[str, str]:
    return {k: getattr(args, k) for k in COLUMNS}


def cmd_train(args: argparse.Namespace) -> int:
    from .device import set_threads
    from .run_folder import train_into

    set_threads(args.threads)
    # Bars only on a terminal: in a log file their escape codes are noise; the epoch lines remain.
    result = train_into(Path(args.out), config_from_args(args), args.data, columns(args), resume=args.resume,
                        force=args.force, progress=not args.quiet and sys.stderr.isatty())
    print(f"best epoch {result.best_epoch}: valid HR@10 {result.valid['HR@10']:.4f} NDCG@10 {result.valid['NDCG@10']:.4f}"
          f" | test HR@10 {result.test['HR@10']:.4f} NDCG@10 {result.test['NDCG@10']:.4f}  -> {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .data import load_data
    from .device import resolve_device, set_threads
    from .evaluate import evaluate, scorer
    from .model_folder import load_model

    set_threads(args.threads)
    device = resolve_device(args.device)
    loaded = load_model(args.model, device)
    data = load_data(args.data, max_len=loaded.max_len, kcore=loaded.config.kcore, **columns(args))
    if data.n_items != loaded.model.n_items:
        raise ValueError(f"{args.data} has {data.n_items} items but the model in {args.model} was trained "
                         f"on {loaded.model.n_items}: not the same prepared data")
    if data.item_ids is not None and list(map(str, data.item_ids[1:])) != list(map(str, loaded.item_ids[1:])):
        raise ValueError(f"{args.data} numbers its items otherwise than the data the model in {args.model} "
                         "was trained on: not the same prepared data")
    score = scorer(loaded.config, loaded.model, device)  # as in training, so the numbers match the run's
    with torch.no_grad():
        metrics = {split: evaluate(score, getattr(data, split).to(device), mask_history=args.mask_history)
                   for split in args.split}
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from .model_folder import load_model, recommend

    loaded = load_model(args.model)
    for history, items in zip(args.history, recommend(loaded, [h.split() for h in args.history], args.k)):
        print(f"{history}\t{' '.join(map(str, items))}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from .datasets import listing

    print(listing(), end="")
    return 0


# --- the search (tuner/) --------------------------------------------------------------------

def search_request(args: argparse.Namespace, resume: bool | None = None) -> "SearchRequest":
    from tuner.jobs import SEARCH_FLAGS, SearchRequest

    return SearchRequest(settings={k: getattr(args, k) for k in SEARCH_FLAGS}, max_epochs=args.max_epochs,
                         resume=args.resume if resume is None else resume, ray_address=args.ray_address)


def cmd_tune(args: argparse.Namespace) -> int:
    from tuner.jobs import Job, run_job

    job = Job(args.data, args.space, args.out, args.experiment, columns(args))
    print_best(run_job(job, search_request(args)), job.out)
    return 0


def cmd_tune_all(args: argparse.Namespace) -> int:
    from tuner.experiment import markdown, summary, write_summary
    from tuner.jobs import plan_all, run_all

    jobs = plan_all(args.datasets, args.out, args.space_dir, args.storage)
    bests = run_all(jobs, search_request(args))
    for name, best in bests.items():
        print_best(best, args.out / name)
    table = summary(bests)
    write_summary(table, args.out)
    print(markdown(table), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tuner.experiment import export

    from .files import locked

    with locked(args.out):
        print_best(export(args.experiment, args.out), args.out)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tuner.status import format_status, load

    print(format_status(load(args.search), top=args.top), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tuner.report import write_report

    print(write_report(args.search, args.out, final=args.final, top=args.top))
    return 0


def print_best(best: dict[str, Any], out: Path) -> None:
    """A search's closing lines: its best trial, and the trials its epoch cap cut short."""
    from tuner.protocol import RECORD, study_name
    from tuner.status import load, rising

    from .config import read_yaml

    metrics = best["metrics"]
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["parameters"].items())
    print(f"best trial {best['trial']} at epoch {best['epoch']}: valid NDCG@10 {metrics['valid/NDCG@10']:.4f} "
          f"HR@10 {metrics['valid/HR@10']:.4f} ({params}) -> {out}")
    experiment = best["search"]["experiment"]
    note = rising(load(experiment))  # the search, wherever the exports went
    if note is not None:
        print(note)
    print(f"exports in {out}: best_config.yaml, best_checkpoint/, results.parquet; TensorBoard logs: "
          f"tensorboard --logdir {experiment}; a report: simdiffrec report {experiment} --out {out}/report")
    storage = read_yaml(out / RECORD)["settings"].get("optuna_storage") if (out / RECORD).is_file() else None
    if storage:
        print(f"the Optuna study {study_name(experiment)!r}, with each trial's learning curve: optuna-dashboard {storage}")


def add_search_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune + Optuna + ASHA; export the best")
    add_data_flags(p)
    p.add_argument("--space", help="search space YAML file, or a shipped one's name "
                                   "(default: the dataset's own when --data names one, else default)")
    p.add_argument("--out", required=True, type=Path,
                   help="folder for best_config.yaml, best_checkpoint/, results.parquet")
    p.add_argument("--experiment", help="where Ray keeps the experiment: a folder or a URI such as "
                                        f"s3://bucket/simdiffrec/beauty (default ${STORAGE_ENV}/NAME with "
                                        "NAME the last part of OUT, else OUT/experiment)")
    add_search_flags(p)
    p.set_defaults(run=cmd_tune)

    p = sub.add_parser("tune-all", help="one search per dataset, each with its own space; a summary table")
    p.add_argument("--datasets", required=True,
                   help="comma-separated dataset names (beauty,toys,...); NAME=PATH reads NAME's data from a file")
    p.add_argument("--out", required=True, type=Path, help="OUT/NAME/ per dataset, OUT/summary.md and .parquet")
    p.add_argument("--space-dir", type=Path, help="folder of NAME.yaml spaces (default: the shipped ones)")
    p.add_argument("--storage", help="folder or URI under which each experiment goes as NAME "
                                     f"(default ${STORAGE_ENV}, else OUT/NAME/experiment)")
    add_search_flags(p)
    p.set_defaults(run=cmd_tune_all)

    p = sub.add_parser("export", help="write a search's exports from its experiment, running nothing")
    p.add_argument("experiment", help="the experiment folder or URI (tune's OUT/experiment)")
    p.add_argument("--out", required=True, type=Path,
                   help="folder for best_config.yaml, best_checkpoint/, results.parquet")
    p.set_defaults(run=cmd_export)

    search_help = "the search's folder (tune's OUT) or its experiment folder or URI"
    p = sub.add_parser("status", help="a search's progress and leaderboard, also while it runs")
    p.add_argument("search", help=search_help)
    p.add_argument("--top", type=positive, default=10,
                   help="trials in the leaderboard (default 10); running ones are listed below them too")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("report", help="a search as an HTML page of figures: curves, importance, cost, final")
    p.add_argument("search", help=search_help)
    p.add_argument("--out", required=True, type=Path, help="folder for report.html and one PNG per figure")
    p.add_argument("--final", type=Path,
                   help="finalize's folder (default: final/ in the search's folder, else next to the experiment)")
    p.add_argument("--top", type=positive, default=10, help="trials in the leaderboard (default 10)")
    p.set_defaults(run=cmd_report)


def add_search_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search")
    g.add_argument("--num-samples", type=int, help="trials in all (default 20); with --resume, a larger number grows the search")
    g.add_argument("--max-epochs", type=int, help="epochs of a trial that ASHA never stops (default: the space's)")
    g.add_argument("--seed", type=int, help="seed of Optuna's TPE sampler (default 0)")
    g.add_argument("--optuna-storage", help="database URL for the Optuna study, e.g. sqlite:///study.db, "
                                            "to watch it with optuna-dashboard (default: in memory)")
    add_resource_flags(g, "continue the interrupted search(es) in OUT")


def add_resource_flags(g: argparse._ArgumentGroup, resume: str) -> None:
    """Where and how trials run: a search's, finalize's and reproduce's flags alike."""
    g.add_argument("--trials-per-gpu", type=int, help="trials sharing one GPU: each asks for 1/N of it (default 1)")
    g.add_argument("--cpus-per-trial", type=float, help="CPUs Ray reserves for each trial (default 1)")
    g.add_argument("--gpu", choices=("auto", "always", "never"),
                   help="auto: GPU trials when the cluster has GPUs; always: also when an autoscaler has "
                        "none up yet; never: CPU trials (default auto)")
    g.add_argument("--max-concurrent", type=int, help="trials running at once (default 8)")
    g.add_argument("--max-failures", type=int, help="retries of a failed trial from its checkpoint (default 2)")
    g.add_argument("--ray-address", help="Ray cluster to join; auto: the one `ray start` began on this machine "
                                         "(default: RAY_ADDRESS, else a Ray of this run alone, on 127.0.0.1)")
    g.add_argument("--resume", action="store_true", help=resume)


# --- retraining: finalize, reproduce (tuner/retrain.py) --------------------------------------

def retrain_request(args: argparse.Namespace) -> "RetrainRequest":
    from tuner.jobs import prefer_loopback

    prefer_loopback(args.ray_address)  # before Ray is imported (tuner.retrain imports it)
    from tuner.retrain import GRID_FLAGS, RetrainRequest

    return RetrainRequest(settings={k: getattr(args, k) for k in GRID_FLAGS if getattr(args, k) is not None},
                          max_epochs=args.max_epochs, patience=args.patience, resume=args.resume,
                          ray_address=args.ray_address)


def cmd_finalize(args: argparse.Namespace) -> int:
    request = retrain_request(args)
    from tuner.retrain import final_folder, finalize
    from tuner.status import locate

    experiment, search = locate(args.experiment)  # the search's folder, as status and report take it, or its experiment
    search = args.search or search
    out = final_folder(experiment, args.out or (search / "final" if search else None))
    table = finalize(experiment, out, args.seeds, args.top, request, search, args.trials)
    for _, row in table.iterrows():
        diff = "" if row["is_baseline"] else \
            f" ({row['test/NDCG@10_diff']:+.4f} vs {row['baseline']}, p={row['test/NDCG@10_p']:.2g})"
        print(f"{row['configuration']}: {int(row['seeds'])} seeds, test NDCG@10 {row['test/NDCG@10_mean']:.4f} "
              f"± {row['test/NDCG@10_std']:.4f}{diff}")
    print(f"-> {out}/final.md, final.parquet, final_runs.parquet, final_checkpoint/")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    request = retrain_request(args)
    from tuner.retrain import reproduce

    reproduce(args.datasets, args.out, args.seeds, request)
    print((args.out / "table.md").read_text(), end="")
    return 0


def add_retrain_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finalize", help="retrain a search's best configurations and SASRec at their settings "
                                        "with several seeds; mean ± std, paired tests, the final model")
    p.add_argument("experiment", help="the search's folder (tune's OUT), or its experiment folder or URI")
    p.add_argument("--seeds", type=int, default=5, help="runs per configuration (default 5; the paper ran ten)")
    p.add_argument("--top", type=int, default=3,
                   help="configurations to retrain, best valid NDCG@10 first (default 3)")
    p.add_argument("--trials", type=numbers, default=(), metavar="N[,N...]",
                   help="also retrain these trials, by the number `status` shows (#N), e.g. one still "
                        "improving when the search's epoch cap ended it")
    p.add_argument("--out", type=Path, help="folder for final.md, final.parquet, final_runs.parquet, "
                                            "final_checkpoint/ (default: the search's folder/final)")
    p.add_argument("--search", type=Path, help="the search's folder, holding search.yaml and space.yaml "
                                               "(default: EXPERIMENT's folder)")
    add_run_flags(p)
    p.set_defaults(run=cmd_finalize)

    p = sub.add_parser("reproduce", help="the paper's SASRec, SimDiffRec and ablations on its datasets, "
                                         "beside its numbers")
    p.add_argument("--datasets", required=True,
                   help="comma-separated dataset names (beauty,toys,...); NAME=PATH reads NAME's data from a file")
    p.add_argument("--seeds", type=int, default=5, help="runs per configuration (default 5; the paper ran ten)")
    p.add_argument("--out", required=True, type=Path, help="folder for table.md, table.parquet, runs.parquet")
    add_run_flags(p)
    p.set_defaults(run=cmd_reproduce)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runs")
    g.add_argument("--max-epochs", type=int,
                   help="epochs at most, if early stopping has not ended a run (default 200)")
    g.add_argument("--patience", type=int, help="epochs without a better valid NDCG@10 before a run stops "
                                                "(default: finalize 20, or the search's if longer; reproduce 10)")
    add_resource_flags(g, "continue the interrupted runs in OUT")


# --- the parser -----------------------------------------------------------------------------


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
    p.add_argument("--force", action="store_true", help="replace the run already in OUT (without it, "
                                                         "an OUT holding a run is refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (there are none when stderr "
                                                         "is not a terminal: per-epoch lines only)")
    add_threads_flag(p)
    add_config_flags(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a saved model folder on a dataset")
    p.add_argument("model", type=Path, help="a model folder (best_checkpoint/)")
    add_data_flags(p)
    p.add_argument("--split", nargs="+", choices=("valid", "test"), default=["valid", "test"],
                   help="the splits to evaluate (default both)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    add_threads_flag(p)
    p.add_argument("--mask-history", action=argparse.BooleanOptionalAction, default=True,
                   help="remove the user's history from the candidates "
                        "(--no-mask-history: keep it, as RecBole does)")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("recommend", help="top-k items for histories given in your item ids")
    p.add_argument("model", type=Path, help="a model folder (best_checkpoint/)")
    p.add_argument("--history", nargs="+", required=True, help='one quoted, space-separated history per user')
    p.add_argument("-k", type=int, default=10, help="items per history, never one of the history's own "
                                                      "(default 10)")
    p.set_defaults(run=cmd_recommend)

    p = sub.add_parser("datasets", help="the named datasets for --data: what each needs, its size and terms")
    p.set_defaults(run=cmd_datasets)

    add_search_commands(sub)
    add_retrain_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if "resume" in args:  # the long commands: SIGTERM ends them as Ctrl-C does
        from tuner.signals import stop_on_sigterm

        stop_on_sigterm()
    try:
        with warnings.catch_warnings():  # a warning is one line too
            warnings.showwarning = lambda message, *_: print(f"simdiffrec {args.command}: warning: {message}",
                                                             file=sys.stderr)
            return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"simdiffrec {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # an optional piece (Ray, Optuna, ...) is not installed
        print(f"simdiffrec {args.command}: error: needs the Python package {err.name!r}, which is not "
              f"installed (pip install -e . installs every dependency)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or tuner.signals.Stopped (SIGTERM too)
        signum = getattr(err, "signum", signal.SIGINT)
        hint = ""
        if "resume" in args:  # the commands that take --resume: what was done is kept
            hint = f"; continue with: simdiffrec {shlex.join(argv + ['--resume'] * (not args.resume))}"
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"simdiffrec {args.command}: {how}{hint}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
