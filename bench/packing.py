"""How many SimDiffRec trials to pack onto one GPU: total training throughput with 1, 2, 4, 8
trials side by side (the way `simdiffrec tune --trials-per-gpu K` packs them) against one alone.

    python bench/packing.py --data ../shared/data/Beauty.txt            # on a GPU machine
    python bench/packing.py --data ../shared/data/Beauty.txt --mps both # and again under NVIDIA MPS
    python bench/packing.py --tiny                                      # CPU smoke run, seconds

Each trial is a separate process running `simdiffrec.train` (training plus the validation pass
after every epoch, as in a search) on the same device; all of a round start together at a
barrier.  A trial's throughput is training sequences per second of wall time between its first
and last evaluation (the first epoch, with its start-up costs, is left out); a round's total is
the sum over its trials.  Trials per GPU-hour assume trials of --trial-epochs epochs (ASHA stops
most trials earlier, so a search gets through more).  `--mps on` runs the rounds with an NVIDIA
MPS control daemon started for them (`nvidia-cuda-mps-control -d`, stopped afterwards), so the
trials' kernels share the GPU at once instead of time-slicing; `--mps both` runs without, then with.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import subprocess
import sys
import time

import numpy as np
import torch

from simdiffrec.config import Config
from simdiffrec.data import SequenceData, load_data
from simdiffrec.device import resolve_device
from simdiffrec.train import Evaluation, train

TINY = dict(hidden=16, inner=32, steps=50, k_noise=3, k_sample=2, batch_size=32, max_len=10)


def trial(cfg: Config, data: SequenceData, barrier, results) -> None:
    """One trial's process: wait for the others, train, hand back (report times, peak memory)."""
    if cfg.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(1)  # as Ray gives a 1-CPU trial
    times: list[float] = []

    def report(ev: Evaluation) -> None:
        times.append(time.perf_counter())

    barrier.wait()
    train(cfg, data, report=report)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    results.put((times, peak))


def run_round(k: int, cfg: Config, data: SequenceData) -> tuple[list[float], float]:
    """Throughput (sequences/s) of each of k trials run together, and their peak memory (GiB)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=trial, args=(cfg, data, barrier, results)) for _ in range(k)]
    for p in procs:
        p.start()
    outcomes = [results.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a trial process failed (exit code {p.exitcode})")
    rows = len(data.train_lengths)
    rates = [rows * (len(times) - 1) / (times[-1] - times[0]) for times, _ in outcomes]
    return rates, max(peak for _, peak in outcomes)


@contextlib.contextmanager
def mps_daemon(enabled: bool):
    """An NVIDIA MPS control daemon for the processes started inside (nothing when not enabled)."""
    if not enabled:
        yield
        return
    subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True)
    try:
        yield
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, check=False)


def synthetic(n_users: int = 300, n_items: int = 100, seed: int = 0) -> SequenceData:
    """Users walking the items in order from random starts (as the tests' data)."""
    rng = np.random.default_rng(seed)
    starts, lengths = rng.integers(n_items, size=n_users), rng.integers(4, 13, size=n_users)
    return SequenceData.from_sequences([[(s + j) % n_items + 1 for j in range(n)] for s, n in zip(starts, lengths)],
                                       max_len=TINY["max_len"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="beauty", help="a data file or dataset name (default beauty)")
    parser.add_argument("--trials", default="1,2,4,8", help="trials per round (default 1,2,4,8)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial; the first is warm-up (default 4)")
    parser.add_argument("--trial-epochs", type=int, default=100,
                        help="length of a full trial, for trials per GPU-hour (default 100: ASHA's max_t)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on synthetic data, on the CPU")
    parser.add_argument("--mps", choices=("off", "on", "both"), default="off",
                        help="run the rounds under an NVIDIA MPS daemon (on), without (off) or both ways")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first is warm-up)")

    settings = dict(epochs=args.epochs, patience=args.epochs, eval_every=1)
    if args.tiny:
        data, cfg = synthetic(), Config(device="cpu", **TINY, **settings)
    else:
        data, cfg = load_data(args.data), Config(**settings)
    device = resolve_device(cfg.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = len(data.train_lengths)
    print(f"# packing on {name}: {args.data if not args.tiny else 'synthetic'} ({rows:,} training sequences), "
          f"{args.epochs} epochs per trial, torch {torch.__version__}")
    print("| MPS | trials | seq/s per trial | total seq/s | vs one alone | trials per GPU-hour | peak GiB per trial |")
    print("|---|---|---|---|---|---|---|")
    alone = None
    for mps in {"off": [False], "on": [True], "both": [False, True]}[args.mps]:
        with mps_daemon(mps):
            for k in (int(x) for x in args.trials.split(",")):
                rates, peak = run_round(k, cfg, data)
                total = sum(rates)
                alone = alone or total  # the first round (normally k=1 without MPS) is the reference
                per_hour = 3600 * total / (rows * args.trial_epochs)
                memory = "-" if np.isnan(peak) else f"{peak:.2f}"
                print(f"| {'on' if mps else 'off'} | {k} | {total / k:,.0f} | {total:,.0f} | {total / alone:.2f}x "
                      f"| {per_hour:.1f} | {memory} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
