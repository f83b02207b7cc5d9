"""Which device a run uses and the precision it computes in there: shared by training,
evaluation and the benchmarks, so that every one of them computes the same numbers."""

from __future__ import annotations

import contextlib
import os

import torch

from .config import Config


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; asking for CUDA where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r}: not a device (auto, cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine")
    return device


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (when cfg.amp); full precision elsewhere."""
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_threads() -> int:
    """CPU threads when none are asked for: $OMP_NUM_THREADS if set; else 1 when the machine is
    busy (load average above half its cores), else up to 4.  torch's own default, every core,
    collapses when other jobs share them (BENCHMARKS.md, threads)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > cores / 2 else min(4, cores)


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads (None: `default_threads()`); returns the number used."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: must be at least 1")
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads
