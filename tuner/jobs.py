"""A search as the command line starts it: check the input, record the settings, run or resume
the search, export.  Also `tune-all`'s one search per dataset.

Everything that can be wrong with the input (data, space file, settings) is checked before Ray
starts.  A search's folder OUT holds its exports plus `search.yaml` and `space.yaml`, the
settings it was started with: a resumed search continues with those, and refuses settings that
contradict them (only the resources may change, e.g. on another cluster).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simdiffrec.config import read_yaml, write_yaml
from simdiffrec.files import locked

from .protocol import RECORD, SPACE_COPY
from .settings import check as check_settings
from .signals import stop_on_sigterm

if TYPE_CHECKING:
    from .search import SearchSettings
    from .spaces import Space

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's one-machine mode, every process on 127.0.0.1
STORAGE_ENV = "SIMDIFFREC_STORAGE"  # where experiments go by default, as NAME: set by cluster.yaml to an S3 URI
# SearchSettings fields a user may give; None means "not given" (the default, or the record's on resume).
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
    name: str | None = None  # the dataset's name (tune-all's NAME=PATH): its shipped space, if any


@dataclasses.dataclass
class SearchRequest:
    """What the user asked of a search besides its Job: settings (None: not given) and where Ray runs."""

    settings: dict[str, Any]  # SEARCH_FLAGS -> value or None
    max_epochs: int | None = None
    resume: bool = False
    ray_address: str | None = None  # None: RAY_ADDRESS, else a Ray of this search alone


def parse_datasets(datasets: str) -> dict[str, str]:
    """`name,name=path,...` (--datasets) as name -> data (the path, else the name itself)."""
    parsed = {}
    for entry in filter(None, (e.strip() for e in datasets.split(","))):
        name, _, data = entry.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or set(name) == {"."}:
            raise ValueError(f"--datasets: {name!r} is not a plain name (letters, digits, '-', '_', '.'): "
                             "it names the folder OUT/NAME, which must stay inside --out")
        if name in parsed:
            raise ValueError(f"--datasets: {name} is given twice")
        parsed[name] = data or name
    if not parsed:
        raise ValueError("--datasets: no dataset given")
    return parsed


def plan_all(datasets: str, out: Path, space_dir: Path | None, storage: str | None) -> list[Job]:
    """tune-all's jobs from `name,name=path,...`; every space is checked before any search starts."""
    jobs = []
    for name, data in parse_datasets(datasets).items():
        space = str(space_dir / f"{name}.yaml") if space_dir else None
        experiment = f"{storage.rstrip('/')}/{name}" if storage else None
        jobs.append(Job(data, space, out / name, experiment, name=name))
    for job in jobs:
        space_for(job)
    return jobs


def run_all(jobs: list[Job], request: SearchRequest) -> dict[str, dict[str, Any]]:
    """One search per job, in turn; on resume, datasets not started yet start now."""
    bests = {}
    for job in jobs:
        print(f"=== {job.out.name}", file=sys.stderr)
        resume = request.resume and (job.out / RECORD).exists()
        bests[job.out.name] = run_job(job, dataclasses.replace(request, resume=resume))
    return bests


def run_job(job: Job, request: SearchRequest) -> dict[str, Any]:
    """Check, prepare the data, run (or resume) the search, export; return best_config's content.
    OUT is locked for the search's life, before anything in it is read or written.  The flags are
    checked first, before Ray or torch is imported."""
    check_settings(request.settings)
    with locked(job.out):
        return _run_job(job, request)


def _run_job(job: Job, request: SearchRequest) -> dict[str, Any]:
    address = prefer_loopback(request.ray_address)
    import ray

    from simdiffrec.config import Config
    from simdiffrec.data import fingerprint, load_and_describe

    from . import search
    from .experiment import export
    from .trainable import make_trainable, search_setup

    given, resume = request.settings, request.resume
    space, settings = (_resumed(job, request.max_epochs, given) if resume
                       else _new(job, request.max_epochs, given))
    fixed = Config.from_dict(space.fixed, source=space.source)
    data, stats = load_and_describe(job.data, max_len=space.data_max_len(), kcore=fixed.kcore, **job.columns)
    if resume:
        check_same_data(job.out / RECORD, fingerprint(data))
        grown(job.out / RECORD, settings.num_samples)
    else:
        job.out.mkdir(parents=True, exist_ok=True)
        write_yaml(job.out / SPACE_COPY, space.raw)  # its base merged in: a resume never reads a changed base
        record = {"data": job.data, "columns": job.columns, "fingerprint": fingerprint(data), "space": space.source,
                  "max_epochs": space.asha.max_epochs, "settings": dataclasses.asdict(settings)}
        write_yaml(job.out / RECORD, record)
    init_ray(address)
    setup = search_setup(ray.put(data), {"source": job.data, **stats}, space)
    search.run_search(make_trainable(setup), space, settings, resume=resume)
    return export(settings.experiment, job.out)


