"""`simdiffrec tune | tune-all | export`, added to simdiffrec's CLI by `add_commands`.

Ray and Optuna are imported inside the commands, so `simdiffrec --help` and `simdiffrec train`
stay fast.  Everything that can be wrong with the input (data, space file, flags) is checked
before Ray starts.  A search's folder OUT holds its exports plus `search.yaml` and `space.yaml`,
the settings it was started with: `--resume` continues with those, and refuses flags that
contradict them (only the resource flags may change, e.g. on another cluster).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from simdiffrec.cli import add_data_flags, load_for
from simdiffrec.config import Config

RECORD = "search.yaml"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's one-machine mode, every process on 127.0.0.1
STORAGE_ENV = "SIMDIFFREC_STORAGE"  # where experiments go by default, as NAME: set by cluster.yaml to an S3 URI
SPACE_COPY = "space.yaml"
# SearchSettings fields given as flags; None means "not given" (the default, or the record's on resume).
SEARCH_FLAGS = ("num_samples", "trials_per_gpu", "cpus_per_trial", "gpu", "max_concurrent", "seed",
                "optuna_storage", "max_failures")
RESOURCE_FLAGS = {"trials_per_gpu", "cpus_per_trial", "gpu"}  # may differ on resume


@dataclasses.dataclass
class Job:
    """One search: which data, which space, where its exports and its Ray experiment go."""

    data: str
    space: str | None  # a file or shipped name; None: the dataset's own space, else default
    out: Path
    experiment: str | None  # None: $SIMDIFFREC_STORAGE/NAME, else OUT/experiment
    columns: dict[str, str] = dataclasses.field(  # of a .csv/.parquet file
        default_factory=lambda: {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp"})


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune + Optuna + ASHA; export the best")
    add_data_flags(p)
    p.add_argument("--space", help="search space YAML file, or a shipped one's name "
                                   "(default: the dataset's own when --data names one, else default)")
    p.add_argument("--out", required=True, type=Path,
                   help="folder for best_config.yaml, best_checkpoint/, results.parquet")
    p.add_argument("--experiment", help="where Ray keeps the experiment: a folder or a URI such as "
                                        f"s3://bucket/simdiffrec/beauty (default ${STORAGE_ENV}/NAME with "
                                        "NAME the last part of OUT, else OUT/experiment)")
    _add_search_flags(p)
    p.set_defaults(run=cmd_tune)

    p = sub.add_parser("tune-all", help="one search per dataset, each with its own space; a summary table")
    p.add_argument("--datasets", required=True,
                   help="comma-separated dataset names (beauty,toys,...); NAME=PATH reads NAME's data from a file")
    p.add_argument("--out", required=True, type=Path, help="OUT/NAME/ per dataset, OUT/summary.md and .parquet")
    p.add_argument("--space-dir", type=Path, help="folder of NAME.yaml spaces (default: the shipped ones)")
    p.add_argument("--storage", help="folder or URI under which each experiment goes as NAME "
                                     f"(default ${STORAGE_ENV}, else OUT/NAME/experiment)")
    _add_search_flags(p)
    p.set_defaults(run=cmd_tune_all)

    p = sub.add_parser("export", help="write a search's exports from its experiment, running nothing")
    p.add_argument("experiment", help="the experiment folder or URI (tune's OUT/experiment)")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(run=cmd_export)


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search")
    g.add_argument("--num-samples", type=int, help="trials in all (default 20)")
    g.add_argument("--max-epochs", type=int, help="epochs of a trial that ASHA never stops (default: the space's)")
    g.add_argument("--trials-per-gpu", type=int, help="trials sharing one GPU: each asks for 1/N of it (default 1)")
    g.add_argument("--cpus-per-trial", type=float, help="(default 1)")
    g.add_argument("--gpu", choices=("auto", "always", "never"),
                   help="auto: GPU trials when the cluster has GPUs; always: also when an autoscaler has "
                        "none up yet; never: CPU trials (default auto)")
    g.add_argument("--max-concurrent", type=int, help="trials running at once (default 8)")
    g.add_argument("--seed", type=int, help="seed of Optuna's TPE sampler (default 0)")
    g.add_argument("--optuna-storage", help="database URL for the Optuna study, e.g. sqlite:///study.db, "
                                            "to watch it with optuna-dashboard (default: in memory)")
    g.add_argument("--max-failures", type=int, help="retries of a failed trial from its checkpoint (default 2)")
    g.add_argument("--ray-address", help="Ray cluster to join; auto: the one `ray start` began on this machine "
                                         "(default: RAY_ADDRESS, else a Ray of this search alone, on 127.0.0.1)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted search(es) in OUT")


def cmd_tune(args: argparse.Namespace) -> int:
    columns = {k: getattr(args, k) for k in ("user_col", "item_col", "time_col")}
    job = Job(args.data, args.space, args.out, args.experiment, columns)
    best = run_job(job, args, args.resume)
    _print_best(best, job.out)
    return 0


def cmd_tune_all(args: argparse.Namespace) -> int:
    from .export import markdown, summary, write_summary

    jobs = []
    for entry in filter(None, (e.strip() for e in args.datasets.split(","))):
        name, _, data = entry.partition("=")
        space = str(args.space_dir / f"{name}.yaml") if args.space_dir else None
        out = args.out / name
        experiment = f"{args.storage.rstrip('/')}/{name}" if args.storage else None
        jobs.append(Job(data or name, space, out, experiment))
    if not jobs:
        raise ValueError("--datasets: no dataset given")
    for job in jobs:  # every space must load before the first search starts
        _space_for(job)
    bests = {}
    for job in jobs:
        print(f"=== {job.out.name}", file=sys.stderr)
        resume = args.resume and (job.out / RECORD).exists()  # datasets not started yet start now
        bests[job.out.name] = run_job(job, args, resume)
        _print_best(bests[job.out.name], job.out)
    table = summary(bests)
    write_summary(table, args.out)
    print(markdown(table), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    _print_best(export(args.experiment, args.out), args.out)
    return 0


def run_job(job: Job, args: argparse.Namespace, resume: bool) -> dict[str, Any]:
    """Check, prepare the data, run (or resume) the search, export; return best_config's content."""
    address = args.ray_address or os.environ.get("RAY_ADDRESS")  # None: a Ray of this search alone
    _loopback_unless_joining(address)
    import ray

    from . import search
    from .export import export
    from .trainable import TrialSetup, make_trainable

    given = {k: getattr(args, k) for k in SEARCH_FLAGS}
    space, settings = _resumed(job, args.max_epochs, given) if resume else _new(job, args.max_epochs, given)
    data, stats = load_for(Config.from_dict(space.fixed, source=space.source),
                           argparse.Namespace(data=job.data, **job.columns))
    if not resume:
        job.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(space.source, job.out / SPACE_COPY)
        record = {"data": job.data, "columns": job.columns, "space": space.source,
                  "max_epochs": space.asha.max_epochs, "settings": dataclasses.asdict(settings)}
        (job.out / RECORD).write_text(yaml.safe_dump(record, sort_keys=False))
    if not ray.is_initialized():
        ray.init(address=address or "local")  # never a cluster that `ray start` left on this machine
    setup = TrialSetup(data=ray.put(data), data_info={"source": job.data, **stats}, space=space,
                       max_epochs=space.asha.max_epochs)
    search.run(make_trainable(setup), space, settings, resume=resume)
    return export(settings.experiment, job.out)


