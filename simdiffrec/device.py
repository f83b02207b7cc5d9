"""Which device a run uses and the precision it computes in there: shared by training,
evaluation and the benchmarks, so that every one of them computes the same numbers."""

from __future__ import annotations

import contextlib

import torch

from .config import Config


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; asking for CUDA where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine")
    return device


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (when cfg.amp); full precision elsewhere."""
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