def check_same_data(record: Path, now: dict[str, Any]) -> None:
    """Refuse to resume a search on data other than it began with (its trials would go on
    training on the new data, or fail for its other number of items).  A record from before
    fingerprints were kept is trusted, with a warning."""
    started = read_yaml(record).get("fingerprint")
    if started is None:
        warnings.warn(f"{record} keeps no fingerprint of the search's data (an older search): "
                      "--resume cannot tell whether the data changed since it began")
        return
    changed = [f"{key} {str(started.get(key))[:12]} -> {str(value)[:12]}"
               for key, value in now.items() if started.get(key) != value]
    if changed:
        raise ValueError(f"{record}: the search began on other data ({', '.join(changed)}): "
                         "--resume continues a search on the data it began with")


def grown(record: Path, trials: int) -> None:
    """Record a search's new number of trials (`--resume --num-samples`) before it grows, so that
    `status` counts against it and a later `--resume` keeps it."""
    content = read_yaml(record)
    if content["settings"]["num_samples"] != trials:
        content["settings"]["num_samples"] = trials
        write_yaml(record, content)


def prefer_loopback(address: str | None) -> str | None:
    """The cluster to join (`address`, else RAY_ADDRESS), or None: a Ray of this run alone, which
    then keeps every process on 127.0.0.1 (without this, Ray's GCS, raylet and workers listen on
    every interface).  Ray reads the setting when first imported: call this before importing Ray;
    an already imported Ray (a caller's own ray.init) is left as it is."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    return address


def init_ray(address: str | None) -> None:
    """Join the cluster `address` (see `prefer_loopback`), else start a Ray of this run alone:
    never one that a `ray start` left on this machine."""
    import ray

    if not ray.is_initialized():
        quiet_ray()
        ray.init(address=address or "local", logging_level=logging.WARNING,
                 logging_config=ray.LoggingConfig(log_level="WARNING"))  # no worker's "Checkpoint ... created"
        stop_on_sigterm()  # ray.init's own handler exits mid-search with a crash dump


def quiet_ray() -> None:
    """Ray's console as plain as ours: no colour codes around its workers' lines outside a terminal,
    and not its notice that token authentication is on (its default, announced on every start; the
    warning that it is off stays)."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: not record.getMessage().startswith("Token authentication is enabled"))


def _new(job: Job, max_epochs: int | None, given: dict[str, Any]) -> tuple["Space", "SearchSettings"]:
    """The space and settings of a search about to start."""
    from ray import tune

    from . import search, spaces

    if (job.out / RECORD).exists():  # a search that never got going may be started again
        started = read_yaml(job.out / RECORD)["settings"]["experiment"]
        if tune.Tuner.can_restore(started):
            raise ValueError(f"{job.out} already holds a search: continue it with --resume, or choose another --out")
    space = spaces.load(space_for(job)).with_max_epochs(max_epochs)
    settings = search.SearchSettings(experiment=job.experiment or default_experiment(job.out),
                                     **{k: v for k, v in given.items() if v is not None})
    search.refuse_taken(settings)  # before OUT records it: --resume would follow it there
    return space, settings


def _resumed(job: Job, max_epochs: int | None, given: dict[str, Any]) -> tuple["Space", "SearchSettings"]:
    """The space and settings a search in OUT was started with; flags may change resources only."""
    from . import search, spaces

    if not (job.out / RECORD).is_file():
        raise FileNotFoundError(f"{job.out}: no search to resume ({RECORD} is missing)")
    record = read_yaml(job.out / RECORD)
    started = {"data": record["data"], "columns": record["columns"], "space": record["space"],
               "max_epochs": record["max_epochs"], **record["settings"]}
    now = {"data": job.data, "columns": job.columns, "space": str(space_for(job)) if job.space else None,
           "max_epochs": max_epochs, "experiment": job.experiment and search.absolute(job.experiment), **given}
    for key, value in now.items():
        if key == "num_samples" and value is not None and value < started[key]:
            raise ValueError(f"{job.out} holds a search of {started[key]} trials: --resume --num-samples "
                             f"{value} cannot shrink it (more trials grow it)")
        if value is not None and key not in RESOURCE_FLAGS | {"num_samples"} and value != started[key]:
            raise ValueError(f"{job.out} holds a search started with {key.replace('_', '-')} {started[key]!r}, "
                             f"not {value!r}: --resume continues it as it was started")
    space = spaces.load(job.out / SPACE_COPY).with_max_epochs(record["max_epochs"])
    changes = {k: v for k, v in given.items() if k in RESOURCE_FLAGS | {"num_samples"} and v is not None}
    return space, search.SearchSettings(**{**record["settings"], **changes})


def default_experiment(out: Path, name: str | None = None) -> str:
    """Where Ray keeps OUT's experiment: $SIMDIFFREC_STORAGE/NAME (NAME: OUT's last part), else OUT/experiment."""
    root = os.environ.get(STORAGE_ENV)
    return f"{root.rstrip('/')}/{name or out.resolve().name}" if root else str(out / "experiment")


def space_for(job: Job) -> Path:
    """The space file a job uses: its own, else the dataset's shipped one (by its name, else by
    --data naming one), else default."""
    from . import spaces

    if job.space is not None:
        return spaces.find(job.space)
    return spaces.find(next((n for n in (job.name, job.data) if n in spaces.shipped()), "default"))