def _loopback_unless_joining(address: str | None) -> None:
    """A search that starts its own Ray keeps it on 127.0.0.1: without this, Ray's GCS, raylet and
    workers listen on every interface.  Not when joining a cluster, whose other nodes must reach
    the driver.  Ray reads the setting when first imported, so an already imported Ray (a caller's
    own ray.init) is left as it is."""
    if address is None and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")


def _new(job: Job, max_epochs: int | None, given: dict[str, Any]):
    """The space and settings of a search about to start."""
    from ray import tune

    from . import search, spaces

    if (job.out / RECORD).exists():  # a search that never got going may be started again
        started = yaml.safe_load((job.out / RECORD).read_text())["settings"]["experiment"]
        if tune.Tuner.can_restore(started):
            raise ValueError(f"{job.out} already holds a search: continue it with --resume, or choose another --out")
    space = spaces.load(_space_for(job)).with_max_epochs(max_epochs)
    settings = search.SearchSettings(experiment=job.experiment or _default_experiment(job.out),
                                     **{k: v for k, v in given.items() if v is not None})
    return space, settings


def _resumed(job: Job, max_epochs: int | None, given: dict[str, Any]):
    """The space and settings a search in OUT was started with; flags may change resources only."""
    from . import search, spaces

    if not (job.out / RECORD).is_file():
        raise FileNotFoundError(f"{job.out}: no search to resume ({RECORD} is missing)")
    record = yaml.safe_load((job.out / RECORD).read_text())
    started = {"data": record["data"], "columns": record["columns"], "space": record["space"],
               "max_epochs": record["max_epochs"], **record["settings"]}
    now = {"data": job.data, "columns": job.columns, "space": str(_space_for(job)) if job.space else None,
           "max_epochs": max_epochs, "experiment": job.experiment and search.absolute(job.experiment), **given}
    for key, value in now.items():
        if value is not None and key not in RESOURCE_FLAGS and value != started[key]:
            raise ValueError(f"{job.out} holds a search started with {key.replace('_', '-')} {started[key]!r}, "
                             f"not {value!r}: --resume continues it as it was started")
    space = spaces.load(job.out / SPACE_COPY).with_max_epochs(record["max_epochs"])
    resources = {k: v for k, v in given.items() if k in RESOURCE_FLAGS and v is not None}
    return space, search.SearchSettings(**{**record["settings"], **resources})


def _default_experiment(out: Path) -> str:
    root = os.environ.get(STORAGE_ENV)
    return f"{root.rstrip('/')}/{out.resolve().name}" if root else str(out / "experiment")


def _space_for(job: Job) -> Path:
    from . import spaces

    if job.space is not None:
        return spaces.find(job.space)
    return spaces.find(job.data if job.data in spaces.shipped() else "default")


def _print_best(best: dict[str, Any], out: Path) -> None:
    metrics = best["metrics"]
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["parameters"].items())
    print(f"best trial {best['trial']} at epoch {best['epoch']}: valid NDCG@10 {metrics['valid/NDCG@10']:.4f} "
          f"HR@10 {metrics['valid/HR@10']:.4f} ({params}) -> {out}")
